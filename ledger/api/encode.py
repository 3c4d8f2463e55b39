"""Domain values -> protobuf responses."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ledger.domain.accounts import Account, AccountKey
from ledger.domain.transfers import Entry, TransferRecord
from ledger.storage.shard import TransferView
from ledger.v1 import ledger_pb2 as pb


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def account_ref(key: AccountKey | None) -> pb.AccountRef | None:
    if key is None:
        return None
    return pb.AccountRef(merchant_id=key.merchant_id, account_id=key.account_id)


def account(a: Account) -> pb.Account:
    b = a.balances
    return pb.Account(
        ref=account_ref(a.key),
        currency=a.spec.currency,
        debits_must_not_exceed_credits=a.spec.debits_must_not_exceed_credits,
        credits_must_not_exceed_debits=a.spec.credits_must_not_exceed_debits,
        closed=a.closed,
        metadata=dict(a.spec.metadata),
        debits_posted=b.debits_posted,
        credits_posted=b.credits_posted,
        debits_pending=b.debits_pending,
        credits_pending=b.credits_pending,
        created_at=timestamp(a.created_at),
    )


def transfer(record: TransferRecord) -> pb.Transfer:
    r = record.request
    return pb.Transfer(
        id=r.id,
        debit_account=account_ref(r.debit),
        credit_account=account_ref(r.credit),
        amount_minor=r.amount_minor,
        currency=r.currency,
        action=int(r.action),  # type: ignore[arg-type]
        pending_id=r.pending_id,
        timeout_ms=r.timeout_ms,
        linked=r.linked,
        reversal_of=r.reversal_of,
        metadata=dict(r.metadata),
        created_at=timestamp(record.created_at),
    )


def transfer_view(view: TransferView) -> pb.TransferRecord:
    return pb.TransferRecord(
        transfer=transfer(view.record),
        result=int(view.record.result),  # type: ignore[arg-type]
        pending_state=int(view.pending_state or 0),  # type: ignore[arg-type]
        expires_at=timestamp(view.record.expires_at),
    )


def entry(e: Entry) -> pb.Entry:
    b = e.balances_after
    return pb.Entry(
        sequence=e.sequence,
        transfer_id=e.transfer.transfer_id,
        direction=int(e.direction),  # type: ignore[arg-type]
        kind=int(e.kind),  # type: ignore[arg-type]
        amount_minor=e.amount_minor,
        debits_posted=b.debits_posted,
        credits_posted=b.credits_posted,
        debits_pending=b.debits_pending,
        credits_pending=b.credits_pending,
        created_at=timestamp(e.created_at),
    )

"""Domain values -> protobuf responses."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ledger.domain.accounts import Account, AccountKey
from ledger.domain.chain import epoch_micros
from ledger.domain.sagas import Saga, SagaStep
from ledger.domain.transfers import Entry, TransferRecord
from ledger.storage.shard import TransferView
from ledger.v1 import ledger_pb2 as pb


def timestamp(value: datetime | None) -> Timestamp | None:
    # Integer microseconds (cached per moment: a batch's items share one), not
    # Timestamp.FromDatetime, which costs a time tuple and calendar.timegm per call.
    if value is None:
        return None
    micros = epoch_micros(value)
    return Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


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
        trace_id=record.trace_id,
    )


def transfer_view(view: TransferView) -> pb.TransferRecord:
    summary = None
    if view.saga is not None:
        summary = pb.SagaSummary(
            state=int(view.saga.state),  # type: ignore[arg-type]
            attempts=view.saga.attempts,
            last_error=view.saga.last_error,
            credit_shard=view.saga.peer_shard,
        )
    return pb.TransferRecord(
        transfer=transfer(view.record),
        result=int(view.record.result),  # type: ignore[arg-type]
        pending_state=int(view.pending_state or 0),  # type: ignore[arg-type]
        expires_at=timestamp(view.record.expires_at),
        saga=summary,
    )


def saga(s: Saga, steps: list[SagaStep] | None = None) -> pb.Saga:
    return pb.Saga(
        ref=pb.SagaRef(
            merchant_id=s.key.merchant_id,
            transfer_id=s.key.transfer_id,
            kind=int(s.key.kind),  # type: ignore[arg-type]
        ),
        state=int(s.state),  # type: ignore[arg-type]
        next_step=s.next_step,
        debit_shard=s.home_shard,
        credit_shard=s.peer_shard,
        debit_account=account_ref(s.debit),
        credit_account=account_ref(s.credit),
        amount_minor=s.amount_minor or s.pending_minor,
        currency=s.currency,
        result=int(s.result or 0),  # type: ignore[arg-type]
        attempts=s.attempts,
        next_attempt_at=timestamp(s.next_attempt_at),
        last_error=s.last_error,
        created_at=timestamp(s.created_at),
        steps=[
            pb.SagaStep(step=st.step, outcome=st.outcome, detail=st.detail, at=timestamp(st.at))
            for st in steps or []
        ],
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
        hash=e.hash,
        transfer_merchant_id=e.transfer.merchant_id,
    )

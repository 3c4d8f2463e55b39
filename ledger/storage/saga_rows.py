"""Saga rows -> domain Saga."""

from __future__ import annotations

import asyncpg

from ledger.domain.accounts import AccountKey
from ledger.domain.sagas import CreditAction, CreditOutcome, Saga, SagaKey, SagaKind, SagaState
from ledger.domain.transfers import TransferResult


def saga_from_row(row: asyncpg.Record, home_shard: str) -> Saga:
    return Saga(
        key=SagaKey(row["merchant_id"], row["transfer_id"], SagaKind(row["kind"])),
        state=SagaState(row["state"]),
        next_step=row["next_step"],
        home_shard=home_shard,
        peer_shard=row["peer_shard"],
        debit=AccountKey(row["merchant_id"], row["debit_account_id"]),
        credit=AccountKey(row["credit_merchant_id"], row["credit_account_id"]),
        currency=row["currency"],
        credit_action=CreditAction(row["credit_action"]),
        amount_minor=row["amount_minor"],
        pending_minor=row["pending_minor"],
        pending_id=row["pending_id"],
        result=TransferResult(row["result"]) if row["result"] else None,
        credit_outcome=CreditOutcome(row["credit_outcome"]) if row["credit_outcome"] else None,
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        version=row["version"],
        trace_context=row["trace_context"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        path_position=row["path_position"],
        reversal_of=row["reversal_of"],
    )

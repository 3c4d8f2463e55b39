"""The chaos checker's model of a hold that a move folded into a local one.

Chaos seed 315 (the first run after holds between merchants that come to share
a shard became local) reported 12 idempotency violations, all of one shape: a
folded hold had expired on its one shard, releasing its credit side under its
own id, while the checker expected the credit side to be released only by an
EXPIRE saga's step 2, which a local expiry has none of. The checker now reads
`sagas.settles_locally`; here is its expectation for each way such a hold ends.
"""

from __future__ import annotations

import pytest

from chaos.checker import CheckReport, Effect, SagaRow, Snapshot, TransferRow, expected_effects
from chaos.plan import Ref
from ledger.domain.sagas import CreditAction, CreditOutcome, SagaKind, SagaState
from ledger.domain.transfers import PendingState, RecordKind, TransferAction, TransferResult

HOLD = ("m-payer", "hold-1")
PAYER = Ref("m-payer", "cash")
PAYEE = Ref("m-payee", "sales")
AMOUNT_MINOR = 300


def snapshot(*, settles_locally: bool, resolution: PendingState | None) -> Snapshot:
    snap = Snapshot()
    snap.transfers[HOLD] = TransferRow(
        "shard-b",
        HOLD,
        RecordKind.TRANSFER,
        TransferAction.PENDING,
        PAYER,
        PAYEE,
        AMOUNT_MINOR,
        AMOUNT_MINOR,
        "USD",
        "",
        0,
        False,
        TransferResult.IN_PROGRESS,
    )
    snap.sagas[(HOLD, SagaKind.TRANSFER)] = SagaRow(
        "shard-b",
        HOLD,
        SagaKind.TRANSFER,
        SagaState.COMPLETED,
        "shard-a",
        PAYEE,
        CreditAction.PENDING,
        AMOUNT_MINOR,
        0,
        "",
        TransferResult.OK,
        1,
        "",
        settles_locally,
    )
    snap.credits[(HOLD, SagaKind.TRANSFER)] = CreditOutcome.APPLIED
    if resolution is not None:
        snap.resolutions[HOLD] = resolution
    return snap


@pytest.mark.parametrize(
    ("settles_locally", "resolution", "payee_pending_minor"),
    [
        # Open, folded or not: held on both sides.
        (False, None, AMOUNT_MINOR),
        (True, None, AMOUNT_MINOR),
        # Expired as a local hold: released on both sides under its own id.
        (True, PendingState.EXPIRED, 0),
        # Expired cross-shard: the credit side waits for its EXPIRE saga's step 2.
        (False, PendingState.EXPIRED, AMOUNT_MINOR),
    ],
)
def test_the_hold_itself_holds_until_it_expires_where_it_settles(
    settles_locally: bool, resolution: PendingState | None, payee_pending_minor: int
) -> None:
    report = CheckReport()
    expected = expected_effects(
        snapshot(settles_locally=settles_locally, resolution=resolution), report
    )
    assert report.violations == []
    payer_pending_minor = 0 if resolution is PendingState.EXPIRED else AMOUNT_MINOR
    assert expected.get((PAYER, HOLD), Effect()) == Effect(debits_pending=payer_pending_minor)
    assert expected.get((PAYEE, HOLD), Effect()) == Effect(credits_pending=payee_pending_minor)

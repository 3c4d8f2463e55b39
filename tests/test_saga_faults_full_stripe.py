"""The saga crash-point test of tests/test_saga_faults.py, each transfer sent past
a settlement stripe that one transfer of 2^63-1 filled (docs/sagas.md, "Stripes
that fill"): whatever the crash, every step finds the transfer's legs on the
accounts of its own that its first steps made, and it ends OK exactly once.
A cluster of its own (three shard servers and the service as a process), so the
filled stripe stays out of the other module's tests."""

from __future__ import annotations

import asyncpg
import pytest

from ledger import faults
from ledger.domain.sagas import SETTLEMENT_MERCHANT_ID, settlement_stripe
from ledger.limits import AMOUNT_MINOR_MAX
from ledger.v1 import ledger_pb2 as pb
from tests.process_cluster import ProcessCluster
from tests.support import ref, transfer, transfers, uid
from tests.test_saga_faults import (
    CREDIT_SHARD,
    DEBIT_SHARD,
    converges_after_a_crash_at,
    payer_and_payee,
    saga_cluster,  # noqa: F401 (the module's own cluster)
)

FILLED_STRIPE = 3
CANDIDATES = 10_000
# Entries naming a transfer on settlement accounts of one transfer's own.
OWN_ENTRIES = """
SELECT count(*) FROM entries WHERE merchant_id = $1 AND account_id LIKE '%/t-%'
AND transfer_merchant_id = $2 AND transfer_id = $3
"""


def on_filled_stripe(prefix: str) -> str:
    return next(
        i for i in (uid(prefix) for _ in range(CANDIDATES)) if settlement_stripe(i) == FILLED_STRIPE
    )


@pytest.fixture(scope="module")
async def filled_stripe(saga_cluster: ProcessCluster) -> None:  # noqa: F811
    """Fills the stripe's sides that a transfer from the debit to the credit shard takes."""
    whale, payee = await payer_and_payee(saga_cluster)
    assert saga_cluster.service.stub is not None
    answers = await transfers(
        saga_cluster.service.stub,
        transfer(on_filled_stripe("f"), ref(whale, "cash"), ref(payee, "sales"), AMOUNT_MINOR_MAX),
    )
    assert [a.result for a in answers] == [pb.TRANSFER_RESULT_OK], answers


@pytest.mark.parametrize("point", [p for p in faults.POINTS if p.startswith("saga.")])
async def test_transfer_past_a_full_stripe_converges_after_the_service_crashes_at(
    saga_cluster: ProcessCluster,  # noqa: F811
    filled_stripe: None,
    point: str,
) -> None:
    payer, payee = await payer_and_payee(saga_cluster)
    transfer_id = on_filled_stripe("t")
    await converges_after_a_crash_at(saga_cluster, point, payer, payee, transfer_id)
    config = saga_cluster.shards.config()
    found = {}
    for spec in config.shards:
        if spec.name in (DEBIT_SHARD, CREDIT_SHARD):
            conn = await asyncpg.connect(spec.dsn)
            try:
                found[spec.name] = await conn.fetchval(
                    OWN_ENTRIES, SETTLEMENT_MERCHANT_ID, payer, transfer_id
                )
            finally:
                await conn.close()
    # Reserved, then released and posted on the debit shard; debited on the credit shard.
    assert found == {DEBIT_SHARD: 3, CREDIT_SHARD: 1}, found

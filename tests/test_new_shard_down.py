"""A merchant whose new shard is down is served by its old shard until it moves.

Under a config change, the ring already places a merchant on its new shard while
the rebalance has not moved it yet: its old shard still owns and serves it. Before,
when that new shard could not be reached, every call for the merchant was answered
SHARD_UNAVAILABLE, and a cross-shard transfer to it reserved the money and then
waited for the new shard to come back before crediting it (SagaRunner._credit_owner
took the ring's shard as the owner). Now routing asks the shard the previous config
placed the merchant on, once (Cluster.previous_owner_if_down); that shard serves the
merchant if it still owns it, and names the owner if it does not.
"""

from __future__ import annotations

import grpc
import pytest

from ledger.routing.ring import ShardRing
from ledger.v1 import ledger_pb2 as pb
from tests.ledger4 import ALL_SHARDS, Ledger4
from tests.support import ref, transfer, uid
from tests.test_rebalance import (
    RPC_TIMEOUT_S,
    all_balances,
    assert_reconciled,
    create_merchants,
    merchants_moving,
    staying_merchant,
    switch_and_rebalance,
)

CROSS_MINOR = 500
LOCAL_MINOR = 70


async def test_a_merchant_not_moved_yet_is_served_by_its_old_shard_while_its_new_one_is_down(
    ledger4: Ledger4,
) -> None:
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (payee,) = merchants_moving(old, new, 1, destination="shard-d")
    old_home = ShardRing(old).shard_for(payee)
    payer = staying_merchant(old, new, on=False, shard=old_home)
    await create_merchants(service, [payer, payee])
    await ledger4.switch_to(new)

    async with ledger4.refusing_connections("shard-d"):
        cross = transfer(uid("nd"), ref(payer, "cash"), ref(payee, "sales"), CROSS_MINOR)
        local = transfer(uid("nd"), ref(payee, "cash"), ref(payee, "sales"), LOCAL_MINOR)
        for item in (cross, local):
            response = await service.stub.CreateTransfers(
                pb.CreateTransfersRequest(transfers=[item]), timeout=RPC_TIMEOUT_S
            )
            assert [r.result for r in response.results] == [pb.TRANSFER_RESULT_OK], response
        # A linked chain goes to the old shard whole (chaos seed 322: its items went
        # one by one, the first alone, and only it was stored).
        chain = [
            transfer(uid("nd"), ref(payee, "cash"), ref(payee, "sales"), LOCAL_MINOR),
            transfer(uid("nd"), ref(payee, "sales"), ref(payee, "cash"), LOCAL_MINOR),
        ]
        chain[0].linked = True
        response = await service.stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=chain), timeout=RPC_TIMEOUT_S
        )
        assert [r.result for r in response.results] == [pb.TRANSFER_RESULT_OK] * 2, response
        balances = await all_balances(service, [payer, payee])
        assert balances[(payee, "sales")] == (LOCAL_MINOR, CROSS_MINOR + 2 * LOCAL_MINOR, 0, 0)
        assert balances[(payee, "cash")] == (2 * LOCAL_MINOR, LOCAL_MINOR, 0, 0)
        assert balances[(payer, "cash")] == (CROSS_MINOR, 0, 0, 0)

    summary = await switch_and_rebalance(ledger4, new)
    assert payee in {r.move.merchant_id for r in summary.results if r.outcome == "moved"}
    await assert_reconciled(ledger4, new, "reconcile.toml", every_mirror_checked=True)


async def test_a_merchant_on_its_new_shard_is_unavailable_while_that_shard_is_down_never_missing(
    ledger4: Ledger4,
) -> None:
    """One moved to the new shard, and one created there after the config change: the
    old shard refuses the first with its owner's name and has no record of the
    second. Either way the call ends UNAVAILABLE (retryable, nothing written), with
    no ping-pong between the two shards, and a read never answers that the merchant's
    accounts or transfers do not exist (a caller could take that at its word)."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    moved, created = merchants_moving(old, new, 2, destination="shard-d")
    await create_merchants(service, [moved])
    summary = await switch_and_rebalance(ledger4, new)
    assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(moved, "moved")]
    await create_merchants(service, [created])
    made: dict[str, pb.Transfer] = {}
    for merchant in (moved, created):
        made[merchant] = transfer(uid("nd"), ref(merchant, "cash"), ref(merchant, "sales"), 1)
        response = await service.stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=[made[merchant]]), timeout=RPC_TIMEOUT_S
        )
        assert [r.result for r in response.results] == [pb.TRANSFER_RESULT_OK], response

    async with ledger4.refusing_connections("shard-d"):
        for merchant in (moved, created):
            again = transfer(uid("nd"), ref(merchant, "cash"), ref(merchant, "sales"), 1)
            calls = {
                "CreateTransfers": service.stub.CreateTransfers(
                    pb.CreateTransfersRequest(transfers=[again]), timeout=RPC_TIMEOUT_S
                ),
                "LookupAccounts": service.stub.LookupAccounts(
                    pb.LookupAccountsRequest(refs=[ref(merchant, "cash")]), timeout=RPC_TIMEOUT_S
                ),
                "GetBalance": service.stub.GetBalance(
                    pb.GetBalanceRequest(account=ref(merchant, "cash")), timeout=RPC_TIMEOUT_S
                ),
                "LookupTransfers": service.stub.LookupTransfers(
                    pb.LookupTransfersRequest(
                        refs=[pb.TransferRef(merchant_id=merchant, transfer_id=made[merchant].id)]
                    ),
                    timeout=RPC_TIMEOUT_S,
                ),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (name, refused.value)
    balances = await all_balances(service, [moved, created])
    assert {m: balances[(m, "cash")] for m in (moved, created)} == {
        moved: (1, 0, 0, 0),
        created: (1, 0, 0, 0),
    }

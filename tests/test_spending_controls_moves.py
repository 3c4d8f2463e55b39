"""Spending controls and merchant moves: a limited merchant moves while transfers race
its limit; its limits, their history, its velocity counters, its monitors and their
crossings move with it, are verified like the rest, and the limit holds throughout."""

from __future__ import annotations

import asyncio

import grpc

from ledger.storage.moves import MoveStore
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.ledger4 import ALL_SHARDS, Ledger4
from tests.support import RPC_TIMEOUT_S, ref, transfer, uid
from tests.test_rebalance import create_merchants, merchants_moving, opened

COUNT_LIMIT = 15
WORKERS = 8
TRANSFERS_PER_WORKER = 5
AMOUNT_MINOR = 3
# A call that meets the move's pause is retried with the same id (exactly once).
ATTEMPTS_MAX = 5


async def test_a_limit_holds_while_its_merchant_moves_and_its_controls_move_with_it(
    ledger4: Ledger4,
) -> None:
    service = ledger4.service
    admin = ledger_pb2_grpc.LedgerAdminServiceStub(service.channel)
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (merchant_id,) = merchants_moving(old, new, 1, destination="shard-d")
    await create_merchants(service, [merchant_id])
    monitor = pb.BalanceMonitor(
        monitor_id=uid("mon"), balance=pb.MONITORED_BALANCE_NET_POSTED, threshold_minor=-20
    )
    await admin.SetAccountLimits(
        pb.SetAccountLimitsRequest(
            account=ref(merchant_id, "cash"),
            change_id="limits-1",
            reason="move test",
            limits=pb.AccountLimits(
                velocity_rules=[
                    pb.VelocityRule(
                        rule_id="burst",
                        direction=pb.DIRECTION_DEBIT,
                        metric=pb.VELOCITY_METRIC_COUNT,
                        window_s=3600,
                        limit=COUNT_LIMIT,
                    ),
                    pb.VelocityRule(
                        rule_id="daily",
                        direction=pb.DIRECTION_DEBIT,
                        metric=pb.VELOCITY_METRIC_AMOUNT,
                        window_s=86_400,
                        limit=10_000,
                    ),
                ],
                monitors=[monitor],
            ),
        ),
        timeout=RPC_TIMEOUT_S,
    )

    done: list[int] = []
    started = asyncio.Event()

    async def send(transfer_id: str) -> int:
        item = transfer(transfer_id, ref(merchant_id, "cash"), ref(merchant_id, "sales"), 3)
        for attempt in range(ATTEMPTS_MAX):
            try:
                response = await service.stub.CreateTransfers(
                    pb.CreateTransfersRequest(transfers=[item]), timeout=RPC_TIMEOUT_S
                )
                done.append(response.results[0].result)
                if len(done) >= WORKERS:
                    started.set()
                return response.results[0].result
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == ATTEMPTS_MAX - 1:
                    raise
        raise AssertionError("unreachable")

    async def worker() -> list[int]:
        return [await send(uid("t")) for _ in range(TRANSFERS_PER_WORKER)]

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        racing = asyncio.gather(*(worker() for _ in range(WORKERS)))
        # The move starts with the race under way (some of the window spent on the old
        # shard), and the race goes on through the move's pause and after it.
        await asyncio.wait_for(started.wait(), timeout=RPC_TIMEOUT_S)
        summary = await rebalancer.rebalance()
        results = [r for batch in await racing for r in batch]
        assert {r.move.merchant_id for r in summary.moved} == {merchant_id}, summary.render()
        assert await MoveStore(rebalancer.shards["shard-d"]).state_of(merchant_id) == (
            "active",
            None,
        )
        # The verified digests cover the controls too: the copies agree.
        source = MoveStore(rebalancer.shards[service.ring.shard_for(merchant_id)])
        moved_to = MoveStore(rebalancer.shards["shard-d"])
        assert (await source.digest(merchant_id)).limits_md5 == (
            await moved_to.digest(merchant_id)
        ).limits_md5

    assert results.count(pb.TRANSFER_RESULT_OK) == COUNT_LIMIT
    assert set(results) == {pb.TRANSFER_RESULT_OK, pb.TRANSFER_RESULT_EXCEEDS_VELOCITY_LIMIT}
    # On the new shard: the same window, the same limits and history, the crossing.
    one_more = transfer(uid("t"), ref(merchant_id, "cash"), ref(merchant_id, "sales"), 1)
    response = await service.stub.CreateTransfers(
        pb.CreateTransfersRequest(transfers=[one_more]), timeout=RPC_TIMEOUT_S
    )
    assert response.results[0].result == pb.TRANSFER_RESULT_EXCEEDS_VELOCITY_LIMIT
    assert response.results[0].refused_by_rule == "burst"
    got = await admin.GetAccountLimits(
        pb.GetAccountLimitsRequest(account=ref(merchant_id, "cash")), timeout=RPC_TIMEOUT_S
    )
    assert [c.change_id for c in got.history] == ["limits-1"]
    assert [r.rule_id for r in got.limits.velocity_rules] == ["burst", "daily"]
    crossings = await admin.ListMonitorCrossings(
        pb.ListMonitorCrossingsRequest(merchant_id=merchant_id), timeout=RPC_TIMEOUT_S
    )
    # 15 x 3 = 45 debited: net posted fell below -20 once.
    assert [c.direction for c in crossings.crossings] == [pb.MONITOR_CROSSING_DIRECTION_FELL_BELOW]

"""Over its concurrency limit the server refuses at once with RESOURCE_EXHAUSTED, then recovers.

Calls are made slow deterministically, not by timing: a direct connection holds a row lock on
the debit account, so the calls the server admits block inside PostgreSQL until the test lets go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from ledger import limits
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.config import ShardConfig
from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    balance,
    create_accounts,
    fresh_databases,
    ref,
    result_names,
    start_service,
    transfer,
    transfers,
    uid,
    wait_until,
    write_config,
)

CONCURRENT_RPCS_MAX = 2
CALLS = 10
AMOUNT_MINOR = 7
# Refusals must not wait for the lock; far below the shard command timeout (10 s) that would
# otherwise end the blocked calls.
REFUSAL_LATENCY_S_MAX = 5.0


@pytest.fixture
async def small_service(pg_server: EmbeddedPostgres, tmp_path: Path) -> AsyncIterator[Service]:
    """A service of its own that admits only CONCURRENT_RPCS_MAX calls at a time."""
    specs = fresh_databases(pg_server, ("shard-a", "shard-b", "shard-c"))
    path = write_config(tmp_path / "shards.toml", ShardConfig(epoch=1, shards=tuple(specs)))
    service = await start_service(path, concurrent_rpcs_max=CONCURRENT_RPCS_MAX)
    try:
        yield service
    finally:
        await service.stop()


async def lock_waiters(watcher: asyncpg.Connection) -> int:
    """Backends of this database waiting for a heavyweight lock (a row lock, here)."""
    return int(
        await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


async def timed(call: object) -> tuple[float, object]:
    """Awaits an RPC; returns (when it finished, response or the AioRpcError it raised)."""
    try:
        outcome: object = await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        outcome = error
    return time.monotonic(), outcome


def code_of(outcome: object) -> grpc.StatusCode:
    return outcome.code() if isinstance(outcome, grpc.aio.AioRpcError) else grpc.StatusCode.OK


async def test_calls_over_the_limit_get_resource_exhausted_at_once_and_the_service_recovers(
    small_service: Service,
) -> None:
    service = small_service
    m = uid("m")
    cash, wallet = ref(m, "cash"), ref(m, "wallet")
    await create_accounts(service.stub, account(m, "cash"), account(m, "wallet"))
    dsn = service.cluster.shard_for(m).dsn
    locker = await asyncpg.connect(dsn)
    # pg_stat_activity is a snapshot per transaction, so it is read from a connection of its own.
    watcher = await asyncpg.connect(dsn)
    calls: list[asyncio.Task[tuple[float, object]]] = []
    try:
        hold = locker.transaction()
        await hold.start()
        locked = await locker.fetchval(
            "SELECT account_id FROM accounts WHERE merchant_id = $1 AND account_id = $2 FOR UPDATE",
            m,
            "cash",
        )
        assert locked == "cash"
        assert await lock_waiters(watcher) == 0

        ids = [uid("t") for _ in range(CALLS)]
        started = time.monotonic()
        calls = [
            asyncio.create_task(
                timed(
                    service.stub.CreateTransfers(
                        pb.CreateTransfersRequest(
                            transfers=[transfer(i, cash, wallet, AMOUNT_MINOR)]
                        ),
                        timeout=RPC_TIMEOUT_S,
                    )
                )
            )
            for i in ids
        ]

        # Admitted calls for one shard share group-commit transactions: as many
        # transactions as may run at once wait on the lock, the rest queue behind them.
        lock_waits = min(CONCURRENT_RPCS_MAX, limits.group_commit_batches_in_flight_max)

        async def admitted_calls_block_on_the_lock() -> bool:
            return await lock_waiters(watcher) == lock_waits

        async def the_rest_are_answered() -> bool:
            return sum(c.done() for c in calls) == CALLS - CONCURRENT_RPCS_MAX

        await wait_until(admitted_calls_block_on_the_lock, what="admitted calls wait on the lock")
        await wait_until(the_rest_are_answered, what="calls over the limit are answered")

        # Still holding the lock: the refused calls did not wait for it.
        refused = [c.result() for c in calls if c.done()]
        assert [code_of(o) for _, o in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * len(
            refused
        ), [o for _, o in refused]
        assert max(when for when, _ in refused) - started < REFUSAL_LATENCY_S_MAX
        in_flight = [c for c in calls if not c.done()]
        assert len(in_flight) == CONCURRENT_RPCS_MAX
        assert await lock_waiters(watcher) == lock_waits

        await hold.rollback()
        admitted = [outcome for _, outcome in await asyncio.gather(*in_flight)]
        for outcome in admitted:
            assert isinstance(outcome, pb.CreateTransfersResponse), outcome
            assert result_names(outcome.results) == ["TRANSFER_RESULT_OK"]
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await locker.close()
        await watcher.close()

    every_code = [code_of(c.result()[1]) for c in calls]
    assert grpc.StatusCode.INTERNAL not in every_code and grpc.StatusCode.UNKNOWN not in every_code
    assert every_code.count(grpc.StatusCode.OK) == CONCURRENT_RPCS_MAX, every_code

    # Recovered: once the finished calls have left the server, a new call is admitted and works.
    async def admits_calls_again() -> bool:
        try:
            await service.stub.GetBalance(pb.GetBalanceRequest(account=cash), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                return False
            raise
        return True

    await wait_until(admits_calls_again, what="the server admits calls again")
    after = await transfers(service.stub, transfer(uid("t"), cash, wallet, AMOUNT_MINOR))
    assert result_names(after) == ["TRANSFER_RESULT_OK"]

    # Exactly the admitted calls and the new one moved money; refused calls recorded nothing.
    wallet_now = await balance(service.stub, m, "wallet")
    assert wallet_now.credits_posted == (CONCURRENT_RPCS_MAX + 1) * AMOUNT_MINOR
    refused_ids = [i for i, code in zip(ids, every_code, strict=True) if code != grpc.StatusCode.OK]
    found = await service.stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=m, transfer_id=i) for i in refused_ids]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert list(found.transfers) == []

"""A replica's worker 0 looks for work other processes left; its other workers
(ledger serve --workers N) only react to their own, so an idle replica pays for
one poller, not N (issue 18: idle CPU). Real shards, a real gRPC channel."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.config import ShardConfig
from ledger.v1 import ledger_pb2 as pb
from tests.conftest import SHARD_NAMES
from tests.support import (
    Service,
    account,
    background_wake_times,
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


@pytest.fixture(params=[True, False], ids=["worker-0", "other-worker"])
async def worker(
    request: pytest.FixtureRequest,
    pg_server: EmbeddedPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Service]:
    specs = fresh_databases(pg_server, SHARD_NAMES)
    path = tmp_path_factory.mktemp("config") / "shards.toml"
    write_config(path, ShardConfig(epoch=1, shards=tuple(specs)))
    running = await start_service(path, polls_for_others=request.param)
    try:
        yield running
    finally:
        await running.stop()


async def test_only_worker_0_wakes_by_the_clock_when_nothing_is_due(worker: Service) -> None:
    polls = worker.server.sequencer.idle_poll_s != math.inf
    wakes = await background_wake_times(worker.server)
    assert len(wakes) == 2
    for name, sleeps_until in wakes.items():
        # Worker 0 wakes within the idle poll; the others only when woken.
        assert math.isinf(sleeps_until) is not polls, name
    assert worker.server.recovery.refreshes_gauges is polls


async def test_a_worker_that_does_not_poll_still_expires_its_own_holds(worker: Service) -> None:
    m = uid("m")
    await create_accounts(
        worker.stub,
        account(m, "bank"),
        account(m, "customer", no_overdraft=True),
        account(m, "shop"),
    )
    funded = await transfers(
        worker.stub, transfer(uid("f"), ref(m, "bank"), ref(m, "customer"), 500)
    )
    assert result_names(funded) == ["TRANSFER_RESULT_OK"]
    hold = transfer(
        uid("p"),
        ref(m, "customer"),
        ref(m, "shop"),
        500,
        action=pb.TRANSFER_ACTION_PENDING,
        timeout_ms=200,
    )
    assert result_names(await transfers(worker.stub, hold)) == ["TRANSFER_RESULT_OK"]

    async def released() -> bool:
        return (await balance(worker.stub, m, "customer")).debits_pending == 0

    # The hold's timeout woke this worker's sweeper: no poll was needed.
    await wait_until(released, what="the hold's expiry by the worker that made it")

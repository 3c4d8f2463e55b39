"""Retention of the event stream: pruned only up to what registered consumers
acknowledged, and a consumer too far behind is told so (issue 20)."""

from __future__ import annotations

import os

import grpc
import pytest

from ledger.storage.events import EventStore
from ledger.v1 import ledger_pb2 as pb
from tests.auth_support import run_cli
from tests.event_support import collect_until, marked
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    error_reason,
    ref,
    transfer,
    transfers,
    uid,
)


async def _prune_everything_allowed(service: Service) -> int:
    """Retention with no minimum age and a generous bound: prunes what consumers allow."""
    pruned = 0
    for shard in service.cluster.shards.values():
        _, count = await EventStore(shard).retain(
            lag_events_max=10**9, lag_s_max=10**9, retention_s_min=0.0, prune_max=10**6
        )
        pruned += count
    return pruned


async def test_events_are_pruned_only_up_to_what_a_registered_consumer_acknowledged(
    service: Service,
) -> None:
    stub = service.stub
    m = service.merchant_on("shard-a")
    await create_accounts(stub, account(m, "a"), account(m, "b"))
    # Registering (from the oldest event) holds everything for this consumer.
    await collect_until(stub, pb.SubscribeEventsRequest(consumer="books"), 1)
    for i in range(5):
        await transfers(stub, transfer(uid("t"), ref(m, "a"), ref(m, "b"), i + 1))
    events = await marked(stub, [m], pb.SubscribeEventsRequest(merchant_id=m))
    assert await _prune_everything_allowed(service) == 0, "nothing acknowledged yet"
    halfway = events[3]
    acked = await stub.AckEvents(
        pb.AckEventsRequest(consumer="books", cursor=halfway.cursor), timeout=RPC_TIMEOUT_S
    )
    assert acked.acknowledged.positions["shard-a"] == halfway.position
    assert await _prune_everything_allowed(service) > 0
    oldest, _ = await EventStore(service.cluster.shards["shard-a"]).bounds()
    assert oldest == halfway.position + 1, "pruned exactly up to the acknowledgement"
    # A cursor before what is kept is refused, never silently skipped ...
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect_until(
            stub, pb.SubscribeEventsRequest(after=pb.EventCursor(positions={"shard-a": 0})), 1
        )
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_reason(caught.value) == "EVENTS_PRUNED"
    # ... and the consumer resumes from what it acknowledged.
    resumed = await collect_until(
        stub, pb.SubscribeEventsRequest(after=halfway.cursor, merchant_id=m), 1
    )
    assert resumed[0].event_id == events[4].event_id


async def test_a_consumer_past_the_retention_bound_lapses_and_is_told_so(
    service: Service,
) -> None:
    stub = service.stub
    m = service.merchant_on("shard-b")
    await stub.AckEvents(
        pb.AckEventsRequest(consumer="slow", cursor=pb.EventCursor(positions={"shard-b": 0})),
        timeout=RPC_TIMEOUT_S,
    )
    await create_accounts(stub, account(m, "a"), account(m, "b"))
    await transfers(stub, transfer(uid("t"), ref(m, "a"), ref(m, "b"), 3))
    await marked(stub, [m], pb.SubscribeEventsRequest(merchant_id=m))
    store = EventStore(service.cluster.shards["shard-b"])
    lapsed, _ = await store.retain(
        lag_events_max=1, lag_s_max=10**9, retention_s_min=10**9, prune_max=0
    )
    assert "slow" in lapsed
    lags = {c.consumer: c for c in await store.consumers()}
    assert lags["slow"].lapsed and lags["slow"].lag_events > 1
    for call in (
        stub.AckEvents(
            pb.AckEventsRequest(consumer="slow", cursor=pb.EventCursor(positions={"shard-b": 9})),
            timeout=RPC_TIMEOUT_S,
        ),
        collect_until(stub, pb.SubscribeEventsRequest(consumer="slow"), 1),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(caught.value) == "CONSUMER_LAPSED"
    assert await store.drop("slow")
    await stub.AckEvents(
        pb.AckEventsRequest(consumer="slow", cursor=pb.EventCursor(positions={"shard-b": 1})),
        timeout=RPC_TIMEOUT_S,
    )


async def test_the_sequencer_reports_each_consumers_lag(service: Service) -> None:
    stub = service.stub
    m = service.merchant_on("shard-c")
    await stub.AckEvents(
        pb.AckEventsRequest(consumer="gauge", cursor=pb.EventCursor(positions={"shard-c": 0})),
        timeout=RPC_TIMEOUT_S,
    )
    await create_accounts(stub, account(m, "a"))
    await marked(stub, [m], pb.SubscribeEventsRequest(merchant_id=m))
    await service.server.sequencer.retain_now()
    lags = service.server.sequencer.lags()
    assert lags[("gauge", "shard-c")] >= 2


async def test_acknowledging_positions_not_given_yet_stops_at_the_last_one(
    service: Service,
) -> None:
    stub = service.stub
    m = service.merchant_on("shard-c")
    await create_accounts(stub, account(m, "a"))
    (event,) = await marked(stub, [m], pb.SubscribeEventsRequest(merchant_id=m))
    ahead = pb.EventCursor(positions={"shard-c": event.position + 10**6})
    acked = await stub.AckEvents(
        pb.AckEventsRequest(consumer="eager", cursor=ahead), timeout=RPC_TIMEOUT_S
    )
    _, last = await EventStore(service.cluster.shards["shard-c"]).bounds()
    assert event.position <= acked.acknowledged.positions["shard-c"] == last


async def test_the_consumers_command_shows_lag_and_lapse_and_drops_a_consumer_everywhere(
    service: Service,
) -> None:
    stub = service.stub
    consumer = uid("cli-")
    m = service.merchant_on("shard-c")
    await stub.AckEvents(
        pb.AckEventsRequest(consumer=consumer, cursor=pb.EventCursor(positions={"shard-c": 0})),
        timeout=RPC_TIMEOUT_S,
    )
    await create_accounts(stub, account(m, "a"), account(m, "b"))
    await marked(stub, [m], pb.SubscribeEventsRequest(merchant_id=m))
    store = EventStore(service.cluster.shards["shard-c"])
    lapsed, _ = await store.retain(
        lag_events_max=1, lag_s_max=10**9, retention_s_min=10**9, prune_max=0
    )
    assert consumer in lapsed
    lag = {c.consumer: c for c in await store.consumers()}[consumer].lag_events
    config = ["--config", str(service.config_path)]

    listed = await run_cli(["events", "consumers", *config], os.environ)
    assert listed.returncode == 0, listed.stderr
    row = next(line.split() for line in listed.stdout.splitlines() if consumer in line)
    assert row[:4] == ["shard-c", consumer, "0", str(lag)] and row[5] == "LAPSED", row

    dropped = await run_cli(["events", "consumers", *config, "--drop", consumer], os.environ)
    assert dropped.returncode == 0, dropped.stderr
    assert f"shard-c: dropped {consumer!r}" in dropped.stdout
    assert f"shard-a: no {consumer!r}" in dropped.stdout
    assert consumer not in {c.consumer for c in await store.consumers()}

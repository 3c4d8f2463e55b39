"""Retention of the event stream: pruned only up to what registered consumers
acknowledged, and a consumer too far behind is told so (issue 20)."""

from __future__ import annotations

import json
import os

import asyncpg
import grpc
import pytest

from ledger import limits
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.storage import event_statements as event_sql
from ledger.storage.events import EventStore
from ledger.storage.migrate import apply_migrations
from ledger.v1 import ledger_pb2 as pb
from tests.auth_support import run_cli
from tests.event_support import collect_until, marked
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    error_reason,
    fresh_databases,
    ref,
    scans_of,
    transfer,
    transfers,
    uid,
    wait_until,
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


async def test_numbering_goes_on_while_a_retention_pass_waits(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention ran inside the sequencer's loop, so a slow pass held back every
    event's numbering, hence its delivery (p99 1.5 s at half the peak)."""
    shard = service.cluster.shards["shard-a"]
    m = service.merchant_on("shard-a")
    await create_accounts(service.stub, account(m, "a"), account(m, "b"))
    monkeypatch.setattr(limits, "event_retention_interval_s", 0.0)
    store = EventStore(shard)
    blocker = await asyncpg.connect(shard.dsn)
    try:
        async with blocker.transaction():
            # Every retention pass on this shard now waits here (it lapses consumers first).
            await blocker.execute("LOCK TABLE event_consumers IN ACCESS EXCLUSIVE MODE")
            await wait_until(
                lambda: _waiting_on_lock(blocker), what="a retention pass waiting on the lock"
            )
            _, last_before = await store.bounds()
            await transfers(service.stub, transfer(uid("t"), ref(m, "a"), ref(m, "b"), 5))

            async def numbered() -> bool:
                return (await store.bounds())[1] > last_before

            # Well before the blocked pass's statement times out (the old loop went
            # on only then): numbering must not wait for it at all.
            await wait_until(
                numbered,
                deadline_s=limits.shard_command_timeout_s / 2,
                what="the transfer's event numbered",
            )
    finally:
        await blocker.close()


async def _waiting_on_lock(blocker: asyncpg.Connection[asyncpg.Record]) -> bool:
    return bool(
        await blocker.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = "
            "'event_consumers'::regclass"
        )
    )


async def test_a_prune_pass_reads_only_the_old_head_of_the_stream_and_prunes_it(
    pg_server: EmbeddedPostgres,
) -> None:
    """A pass read every retained event when none was old enough: a day's stream every
    10 s, with the sequencer waiting behind it (delivery p99 1.5 s at half the peak).
    Then it read the prune_max oldest (10,000) every pass, to delete none until the
    stream was a day old. It reads what it deletes and the event after."""
    (spec,) = fresh_databases(pg_server, ["prune"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations(conn)
        retained, old, prune_max = 3_000, 30, 1_000
        # Positions in commit order; the oldest `old` are two days old, one kept
        # departure (kind 17) among them, which no pass prunes.
        # Written as the sequencer leaves them (migration 0016): outbox rows, numbered.
        await conn.execute(
            """
            WITH written AS (
                INSERT INTO event_outbox (kind, merchant_id, merchant_ids, transfer_id, body,
                                          committed_at)
                SELECT CASE WHEN g = 5 THEN $3 ELSE 1 END, 'm', ARRAY['m'], 't' || g, '{}',
                       CASE WHEN g <= $2 THEN now() - interval '2 days' ELSE now() END
                FROM generate_series(1, $1) AS g
                RETURNING id
            )
            INSERT INTO event_numbers (position, outbox_id)
            SELECT row_number() OVER (ORDER BY id), id FROM written
            """,
            retained,
            old,
            event_sql.KEPT_KIND,
        )
        await conn.execute("DELETE FROM event_queue")
        await conn.execute("UPDATE event_positions SET last_position = $1", retained)
        # As shard connections plan (SHARD_SERVER_SETTINGS): the generic plan of the
        # form before hash-joined every event.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        explaining = conn.transaction()
        await explaining.start()
        try:  # EXPLAIN ANALYZE deletes: rolled back
            explained = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {event_sql.PRUNE_EVENTS}", 86_400.0, prune_max
            )
        finally:
            await explaining.rollback()
        read, _ = scans_of(json.loads(explained)[0]["Plan"], "event_numbers")
        # The old head walked (the kept row on the way, the first young event to
        # stop), then the doomed again by index; never the 2,970 young events (the
        # form before read prune_max of them, the one before that every one, twice).
        assert read <= 2 * old + 2, f"a pass read {read} events of {retained}"
        bodies, _ = scans_of(json.loads(explained)[0]["Plan"], "event_outbox")
        assert bodies <= 2 * old + 2, f"a pass read {bodies} outbox rows of {retained}"
        status = await conn.execute(event_sql.PRUNE_EVENTS, 86_400.0, prune_max)
        assert status == f"DELETE {old - 1}", "every old event but the kept departure"
        assert await conn.fetchval("SELECT count(*) FROM events") == retained - (old - 1)
        assert await conn.fetchval("SELECT count(*) FROM events WHERE position = 5") == 1
        # The numbers and the bodies go together.
        assert await conn.fetchval("SELECT count(*) FROM event_outbox") == retained - (old - 1)
        # Nothing old is left: a pass looks at the kept departure and the first
        # young event, and stops.
        explained = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {event_sql.PRUNE_EVENTS}", 86_400.0, prune_max
        )
        read, _ = scans_of(json.loads(explained)[0]["Plan"], "event_numbers")
        assert read <= 3, f"a pass with nothing to prune read {read} events"
        assert await conn.fetchval("SELECT count(*) FROM events") == retained - (old - 1)
    finally:
        await conn.close()

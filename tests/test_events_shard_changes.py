"""The event stream as an admin grows and shrinks the cluster (issue 20): a live
subscription follows a shard added after it opened; the rebalance that fills a new
shard registers every live consumer there; a shard leaves routing only once every
registered consumer acknowledged its stream to the end, and cursors that name it
still resume afterwards."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from ledger.moves.rebalance import ShardPinned
from ledger.routing.config import ShardConfig
from ledger.routing.ring import ShardRing
from ledger.storage.events import EventStore
from ledger.v1 import ledger_pb2 as pb
from tests.event_support import collect_until, kinds
from tests.ledger4 import ALL_SHARDS, FIRST_SHARDS, Ledger4, merchant_on
from tests.support import (
    WAIT_DEADLINE_S,
    account,
    create_accounts,
    ref,
    transfer,
    transfers,
    uid,
    wait_until,
    write_config,
)
from tests.test_moves_settle_routing import rebalance_to
from tests.test_rebalance import opened

# Calls at once with a cursor naming a shard no config has.
BOGUS_CURSOR_BURST = 20


async def grow_to_four(env: Ledger4) -> ShardConfig:
    """Epoch 2 adds shard-d, loaded and rebalanced; no merchant of the test is placed
    there yet, so nothing moves."""
    four = env.config(2, ALL_SHARDS)
    await env.switch_to(four)
    async with opened(four) as rebalancer:
        assert (await rebalancer.rebalance()).results == []
    return four


async def drain_shard_d(env: Ledger4) -> None:
    """Epoch 3 marks shard-d draining, loaded and rebalanced until it is DRAINED."""
    draining = env.config(3, ALL_SHARDS, states={"shard-d": "draining"})
    await env.switch_to(draining)
    async with opened(draining) as rebalancer:
        summary = await rebalancer.rebalance()
    assert summary.finished and "DRAINED shard-d" in summary.render(), summary.render()


async def test_a_live_subscription_follows_a_merchant_onto_a_shard_added_after_it_opened(
    ledger4: Ledger4,
) -> None:
    env, stub = ledger4, ledger4.service.stub
    grown = env.config(2, ALL_SHARDS)
    mover = merchant_on(grown, "shard-d")
    home = ShardRing(env.service.cluster.config).shard_for(mover)
    await create_accounts(stub, account(mover, "cash"), account(mover, "sales"))
    home_shard = env.service.cluster.shards[home]

    async def numbered() -> bool:
        return (await EventStore(home_shard).outbox_backlog())[0] == 0

    # "Now" is the last event numbered: the accounts' creations, committed but numbered
    # a sequencer round later, came after it (failed twice in full runs).
    await wait_until(numbered, what="the accounts' creations numbered")
    got: list[pb.Event] = []
    call = stub.SubscribeEvents(pb.SubscribeEventsRequest(merchant_id=mover, from_now=True))
    paid_there = uid("there")

    async def follow() -> None:
        async for event in call:
            got.append(event)
            if event.transfer.id == paid_there:
                return

    following = asyncio.create_task(follow())
    feed = env.service.server.feed

    async def started() -> bool:
        return feed.subscriptions > 0

    # And "now" is when the service starts the subscription, not when the call is
    # made: the move must begin after that.
    try:
        await wait_until(started, what="the subscription to start")
        await rebalance_to(env, grown, mover)
        assert env.service.cluster.ring.shard_for(mover) == "shard-d"
        await transfers(stub, transfer(paid_there, ref(mover, "cash"), ref(mover, "sales"), 5))
        await asyncio.wait_for(following, WAIT_DEADLINE_S)
    finally:
        call.cancel()
    assert kinds(got) == ["MERCHANT_MOVED_OUT", "MERCHANT_MOVED_IN", "TRANSFER_POSTED"]
    assert [e.shard for e in got] == [home, "shard-d", "shard-d"]


async def test_a_rebalance_registers_every_live_consumer_on_the_shard_it_adds(
    ledger4: Ledger4,
) -> None:
    """Retention keeps a shard's events only for the consumers registered there: one
    that was offline while a new shard filled must find its events all kept."""
    env, stub = ledger4, ledger4.service.stub
    first = {name: 0 for name in env.service.cluster.shards}
    await stub.AckEvents(
        pb.AckEventsRequest(consumer="books", cursor=pb.EventCursor(positions=first))
    )
    grown = env.config(2, ALL_SHARDS)
    await env.switch_to(grown)
    async with opened(grown) as rebalancer:
        summary = await rebalancer.rebalance()
    assert summary.consumers_carried == [("shard-d", "books")]
    assert "registered event consumer 'books' on shard shard-d" in summary.render()
    states = await EventStore(env.service.cluster.shards["shard-d"]).consumers()
    assert [(c.consumer, c.position, c.lapsed) for c in states] == [("books", 0, False)]
    # Nothing on shard-d is acknowledged: every event there waits for the consumer.
    async with opened(grown) as again:
        assert (await again.rebalance()).consumers_carried == []


async def test_a_consumer_dropped_while_a_rebalance_carries_it_does_not_come_back(
    ledger4: Ledger4, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin drops a consumer on every shard between the rebalance's read of the
    consumers and its registration on the new shard: the registration must not
    resurrect it there, where it would hold every event and refuse retirement."""
    env, stub = ledger4, ledger4.service.stub
    first = {name: 0 for name in env.service.cluster.shards}
    for consumer in ("books", "gone"):
        await stub.AckEvents(
            pb.AckEventsRequest(consumer=consumer, cursor=pb.EventCursor(positions=first))
        )
    grown = env.config(2, ALL_SHARDS)
    await env.switch_to(grown)
    register = EventStore.register
    dropped: list[str] = []

    async def drop_first(self: EventStore, consumer: str, *, position: int) -> int:
        if not dropped:
            # The drop of `ledger events consumers --drop gone`, on every shard.
            for shard in env.service.cluster.shards.values():
                await EventStore(shard).drop("gone")
            dropped.append("gone")
        return await register(self, consumer, position=position)

    monkeypatch.setattr(EventStore, "register", drop_first)
    async with opened(grown) as rebalancer:
        summary = await rebalancer.rebalance()
    assert dropped == ["gone"]
    assert summary.consumers_carried == [("shard-d", "books")]
    for shard in env.service.cluster.shards.values():
        states = await EventStore(shard).consumers()
        assert [c.consumer for c in states] == ["books"], shard.name


async def test_a_shard_retires_only_once_every_consumer_has_its_whole_stream(
    ledger4: Ledger4,
) -> None:
    """Replicas stop reading a retired shard: events a registered consumer had not
    acknowledged there would never reach it. Retiring waits for the consumers, and a
    cursor naming the retired shard resumes (it used to be refused: UNKNOWN_SHARD)."""
    env, stub = ledger4, ledger4.service.stub
    four = await grow_to_four(env)
    on_d = merchant_on(four, "shard-d")
    await create_accounts(stub, account(on_d, "cash"), account(on_d, "sales"))
    await transfers(stub, transfer(uid("t"), ref(on_d, "cash"), ref(on_d, "sales"), 9))
    everywhere = pb.EventCursor(positions={name: 0 for name in ALL_SHARDS})
    await stub.AckEvents(pb.AckEventsRequest(consumer="books", cursor=everywhere))

    await drain_shard_d(env)

    retired = env.config(4, ALL_SHARDS, states={"shard-d": "retired"})
    shard_d = env.service.cluster.shards["shard-d"]

    async def numbered() -> bool:
        return (await EventStore(shard_d).outbox_backlog())[0] == 0

    await wait_until(numbered, what="shard-d's events numbered")
    async with opened(retired) as rebalancer:
        with pytest.raises(ShardPinned, match="not acknowledged to its end by 'books'"):
            await rebalancer.rebalance()
    # The consumer reads shard-d to its end (its last event: the merchant's departure).
    _, last_d = await EventStore(shard_d).bounds()
    events = await collect_until(
        stub,
        pb.SubscribeEventsRequest(after=everywhere, consumer="books"),
        lambda e: e.shard == "shard-d" and e.position == last_d,
    )
    assert kinds(events)[-1] == "MERCHANT_MOVED_OUT"
    await stub.AckEvents(pb.AckEventsRequest(consumer="books", cursor=events[-1].cursor))

    await env.switch_to(retired)
    async with opened(retired) as rebalancer:
        assert (await rebalancer.rebalance()).results == []
    assert "shard-d" not in env.service.cluster.shards
    # The consumer's cursor still names shard-d: it resumes, and sees new events.
    marker = uid("after")
    await create_accounts(stub, account(on_d, marker))
    resumed = await collect_until(
        stub,
        pb.SubscribeEventsRequest(after=events[-1].cursor, consumer="books"),
        lambda e: e.kind == pb.EVENT_KIND_ACCOUNT_CREATED and e.account.ref.account_id == marker,
    )
    assert "shard-d" not in {e.shard for e in resumed}
    # A consumer acknowledges the cursors it is given: shard-d's part is passed over.
    acked = await stub.AckEvents(pb.AckEventsRequest(consumer="books", cursor=resumed[-1].cursor))
    assert set(acked.acknowledged.positions) == set(FIRST_SHARDS)
    # The cursors given keep naming it where the consumer left it, so a stream open
    # when the shard is made active again goes on there, after what it had read.
    assert resumed[-1].cursor.positions["shard-d"] == last_d
    back_on_d: list[pb.Event] = []
    call = stub.SubscribeEvents(pb.SubscribeEventsRequest(after=resumed[-1].cursor))

    async def follow() -> None:
        async for event in call:
            if event.shard == "shard-d":
                back_on_d.append(event)
                return

    following = asyncio.create_task(follow())
    try:
        active = env.config(5, ALL_SHARDS)
        await env.switch_to(active)
        async with opened(active) as rebalancer:
            assert on_d in {r.move.merchant_id for r in (await rebalancer.rebalance()).moved}
        await asyncio.wait_for(following, WAIT_DEADLINE_S)
    finally:
        call.cancel()
    assert [(e.position, kinds([e])) for e in back_on_d] == [(last_d + 1, ["MERCHANT_MOVED_IN"])]


async def test_a_shard_down_does_not_hold_back_acknowledgements_on_the_others(
    ledger4: Ledger4,
) -> None:
    """AckEvents went shard by shard and stopped at the first that could not be
    reached, so a consumer's progress on the shards after it was not recorded: one
    shard down held back retention, and retiring a shard, everywhere (chaos: a drained
    shard could not retire while the acknowledgements kept failing on another)."""
    env, stub = ledger4, ledger4.service.stub
    for name in FIRST_SHARDS:
        m = env.service.merchant_on(name)
        await create_accounts(stub, account(m, "cash"))
    lasts: dict[str, int] = {}

    async def numbered() -> bool:
        for name, shard in env.service.cluster.shards.items():
            lasts[name] = (await EventStore(shard).bounds())[1]
        return all(lasts.values())

    await wait_until(numbered, what="an event numbered on every shard")
    start = pb.EventCursor(positions=dict.fromkeys(FIRST_SHARDS, 0))
    await stub.AckEvents(pb.AckEventsRequest(consumer="books", cursor=start))
    async with env.refusing_connections("shard-a"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.AckEvents(
                pb.AckEventsRequest(consumer="books", cursor=pb.EventCursor(positions=lasts))
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shard-a" in (refused.value.details() or "")
    for name in ("shard-b", "shard-c"):
        states = await EventStore(env.service.cluster.shards[name]).consumers()
        assert [(c.consumer, c.position) for c in states] == [("books", lasts[name])], name


async def test_a_cursor_naming_a_shard_being_retired_is_acknowledged_while_its_pool_closes(
    ledger4: Ledger4,
) -> None:
    """A replica loading the config that retires a shard took the shard out of its pools
    and then awaited the pool's close before it took the new config: meanwhile the shard
    was neither served nor retired, so AckEvents refused a cursor naming it as naming no
    shard of the cluster (chaos seed 35, CI). The pool's close waits for a connection
    held here, which keeps the replica in that window for as long as the test needs."""
    env, stub = ledger4, ledger4.service.stub
    await grow_to_four(env)
    await drain_shard_d(env)
    cluster = env.service.cluster
    pool = cluster.shards["shard-d"].pool
    held = await pool.acquire()
    retired = env.config(4, ALL_SHARDS, states={"shard-d": "retired"})
    write_config(env.config_path, retired)
    try:

        async def closing() -> bool:
            return "shard-d" not in cluster.shards

        await wait_until(closing, what="the replica to close shard-d's pool")
        everywhere = pb.EventCursor(positions={name: 0 for name in ALL_SHARDS})
        acked = await stub.AckEvents(pb.AckEventsRequest(consumer="books", cursor=everywhere))
        assert set(acked.acknowledged.positions) == set(FIRST_SHARDS)
    finally:
        await pool.release(held)

    async def loaded() -> bool:
        return cluster.epoch == retired.epoch

    await wait_until(loaded, what="the replica to load the retiring config")
    assert cluster.retired == {"shard-d"}


@pytest.mark.parametrize("rpc", ["SubscribeEvents", "AckEvents"])
async def test_a_replica_behind_on_the_config_takes_a_cursor_naming_the_shard_it_adds(
    ledger4: Ledger4, rpc: str
) -> None:
    """A cursor given by a replica that loaded a config adding a shard names that shard;
    a replica that had not looked at the file yet (it does once a second) refused it as
    naming no shard of the cluster, INVALID_ARGUMENT, which a client does not retry. It
    reloads the config first now. This replica's watcher is stopped, so it lags for as
    long as the test needs."""
    env, stub = ledger4, ledger4.service.stub
    await env.service.server.config_watch.stop()
    write_config(env.config_path, env.config(2, ALL_SHARDS))
    assert env.service.cluster.epoch == 1
    cursor = pb.EventCursor(positions=dict.fromkeys(ALL_SHARDS, 0))
    if rpc == "AckEvents":
        acked = await stub.AckEvents(pb.AckEventsRequest(consumer="books", cursor=cursor))
        assert set(acked.acknowledged.positions) == set(ALL_SHARDS)
    else:
        m = env.service.merchant_on("shard-a")
        await create_accounts(stub, account(m, "cash"))
        events = await collect_until(
            stub,
            pb.SubscribeEventsRequest(after=cursor),
            lambda e: e.kind == pb.EVENT_KIND_ACCOUNT_CREATED and e.account.ref.merchant_id == m,
        )
        assert "shard-d" in events[-1].cursor.positions
    assert env.service.cluster.epoch == 2
    # A shard no config names is still refused, with its field; such cursors make the
    # replica parse the file again only once it changed, however many come at once.
    feed = env.service.server.feed
    reloads = feed.cursor_reloads
    unknown = pb.EventCursor(positions={"shard-z": 0})

    async def refused_bursts() -> None:
        calls = [
            stub.AckEvents(pb.AckEventsRequest(consumer="books", cursor=unknown))
            for _ in range(BOGUS_CURSOR_BURST)
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        for answer in answers:
            assert isinstance(answer, grpc.aio.AioRpcError), answer
            assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "shard-z" in (answer.details() or "")

    await refused_bursts()
    assert feed.cursor_reloads == reloads
    write_config(env.config_path, env.config(3, ALL_SHARDS))
    await refused_bursts()
    assert feed.cursor_reloads == reloads + 1
    assert env.service.cluster.epoch == 3


async def test_a_replica_keeps_no_connection_to_a_shard_it_retired(ledger4: Ledger4) -> None:
    """Replicas close a retired shard's pool, but the event feed's LISTEN connection to
    it, outside the pool, stayed open until the replica restarted: the admin could not
    drop the shard's database ("being accessed by other users"). The subscription that
    made the feed listen ended before the retirement, so nothing but the reload can
    let the connection go."""
    env, stub = ledger4, ledger4.service.stub
    await grow_to_four(env)
    listens = await asyncpg.connect(env.specs["shard-d"].dsn)
    try:

        async def listeners_on_d() -> int:
            found = await listens.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
            )
            return int(found)

        async def listening() -> bool:
            return await listeners_on_d() > 0

        call = stub.SubscribeEvents(pb.SubscribeEventsRequest(from_now=True))
        try:
            await wait_until(listening, what="the replica to listen on shard-d")
        finally:
            call.cancel()
        await drain_shard_d(env)
        assert await listeners_on_d() == 1, "still served while draining"
        retired = env.config(4, ALL_SHARDS, states={"shard-d": "retired"})
        await env.switch_to(retired)

        async def let_go() -> bool:
            return await listeners_on_d() == 0

        await wait_until(let_go, what="the replica to close its LISTEN connection to shard-d")
    finally:
        await listens.close()

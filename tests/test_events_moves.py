"""A merchant's events keep their order across moves (issue 20): the arrival on the new
shard is delivered only after the departure from the old one."""

from __future__ import annotations

import asyncio

from ledger.core.event_feed import Subscription
from ledger.domain.events import EventKind
from ledger.routing.config import ShardConfig
from ledger.storage.events import EventRow
from ledger.v1 import ledger_pb2 as pb
from tests.event_support import balances_from, kinds, marked
from tests.ledger4 import Ledger4
from tests.support import (
    account,
    balance,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    wait_until,
)
from tests.test_moves_settle_routing import away_and_back, rebalance_to


async def _pay(env: Ledger4, merchant_id: str, count: int) -> None:
    for _ in range(count):
        results = await transfers(
            env.service.stub,
            transfer(uid("p"), ref(merchant_id, "cash"), ref(merchant_id, "sales"), 7),
        )
        assert result_names(results) == ["TRANSFER_RESULT_OK"]


async def _paid_and_moved_away(env: Ledger4, payments: int) -> tuple[str, str, str, ShardConfig]:
    """A merchant with accounts that paid `payments` times at home, then moved away
    and paid as many times there: (mover, home, away, the config that moves it back)."""
    mover, _, home, heavier, restored = away_and_back(env)
    await create_accounts(env.service.stub, account(mover, "cash"), account(mover, "sales"))
    await _pay(env, mover, payments)
    await rebalance_to(env, heavier, mover)
    away = env.service.cluster.ring.shard_for(mover)
    assert away != home
    await _pay(env, mover, payments)
    return mover, home, away, restored


async def test_a_merchant_moved_away_and_back_has_its_events_in_order(ledger4: Ledger4) -> None:
    env, stub = ledger4, ledger4.service.stub
    mover, home, away, restored = await _paid_and_moved_away(env, 3)
    await rebalance_to(env, restored, mover)
    await _pay(env, mover, 3)

    # Read from the start of every shard: whichever shard the stream reads first,
    # each arrival waits for its departure, so the merchant's order holds.
    events = await marked(stub, [mover], pb.SubscribeEventsRequest(merchant_id=mover))
    moves = [(k, e.shard, e.move.epoch) for e, k in zip(events, kinds(events), strict=True)
             if k.startswith("MERCHANT_MOVED")]  # fmt: skip
    assert moves == [
        ("MERCHANT_MOVED_OUT", home, 2),
        ("MERCHANT_MOVED_IN", away, 2),
        ("MERCHANT_MOVED_OUT", away, 3),
        ("MERCHANT_MOVED_IN", home, 3),
    ]
    shards_of_payments = [e.shard for e in events if e.kind == pb.EVENT_KIND_TRANSFER_POSTED]
    assert shards_of_payments == [home] * 3 + [away] * 3 + [home] * 3
    for account_id in ("cash", "sales"):
        sequences = [
            e.sequence
            for event in events
            for e in event.entries
            if (e.account.merchant_id, e.account.account_id) == (mover, account_id)
        ]
        assert sequences == sorted(sequences) and len(sequences) == 9, account_id
        stored = await balance(stub, mover, account_id)
        assert balances_from(events)[(mover, account_id)] == (
            stored.debits_posted,
            stored.credits_posted,
            stored.debits_pending,
            stored.credits_pending,
        )


async def test_an_arrival_read_while_its_source_shard_is_down_waits_and_the_stream_stays_open(
    ledger4: Ledger4,
) -> None:
    """Reproduces chaos seed 71: a subscription read a merchant's arrival while the
    shard it came from refused connections, and the departure lookup's
    ShardUnavailable ended the stream (UNKNOWN to the caller). The arrival now
    waits, as events of an unavailable shard do, and follows the departure once
    the source answers again. The feed is followed from the start of every shard,
    positions a subscription took while all were up."""
    env = ledger4
    mover, home, away, _ = await _paid_and_moved_away(env, 2)
    feed = env.service.server.feed
    positions = {name: 0 for name in env.service.cluster.shards}
    rows: list[EventRow] = []

    async def follow() -> None:
        subscription = Subscription(after=positions, merchant_id=mover)
        async for batch, _ in feed.follow_batches(subscription, dict(positions)):
            rows.extend(batch)

    following: asyncio.Task[None] | None = None
    async with env.refusing_connections(home):
        away_reads = feed.shard_reads[away]
        following = asyncio.create_task(follow())

        async def read_away() -> bool:
            return following.done() or feed.shard_reads[away] > away_reads

        await wait_until(read_away, what="the feed to read the arrival's shard")
        home_reads = feed.shard_reads[home]

        async def passed_on() -> bool:
            # A later look at the source: the arrival's read was done with by then.
            return following.done() or feed.shard_reads[home] > home_reads

        await wait_until(passed_on, what="the feed to look at the source again")
        assert not following.done(), following.exception()
        assert [r.shard for r in rows] == [], "nothing of the merchant before its departure"
    try:

        async def all_read() -> bool:
            if following.done():
                following.result()
            return sum(r.kind is EventKind.TRANSFER_POSTED for r in rows) == 4

        await wait_until(all_read, what="the merchant's events once the source is back")
    finally:
        following.cancel()
    moves = [(r.kind, r.shard) for r in rows if r.kind.name.startswith("MERCHANT_MOVED")]
    assert moves == [(EventKind.MERCHANT_MOVED_OUT, home), (EventKind.MERCHANT_MOVED_IN, away)]
    payments = [r.shard for r in rows if r.kind is EventKind.TRANSFER_POSTED]
    assert payments == [home] * 2 + [away] * 2

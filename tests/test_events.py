"""The event stream over gRPC: every change produces exactly its events, in order,
resumable by cursor (issue 20)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import grpc
import pytest

from ledger import limits
from ledger.storage.events import EventStore
from ledger.v1 import ledger_pb2 as pb
from tests.event_support import (
    balances_from,
    collect_batches_until,
    collect_until,
    kinds,
    marked,
    without_cursor,
)
from tests.support import (
    RPC_TIMEOUT_S,
    WAIT_DEADLINE_S,
    Service,
    account,
    balance,
    create_accounts,
    field_violations,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    wait_until,
)


def of(merchant_id: str, **fields: object) -> pb.SubscribeEventsRequest:
    return pb.SubscribeEventsRequest(merchant_id=merchant_id, **fields)  # type: ignore[arg-type]


# Per transfer of merchant $1 with entries in its events (a hold and its expiry
# share an id): whether they are, as a set, its entries rows, less the keys an
# event leaves out.
_EVENT_ENTRIES_AGAINST_ROWS = """
WITH announced AS (
    SELECT e.transfer_id, jsonb_agg(x) AS entries
    FROM events AS e, json_array_elements(e.body -> 'entries') AS x
    WHERE e.merchant_id = $1
    GROUP BY e.transfer_id
)
SELECT a.transfer_id, a.entries @> r.entries AND r.entries @> a.entries
       AND jsonb_array_length(a.entries) = jsonb_array_length(r.entries) AS same
FROM announced AS a, LATERAL (
    SELECT coalesce(jsonb_agg(to_jsonb(x) - 'entry_hash' - 'transfer_merchant_id'
                              - 'transfer_id' - 'created_at'), '[]') AS entries
    FROM entries AS x
    WHERE x.transfer_merchant_id = $1 AND x.transfer_id = a.transfer_id
) AS r
ORDER BY a.transfer_id
"""


async def test_every_change_to_the_books_produces_exactly_its_events(service: Service) -> None:
    stub = service.stub
    m = service.merchant_on("shard-a")
    cash, sales, fees = ref(m, "cash"), ref(m, "sales"), ref(m, "fees")
    await create_accounts(
        stub, account(m, "cash"), account(m, "sales", no_overdraft=True), account(m, "fees")
    )
    results = await transfers(
        stub,
        transfer("t-post", cash, sales, 1000, metadata={"order": "17"}),
        transfer("t-hold", cash, sales, 500, action=pb.TRANSFER_ACTION_PENDING),
        transfer("t-void-me", cash, sales, 70, action=pb.TRANSFER_ACTION_PENDING),
        transfer("t-fails", sales, cash, 10**9),  # refused: recorded, but no money moved
        transfer("t-settle", cash, None, 300, action=pb.TRANSFER_ACTION_POST_PENDING,
                 pending_id="t-hold"),
        transfer("t-void", cash, None, 0, action=pb.TRANSFER_ACTION_VOID_PENDING,
                 pending_id="t-void-me"),
        transfer("t-back", sales, cash, 200, reversal_of="t-post"),
        transfer("t-expires", cash, sales, 40, action=pb.TRANSFER_ACTION_PENDING, timeout_ms=1),
    )  # fmt: skip
    assert (
        result_names(results)
        == ["TRANSFER_RESULT_OK"] * 3
        + ["TRANSFER_RESULT_EXCEEDS_CREDITS"]
        + ["TRANSFER_RESULT_OK"] * 4
    )

    async def expired() -> bool:
        return (await balance(stub, m, "cash")).debits_pending == 0

    await wait_until(expired, what="the hold with a 1 ms timeout to expire")
    journal = await stub.PostJournal(
        pb.PostJournalRequest(
            journal_id="j-1",
            merchant_id=m,
            postings=[
                pb.Posting(account=cash, amount_minor=9, currency="USD",
                           direction=pb.DIRECTION_DEBIT),
                pb.Posting(account=fees, amount_minor=9, currency="USD",
                           direction=pb.DIRECTION_CREDIT),
            ],
        ),
        timeout=RPC_TIMEOUT_S,
    )  # fmt: skip
    assert journal.result == pb.TRANSFER_RESULT_OK
    await stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=[fees], closed=True), timeout=RPC_TIMEOUT_S
    )
    # Closing a closed account changes nothing, and says nothing.
    await stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=[fees], closed=True), timeout=RPC_TIMEOUT_S
    )
    await stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=[fees], closed=False), timeout=RPC_TIMEOUT_S
    )

    events = await marked(stub, [m], of(m))
    assert kinds(events) == [
        "ACCOUNT_CREATED", "ACCOUNT_CREATED", "ACCOUNT_CREATED",
        "TRANSFER_POSTED", "PENDING_CREATED", "PENDING_CREATED", "PENDING_POSTED",
        "PENDING_VOIDED", "TRANSFER_REVERSED", "PENDING_CREATED", "PENDING_EXPIRED",
        "JOURNAL_POSTED", "ACCOUNT_CLOSED", "ACCOUNT_REOPENED",
    ]  # fmt: skip
    by_id = {e.transfer_id: e for e in events if e.transfer_id}
    posted = by_id["t-post"]
    assert posted.transfer.metadata["order"] == "17"
    assert posted.transfer.amount_minor == 1000 and posted.shard == "shard-a"
    assert [(e.account.account_id, e.direction) for e in posted.entries] == [
        ("cash", pb.DIRECTION_DEBIT),
        ("sales", pb.DIRECTION_CREDIT),
    ]
    assert by_id["t-settle"].amount_effective_minor == 300
    assert by_id["t-settle"].transfer.pending_id == "t-hold"
    assert by_id["t-expires"].kind == pb.EVENT_KIND_PENDING_EXPIRED
    assert [p.amount_minor for p in by_id["j-1"].postings] == [9, 9]
    assert "t-fails" not in by_id
    # Positions on one shard rise; the events rebuild every account's balances.
    positions = [e.position for e in events]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert all(e.event_id and e.committed_at.seconds > 0 for e in events)
    for account_id in ("cash", "sales", "fees"):
        stored = await balance(stub, m, account_id)
        assert balances_from(events)[(m, account_id)] == (
            stored.debits_posted,
            stored.credits_posted,
            stored.debits_pending,
            stored.credits_pending,
        ), account_id
    # Each event's entries are the entries rows its change wrote, key for key.
    async with service.cluster.shards["shard-a"].pool.acquire() as conn:
        compared = await conn.fetch(_EVENT_ENTRIES_AGAINST_ROWS, m)
    assert len(compared) == 8, "every transfer and journal that wrote entries"
    assert [r["transfer_id"] for r in compared if not r["same"]] == []


async def test_a_cross_shard_transfer_has_events_on_both_shards_and_says_how_it_ended(
    service: Service,
) -> None:
    stub = service.stub
    a, b = service.merchant_on("shard-a"), service.merchant_on("shard-b")
    await create_accounts(stub, account(a, "cash"), account(b, "sales"), account(b, "shut"))
    await stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=[ref(b, "shut")], closed=True), timeout=RPC_TIMEOUT_S
    )
    results = await transfers(
        stub,
        transfer("x-ok", ref(a, "cash"), ref(b, "sales"), 250),
        transfer("x-refused", ref(a, "cash"), ref(b, "shut"), 5),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK", "TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED"]

    # The debit merchant's subscription sees both shards' events of its transfers:
    # per shard, in order.
    everything = await marked(stub, [a, b], pb.SubscribeEventsRequest())
    events = [e for e in everything if e.transfer_id.startswith("x-") and a in e.merchant_ids]
    on_a = [e for e in events if e.shard == "shard-a"]
    on_b = [e for e in events if e.shard == "shard-b"]
    ok = [e for e in on_a if e.transfer_id == "x-ok"]
    assert kinds(ok) == ["SAGA_STEP", "SAGA_STEP", "SAGA_COMPLETED"]
    assert ok[0].transfer_result == pb.TRANSFER_RESULT_IN_PROGRESS
    assert ok[0].transfer.credit_account.merchant_id == b
    assert ok[-1].saga.state == pb.SAGA_STATE_COMPLETED
    assert ok[-1].saga.peer_shard == "shard-b"
    refused = [e for e in on_a if e.transfer_id == "x-refused"]
    assert kinds(refused) == ["SAGA_STEP", "SAGA_STEP", "SAGA_COMPENSATED"]
    assert refused[-1].saga.result == pb.TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED
    # The credit shard applied one credit and refused the other (no money moved there).
    assert [(e.transfer_id, k) for e, k in zip(on_b, kinds(on_b), strict=True)] == [
        ("x-ok", "SAGA_STEP")
    ]
    (credited,) = [e for e in on_b[0].entries if e.account.merchant_id == b]
    assert (credited.direction, credited.amount_minor, credited.credits_posted) == (
        pb.DIRECTION_CREDIT,
        250,
        250,
    )
    # The credit merchant's own subscription sees the same credit.
    mine = [e for e in await marked(stub, [b], of(b)) if e.shard == "shard-b"]
    assert [e.event_id for e in mine if e.transfer_id == "x-ok"] == [on_b[0].event_id]


async def test_a_consumer_resumed_by_cursor_sees_each_event_once_in_shard_order(
    service: Service,
) -> None:
    stub = service.stub
    merchants = [service.merchant_on(s) for s in ("shard-a", "shard-b", "shard-c")]
    await create_accounts(stub, *(account(m, n) for m in merchants for n in ("x", "y")))
    for i in range(12):
        m = merchants[i % 3]
        assert result_names(
            await transfers(stub, transfer(uid("r"), ref(m, "x"), ref(m, "y"), i + 1))
        ) == ["TRANSFER_RESULT_OK"]
    whole = await marked(stub, merchants, pb.SubscribeEventsRequest())
    # Read again in pieces of at most 7, each resumed from the last event's cursor,
    # until every event of `whole` came again.
    wanted = {e.event_id for e in whole}
    pieces: list[pb.Event] = []
    cursor = pb.EventCursor()
    while missing := len(wanted - {e.event_id for e in pieces}):
        piece = await collect_until(stub, pb.SubscribeEventsRequest(after=cursor), min(7, missing))
        pieces += piece
        cursor = piece[-1].cursor
    assert len({e.event_id for e in pieces}) == len(pieces), "no event came twice"
    # Shards interleave as they are read; each shard's order is the same every time.
    for shard in ("shard-a", "shard-b", "shard-c"):
        mine = [(e.position, e.event_id) for e in whole if e.shard == shard]
        again = [(e.position, e.event_id) for e in pieces if e.shard == shard]
        assert again[: len(mine)] == mine, shard
        # 1, 2, 3, ... with no gap (nothing was pruned here).
        assert [p for p, _ in again] == list(range(1, len(again) + 1)), shard


async def test_event_batches_hold_the_events_one_by_one_delivery_gives_and_resume_by_cursor(
    service: Service,
) -> None:
    stub = service.stub
    merchants = [service.merchant_on(s) for s in ("shard-a", "shard-b", "shard-c")]
    await create_accounts(stub, *(account(m, n) for m in merchants for n in ("x", "y")))
    for i in range(12):
        m = merchants[i % 3]
        assert result_names(
            await transfers(stub, transfer(uid("b"), ref(m, "x"), ref(m, "y"), i + 1))
        ) == ["TRANSFER_RESULT_OK"]
    whole = await marked(stub, merchants, pb.SubscribeEventsRequest())
    batches = await collect_batches_until(stub, pb.SubscribeEventsRequest(), len(whole))
    events: list[pb.Event] = []
    for batch in batches:
        assert batch.events, "no empty batch"
        shards = {e.shard for e in batch.events}
        assert len(shards) == 1, "a batch is one shard's"
        (shard,) = shards
        assert batch.cursor.positions[shard] == batch.events[-1].position
        assert not any(e.HasField("cursor") for e in batch.events)
        events += batch.events
    # Each shard's events are the same as one by one, in the same order, cursor aside.
    for shard in ("shard-a", "shard-b", "shard-c"):
        one_by_one = [without_cursor(e) for e in whole if e.shard == shard]
        batched = [e for e in events if e.shard == shard]
        assert batched[: len(one_by_one)] == one_by_one, shard
    # Resuming from the first batch's cursor: each shard continues right after it.
    first = batches[0]
    again = await collect_batches_until(
        stub, pb.SubscribeEventsRequest(after=first.cursor), len(events) - len(first.events)
    )
    first_shard = first.events[0].shard
    for shard in ("shard-a", "shard-b", "shard-c"):
        resumed = [e.position for b in again for e in b.events if e.shard == shard]
        after = first.cursor.positions[shard]
        assert resumed == list(range(after + 1, after + 1 + len(resumed))), shard
        assert resumed or shard == first_shard, shard
    assert sum(len(b.events) for b in again) == len(events) - len(first.events)


async def test_an_event_batch_past_its_byte_bound_is_split_with_a_cursor_for_each_part(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = service.stub
    m = service.merchant_on("shard-b")
    await create_accounts(stub, account(m, "x"), account(m, "y"))
    for i in range(6):
        await transfers(stub, transfer(uid("s"), ref(m, "x"), ref(m, "y"), i + 1))
    whole = [e for e in await marked(stub, [m], of(m)) if e.shard == "shard-b"]
    # About two transfer events per batch.
    monkeypatch.setattr(limits, "event_batch_bytes_max", 2 * max(e.ByteSize() for e in whole))
    batches = await collect_batches_until(stub, of(m), len(whole))
    events = [e for b in batches for e in b.events if e.shard == "shard-b"]
    assert events[: len(whole)] == [without_cursor(e) for e in whole]
    assert len(batches) >= len(whole) // 3
    for batch in batches:
        events_bytes = sum(e.ByteSize() for e in batch.events)
        assert events_bytes <= limits.event_batch_bytes_max or len(batch.events) == 1
        assert batch.cursor.positions["shard-b"] == batch.events[-1].position


async def test_from_now_skips_history_and_an_account_filter_keeps_its_account(
    service: Service,
) -> None:
    stub = service.stub
    m = service.merchant_on("shard-b")
    await create_accounts(stub, account(m, "a"), account(m, "b"), account(m, "c"))
    await transfers(stub, transfer(uid("old"), ref(m, "a"), ref(m, "b"), 1))
    # c's creation is in the stream before "now" (the sequencer numbers it a round
    # after its commit): else a subscription started within that round sees it after.
    await collect_until(
        stub,
        of(m),
        lambda e: e.kind == pb.EVENT_KIND_ACCOUNT_CREATED and e.account.ref.account_id == "c",
    )
    feed = service.server.feed

    async def idle() -> bool:
        return feed.subscriptions == 0

    # The subscription just cancelled (and any before) ends on the server in its time.
    await wait_until(idle, what="the earlier subscriptions to end")
    call = stub.SubscribeEvents(
        pb.SubscribeEventsRequest(from_now=True, account=ref(m, "c")), timeout=RPC_TIMEOUT_S
    )

    async def following() -> bool:
        return feed.subscriptions > 0

    # "Now" is when the service starts the subscription, not when the call is made:
    # the writes below must come after it.
    await wait_until(following, what="the subscription to start")
    await transfers(
        stub,
        transfer("not-c", ref(m, "a"), ref(m, "b"), 2),
        transfer("to-c", ref(m, "a"), ref(m, "c"), 3),
    )
    first = await call.read()
    call.cancel()
    assert isinstance(first, pb.Event)
    assert (first.kind, first.transfer_id) == (pb.EVENT_KIND_TRANSFER_POSTED, "to-c")


async def test_bad_subscriptions_are_refused_with_the_field(service: Service) -> None:
    stub = service.stub
    for request, field in (
        (pb.SubscribeEventsRequest(after=pb.EventCursor(positions={"shard-a": -1})), "after"),
        (pb.SubscribeEventsRequest(merchant_id="$x"), "merchant_id"),
        (pb.SubscribeEventsRequest(consumer="a" * 200), "consumer"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect_until(stub, request, 1, deadline_s=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect_until(
            stub, pb.SubscribeEventsRequest(after=pb.EventCursor(positions={"nope": 1})), 1
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "names no shard" in field_violations(caught.value)["after.positions['nope']"]
    # A long name is not echoed whole: the details once passed gRPC's 16 KiB
    # metadata limit and the caller got RESOURCE_EXHAUSTED (found by the fuzzer).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect_until(
            stub, pb.SubscribeEventsRequest(after=pb.EventCursor(positions={"x" * 10_000: 1})), 1
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AckEvents(pb.AckEventsRequest(), timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_subscriber_reads_again_only_the_shards_that_numbered_new_events(
    service: Service,
) -> None:
    """Under load the sequencer runs a round every few ms: a subscription reads the
    shard that round numbered, not every shard on each round (nor again on the
    round's own NOTIFY); idle shards are read on the idle poll only."""
    stub = service.stub
    m = service.merchant_on("shard-a")
    idle = ("shard-b", "shard-c")
    await create_accounts(stub, account(m, "cash"), account(m, "sales"))
    feed = service.server.feed
    call = stub.SubscribeEvents(pb.SubscribeEventsRequest(), timeout=10 * WAIT_DEADLINE_S)
    try:
        await transfers(stub, transfer("first", ref(m, "cash"), ref(m, "sales"), 1))
        async with asyncio.timeout(WAIT_DEADLINE_S):
            event = await call.read()
            while event.transfer_id != "first":
                event = await call.read()  # the history before it
            # The idle shards' history too (order is per shard: it may come after).
            lasts = {
                name: (await EventStore(service.cluster.shards[name]).bounds())[1] for name in idle
            }
            while any(event.cursor.positions.get(n, 0) < lasts[n] for n in idle):
                event = await call.read()
        reads_before = {name: feed.shard_reads[name] for name in idle}
        started = time.monotonic()
        writes = 20
        for i in range(writes):
            await transfers(stub, transfer(f"t{i}", ref(m, "cash"), ref(m, "sales"), 1))
            async with asyncio.timeout(WAIT_DEADLINE_S):
                event = await call.read()
            assert isinstance(event, pb.Event) and event.transfer_id == f"t{i}"
        elapsed_s = time.monotonic() - started
    finally:
        call.cancel()
    # Reading every shard on each round and on its NOTIFY made at least two reads of
    # each idle shard per write; now: one per idle poll, and the pass under way.
    reads_max = elapsed_s / limits.event_idle_poll_s + 2
    for name in idle:
        assert feed.shard_reads[name] - reads_before[name] <= reads_max, (name, elapsed_s)
    assert feed.shard_reads["shard-a"] >= writes


async def test_a_shard_whose_notifications_are_lost_is_read_while_other_shards_stay_busy(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscription reads a shard again when told it numbered more (this replica's
    sequencer, or a NOTIFY from another's), and every shard on the idle poll. Under
    steady traffic elsewhere it was never idle, so a shard whose word was lost (another
    replica numbered it, and the LISTEN connection was half-dead behind a partition)
    went unread for as long as the traffic lasted: chaos saw a drained shard's last
    56 events withheld from a consumer for 30 s. Every shard is now read at least
    once per event_idle_poll_s, busy or not."""
    stub, feed = service.stub, service.server.feed
    busy, quiet = service.merchant_on("shard-a"), service.merchant_on("shard-b")
    await create_accounts(stub, account(busy, "cash"), account(busy, "sales"))
    told = feed.wake

    def lose_shard_b(shard_name: str = "", last_position: int = 0) -> None:
        if shard_name != "shard-b":
            told(shard_name, last_position)

    monkeypatch.setattr(service.server.sequencer, "on_sequenced", lose_shard_b)
    monkeypatch.setattr(feed, "wake", lose_shard_b)
    after = {n: (await EventStore(s).bounds())[1] for n, s in service.cluster.shards.items()}
    stop = asyncio.Event()

    async def keep_busy() -> None:
        while not stop.is_set():
            await transfers(stub, transfer(uid("busy"), ref(busy, "cash"), ref(busy, "sales"), 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    busy_task = asyncio.create_task(keep_busy())
    try:
        marker = uid("quiet")
        await create_accounts(stub, account(quiet, marker))
        started = time.monotonic()
        await collect_until(
            stub,
            pb.SubscribeEventsRequest(after=pb.EventCursor(positions=after)),
            lambda e: (
                e.kind == pb.EVENT_KIND_ACCOUNT_CREATED and e.account.ref.account_id == marker
            ),
            deadline_s=5 * limits.event_idle_poll_s,
        )
        waited_s = time.monotonic() - started
    finally:
        stop.set()
        await busy_task
    assert waited_s < 3 * limits.event_idle_poll_s, waited_s


# Subscriptions opened at once, then cancelled, in the listener test.
CONCURRENT_SUBSCRIPTIONS = 6


async def test_subscriptions_at_once_share_one_listen_connection_per_shard(
    service: Service,
) -> None:
    """CI: a replica showed no LISTEN connection to a shard where it had kept one
    (tests/test_events_shard_changes.py, once): a subscription cancelled while it
    connected left the connection listening but unknown to the feed (closed when
    collected), and subscriptions at once each made one. The feed makes each shard's
    connection once, in a task of its own, whoever waits for it. (The cancellation's
    moment is too narrow to hit on purpose: this checks the sharing.)"""
    shard = service.cluster.shards["shard-a"]
    probe = await asyncpg.connect(shard.dsn)
    try:

        async def listeners() -> int:
            found = await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
            )
            return int(found)

        async def listening() -> bool:
            return await listeners() > 0

        calls = [
            service.stub.SubscribeEvents(pb.SubscribeEventsRequest(from_now=True))
            for _ in range(CONCURRENT_SUBSCRIPTIONS)
        ]
        try:
            await wait_until(listening, what="the replica to listen on shard-a")
        finally:
            for call in calls:
                call.cancel()
        feed = service.server.feed

        async def subscriptions_ended() -> bool:
            return feed.subscriptions == 0

        await wait_until(subscriptions_ended, what="the subscriptions to end")
        assert await listeners() == 1
        assert "shard-a" in feed._listeners
    finally:
        await probe.close()

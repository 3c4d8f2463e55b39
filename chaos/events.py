"""The event stream under chaos: a subscriber that rides out the faults, and the check
that its events are a complete record of the books.

The subscriber holds one unfiltered SubscribeEvents call to a replica from before
the accounts are created to after the checks. When the stream breaks (a replica
SIGKILLed, a status, the stream ending) it calls again, on the other replica,
with the cursor of the last event it took, so it resumes exactly after it.

Per event it checks, as it arrives:

- dedupe: an event_id seen before is dropped (delivery is at least once), and
  must come with the shard and position it came with the first time;
- per shard, positions arrive 1, 2, 3, ... (after dedupe): a jump is a gap, a
  step back a reordering;
- per account, entry sequences arrive 1, 2, 3, ... and each entry's balances are
  the previous entry's plus its own amount (so no change to the account is
  missing, none is out of order, and each says what it did).

At the end, once the books are quiet and every hold is settled, it waits (with a
deadline) until every shard's outbox is empty and it has every position the
shard gave, reading each shard's accounts in the same snapshot; then every
account's balances rebuilt from the events (its entry with the highest
sequence, as tests/event_support.balances_from) must equal the stored ones, on
every shard, settlement accounts included (those are per shard: keyed by the
shard of the events that carry them).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc

from chaos.checker import SHARD_CONNECT_TIMEOUT_S, SHARD_QUERY_TIMEOUT_S, CheckReport
from chaos.cluster import Replica
from ledger.v1 import ledger_pb2 as pb

# Back-off between calls after the stream broke, with jitter, capped: a replica
# comes back within seconds of a kill, and the other one serves meanwhile.
RESUBSCRIBE_DELAY_S_MIN = 0.05
RESUBSCRIBE_DELAY_S_MAX = 1.0
# At the end: how long the sequencers may take to number what the last writes
# left in the outboxes, and the subscriber to receive it. A shard stopped until
# the heal leaves its outbox to the next idle poll (limits.event_idle_poll_s), so
# seconds; past this the stream is stuck, which is itself a violation.
CATCH_UP_DEADLINE_S = 60.0
# How long the final wait sleeps between looks at the shards when no event comes.
CATCH_UP_POLL_S = 0.2
# A stream that delivers nothing for this long while the shards have events it has
# not delivered is called again (a stuck call would otherwise only hit the deadline).
STALLED_STREAM_S = 10.0
# The subscriber is a registered consumer, so that a drained shard retires only
# once it has that shard's whole stream (MoveStore.leave_refused); it acknowledges
# what it took this often (on whichever replica runs).
CONSUMER = "chaos-books"
ACK_INTERVAL_S = 0.5
ACK_TIMEOUT_S = 5.0
# Problems printed per kind in the summary's notes; the violations hold all.
PROBLEMS_PER_CHECK_MAX = 1000

if not STALLED_STREAM_S < CATCH_UP_DEADLINE_S:
    raise AssertionError("a stalled stream must be called again before the final deadline")

Balances = tuple[int, int, int, int]
AccountKey = tuple[str, str]
ZERO: Balances = (0, 0, 0, 0)


def account_key(shard: str, merchant_id: str, account_id: str) -> AccountKey:
    """Settlement accounts (merchant ids starting with $) are the shard's own: one per
    shard under one name, as the checker keys them (`$settlement@shard-a`)."""
    if merchant_id.startswith("$"):
        return (f"{merchant_id}@{shard}", account_id)
    return (merchant_id, account_id)


def after_entry(before: Balances, entry: pb.EventEntry) -> Balances:
    """The balances an entry leaves, from those before it."""
    dp, cp, dpe, cpe = before
    amount = entry.amount_minor
    debit = entry.direction == pb.DIRECTION_DEBIT
    if entry.kind == pb.ENTRY_KIND_POSTED:
        return (dp + amount, cp, dpe, cpe) if debit else (dp, cp + amount, dpe, cpe)
    if entry.kind == pb.ENTRY_KIND_PENDING:
        return (dp, cp, dpe + amount, cpe) if debit else (dp, cp, dpe, cpe + amount)
    return (dp, cp, dpe - amount, cpe) if debit else (dp, cp, dpe, cpe - amount)


def balances_of(entry: pb.EventEntry) -> Balances:
    return (entry.debits_posted, entry.credits_posted, entry.debits_pending, entry.credits_pending)


@dataclass
class StreamState:
    """What the events said so far, deduplicated, and what was wrong with them."""

    # event_id -> (shard, position) as first delivered.
    seen: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Per shard, the last position taken (positions are checked contiguous).
    positions: dict[str, int] = field(default_factory=dict)
    # Per account, (sequence, balances) of its newest entry.
    accounts: dict[AccountKey, tuple[int, Balances]] = field(default_factory=dict)
    created: set[AccountKey] = field(default_factory=set)
    kinds: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    # (check, where, detail), as the checker's violations.
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    # Seconds from each event's commit to its receipt here.
    delays_s: list[float] = field(default_factory=list)

    @property
    def events(self) -> int:
        return len(self.seen)

    def problem(self, check: str, where: str, detail: str) -> None:
        if len(self.problems) < PROBLEMS_PER_CHECK_MAX:
            self.problems.append((check, where, detail))

    def take(self, event: pb.Event) -> bool:
        """Checks and records one delivered event; False for a duplicate."""
        first = self.seen.get(event.event_id)
        if first is not None:
            self.duplicates += 1
            if first != (event.shard, event.position):
                self.problem(
                    "events order",
                    f"event {event.event_id}",
                    f"delivered as {event.shard}#{event.position}, first as {first[0]}#{first[1]}",
                )
            return False
        self.seen[event.event_id] = (event.shard, event.position)
        last = self.positions.get(event.shard, 0)
        if event.position != last + 1:
            what = "gap" if event.position > last + 1 else "reordered"
            self.problem(
                "events order",
                f"shard {event.shard}",
                f"{what}: position {event.position} delivered after {last}",
            )
        self.positions[event.shard] = max(last, event.position)
        self.kinds[pb.EventKind.Name(event.kind).removeprefix("EVENT_KIND_")] += 1
        if event.kind == pb.EVENT_KIND_ACCOUNT_CREATED:
            ref = event.account.ref
            self.created.add(account_key(event.shard, ref.merchant_id, ref.account_id))
        for entry in event.entries:
            self._take_entry(event, entry)
        return True

    def _take_entry(self, event: pb.Event, entry: pb.EventEntry) -> None:
        key = account_key(event.shard, entry.account.merchant_id, entry.account.account_id)
        sequence, before = self.accounts.get(key, (0, ZERO))
        where = f"{key[0]}/{key[1]} (event {event.shard}#{event.position})"
        if entry.sequence != sequence + 1:
            what = "gap" if entry.sequence > sequence + 1 else "reordered"
            self.problem(
                "events order", where, f"{what}: entry {entry.sequence} after entry {sequence}"
            )
        elif after_entry(before, entry) != balances_of(entry):
            self.problem(
                "events balances",
                where,
                f"entry {entry.sequence} says balances {balances_of(entry)}, but the previous "
                f"{before} and its {pb.EntryKind.Name(entry.kind)} "
                f"{pb.Direction.Name(entry.direction)} of {entry.amount_minor} make "
                f"{after_entry(before, entry)}",
            )
        if entry.sequence > sequence:
            self.accounts[key] = (entry.sequence, balances_of(entry))


class EventSubscriber:
    """One unfiltered subscription, called again with its cursor whenever it breaks."""

    def __init__(self, replicas: Sequence[Replica], *, jitter: random.Random) -> None:
        self.replicas = replicas
        self._jitter = jitter  # back-off only
        self.state = StreamState()
        self.cursor: dict[str, int] = {}
        self.calls = 0
        # Why each call ended (a status name, "ended", "stalled").
        self.breaks: Counter[str] = Counter()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None
        # Set when restart_if_stalled cancels the call: gRPC then raises CancelledError
        # in the reader, which is a break to resume from, not the task's end.
        self._restarting = False
        self._last_event_at = time.monotonic()
        self._acker: asyncio.Task[None] | None = None
        self.acks = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos-event-subscriber")
        self._acker = asyncio.create_task(self._acknowledge(), name="chaos-event-acks")

    async def stop(self) -> None:
        for task in (self._task, self._acker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _acknowledge(self) -> None:
        """Acknowledges the cursor every ACK_INTERVAL_S once it moved, through a running
        replica; a failed call is tried again at the next interval."""
        acked: dict[str, int] = {}
        while True:
            await asyncio.sleep(ACK_INTERVAL_S)
            cursor = dict(self.cursor)
            if cursor == acked:
                continue
            for replica in self.replicas:
                if replica.stub is None or not replica.running:
                    continue
                try:
                    await replica.stub.AckEvents(
                        pb.AckEventsRequest(
                            consumer=CONSUMER, cursor=pb.EventCursor(positions=cursor)
                        ),
                        timeout=ACK_TIMEOUT_S,
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.FAILED_PRECONDITION,
                    ):
                        self.state.problem(
                            "events stream",
                            "AckEvents",
                            f"unexpected {error.code().name}: {error.details()}",
                        )
                    continue
                acked = cursor
                self.acks += 1
                break

    async def _run(self) -> None:
        replica = 0
        delay_s = RESUBSCRIBE_DELAY_S_MIN
        while True:
            stub = self.replicas[replica].stub
            if stub is not None and self.replicas[replica].running:
                if await self._follow(stub):
                    delay_s = RESUBSCRIBE_DELAY_S_MIN
            replica = (replica + 1) % len(self.replicas)
            await asyncio.sleep(self._jitter.uniform(delay_s / 2, delay_s))
            delay_s = min(delay_s * 2, RESUBSCRIBE_DELAY_S_MAX)

    async def _follow(self, stub: Any) -> bool:
        """Follows one call until it breaks; whether it delivered anything."""
        request = pb.SubscribeEventsRequest(
            after=pb.EventCursor(positions=self.cursor), consumer=CONSUMER
        )
        self.calls += 1
        delivered = False
        call = stub.SubscribeEvents(request)
        self._call = call
        try:
            async for event in call:
                received_at = time.time()
                self._last_event_at = time.monotonic()
                delivered = True
                if self.state.take(event):
                    self.state.delays_s.append(
                        max(0.0, received_at - event.committed_at.ToNanoseconds() / 1e9)
                    )
                # Resume after it whether or not it was new: the cursor only grows.
                for shard, position in event.cursor.positions.items():
                    self.cursor[shard] = max(self.cursor.get(shard, 0), position)
                self._progress.set()
            self.breaks["ended"] += 1
        except asyncio.CancelledError:
            if not self._restarting:
                raise  # stop()
            self._restarting = False
        except grpc.aio.AioRpcError as error:
            self.breaks[error.code().name] += 1
            if error.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.ABORTED,
            ):
                self.state.problem(
                    "events stream",
                    "SubscribeEvents",
                    f"unexpected {error.code().name}: {error.details()}",
                )
        finally:
            self._call = None
            call.cancel()
        return delivered

    def restart_if_stalled(self, *, waiting_since: float) -> None:
        """Calls again if the call delivered nothing since waiting_since (monotonic)
        or its last event, whichever is later, for STALLED_STREAM_S."""
        quiet_since = max(self._last_event_at, waiting_since)
        if self._call is not None and time.monotonic() - quiet_since > STALLED_STREAM_S:
            self.breaks["stalled"] += 1
            self._last_event_at = time.monotonic()
            self._restarting = True
            self._call.cancel()

    async def wait_for_progress(self, timeout_s: float) -> None:
        """Until an event arrives or timeout_s passes (the catch-up's poll)."""
        self._progress.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._progress.wait()

    def summary(self) -> dict[str, Any]:
        delays = sorted(self.state.delays_s)

        def quantile_ms(q: float) -> float | None:
            if not delays:
                return None
            return round(delays[min(len(delays) - 1, int(q * len(delays)))] * 1000, 1)

        return {
            "events": self.state.events,
            "per_shard": dict(sorted(self.state.positions.items())),
            "duplicates_dropped": self.state.duplicates,
            "calls": self.calls,
            "acks": self.acks,
            "breaks": dict(self.breaks.most_common()),
            "kinds": dict(self.state.kinds.most_common()),
            "accounts_rebuilt": len(self.state.accounts),
            "delivery_delay_ms_p50": quantile_ms(0.5),
            "delivery_delay_ms_p99": quantile_ms(0.99),
        }


# The final comparison, from every shard directly.

# What each shard owns (as the checker reads it) and its own settlement accounts
# (merchant ids starting with $), in one snapshot with its event bounds.
_BOOKS_SQL = """
SELECT merchant_id, account_id, debits_posted, credits_posted, debits_pending,
       credits_pending
FROM accounts
WHERE merchant_id IN (SELECT merchant_id FROM merchants WHERE state IN ('active', 'moving'))
   OR merchant_id LIKE '$%'
"""
_EVENT_BOUNDS_SQL = """
SELECT (SELECT last_position FROM event_positions) AS last_position,
       (SELECT count(*) FROM event_queue) AS outbox
"""


@dataclass(frozen=True, slots=True)
class ShardBooks:
    accounts: dict[AccountKey, Balances]
    last_position: int
    outbox: int


async def read_books(name: str, dsn: str) -> ShardBooks:
    connection = await asyncpg.connect(dsn, timeout=SHARD_CONNECT_TIMEOUT_S)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            bounds = await connection.fetchrow(_EVENT_BOUNDS_SQL, timeout=SHARD_QUERY_TIMEOUT_S)
            rows = await connection.fetch(_BOOKS_SQL, timeout=SHARD_QUERY_TIMEOUT_S)
    finally:
        await connection.close()
    assert bounds is not None
    return ShardBooks(
        {
            account_key(name, r["merchant_id"], r["account_id"]): (
                r["debits_posted"],
                r["credits_posted"],
                r["debits_pending"],
                r["credits_pending"],
            )
            for r in rows
        },
        int(bounds["last_position"]),
        int(bounds["outbox"]),
    )


async def caught_up_books(
    subscriber: EventSubscriber, dsns: dict[str, str], report: CheckReport
) -> dict[str, ShardBooks] | None:
    """Every shard's books once its outbox is empty and the subscriber has every event
    the shard numbered, read in one snapshot per shard (so the events explain exactly
    those balances); None, with a violation, when that does not happen in time."""
    started = time.monotonic()
    deadline = started + CATCH_UP_DEADLINE_S
    while True:
        books: dict[str, ShardBooks] = {}
        behind: list[str] = []
        try:
            for name, dsn in dsns.items():
                books[name] = await read_books(name, dsn)
        except (OSError, asyncpg.PostgresError) as error:
            behind.append(f"shard unreadable: {type(error).__name__}: {error}")
        for name, shard in books.items():
            taken = subscriber.state.positions.get(name, 0)
            if taken > shard.last_position:
                report.add(
                    "events order",
                    f"shard {name}",
                    f"delivered position {taken}, but the shard numbered only "
                    f"{shard.last_position}",
                )
                return None
            if shard.outbox or taken < shard.last_position:
                behind.append(
                    f"{name}: {shard.outbox} in the outbox, delivered {taken} of "
                    f"{shard.last_position}"
                )
        if not behind:
            return books
        if time.monotonic() > deadline:
            report.add(
                "events stream",
                "cluster",
                f"not caught up after {CATCH_UP_DEADLINE_S}s: {'; '.join(behind)}",
            )
            return None
        subscriber.restart_if_stalled(waiting_since=started)
        await subscriber.wait_for_progress(CATCH_UP_POLL_S)


async def check_event_stream(
    subscriber: EventSubscriber, dsns: dict[str, str], report: CheckReport
) -> None:
    """The events rebuild every account's balances exactly, and arrived complete and
    in order (see the module's doc)."""
    books = await caught_up_books(subscriber, dsns, report)
    state = subscriber.state
    for check, where, detail in state.problems:
        report.add(check, where, detail)
    if books is None:
        report.notes.append(f"events: {state.events} events received; not caught up, not compared")
        return
    stored: dict[AccountKey, Balances] = {}
    for shard in books.values():
        stored.update(shard.accounts)
    differ = compare_books(state, stored, report)
    settlement = sum(1 for key in stored if key[0].startswith("$"))
    per_shard = ", ".join(f"{n} {p}" for n, p in sorted(state.positions.items()))
    report.notes.append(
        f"events: {state.events} events ({per_shard}) over {subscriber.calls} calls, "
        f"{state.duplicates} duplicates dropped, positions and entry sequences contiguous "
        f"unless said below; rebuilt balances of {len(stored)} accounts ({settlement} "
        f"settlement) against the shards: {differ} differ"
    )


def compare_books(
    state: StreamState, stored: dict[AccountKey, Balances], report: CheckReport
) -> int:
    """Every stored account's balances against those its events rebuild (none: zero),
    and every account created; how many accounts differ."""
    differ = 0
    for key in sorted(stored.keys() | state.accounts.keys()):
        rebuilt = state.accounts.get(key, (0, ZERO))[1]
        if key not in stored:
            differ += 1
            report.add(
                "events balances",
                f"{key[0]}/{key[1]}",
                f"the events rebuild balances {rebuilt} for an account no shard owns",
            )
        elif rebuilt != stored[key]:
            differ += 1
            report.add(
                "events balances",
                f"{key[0]}/{key[1]}",
                f"the events rebuild (debits_posted, credits_posted, debits_pending, "
                f"credits_pending) = {rebuilt}, the shard stores {stored[key]}",
            )
        if not key[0].startswith("$") and key in stored and key not in state.created:
            report.add(
                "events complete", f"{key[0]}/{key[1]}", "stored, but no ACCOUNT_CREATED event"
            )
    return differ

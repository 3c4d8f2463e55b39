"""Serving the event stream: catch up from each shard's events, then follow them live.

A subscription holds a cursor (the last position delivered per shard) and reads
every shard after it, in per-shard order. It wakes when a shard numbers new
events: told in-process by this replica's sequencer, and through LISTEN on each
shard for the others' (with a poll every limits.event_idle_poll_s, should a
notification be lost). Both say the shard and its last position, and a
subscription then reads only the shards numbered past what it has read: under
load the sequencer runs a round every few ms, and reading every shard on each
(twice: the in-process call, then this replica's own NOTIFY) put up to six
queries per round on the writers' pools (docs/performance.md, "Event stream").

Across a move: the destination's MERCHANT_MOVED_IN for merchant M at epoch E is
held back (with the rest of that shard's stream, so per-shard order and the cursor
stay simple) until the source's MERCHANT_MOVED_OUT for (M, E) has been delivered.
Every event of M on the source commits before that departure (it takes M's
exclusive lock), and every event of M on the destination after the arrival, so a
consumer sees M's events in the order they happened, whichever shard it reads
first. If the rebalance stopped between the two, the destination waits until a
rerun finishes the move.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import asyncpg

from ledger import limits
from ledger.domain.accounts import AccountKey
from ledger.domain.events import EventKind
from ledger.routing.cluster import Cluster
from ledger.routing.config import ConfigError
from ledger.storage import event_statements as sql
from ledger.storage.errors import ShardUnavailable
from ledger.storage.events import EventRow, EventStore
from ledger.storage.shard import Shard

log = logging.getLogger(__name__)


class EventsPruned(Exception):
    """A cursor points before the oldest event a shard still keeps."""

    def __init__(self, shard: str, position: int, oldest: int) -> None:
        super().__init__(
            f"shard {shard} no longer keeps events after position {position}: its oldest is "
            f"{oldest}; resume from a newer cursor, or rebuild from a snapshot"
        )
        self.shard = shard
        self.position = position
        self.oldest = oldest


class UnknownShard(Exception):
    def __init__(self, shard: str) -> None:
        super().__init__(f"the cursor names shard {shard!r}, which this cluster does not have")
        self.shard = shard


@dataclass(frozen=True, slots=True)
class Subscription:
    after: Mapping[str, int]
    from_now: bool = False
    merchant_id: str | None = None
    account: AccountKey | None = None
    consumer: str | None = None


class EventFeed:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # Replaced on every wake-up: a subscriber waits on the one it took before reading.
        self._changed = asyncio.Event()
        # Per shard, the last position this replica was told was numbered (by its own
        # sequencer, or a NOTIFY from another's): a subscription reads a shard again
        # only when this passed what it read, instead of every shard on every round.
        self._numbered: dict[str, int] = {}
        # Reads of each shard's events by every subscription: lets a test see that
        # a shard with nothing new is not read on every round of another.
        self.shard_reads: Counter[str] = Counter()
        # Per shard, the Shard listened to and the LISTEN connection (outside the pool).
        self._listeners: dict[str, tuple[Shard, asyncpg.Connection[asyncpg.Record]]] = {}
        # Per shard, the task making its LISTEN connection (see _listen).
        self._listening: dict[str, asyncio.Task[None]] = {}
        self.subscriptions = 0
        # know_shards: one reload at a time, and the config file's modification time
        # when it last reloaded.
        self._cursor_reload_gate = asyncio.Lock()
        self._cursor_reload_mtime_ns: int | None = None
        # Reloads a cursor's unknown shard caused: lets a test see they are bounded.
        self.cursor_reloads = 0
        self._closed = False
        cluster.on_reload(self._drop_unserved_listeners)

    def _drop_unserved_listeners(self) -> None:
        """Closes the LISTEN connection of each shard this replica no longer serves
        (retired, deleted, or at another DSN): a replica keeps no connection to a
        shard it let go, whose server an admin may then stop or whose database drop
        (one lingered until the next restart)."""
        for name, (shard, conn) in list(self._listeners.items()):
            if self.cluster.shards.get(name) is not shard:
                del self._listeners[name]
                conn.terminate()  # no round trip: it only ever listened

    def wake(self, shard_name: str = "", last_position: int = 0) -> None:
        """New events were numbered on shard_name up to last_position (with no shard:
        anything may have changed): the subscribers read again."""
        if shard_name:
            if last_position <= self._numbered.get(shard_name, 0):
                return  # told already: this replica's own round, echoed by NOTIFY
            self._numbered[shard_name] = last_position
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def close(self) -> None:
        """Ends every subscription (at an event boundary) and stops listening."""
        self._closed = True
        for task in self._listening.values():
            task.cancel()
        await asyncio.gather(*self._listening.values(), return_exceptions=True)
        for _, conn in list(self._listeners.values()):
            with contextlib.suppress(Exception):
                await conn.close()
        self._listeners.clear()
        self.wake()

    async def _listen(self) -> None:
        """LISTEN on every shard not yet listened to (other replicas' rounds).

        Each shard's connection is made by one task of the feed's, which the
        subscriptions wait for: a subscription cancelled while it connected left
        the connection listening but unknown to the feed, and two subscriptions at
        once each made one (CI: a shard showed no listener where one was kept)."""
        waiting = []
        for name, shard in list(self.cluster.shards.items()):
            listening = self._listeners.get(name)
            if listening is not None and not listening[1].is_closed():
                continue
            task = self._listening.get(name)
            if task is None or task.done():
                task = asyncio.create_task(self._listen_on(name, shard), name=f"listen-{name}")
                self._listening[name] = task
            waiting.append(task)
        if waiting:
            # Cancelling this wait leaves the tasks to finish.
            await asyncio.wait(waiting)

    async def _listen_on(self, name: str, shard: Shard) -> None:
        conn: asyncpg.Connection[asyncpg.Record] | None = None
        try:
            conn = await asyncpg.connect(shard.dsn, timeout=limits.shard_connect_timeout_s)
            await conn.add_listener(sql.NOTIFY_CHANNEL, functools.partial(self._notified, name))
            # Kept unless the feed closed or a reload let the shard go meanwhile.
            if not self._closed and self.cluster.shards.get(name) is shard:
                self._listeners[name] = (shard, conn)
                conn = None
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            log.debug("cannot listen for events on shard %s: %s", name, error)
        finally:
            if conn is not None:
                conn.terminate()  # no round trip: it only ever listened

    def _notified(self, shard_name: str, *args: object) -> None:
        # add_listener's callback gets (connection, pid, channel, payload); the
        # payload is the last position the round gave.
        payload = args[-1] if args else ""
        try:
            last_position = int(str(payload))
        except ValueError:
            self.wake()  # not ours to parse: read everything
            return
        self.wake(shard_name, last_position)

    async def know_shards(self, names: Iterable[str]) -> None:
        """Reloads the config if names has a shard this replica neither serves nor knows
        retired: a cursor may come from a replica that loaded a config adding a shard
        before this one looked at the file (within a second), and a client does not
        retry the INVALID_ARGUMENT an unknown shard gets."""
        cluster = self.cluster
        names = list(names)

        def unknown() -> bool:
            return any(n not in cluster.shards and n not in cluster.retired for n in names)

        if not unknown() or cluster.config_path is None:
            return
        async with self._cursor_reload_gate:
            # Parsed again only when the file changed since this last parsed it: a
            # stream of bogus cursors costs a stat each, and callers at once share one
            # reload. (Like the config watcher, this trusts the modification time.)
            try:
                mtime_ns: int | None = cluster.config_path.stat().st_mtime_ns
            except OSError:
                mtime_ns = None
            if not unknown() or mtime_ns == self._cursor_reload_mtime_ns:
                return
            self._cursor_reload_mtime_ns = mtime_ns
            self.cursor_reloads += 1
            try:
                await cluster.reload()
            except (ConfigError, OSError) as error:
                # The file is mid-edit or broken: the watcher reports it; the shard
                # stays unknown.
                log.warning("config not reloaded for a cursor's shard: %s", error)

    async def start_positions(self, subscription: Subscription) -> dict[str, int]:
        """Where the subscription starts on each shard; refuses a pruned or unknown one."""
        # A retired shard's stream has ended: a cursor may still name it (its
        # consumers acknowledged all of it before it left, see MoveStore.leave_refused).
        # Its position is kept, so that the cursors given keep it and, should the
        # shard be made active again, the subscription goes on from there.
        await self.know_shards(subscription.after)
        retired = self.cluster.retired
        positions: dict[str, int] = {}
        for name, position in subscription.after.items():
            if name in retired:
                positions[name] = position
            elif name not in self.cluster.shards:
                raise UnknownShard(name)
        for name, shard in list(self.cluster.shards.items()):
            store = EventStore(shard)
            oldest, last = await store.bounds()
            if name in subscription.after:
                position = subscription.after[name]
                if position + 1 < oldest:
                    raise EventsPruned(name, position, oldest)
                positions[name] = min(position, last)
            else:
                positions[name] = last if subscription.from_now else oldest - 1
            if subscription.consumer is not None:
                await store.register(subscription.consumer, position=positions[name])
        return positions

    async def follow(
        self, subscription: Subscription, positions: dict[str, int]
    ) -> AsyncIterator[tuple[EventRow, dict[str, int]]]:
        """Every event after positions, then live ones, each with the cursor after it."""
        async for rows, cursor in self.follow_batches(subscription, positions):
            for row in rows:
                yield row, {**cursor, row.shard: row.position}

    async def follow_batches(
        self, subscription: Subscription, positions: dict[str, int]
    ) -> AsyncIterator[tuple[list[EventRow], dict[str, int]]]:
        """As follow(), a read at a time: consecutive events of one shard (never none),
        and the cursor after the last (and after any the filter passed over)."""
        self.subscriptions += 1
        try:
            async for item in self._follow(subscription, positions):
                yield item
        finally:
            self.subscriptions -= 1

    async def _follow(
        self, subscription: Subscription, positions: dict[str, int]
    ) -> AsyncIterator[tuple[list[EventRow], dict[str, int]]]:
        # Arrivals whose departure is not delivered yet: shard -> (source, merchant, epoch).
        held: dict[str, tuple[str, str, int]] = {}
        # Per shard, a position up to which this subscription has read everything
        # (of its filter): a shard is read again once more was numbered there, and
        # every shard on a full pass (the first, and then at least once per
        # event_idle_poll_s, busy or not: a NOTIFY may have been lost, or come from
        # a shard not listened to yet, and traffic on other shards used to keep
        # such a shard unread for as long as it lasted).
        read_up_to: dict[str, int] = {}
        full_pass = True
        loop = asyncio.get_running_loop()
        read_at = -limits.event_read_gap_s
        full_pass_at = loop.time()
        while not self._closed:
            await self._listen()
            await self._join_new_shards(subscription, positions)
            # Batching, not synchronisation: what is numbered meanwhile joins this read.
            gap_s = read_at + limits.event_read_gap_s - loop.time()
            if gap_s > 0:
                await asyncio.sleep(gap_s)
            read_at = loop.time()
            if read_at - full_pass_at >= limits.event_idle_poll_s:
                full_pass = True
            if full_pass:
                full_pass_at = read_at
            changed = self._changed
            delivered = False
            for name in list(positions):
                shard = self.cluster.shards.get(name)
                if shard is None:
                    continue
                try:
                    if name in held and not await self._departed(held[name], positions):
                        continue
                    held.pop(name, None)
                    numbered = self._numbered.get(name, 0)
                    if not full_pass and read_up_to.get(name, -1) >= numbered:
                        continue
                    self.shard_reads[name] += 1
                    rows = await EventStore(shard).read(
                        after=positions[name],
                        limit=limits.event_read_batch_max,
                        merchant_id=subscription.merchant_id,
                    )
                    if rows and rows[0].position != positions[name] + 1:
                        oldest, _ = await EventStore(shard).bounds()
                        if positions[name] + 1 < oldest:
                            raise EventsPruned(name, positions[name], oldest)
                except ShardUnavailable as error:
                    log.debug("events of shard %s not read now: %s", name, error)
                    continue
                # Fewer rows than asked for: the read saw everything numbered before it.
                read_all = len(rows) < limits.event_read_batch_max
                batch: list[EventRow] = []
                for row in rows:
                    if row.kind is EventKind.MERCHANT_MOVED_IN:
                        arrival = _arrival(row)
                        # Another shard's departure: delivered in an earlier batch, if
                        # positions passed it (a batch is yielded before the next read).
                        if arrival[0] in positions and not await self._departed(arrival, positions):
                            held[name] = arrival
                            read_all = False
                            break
                    positions[name] = row.position
                    if subscription.account is not None and not _touches(row, subscription.account):
                        continue
                    batch.append(row)
                if batch:
                    delivered = True
                    yield batch, dict(positions)
                if read_all:
                    read_up_to[name] = max(numbered, positions[name])
            full_pass = False
            if not delivered:
                try:
                    async with asyncio.timeout(limits.event_idle_poll_s):
                        await changed.wait()
                except TimeoutError:
                    full_pass = True

    async def _join_new_shards(self, subscription: Subscription, positions: dict[str, int]) -> None:
        """Adds the shards a config change added since the subscription started, from
        their oldest kept event: merchants move onto a new shard with the rebalance
        that follows the change, and their arrivals and what follows must reach a
        subscription that was open already (it read the shards of its start only)."""
        for name, shard in list(self.cluster.shards.items()):
            if name in positions:
                continue
            try:
                store = EventStore(shard)
                oldest, _ = await store.bounds()
                if subscription.consumer is not None:
                    await store.register(subscription.consumer, position=oldest - 1)
            except ShardUnavailable as error:
                log.debug("shard %s not joined to a subscription now: %s", name, error)
                continue
            positions[name] = oldest - 1
            log.info("a subscription follows shard %s from position %d", name, oldest)

    async def _departed(self, arrival: tuple[str, str, int], positions: Mapping[str, int]) -> bool:
        """Whether the source's departure matching an arrival has been delivered."""
        source, merchant_id, epoch = arrival
        shard = self.cluster.shards.get(source)
        if shard is None:
            return True  # the source left the config: nothing of it can come
        # Departures are never pruned (event_statements.PRUNE_EVENTS): none found
        # means the rebalance has not marked it yet. A source that cannot answer
        # now holds the arrival back, as an unavailable shard's events wait
        # (raised out of the stream, it ended the subscription with UNKNOWN).
        try:
            departed_at = await EventStore(shard).moved_out_position(merchant_id, epoch)
        except ShardUnavailable as error:
            log.debug("departure from shard %s not looked up now: %s", source, error)
            return False
        return departed_at is not None and positions.get(source, 0) >= departed_at


def _arrival(row: EventRow) -> tuple[str, str, int]:
    detail = row.body["detail"]
    return str(detail["from_shard"]), str(detail["merchant_id"]), int(detail["epoch"])


def _touches(row: EventRow, account: AccountKey) -> bool:
    body = row.body
    if body.get("account") is not None:
        a = body["account"]
        return bool(
            a["merchant_id"] == account.merchant_id and a["account_id"] == account.account_id
        )
    return any(
        e["merchant_id"] == account.merchant_id and e["account_id"] == account.account_id
        for e in body.get("entries") or ()
    )

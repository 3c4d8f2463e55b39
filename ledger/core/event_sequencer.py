"""Numbers each shard's committed outbox events, and keeps retention, in the background.

One task per replica. A commit on this replica wakes it (Shard.on_commit); with
nothing written here it looks at every shard's outbox each limits.event_idle_poll_s
(events written by another replica, a rebalance, the saga trigger). Shards let one
sequencer at a time work (advisory lock 7306); several replicas are safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from ledger import limits
from ledger.routing.cluster import Cluster
from ledger.storage.due_probe import DueProbes
from ledger.storage.errors import ShardUnavailable
from ledger.storage.events import EventStore
from ledger.telemetry import metrics
from ledger.wake import next_tick_at

log = logging.getLogger(__name__)


class EventSequencer:
    def __init__(
        self,
        cluster: Cluster,
        *,
        idle_poll_s: float = limits.event_idle_poll_s,
        due_probes: DueProbes | None = None,
    ) -> None:
        self.cluster = cluster
        # How often every shard's outbox is looked at with no commit here (inf:
        # never; another worker of the replica does it, and retention with it).
        self.idle_poll_s = idle_poll_s
        # The looks on the clock: the replica's shared readings, else its own.
        self.due_probes = due_probes or DueProbes()
        # Shards a commit here may have written events to since the last round.
        self._dirty: set[str] = set()
        self._poked = asyncio.Event()
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._retained_at = 0.0
        # Told after a round numbered events on a shard, with the last position given
        # (the feed wakes its readers of that shard).
        self.on_sequenced: Callable[[str, int], None] | None = None
        self._lags: list[tuple[float, dict[str, str]]] = []
        self._lag_seconds: list[tuple[float, dict[str, str]]] = []
        self._backlog: list[tuple[float, dict[str, str]]] = []
        metrics.register_gauge_source("event_consumer_lag", lambda: self._lags)
        metrics.register_gauge_source("event_consumer_lag_seconds", lambda: self._lag_seconds)
        metrics.register_gauge_source("event_outbox_backlog", lambda: self._backlog)

    def start(self) -> None:
        self._hook_shards()
        self._task = asyncio.create_task(self._run(), name="event-sequencer")

    async def stop(self) -> None:
        self._stopped = True
        self._poked.set()
        if self._task is not None:
            await self._task
        if self._retention is not None:
            await self._retention
        for shard in self.cluster.shards.values():
            shard.on_commit = None

    def poke(self, shard_name: str) -> None:
        """A transaction committed on the shard: it may have written events."""
        self._dirty.add(shard_name)
        self._poked.set()

    def _hook_shards(self) -> None:
        # Shards come and go with config reloads; hooking is an assignment.
        for shard in self.cluster.shards.values():
            shard.on_commit = self.poke

    async def _drain(self, name: str, *, poked: bool) -> int:
        """poked: a commit here may have written events (no need to look first)."""
        shard = self.cluster.shards.get(name)
        if shard is None:
            return 0
        store = EventStore(shard)
        numbered = last_position = 0
        try:
            # Woken by a commit here: events wait. On the clock: look first.
            if not poked and not (await self.due_probes.read(shard, shared=True)).events_waiting:
                return 0
            while True:
                taken, last = await store.sequence_round(events_max=limits.event_sequence_batch_max)
                numbered += taken
                last_position = max(last_position, last)
                if taken < limits.event_sequence_batch_max:
                    break
        except ShardUnavailable as error:
            log.debug("event sequencing skipped: %s", error)
        if numbered:
            metrics.events_sequenced.add(numbered, {"shard": name})
            if self.on_sequenced is not None:
                self.on_sequenced(name, last_position)
        return numbered

    async def _run(self) -> None:
        while not self._stopped:
            # On the idle workers' tick (ledger/storage/due_probe.py); inf: never.
            idle_until = next_tick_at(self.idle_poll_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(None if math.isinf(idle_until) else idle_until):
                    await self._poked.wait()
            self._poked.clear()
            if self._stopped:
                break
            self._hook_shards()
            # Woken by commits: those shards; by the clock: every shard.
            poked, self._dirty = self._dirty, set()
            try:
                for name in sorted(poked or self.cluster.shards):
                    await self._drain(name, poked=bool(poked))
            except Exception:
                log.exception("event sequencing failed")
            if (
                not math.isinf(self.idle_poll_s)
                and time.monotonic() - self._retained_at >= limits.event_retention_interval_s
                and (self._retention is None or self._retention.done())
            ):
                # A task of its own: numbering never waits for a retention pass
                # (its prune deletes up to event_prune_batch_max rows per shard).
                self._retained_at = time.monotonic()
                self._retention = asyncio.create_task(self._retain(), name="event-retention")
            # Batching, not synchronisation: commits in this gap join the next round.
            await asyncio.sleep(limits.event_sequence_round_gap_s)

    def lags(self) -> dict[tuple[str, str], float]:
        """(consumer, shard) -> events not acknowledged, as of the last retention pass."""
        return {(labels["consumer"], labels["shard"]): lag for lag, labels in self._lags}

    async def _retain(self) -> None:
        try:
            await self.retain_now()
        except Exception:
            log.exception("event retention failed")

    async def retain_now(self) -> None:
        """Lapses consumers past the bound, prunes, and refreshes the lag gauges."""
        lags: list[tuple[float, dict[str, str]]] = []
        lag_seconds: list[tuple[float, dict[str, str]]] = []
        backlog: list[tuple[float, dict[str, str]]] = []
        for name, shard in list(self.cluster.shards.items()):
            store = EventStore(shard)
            try:
                lapsed, pruned = await store.retain(
                    lag_events_max=limits.event_consumer_lag_events_max,
                    lag_s_max=limits.event_consumer_lag_s_max,
                    retention_s_min=limits.event_retention_s_min,
                    prune_max=limits.event_prune_batch_max,
                )
                for consumer in lapsed:
                    log.warning(
                        "event consumer %r lapsed on shard %s: it fell behind the retention bound",
                        consumer,
                        name,
                    )
                if pruned:
                    log.info("pruned %d events on shard %s", pruned, name)
                for c in await store.consumers():
                    labels = {"consumer": c.consumer, "shard": name}
                    lags.append((float(c.lag_events), labels))
                    lag_seconds.append((c.lag_s, labels))
                rows, _ = await store.outbox_backlog()
                backlog.append((float(rows), {"shard": name}))
            except ShardUnavailable as error:
                log.debug("event retention skipped: %s", error)
        self._lags, self._lag_seconds, self._backlog = lags, lag_seconds, backlog

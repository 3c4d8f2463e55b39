"""Releases pending transfers whose timeout passed, on every shard, in the background.

With nothing due the sweeper asks each shard when its next hold expires (one read)
and sleeps until then (at most limits.background_idle_poll_s_max); a hold with a
timeout made by this replica wakes it sooner (wake_within). A shard that has due
holds it cannot release yet, or that is unavailable, is swept every
limits.expiry_sweep_interval_s, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ledger import limits
from ledger.routing.cluster import Cluster
from ledger.storage.due_probe import DueProbes
from ledger.storage.errors import ShardUnavailable
from ledger.storage.sagas import SagaStore
from ledger.storage.shard import Shard
from ledger.wake import WakeSchedule, in_s, next_tick_at

log = logging.getLogger(__name__)


class ExpirySweeper:
    """One task per service replica; shards serialise sweepers with an advisory lock."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        idle_poll_s: float = limits.background_idle_poll_s_max,
        due_probes: DueProbes | None = None,
    ) -> None:
        self.cluster = cluster
        # With nothing due, how long until the shards are asked again (inf: only
        # when this replica's own work wakes it; another process polls for the rest).
        self.idle_poll_s = idle_poll_s
        # The looks at the shards: the replica's shared readings, else its own.
        self.due_probes = due_probes or DueProbes()
        self.schedule = WakeSchedule()
        # Told when a sweep started EXPIRE sagas (the recovery worker drives them), so
        # that the worker (which the server sets here) wakes for them.
        self.on_sagas_started: Callable[[float], None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Sweeps finished (or failed) since start: lets a test wait for rounds, not time.
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="expiry-sweeper")

    async def stop(self) -> None:
        self.schedule.stop()
        if self._task is not None:
            await self._task

    def wake_within(self, delay_s: float) -> None:
        """A hold made here expires in delay_s: sweep by then."""
        self.schedule.wake_within(delay_s)

    async def sweep_once(self) -> int:
        released, _ = await self._sweep_round(shared=False)
        return released

    async def _sweep_round(self, *, shared: bool) -> tuple[int, float]:
        """(holds released, event-loop time a shard needs a look again).

        shared: a round on the clock, which may take a reading another worker made."""
        released = 0
        wake_at = next_tick_at(self.idle_poll_s)
        for shard in list(self.cluster.shards.values()):
            try:
                count, shard_wake_at = await self._sweep_shard(shard, shared=shared)
                released += count
                wake_at = min(wake_at, shard_wake_at)
            except ShardUnavailable as error:
                # The shard logs its change of state once; this runs every round.
                log.debug("expiry sweep skipped: %s", error)
                wake_at = min(wake_at, in_s(limits.expiry_sweep_interval_s))
        return released, wake_at

    async def _sweep_shard(self, shard: Shard, *, shared: bool) -> tuple[int, float]:
        if not shard.marked_unavailable:
            due_s = (await self.due_probes.read(shard, shared=shared)).expiry_due_s
            if due_s is None:
                return 0, next_tick_at(self.idle_poll_s)
            if due_s > 0:
                return 0, in_s(due_s)
        released = 0
        # Drain due expiries in bounded steps so one shard cannot hog a round.
        for _ in range(limits.expiry_sweeps_per_round_max):
            count = await shard.expire_due_pendings()
            released += count
            if count < limits.expiry_sweep_batch_max:
                break
        # Cross-shard pending transfers: the debit side now, the credit side by a saga.
        sagas_started = await SagaStore(shard).expire_due(limit=limits.expiry_sweep_batch_max)
        if sagas_started and self.on_sagas_started is not None:
            self.on_sagas_started(0.0)
        released += sagas_started
        # Due holds may remain that cannot be released yet (a saga still running, a
        # merchant moving): look again at the old interval, not in a busy loop.
        return released, in_s(limits.expiry_sweep_interval_s)

    async def _run(self) -> None:
        woken = True
        while not self.schedule.stopped:
            wake_at = in_s(limits.expiry_sweep_interval_s)
            try:
                _, wake_at = await self._sweep_round(shared=not woken)
            except Exception:
                log.exception("expiry sweep failed")
            self.rounds += 1
            woken = await self.schedule.sleep_until(wake_at)

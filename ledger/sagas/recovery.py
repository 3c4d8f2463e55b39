"""The recovery worker every replica runs: it claims due sagas and drives them on.

Claims use FOR UPDATE SKIP LOCKED and a lease, so replicas share the work
without blocking each other; a replica that dies mid-saga loses its lease and
another one resumes the saga from its recorded state.

With nothing due the worker asks each shard when its next saga is due (one read)
and sleeps until then (at most limits.background_idle_poll_s_max); a retry this
replica schedules wakes it sooner (the runner's on_retry_scheduled). A shard with due
sagas it could not claim, or that is unavailable, is tried every interval_s.
"""

from __future__ import annotations

import asyncio
import logging
import math

from ledger import limits
from ledger.domain.sagas import Saga
from ledger.sagas.runner import SagaRunner, saga_attributes
from ledger.storage.due_probe import DueProbes
from ledger.storage.errors import ShardUnavailable
from ledger.storage.sagas import SagaStore
from ledger.storage.shard import Shard
from ledger.telemetry import metrics
from ledger.telemetry.tracing import context_from_traceparent, tracer
from ledger.wake import WakeSchedule, in_s, next_tick_at

log = logging.getLogger(__name__)


class RecoveryWorker:
    def __init__(
        self,
        runner: SagaRunner,
        *,
        interval_s: float = limits.saga_recovery_interval_s,
        claims_per_round_max: int = limits.saga_claims_per_round_max,
        idle_poll_s: float = limits.background_idle_poll_s_max,
        refreshes_gauges: bool = True,
        due_probes: DueProbes | None = None,
    ) -> None:
        self.runner = runner
        self.interval_s = interval_s
        # As ExpirySweeper.idle_poll_s; and the gauges are one process's job.
        self.idle_poll_s = idle_poll_s
        # The looks at the shards: the replica's shared readings, else its own.
        self.due_probes = due_probes or DueProbes()
        self.refreshes_gauges = refreshes_gauges
        self.claims_per_round_max = claims_per_round_max
        self.schedule = WakeSchedule()
        runner.on_retry_scheduled = self.schedule.wake_within
        self._task: asyncio.Task[None] | None = None
        self._gauge_values: list[tuple[float, dict[str, str]]] = []
        self._rounds = 0
        self._gauges_refreshed_at = float("-inf")
        self._merchant_values: list[tuple[float, dict[str, str]]] = []
        metrics.register_gauge_source("sagas", lambda: self._gauge_values)
        metrics.register_gauge_source("merchants", lambda: self._merchant_values)
        # Per shard: whether the last refresh reached it, and its oldest running saga's age.
        self._shard_values: list[tuple[float, dict[str, str]]] = []
        self._saga_age_values: list[tuple[float, dict[str, str]]] = []
        metrics.register_gauge_source("shard_reachable", lambda: self._shard_values)
        metrics.register_gauge_source("saga_age", lambda: self._saga_age_values)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="saga-recovery")

    async def stop(self) -> None:
        self.schedule.stop()
        if self._task is not None:
            await self._task

    async def run_once(self) -> int:
        """Claims and drives every due saga once; returns how many it drove."""
        driven, _ = await self._round(shared=False)
        return driven

    async def _round(self, *, shared: bool) -> tuple[int, float]:
        """(sagas driven, event-loop time a shard needs a look again).

        shared: a round on the clock, which may take a reading another worker made."""
        driven = 0
        wake_at = next_tick_at(self.idle_poll_s)
        for shard in list(self.runner.cluster.shards.values()):
            try:
                count, shard_wake_at = await self._claim_on(shard, shared=shared)
            except ShardUnavailable as error:
                # The shard logs its change of state once; this runs every round.
                log.debug("saga recovery skipped a shard: %s", error)
                wake_at = min(wake_at, in_s(self.interval_s))
                continue
            driven += count
            wake_at = min(wake_at, shard_wake_at)
        return driven, wake_at

    async def _claim_on(self, shard: Shard, *, shared: bool) -> tuple[int, float]:
        store = SagaStore(shard)
        # A shard marked unavailable is tried with a claim (a write) every round, as
        # before: its return is logged by a transaction that goes through.
        if not shard.marked_unavailable:
            due_s = (await self.due_probes.read(shard, shared=shared)).saga_due_s
            if due_s is None:
                return 0, next_tick_at(self.idle_poll_s)
            if due_s > 0:
                return 0, in_s(due_s)
        claimed = await store.claim_due(
            owner=self.runner.owner,
            limit=self.claims_per_round_max,
            lease_s=self.runner.settings.lease_s,
        )
        if claimed:
            await asyncio.gather(*(self._resume(saga) for saga in claimed))
        # Due sagas may remain (more than one round's claims, or held by another
        # worker): look again after interval_s, not in a busy loop.
        return len(claimed), in_s(self.interval_s)

    async def _resume(self, saga: Saga) -> Saga:
        """Drives a claimed saga inside the trace of the request that started it."""
        parent = context_from_traceparent(saga.trace_context)
        with tracer.start_as_current_span(
            "saga resume",
            context=parent,
            attributes=saga_attributes(saga) | {"ledger.saga.attempts": saga.attempts},
        ):
            return await self.runner.drive(saga)

    async def refresh_gauges(self) -> None:
        """Counts unfinished sagas (ledger_sagas) and merchants by state (ledger_merchants),
        and notes this replica's config epoch on every shard (`ledger shards status`)."""
        sagas: list[tuple[float, dict[str, str]]] = []
        merchants: list[tuple[float, dict[str, str]]] = []
        reachable: list[tuple[float, dict[str, str]]] = []
        ages: list[tuple[float, dict[str, str]]] = []
        for name, shard in list(self.runner.cluster.shards.items()):
            try:
                readings = await shard.gauge_readings(self.runner.owner, self.runner.cluster.epoch)
            except ShardUnavailable:
                reachable.append((0.0, {"shard": name}))
                continue
            reachable.append((1.0, {"shard": name}))
            ages.append((readings.oldest_running_saga_age_s, {"shard": name}))
            sagas.append((readings.running_sagas, {"shard": name, "state": "running"}))
            sagas.append((readings.dead_sagas, {"shard": name, "state": "dead"}))
            for merchant_state in ("active", "moving", "incoming", "moved"):
                merchants.append(
                    (
                        readings.merchants_by_state.get(merchant_state, 0),
                        {"shard": name, "state": merchant_state},
                    )
                )
        self._gauge_values = sagas
        self._merchant_values = merchants
        self._shard_values = reachable
        self._saga_age_values = ages

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        woken = True
        while not self.schedule.stopped:
            wake_at = in_s(self.interval_s)
            try:
                _, wake_at = await self._round(shared=not woken)
                self._rounds += 1
                # On the idle tick, as the looks (the round before may have run a
                # moment after its tick: a refresh is due a little early).
                if (
                    self.refreshes_gauges
                    and loop.time() - self._gauges_refreshed_at
                    >= limits.gauge_refresh_interval_s - limits.due_probe_share_s
                ):
                    self._gauges_refreshed_at = loop.time()
                    await self.refresh_gauges()
            except Exception:
                log.exception("saga recovery round failed")
            gauges_at = math.inf
            if self.refreshes_gauges:
                gauges_at = next_tick_at(limits.gauge_refresh_interval_s)
            woken = await self.schedule.sleep_until(min(wake_at, gauges_at))

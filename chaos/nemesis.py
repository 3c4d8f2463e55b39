"""Injects the planned faults at their times, and repairs each after its duration.

Sleeping here paces the schedule; it never stands in for waiting on a condition
(a restarted replica is waited for by its "serving" line, a started shard by
pg_isready, both with deadlines).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import asyncpg

from chaos.clients import Caller, OpRecord
from chaos.cluster import ChaosCluster, DrainResult
from chaos.holds import (
    holds_moves_wait_for,
    open_holds,
    relayed_holds,
    settle_failure,
    settle_holds,
)
from chaos.plan import REBALANCE_WEIGHT, SHARD_NAMES, Fault, FaultKind, admin_lane


@dataclass
class FaultRecord:
    fault: Fault
    # Seconds since the run started; None if it never began (or never healed).
    started_s: float | None = None
    healed_s: float | None = None
    detail: str = ""
    error: str = ""
    # Findings about the service (not the harness): a drain that did not finish,
    # a hold it relays that could not be settled. The run reports them as violations.
    violations: list[tuple[str, str]] = field(default_factory=list)
    # For a drain: what it came to.
    drain: DrainResult | None = None

    def describe(self) -> str:
        when = (
            f"began {self.started_s:.2f}s, healed {self.healed_s:.2f}s"
            if self.started_s is not None and self.healed_s is not None
            else "not completed"
        )
        text = f"{self.fault.describe()}: {when}"
        if self.detail:
            text += f"; {self.detail}"
        if self.error:
            text += f"; ERROR {self.error}"
        return text


class Nemesis:
    def __init__(
        self, cluster: ChaosCluster, schedule: tuple[Fault, ...], *, caller: Caller
    ) -> None:
        self.cluster = cluster
        self.records = [FaultRecord(fault) for fault in schedule]
        # A drain settles the holds its shard relays through the service, as their
        # callers would; the settles join the history the checker judges.
        self.caller = caller
        self.settles: list[OpRecord] = []
        # The planner never overlaps faults on one target; a slow repair (a replica
        # restarting) could, so each target takes one fault at a time.
        self._locks: dict[str, asyncio.Lock] = {}
        self._start = 0.0

    def _now_s(self) -> float:
        return asyncio.get_running_loop().time() - self._start

    async def run(self, *, start: float) -> None:
        """Runs the whole schedule; start is the run's zero on the event loop's clock."""
        self._start = start
        tasks = []
        for record in self.records:
            await asyncio.sleep(max(0.0, record.fault.at_s - self._now_s()))
            tasks.append(asyncio.create_task(self._inject(record)))
        await asyncio.gather(*tasks)

    async def _inject(self, record: FaultRecord) -> None:
        fault = record.fault
        # Rebalances and drains share one lane: each is a whole admin workflow, one
        # at a time.
        lock = self._locks.setdefault(admin_lane(fault.fault, fault.target), asyncio.Lock())
        async with lock:
            record.started_s = self._now_s()
            try:
                if fault.fault is FaultKind.DRAIN:
                    record.detail = await self._drain(record)
                else:
                    record.detail = await self._apply(fault)
                record.healed_s = self._now_s()
            except Exception as error:
                record.error = f"{type(error).__name__}: {error}"

    async def _drain(self, record: FaultRecord) -> str:
        """Drains the target until DRAINED (or the deadline), retires it, keeps it out
        for the fault's duration, then makes it active again and rebalances back."""
        fault = record.fault
        index = self.records.index(record)
        cluster = self.cluster

        async def settle_pinning(round_number: int, summary: tuple[str, ...]) -> str:
            return await self._settle_pinning(record, index, round_number, summary)

        drained = await cluster.drain(fault.target, between_runs=settle_pinning)
        record.drain = drained
        if not drained.finished:
            record.violations.append(
                (
                    f"drain {fault.target} (epoch {drained.epoch})",
                    f"not DRAINED within the deadline: {drained.describe()}",
                )
            )
        retired = ""
        if drained.finished:
            # Retired once the event subscriber (a registered consumer) has the
            # shard's whole stream; made active again below, as a shard added.
            finished, runs = await cluster.retire(fault.target)
            retired = f"; retired: {runs}"
            if not finished:
                record.violations.append(
                    (f"retire {fault.target}", f"not retired within the deadline: {runs}")
                )
        await asyncio.sleep(fault.duration_s)
        back = await cluster.rebalance(
            dict.fromkeys(SHARD_NAMES, 1),
            kill_after_s=None,
            states=dict.fromkeys(SHARD_NAMES, "active"),
        )
        return f"{drained.describe()}{retired}; active again: {back}"

    async def _settle_pinning(
        self, record: FaultRecord, index: int, round_number: int, summary: tuple[str, ...]
    ) -> str:
        """Settles, through the service, the holds that keep the draining shard: those
        it still relays (what pins it once its merchants have moved), and those the
        last run's summary names as what its merchants' moves wait for (a hold whose
        path would repeat a relay step: chaos seed 272), as their callers would
        when the admin asks them to."""
        target = record.fault.target
        waited_for = holds_moves_wait_for(summary, source=target)
        try:
            keys = await relayed_holds(self.cluster.shards[target].direct_dsn)
        except (OSError, asyncpg.PostgresError) as error:
            return f"relays of {target} unreadable: {type(error).__name__}"
        holds, unlooked = await open_holds(self.caller, [*keys, *waited_for])
        records = await settle_holds(
            self.caller,
            holds,
            suffix=f"drain{index}r{round_number}",
            kind="drain_settle",
            now_s=self._now_s,
        )
        self.settles += records
        answers: Counter[str] = Counter()
        for settle in records:
            why = settle_failure(settle)
            if why.startswith(("answered", "error")):
                record.violations.append(
                    (f"drain {target}: settle {settle.op.op_id}", f"a hold pinning the drain {why}")
                )
            answer = settle.answers[0].result_name if settle.answers else settle.outcome
            answers[answer.removeprefix("TRANSFER_RESULT_")] += 1
        text = f"{len(records)} of {len(keys)} relayed hold(s)"
        if waited_for:
            text += f" and {len(waited_for)} a move waits for"
        text += " open, settled"
        if answers:
            text += " (" + ", ".join(f"{a} {n}" for a, n in answers.most_common()) + ")"
        return text + (f"; {unlooked}" if unlooked else "")

    async def _apply(self, fault: Fault) -> str:
        cluster = self.cluster
        if fault.fault is FaultKind.KILL_REPLICA:
            replica = cluster.replica(fault.target)
            await replica.kill()
            await asyncio.sleep(fault.duration_s)
            failed_before = len(replica.failed_starts)
            await replica.start_supervised()
            failed = replica.failed_starts[failed_before:]
            tries = f" after {len(failed)} failed start(s): {failed[-1]}" if failed else ""
            return f"restarted on port {replica.port}{tries}"
        if fault.fault is FaultKind.REBALANCE:
            raised = {n: REBALANCE_WEIGHT if n == fault.target else 1 for n in SHARD_NAMES}
            kill_s = fault.kill_after_ms / 1000 if fault.kill_after_ms else None
            there = await cluster.rebalance(raised, kill_after_s=kill_s)
            await asyncio.sleep(fault.duration_s)
            back = await cluster.rebalance(dict.fromkeys(SHARD_NAMES, 1), kill_after_s=None)
            return f"{there}; back: {back}"
        if fault.fault is FaultKind.STOP_SHARD:
            await cluster.stop_shard(fault.target)
            await asyncio.sleep(fault.duration_s)
            await cluster.start_shard(fault.target)
            return "started again"
        proxy = cluster.proxy(fault.target)
        if fault.fault is FaultKind.PARTITION_SHARD:
            proxy.set_refusing(True)
            cut = proxy.cut()
            refused_before = proxy.connections_refused
            try:
                await asyncio.sleep(fault.duration_s)
            finally:
                proxy.set_refusing(False)
            return f"{cut} connections cut, {proxy.connections_refused - refused_before} refused"
        if fault.fault is FaultKind.SLOW_SHARD:
            proxy.set_latency_ms(fault.latency_ms)
            try:
                await asyncio.sleep(fault.duration_s)
            finally:
                proxy.set_latency_ms(0)
            return ""
        raise AssertionError(f"unknown fault {fault.fault}")

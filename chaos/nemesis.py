"""Injects the planned faults at their times, and repairs each after its duration.

Sleeping here paces the schedule; it never stands in for waiting on a condition
(a restarted replica is waited for by its "serving" line, a started shard by
pg_isready, both with deadlines).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from chaos.cluster import ChaosCluster
from chaos.plan import REBALANCE_LANE, REBALANCE_WEIGHT, SHARD_NAMES, Fault, FaultKind


@dataclass
class FaultRecord:
    fault: Fault
    # Seconds since the run started; None if it never began (or never healed).
    started_s: float | None = None
    healed_s: float | None = None
    detail: str = ""
    error: str = ""

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
    def __init__(self, cluster: ChaosCluster, schedule: tuple[Fault, ...]) -> None:
        self.cluster = cluster
        self.records = [FaultRecord(fault) for fault in schedule]
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
        # Rebalances share one lane: each is a whole admin workflow, one at a time.
        lane = REBALANCE_LANE if fault.fault is FaultKind.REBALANCE else fault.target
        lock = self._locks.setdefault(lane, asyncio.Lock())
        async with lock:
            record.started_s = self._now_s()
            try:
                record.detail = await self._apply(fault)
                record.healed_s = self._now_s()
            except Exception as error:
                record.error = f"{type(error).__name__}: {error}"

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

"""Releases pending transfers whose timeout passed, on every shard, in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ledger import limits
from ledger.routing.cluster import Cluster
from ledger.storage.errors import ShardUnavailable
from ledger.storage.sagas import SagaStore

log = logging.getLogger(__name__)


class ExpirySweeper:
    """One task per service replica; shards serialise sweepers with an advisory lock."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Sweeps finished (or failed) since start: lets a test wait for rounds, not time.
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="expiry-sweeper")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def sweep_once(self) -> int:
        released = 0
        for shard in list(self.cluster.shards.values()):
            try:
                # Drain due expiries in bounded steps so one shard cannot hog a round.
                for _ in range(limits.expiry_sweeps_per_round_max):
                    count = await shard.expire_due_pendings()
                    released += count
                    if count < limits.expiry_sweep_batch_max:
                        break
                # Cross-shard pending transfers: the debit side now, the credit side by a saga.
                released += await SagaStore(shard).expire_due(limit=limits.expiry_sweep_batch_max)
            except ShardUnavailable as error:
                # The shard logs its change of state once; this runs every round.
                log.debug("expiry sweep skipped: %s", error)
        return released

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sweep_once()
            except Exception:
                log.exception("expiry sweep failed")
            self.rounds += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), limits.expiry_sweep_interval_s)

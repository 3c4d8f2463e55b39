"""The recovery worker every replica runs: it claims due sagas and drives them on.

Claims use FOR UPDATE SKIP LOCKED and a lease, so replicas share the work
without blocking each other; a replica that dies mid-saga loses its lease and
another one resumes the saga from its recorded state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ledger import limits
from ledger.sagas.runner import SagaRunner
from ledger.storage.errors import ShardUnavailable
from ledger.storage.sagas import SagaStore

log = logging.getLogger(__name__)


class RecoveryWorker:
    def __init__(
        self,
        runner: SagaRunner,
        *,
        interval_s: float = limits.saga_recovery_interval_s,
        claims_per_round_max: int = limits.saga_claims_per_round_max,
    ) -> None:
        self.runner = runner
        self.interval_s = interval_s
        self.claims_per_round_max = claims_per_round_max
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="saga-recovery")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def run_once(self) -> int:
        """Claims and drives every due saga once; returns how many it drove."""
        driven = 0
        for shard in list(self.runner.cluster.shards.values()):
            try:
                claimed = await SagaStore(shard).claim_due(
                    owner=self.runner.owner,
                    limit=self.claims_per_round_max,
                    lease_s=self.runner.settings.lease_s,
                )
            except ShardUnavailable as error:
                log.warning("saga recovery skipped a shard: %s", error)
                continue
            if claimed:
                await asyncio.gather(*(self.runner.drive(saga) for saga in claimed))
                driven += len(claimed)
        return driven

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.run_once()
            except Exception:
                log.exception("saga recovery round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

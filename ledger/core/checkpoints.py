"""Records hash-chain checkpoints on every shard in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ledger import limits
from ledger.routing.cluster import Cluster
from ledger.storage.chain import ChainStore, Checkpoint
from ledger.storage.errors import ShardBusy, ShardUnavailable

log = logging.getLogger(__name__)


class ChainCheckpointer:
    """One task per service replica; shards let one checkpointer in at a time."""

    def __init__(self, cluster: Cluster, *, interval_s: float) -> None:
        self.cluster = cluster
        self.interval_s = interval_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chain-checkpointer")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def checkpoint_once(self) -> dict[str, Checkpoint]:
        made: dict[str, Checkpoint] = {}
        for name, shard in list(self.cluster.shards.items()):
            try:
                checkpoint = await ChainStore(shard).checkpoint(
                    heads_max=limits.chain_checkpoint_heads_max
                )
            except (ShardUnavailable, ShardBusy) as error:
                log.warning("chain checkpoint skipped: %s", error)
                continue
            if checkpoint is not None:
                made[name] = checkpoint
                log.info(
                    "chain checkpoint %d on %s: %d heads, digest %s",
                    checkpoint.checkpoint_id,
                    name,
                    checkpoint.heads,
                    checkpoint.digest.hex(),
                )
        return made

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            if self._stop.is_set():
                return
            try:
                await self.checkpoint_once()
            except Exception:
                log.exception("chain checkpoint failed")

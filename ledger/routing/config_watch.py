"""Reloads the shard config when its file changes, so replicas follow an admin's edit.

The same loop finishes setting up shards that were down when the replica started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ledger.routing.cluster import Cluster

log = logging.getLogger(__name__)

# How often the file's modification time is checked; a redirect or SIGHUP
# reloads at once anyway, this only bounds how long an idle replica lags.
CONFIG_POLL_INTERVAL_S = 1.0


class ConfigWatcher:
    def __init__(self, cluster: Cluster, *, interval_s: float = CONFIG_POLL_INTERVAL_S) -> None:
        self.cluster = cluster
        self.interval_s = interval_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._mtime_ns = self._current_mtime_ns()

    def _current_mtime_ns(self) -> int | None:
        path = self.cluster.config_path
        if path is None:
            return None
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return None

    def start(self) -> None:
        if self.cluster.config_path is not None:
            self._task = asyncio.create_task(self._run(), name="config-watch")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            mtime_ns = self._current_mtime_ns()
            if mtime_ns is not None and mtime_ns != self._mtime_ns:
                self._mtime_ns = mtime_ns
                try:
                    if await self.cluster.reload():
                        log.info("shard config reloaded: epoch %d", self.cluster.epoch)
                except Exception:
                    log.exception(
                        "shard config reload failed; keeping epoch %d", self.cluster.epoch
                    )
            try:
                await self.cluster.migrate_unreached()
            except Exception:
                log.exception("setting up shards that were down failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

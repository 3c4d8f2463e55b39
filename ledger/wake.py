"""Sleeping until background work is due, and being woken when it comes due sooner.

The expiry sweeper and the saga recovery worker sleep until the next due time the
shards report (bounded by limits.background_idle_poll_s_max), instead of polling
every few hundred milliseconds; work this replica schedules sooner (a hold with a
timeout, a saga retry) wakes them at once through wake_within().
"""

from __future__ import annotations

import asyncio
import contextlib


class WakeSchedule:
    def __init__(self) -> None:
        self._woken = asyncio.Event()
        self._stopped = False
        # Event-loop time the sleeper will wake at by itself; inf while it is awake.
        self._wakes_at = float("inf")
        # Pokes that arrived while the sleeper was awake: it looks again at once.
        self._poked = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        self._stopped = True
        self._woken.set()

    def wake_within(self, delay_s: float) -> None:
        """Work is due in delay_s: the sleeper looks then at the latest."""
        loop = asyncio.get_running_loop()
        if self._wakes_at == float("inf"):
            self._poked = True
            return
        if loop.time() + delay_s < self._wakes_at:
            # Wake now and work out the new due time from the shards (one read each):
            # simpler than a second timer, and a poke is rare next to a call.
            self._woken.set()

    async def sleep(self, sleep_s: float) -> None:
        """Sleeps sleep_s, or less if stopped or woken for sooner work."""
        if self._poked or self._stopped:
            self._poked = False
            return
        loop = asyncio.get_running_loop()
        self._wakes_at = loop.time() + sleep_s
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep_s):
                    await self._woken.wait()
        finally:
            self._wakes_at = float("inf")
            if not self._stopped:
                self._woken.clear()

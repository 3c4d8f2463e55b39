"""Sleeping until background work is due, and being woken when it comes due sooner.

The expiry sweeper and the saga recovery worker sleep until the next due time the
shards report (bounded by limits.background_idle_poll_s_max), instead of polling
every few hundred milliseconds; work this replica schedules sooner (a hold with a
timeout, a saga retry) wakes them at once through wake_within().
"""

from __future__ import annotations

import asyncio
import contextlib
import math


class WakeSchedule:
    def __init__(self) -> None:
        self._woken = asyncio.Event()
        self._stopped = False
        # Event-loop time the sleeper wakes at by itself, while it sleeps (inf: when woken).
        self._wakes_at = float("inf")
        # Pokes that arrived while the sleeper was awake: it looks again at once.
        self._poked = False
        self._sleeping = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def sleeps_until(self) -> float | None:
        """Event-loop time the sleeper wakes at by itself (inf: only when woken);
        None while it is awake."""
        return self._wakes_at if self._sleeping else None

    def stop(self) -> None:
        self._stopped = True
        self._woken.set()

    def wake_within(self, delay_s: float) -> None:
        """Work is due in delay_s: the sleeper looks then at the latest."""
        loop = asyncio.get_running_loop()
        if not self._sleeping:
            self._poked = True
            return
        if loop.time() + delay_s < self._wakes_at:
            # Wake now and work out the new due time from the shards (one read each):
            # simpler than a second timer, and a poke is rare next to a call.
            self._woken.set()

    async def sleep_until(self, wake_at: float) -> bool:
        """Sleeps until event-loop time wake_at, or less if stopped or woken for sooner
        work; whether it was woken (or stopped), not timed out."""
        if self._poked or self._stopped:
            self._poked = False
            return True
        self._wakes_at = wake_at
        self._sleeping = True
        woken = False
        try:
            with contextlib.suppress(TimeoutError):
                # inf: until woken (a worker that leaves others' work to another).
                async with asyncio.timeout_at(None if math.isinf(wake_at) else wake_at):
                    await self._woken.wait()
                    woken = True
        finally:
            self._sleeping = False
            if not self._stopped:
                self._woken.clear()
        return woken or self._stopped


def next_tick_at(period_s: float) -> float:
    """Event-loop time at which the clock next reaches a multiple of period_s (inf
    stays inf). Idle workers that sleep to the same tick look at the shards together
    and share one read per shard (ledger/storage/due_probe.py). A time, not a delay:
    one worked out before a round's reads still names the tick after them (as a
    delay it slid by the reads' time, 14 ms on a loaded machine)."""
    if math.isinf(period_s):
        return period_s
    now = asyncio.get_running_loop().time()
    return now - now % period_s + period_s


def in_s(delay_s: float) -> float:
    """Event-loop time delay_s from now."""
    return asyncio.get_running_loop().time() + delay_s

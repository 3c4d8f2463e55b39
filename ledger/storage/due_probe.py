"""One read per shard for the idle background workers' looks: is a saga due, a
hold expiring, an event waiting for its number.

With nothing to do, the expiry sweeper, the saga recovery worker and the event
sequencer each looked at every shard once a second with a statement of its own:
three statements per shard and second, most of an idle replica's CPU (issue 18:
idle at most 5 ms of CPU per s). They now sleep to the same tick
(ledger.wake.next_tick_at) and share one reading per shard: the first to look
reads all three answers in one statement, the others take that reading while it
is at most limits.due_probe_share_s old. Only looks on the clock share: a worker
woken for work of its own (a hold made here, a retry, a commit) reads afresh, so
nothing it was told of waits for a stale reading.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ledger import limits
from ledger.storage import event_statements as event_sql
from ledger.storage import saga_statements as saga_sql
from ledger.storage import statements as sql
from ledger.storage.shard import Shard

if TYPE_CHECKING:
    from ledger.storage.shard import Connection

DUE_READING = f"""
SELECT ({saga_sql.NEXT_SAGA_DUE_S}) AS saga_due_s,
       ({sql.NEXT_EXPIRY_DUE_S}) AS expiry_due_s,
       ({event_sql.OUTBOX_HAS_ROWS}) AS events_waiting
"""


@dataclass(frozen=True, slots=True)
class DueReading:
    # Seconds until due (<= 0: now), as the statements of the workers' own looks;
    # None: nothing of the kind here.
    saga_due_s: float | None
    expiry_due_s: float | None
    events_waiting: bool

    def aged(self, elapsed_s: float) -> DueReading:
        """The reading elapsed_s later: what was due in t is due in t - elapsed_s."""
        return DueReading(
            None if self.saga_due_s is None else self.saga_due_s - elapsed_s,
            None if self.expiry_due_s is None else self.expiry_due_s - elapsed_s,
            self.events_waiting,
        )


class DueProbes:
    """The readings of one replica's shards, shared by its idle workers."""

    def __init__(self, *, share_s: float = limits.due_probe_share_s) -> None:
        self.share_s = share_s
        # Shard name -> (event-loop time read, reading).
        self._readings: dict[str, tuple[float, DueReading]] = {}
        # Shard name -> the read under way: the workers wake on the same tick, so
        # they look together, and all but the first wait for its answer.
        self._reading: dict[str, asyncio.Task[DueReading]] = {}
        # Statements run: lets a test count reads, not time.
        self.reads = 0

    async def read(self, shard: Shard, *, shared: bool) -> DueReading:
        """shared: a look on the clock, which may take another worker's recent reading."""
        loop = asyncio.get_running_loop()
        name = shard.name
        if shared:
            kept = self._readings.get(name)
            if kept is not None and (elapsed_s := loop.time() - kept[0]) <= self.share_s:
                return kept[1].aged(elapsed_s)
            under_way = self._reading.get(name)
            if under_way is not None:
                return await asyncio.shield(under_way)
        task = loop.create_task(self._read(shard, read_at=loop.time()))
        self._reading[name] = task
        task.add_done_callback(functools.partial(self._settled, name))
        # Shielded: a worker stopped mid-read leaves the others their answer.
        return await asyncio.shield(task)

    async def _read(self, shard: Shard, *, read_at: float) -> DueReading:
        reading = await shard._with_connection(self._due_reading)
        self.reads += 1
        self._readings[shard.name] = (read_at, reading)
        return reading

    def _settled(self, name: str, task: asyncio.Task[DueReading]) -> None:
        if self._reading.get(name) is task:
            del self._reading[name]
        if not task.cancelled():
            task.exception()  # every waiter was told; not "never retrieved"

    @staticmethod
    async def _due_reading(conn: Connection) -> DueReading:
        row = await conn.fetchrow(DUE_READING)
        assert row is not None
        return DueReading(row["saga_due_s"], row["expiry_due_s"], row["events_waiting"])

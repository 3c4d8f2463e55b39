"""A shard's event stream: sequencing the outbox, reading, consumers and retention.

Writes put their events in the outbox in the same statement as the change
(statements.WRITE_BATCH and friends); this module gives committed outbox rows
their gapless positions and serves them. The SQL is in event_statements.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import asyncpg.pool

from ledger.domain.events import EventKind
from ledger.invariant import invariant
from ledger.storage import event_statements as sql
from ledger.storage.shard import Shard


@dataclass(frozen=True, slots=True)
class EventRow:
    """One sequenced event as stored (its body is the JSON the write produced)."""

    shard: str
    position: int
    event_id: str
    kind: EventKind
    merchant_id: str
    merchant_ids: tuple[str, ...]
    transfer_id: str
    trace_id: str
    body: Mapping[str, Any]
    committed_at: datetime


@dataclass(frozen=True, slots=True)
class ConsumerState:
    consumer: str
    position: int
    lapsed: bool
    lag_events: int
    lag_s: float


class ConsumerLapsed(Exception):
    """A consumer fell behind the retention bound; its events may be gone."""

    def __init__(self, shard: str, consumer: str, position: int) -> None:
        super().__init__(
            f"consumer {consumer!r} lapsed on shard {shard} at position {position}: it fell "
            "behind the retention bound; drop it (ledger events consumers --drop) and "
            "rebuild from a snapshot"
        )
        self.shard = shard
        self.consumer = consumer
        self.position = position


# By number: calling the enum costs a readers' loop about 1 us per event (an
# unknown number still goes to EventKind, which refuses it).
_EVENT_KINDS = {kind.value: kind for kind in EventKind}


class EventStore:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    async def sequence_round(self, *, events_max: int) -> tuple[int, int]:
        """Numbers up to events_max committed outbox events; (how many it numbered,
        the last position given then: 0 when none).

        The caller has looked first (a commit here, or a DueProbes reading that
        says events wait): a round on the clock nearly always finds nothing, and
        then does not run.

        One statement, its own transaction; outside Shard._in_transaction, which
        would tell the sequencer of its own commit and wake it again for nothing.
        """
        async with self.shard.connection() as conn:
            row = await conn.fetchrow(sql.SEQUENCE_EVENTS, events_max)
        assert row is not None
        taken = int(row["taken"])
        invariant(row["inserted"] == taken, "every event taken from the outbox is numbered")
        if not taken:
            return 0, 0
        invariant(row["notified"] == 1, "a round that numbered events tells the readers")
        return taken, int(row["last_position"])

    async def read(self, *, after: int, limit: int, merchant_id: str | None) -> list[EventRow]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(sql.READ_EVENTS, after, limit, merchant_id)
        return self.rows(rows)

    def rows(self, records: Sequence[asyncpg.Record]) -> list[EventRow]:
        """Rows of event_statements.READ_EVENTS as EventRows of this shard."""
        return [self._row(r) for r in records]

    def _row(self, r: Mapping[str, Any] | asyncpg.Record) -> EventRow:
        return EventRow(
            shard=self.shard.name,
            position=r["position"],
            event_id=str(r["event_id"]),
            kind=_EVENT_KINDS.get(r["kind"]) or EventKind(r["kind"]),
            merchant_id=r["merchant_id"],
            merchant_ids=tuple(r["merchant_ids"]),
            transfer_id=r["transfer_id"],
            trace_id=r["trace_id"],
            body=r["body"],
            committed_at=r["committed_at"],
        )

    async def bounds(self) -> tuple[int, int]:
        """(oldest retained position, last position given); oldest > last when none is."""
        async with self.shard.connection() as conn:
            oldest = await conn.fetchval(sql.OLDEST_RETAINED)
            last = await conn.fetchval(sql.LAST_POSITION)
        return int(oldest), int(last)

    async def moved_out_position(self, merchant_id: str, epoch: int) -> int | None:
        async with self.shard.connection() as conn:
            position = await conn.fetchval(
                sql.MOVED_OUT_POSITION, merchant_id, epoch, EventKind.MERCHANT_MOVED_OUT
            )
        return int(position) if position is not None else None

    # Consumers.

    async def register(self, consumer: str, *, position: int) -> int:
        """Registers consumer at position if new; its acknowledged position."""
        async with self.shard.connection() as conn:
            await conn.execute(sql.REGISTER_CONSUMER, consumer, position)
            row = await conn.fetchrow(sql.CONSUMER, consumer)
        assert row is not None
        if row["lapsed_at"] is not None:
            raise ConsumerLapsed(self.shard.name, consumer, row["position"])
        return int(row["position"])

    async def acknowledge(self, consumer: str, position: int) -> int:
        """Moves consumer's position up to position (registering it); its position."""
        async with self.shard.connection() as conn:
            return await self.acknowledge_on(conn, consumer, position)

    async def acknowledge_on(
        self,
        conn: asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
        consumer: str,
        position: int,
    ) -> int:
        """acknowledge() on a connection the caller holds (a publisher's lease)."""
        acked = await conn.fetchval(sql.ACK_CONSUMER, consumer, position)
        if acked is None:
            await conn.execute(sql.REGISTER_CONSUMER, consumer, position)
            acked = await conn.fetchval(sql.ACK_CONSUMER, consumer, position)
        if acked is None:
            row = await conn.fetchrow(sql.CONSUMER, consumer)
            raise ConsumerLapsed(self.shard.name, consumer, row["position"] if row else 0)
        return int(acked)

    async def drop(self, consumer: str) -> bool:
        async with self.shard.connection() as conn:
            return await conn.fetchval(sql.DROP_CONSUMER, consumer) is not None

    async def consumers(self) -> list[ConsumerState]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(sql.CONSUMER_LAGS)
        return [
            ConsumerState(r["consumer"], r["position"], r["lapsed"], r["lag_events"], r["lag_s"])
            for r in rows
        ]

    async def outbox_backlog(self) -> tuple[int, float]:
        """(outbox rows not yet numbered, age of the oldest in seconds)."""
        async with self.shard.connection() as conn:
            row = await conn.fetchrow(sql.OUTBOX_BACKLOG)
        assert row is not None
        return int(row["rows"]), float(row["oldest_s"])

    async def retain(
        self, *, lag_events_max: int, lag_s_max: float, retention_s_min: float, prune_max: int
    ) -> tuple[list[str], int]:
        """Lapses consumers past the bound, then prunes; (lapsed consumers, events pruned)."""
        async with self.shard.connection() as conn:
            lapsed = await conn.fetch(sql.LAPSE_CONSUMERS, lag_events_max, lag_s_max)
            status = await conn.execute(sql.PRUNE_EVENTS, retention_s_min, prune_max)
        return [r["consumer"] for r in lapsed], int(status.rsplit(" ", 1)[-1])

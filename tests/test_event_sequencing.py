"""The sequencer's round costs what it takes from the outbox, not what the outbox
holds (issue 20: a benchmark run whose sequencer fell behind under batch load
numbered 3,536 events/s against 5,640 transfers/s written, and did not catch up)."""

from __future__ import annotations

import json

import asyncpg
import pytest

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.storage import event_statements as event_sql
from ledger.storage.migrate import apply_migrations
from ledger.storage.shard import Shard
from tests.support import apply_migrations_before, fresh_databases, scans_of


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_sequencing_round_reads_only_the_rows_it_takes(
    pg_server: EmbeddedPostgres, plan_cache_mode: str
) -> None:
    """The round deleted `WHERE id IN (SELECT ... LIMIT n)`, which the planner ran as a
    hash join over a sequential scan of the whole outbox, dead rows included: the
    further behind, the slower each round."""
    (spec,) = fresh_databases(pg_server, [f"sequencing_{plan_cache_mode}"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations(conn)
        # Dead rows stay until the test is done, as they do under load between vacuums.
        await conn.execute("ALTER TABLE event_queue SET (autovacuum_enabled = false)")
        written, taken_before, round_max = 6_000, 4_000, 100
        await conn.execute(
            """
            INSERT INTO event_outbox (kind, merchant_id, merchant_ids, body)
            SELECT 4, 'm', ARRAY['m'], jsonb_build_object('n', g)
            FROM generate_series(1, $1) AS g
            """,
            written,
        )
        await conn.execute("ANALYZE event_outbox, event_queue")
        # Earlier rounds took the oldest rows: dead now, at the head of the outbox.
        for _ in range(taken_before // 1_000):
            await conn.fetchrow(event_sql.SEQUENCE_EVENTS, 1_000)
        await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
        await conn.execute(f"PREPARE sequence_round(int) AS {event_sql.SEQUENCE_EVENTS}")
        explaining = conn.transaction()
        await explaining.start()
        try:  # EXPLAIN ANALYZE deletes and inserts: rolled back
            explained = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE sequence_round({round_max})"
            )
        finally:
            await explaining.rollback()
        plan = json.loads(explained)[0]["Plan"]
        rows, scans = scans_of(plan, "event_queue")
        assert "Seq Scan" not in scans, scans
        # The ids in order, then the rows by id: never the other 1,900 live rows.
        assert rows <= 2 * round_max, f"a round of {round_max} read {rows} queued rows"
        # Numbered by reference: the bodies stay where they were written (0016).
        outbox_rows, _ = scans_of(plan, "event_outbox")
        assert outbox_rows == 0, f"a round read {outbox_rows} outbox rows"
        # And the round itself: the next positions, in id order.
        row = await conn.fetchrow(event_sql.SEQUENCE_EVENTS, round_max)
        assert row is not None and row["taken"] == row["inserted"] == round_max
        assert row["last_position"] == taken_before + round_max
        numbered = await conn.fetch(
            "SELECT position, (body ->> 'n')::int AS n FROM events ORDER BY position"
        )
        assert [(r["position"], r["n"]) for r in numbered] == [
            (n, n) for n in range(1, taken_before + round_max + 1)
        ]
    finally:
        await conn.close()


async def test_shard_connections_never_jit_compile_and_plan_once(
    pg_server: EmbeddedPostgres,
) -> None:
    """A shard's statements run in milliseconds; the planner's guesses for unnest()
    and for a new shard's never-analysed tables crossed jit_above_cost (12 ms of
    compilation per sequencing round on a PostgreSQL built with JIT), and left it
    replanning WRITE_BATCH at every execution (0.7 ms per single transfer)."""
    (spec,) = fresh_databases(pg_server, ["jit"])
    shard = Shard(name="jit", dsn=spec.dsn)
    await shard.open()
    try:
        async with shard.pool.acquire() as conn:
            assert await conn.fetchval("SHOW jit") == "off"
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    finally:
        await shard.close()


async def test_upgrading_keeps_every_event_and_numbers_the_outbox_after_it(
    pg_server: EmbeddedPostgres,
) -> None:
    """Migration 0016 numbers events by reference: a shard upgraded with events
    numbered and others waiting in the outbox keeps the first at their positions,
    bodies and ids, and numbers the others next, in the order they were written."""
    (spec,) = fresh_databases(pg_server, ["upgrade_0016"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations_before(conn, 16)
        # As the old sequencer left them: 3 events numbered (outbox rows moved,
        # ids 1-3), 2 written after and waiting in the outbox (ids 4-5).
        await conn.execute(
            """
            INSERT INTO event_outbox (kind, merchant_id, merchant_ids, body)
            SELECT 4, 'm', ARRAY['m'], jsonb_build_object('n', g) FROM generate_series(1, 5) AS g;
            INSERT INTO events (position, event_id, kind, merchant_id, merchant_ids, transfer_id,
                                trace_id, body, committed_at)
            SELECT id, event_id, kind, merchant_id, merchant_ids, transfer_id, trace_id, body,
                   committed_at
            FROM event_outbox WHERE id <= 3;
            DELETE FROM event_outbox WHERE id <= 3;
            UPDATE event_positions SET last_position = 3;
            """
        )
        before = await conn.fetch("SELECT * FROM events ORDER BY position")
        applied = await apply_migrations(conn)
        assert applied[0] == "0016_events_by_reference.sql", applied
        after = await conn.fetch(f"SELECT {event_sql.EVENT_COLUMNS} FROM events ORDER BY position")
        assert [dict(r) for r in after] == [
            {k: v for k, v in dict(r).items() if k != "sequenced_at"} for r in before
        ]
        assert await conn.fetchval(event_sql.OUTBOX_HAS_ROWS)
        row = await conn.fetchrow(event_sql.SEQUENCE_EVENTS, 100)
        assert row is not None and (row["taken"], row["last_position"]) == (2, 5)
        numbered = await conn.fetch(
            "SELECT position, (body ->> 'n')::int AS n FROM events ORDER BY position"
        )
        assert [(r["position"], r["n"]) for r in numbered] == [(n, n) for n in range(1, 6)]
        assert not await conn.fetchval(event_sql.OUTBOX_HAS_ROWS)
        # History stays append-only: a numbered event's body cannot be edited.
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
            await conn.execute("UPDATE event_outbox SET body = '{}' WHERE id = 4")
    finally:
        await conn.close()

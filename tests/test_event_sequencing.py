"""The sequencer's round costs what it takes from the outbox, not what the outbox
holds (issue 20: a benchmark run whose sequencer fell behind under batch load
numbered 3,536 events/s against 5,640 transfers/s written, and did not catch up)."""

from __future__ import annotations

import asyncio
import json
import random

import asyncpg
import pytest

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.storage import event_statements as event_sql
from ledger.storage.migrate import apply_migrations
from ledger.storage.shard import Shard
from tests.support import WAIT_DEADLINE_S, apply_migrations_before, fresh_databases, scans_of


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


async def test_a_round_without_the_sequencer_lock_numbers_nothing_and_one_with_it_notifies(
    pg_server: EmbeddedPostgres,
) -> None:
    """The round is one statement in its own transaction: the lock, the numbering
    and the notification. One that cannot take the lock leaves the queue as it
    is; one that can numbers it and tells the listeners the last position."""
    (spec,) = fresh_databases(pg_server, ["sequencer_lock"])
    conn, holder, listener = [await asyncpg.connect(spec.dsn) for _ in range(3)]
    try:
        await apply_migrations(conn)
        # As on a shard's pool connections: the lock's test is in the generic plan too.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(
            "INSERT INTO event_outbox (kind, merchant_id, merchant_ids, body) "
            "SELECT 4, 'm', ARRAY['m'], json_build_object('n', g) FROM generate_series(1, 3) AS g"
        )
        notified: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener(
            event_sql.NOTIFY_CHANNEL, lambda *args: notified.put_nowait(args[-1])
        )
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(7306, 0)")
            row = await conn.fetchrow(event_sql.SEQUENCE_EVENTS, 100)
            assert row is not None
            assert (row["taken"], row["inserted"], row["notified"]) == (0, 0, 0)
            assert row["last_position"] is None
            assert await conn.fetchval("SELECT count(*) FROM event_queue") == 3
        # The holder's commit released the lock.
        row = await conn.fetchrow(event_sql.SEQUENCE_EVENTS, 100)
        assert row is not None
        assert (row["taken"], row["inserted"], row["notified"]) == (3, 3, 1)
        assert row["last_position"] == 3
        assert await asyncio.wait_for(notified.get(), timeout=WAIT_DEADLINE_S) == "3"
        assert notified.empty()
        assert not await conn.fetchval(event_sql.OUTBOX_HAS_ROWS)
    finally:
        for c in (conn, holder, listener):
            await c.close()


@pytest.mark.parametrize("seed", [1, 2])
async def test_concurrent_rounds_give_every_event_one_position_in_each_accounts_order(
    pg_server: EmbeddedPostgres, seed: int
) -> None:
    """Several sequencers (replicas) run rounds while writers commit: every event
    gets exactly one position, the positions run 1..N with no gap, and each
    account's events are numbered in the order they were committed."""
    rng = random.Random(seed)
    (spec,) = fresh_databases(pg_server, [f"sequencers_{seed}"])
    setup = await asyncpg.connect(spec.dsn)
    await apply_migrations(setup)
    await setup.close()
    writers = [await asyncpg.connect(spec.dsn) for _ in range(3)]
    sequencers = [await asyncpg.connect(spec.dsn) for _ in range(3)]
    accounts, writes_per_account = 6, 40
    try:

        async def write(conn: asyncpg.Connection, account: int) -> None:
            for n in range(writes_per_account):
                await conn.execute(
                    "INSERT INTO event_outbox (kind, merchant_id, merchant_ids, body) "
                    "VALUES (4, $1, ARRAY[$1], json_build_object('n', $2::int))",
                    f"a{account}",
                    n,
                )

        async def writer(conn: asyncpg.Connection, mine: list[int]) -> None:
            for account in mine:
                await write(conn, account)

        done = asyncio.Event()

        async def sequencer(conn: asyncpg.Connection) -> int:
            numbered = 0
            while True:
                finished = done.is_set()
                row = await conn.fetchrow(event_sql.SEQUENCE_EVENTS, rng.randint(1, 25))
                assert row is not None and row["inserted"] == row["taken"]
                numbered += row["taken"]
                if finished and not await conn.fetchval(event_sql.OUTBOX_HAS_ROWS):
                    return numbered

        order = list(range(accounts))
        rng.shuffle(order)
        running = [asyncio.create_task(sequencer(c)) for c in sequencers]
        await asyncio.gather(*(writer(c, order[i :: len(writers)]) for i, c in enumerate(writers)))
        done.set()
        numbered = await asyncio.wait_for(asyncio.gather(*running), timeout=WAIT_DEADLINE_S)
        total = accounts * writes_per_account
        assert sum(numbered) == total
        rows = await writers[0].fetch(
            "SELECT position, merchant_id, (body ->> 'n')::int AS n FROM events ORDER BY position"
        )
        assert [r["position"] for r in rows] == list(range(1, total + 1))
        for account in range(accounts):
            ns = [r["n"] for r in rows if r["merchant_id"] == f"a{account}"]
            assert ns == list(range(writes_per_account)), (account, ns)
    finally:
        for c in writers + sequencers:
            await c.close()

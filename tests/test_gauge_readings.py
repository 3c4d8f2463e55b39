"""The shard gauges' readings: one round trip every refresh, reading only the sagas
that are not finished (issue 18: four statements per shard every 2 s were a third of
an idle replica's CPU, and the saga counts read every saga ever run)."""

from __future__ import annotations

import pytest

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.storage import statements as sql
from ledger.storage.migrate import apply_migrations
from ledger.storage.shard import Shard
from tests.support import fresh_databases, scans_of

FINISHED_SAGAS = 3_000


@pytest.fixture
async def shard(pg_server: EmbeddedPostgres) -> Shard:
    (spec,) = fresh_databases(pg_server, ["gauges"])
    opened = Shard(name="gauges", dsn=spec.dsn)
    await opened.open()
    async with opened.pool.acquire() as conn:
        await apply_migrations(conn)
    yield opened  # type: ignore[misc]
    await opened.close()


async def test_readings_count_unfinished_sagas_and_merchants_and_note_the_replica(
    shard: Shard,
) -> None:
    async with shard.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO merchants (merchant_id, state, moved_to, epoch)"
            " VALUES ('a', 'active', NULL, 1), ('b', 'moving', NULL, 1), ('c', 'moved', 'other', 1)"
        )
        await conn.execute(
            """
            INSERT INTO sagas (merchant_id, transfer_id, kind, state, next_step, peer_shard,
                debit_account_id, credit_merchant_id, credit_account_id, currency,
                credit_action, amount_minor, next_attempt_at, created_at, updated_at)
            SELECT merchant_id, transfer_id, 1, state, 2, 'other', 'x', 'z', 'y', 'USD', 1, 1,
                   now(), now() - age, now()
            FROM (VALUES
                -- Running: the oldest is of a merchant moved away (not this shard's to
                -- drive, so not in the age), then one a minute old.
                ('c', 'r1', 1, interval '1 hour'),
                ('a', 'r2', 1, interval '60 seconds'),
                ('b', 'r3', 1, interval '1 second'),
                ('a', 'd1', 4, interval '2 hours')
            ) AS s(merchant_id, transfer_id, state, age)
            UNION ALL
            SELECT 'a', 'f' || g, 1, 2 + g % 2, 2, 'other', 'x', 'z', 'y', 'USD', 1, 1,
                   now(), now() - interval '3 hours', now()
            FROM generate_series(1, $1) AS g
            """,
            FINISHED_SAGAS,
        )
        explaining = conn.transaction()
        await explaining.start()
        try:  # the heartbeat writes: rolled back
            explained = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {sql.GAUGE_READINGS}", "replica-x", 7
            )
        finally:
            await explaining.rollback()
    # A pool connection decodes json (event bodies, migration 0018), EXPLAIN's too.
    read, scans = scans_of(explained[0]["Plan"], "sagas")
    assert "Seq Scan" not in scans, scans
    # The running and dead ones (twice: the counts and the age), never the finished.
    assert read <= 20, f"the readings read {read} sagas of {FINISHED_SAGAS + 4}"

    readings = await shard.gauge_readings("replica-x", 7)
    assert (readings.running_sagas, readings.dead_sagas) == (3, 1)
    assert 59 <= readings.oldest_running_saga_age_s < 600
    # '$settlement' is a merchant of every shard, active.
    assert readings.merchants_by_state == {"active": 2, "moving": 1, "moved": 1}
    assert await shard.recent_replicas(within_s=60) == [("replica-x", 7)]

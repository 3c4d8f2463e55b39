"""Migrations: numbered, applied once, creating the schema; history tables are append-only."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

import asyncpg
import pytest

from ledger.domain import velocity_counters
from ledger.domain.transfers import Direction
from ledger.domain.velocity import VelocityUsage, bucket_width_s
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.storage.migrate import apply_migrations, migrations
from ledger.storage.shard import Shard
from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    Service,
    account,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
)

APPEND_ONLY_STATE = "55000"  # object_not_in_prerequisite_state, raised by the history trigger
CHECK_VIOLATION_STATE = "23514"
HISTORY_TABLES = ("transfers", "entries", "pending_resolutions")
# Table names, schema-qualified outside public (the cleanup guard's own schema).
_CREATE_TABLE = re.compile(
    r"^\s*CREATE TABLE (?:IF NOT EXISTS )?((?:\w+\.)?\w+)", re.MULTILINE | re.I
)


@pytest.fixture
async def fresh_conn(pg_server: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    database = f"mig_{uid()}"
    pg_server.create_database(database)
    conn = await asyncpg.connect(pg_server.dsn(database))
    try:
        yield conn
    finally:
        await conn.close()


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT CASE table_schema WHEN 'public' THEN '' ELSE table_schema || '.' END"
        " || table_name AS name FROM information_schema.tables"
        " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
    )
    return {r["name"] for r in rows}


_DROP_TABLE = re.compile(r"^\s*DROP TABLE (?:IF EXISTS )?((?:\w+\.)?\w+)", re.MULTILINE | re.I)


def _declared_tables() -> set[str]:
    """Tables the migrations create and leave (0013 drops velocity_buckets)."""
    created = {name for m in migrations() for name in _CREATE_TABLE.findall(m.sql)}
    return created - {name for m in migrations() for name in _DROP_TABLE.findall(m.sql)}


def test_migrations_are_numbered_one_to_n_without_gaps() -> None:
    found = migrations()
    assert found, "there is at least one migration"
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    for m in found:
        assert re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", m.name), m.name
        assert int(m.name[:4]) == m.version


def test_every_sql_file_in_the_migrations_folder_is_a_migration() -> None:
    # A misnamed file would otherwise be skipped silently and never applied.
    folder = resources.files("ledger.storage").joinpath("migrations")
    sql_files = {entry.name for entry in folder.iterdir() if entry.name.endswith(".sql")}
    assert sql_files == {m.name for m in migrations()}


async def test_applying_migrations_creates_every_table_and_records_versions(
    fresh_conn: asyncpg.Connection,
) -> None:
    applied = await apply_migrations(fresh_conn)
    assert applied == [m.name for m in migrations()]
    expected = _declared_tables() | {"schema_migrations"}
    assert {"accounts", "transfers", "entries", "pending_resolutions", "merchants"} <= expected
    assert expected <= await _tables(fresh_conn)
    rows = await fresh_conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in migrations()]


async def test_applying_migrations_twice_applies_nothing_the_second_time(
    fresh_conn: asyncpg.Connection,
) -> None:
    await apply_migrations(fresh_conn)
    recorded_before = await fresh_conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
    assert await apply_migrations(fresh_conn) == []
    recorded_after = await fresh_conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
    assert recorded_after == recorded_before


# --- History is append-only (on a running service's shard). ---


@dataclass(frozen=True)
class History:
    shard: Shard
    merchant_id: str


@pytest.fixture(scope="module")
async def history(service: Service) -> History:
    """One merchant with a posted transfer and a pending transfer that was then posted."""
    m = uid("m")
    await create_accounts(service.stub, account(m, "cash"), account(m, "wallet"))
    pending_id = uid("p")
    results = await transfers(
        service.stub,
        transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 100),
        transfer(
            pending_id, ref(m, "cash"), ref(m, "wallet"), 40, action=pb.TRANSFER_ACTION_PENDING
        ),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"] * 2
    results = await transfers(
        service.stub,
        transfer(
            uid("t"),
            ref(m, "cash"),
            ref(m, "wallet"),
            0,
            "",
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=pending_id,
        ),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"]
    return History(shard=service.cluster.shard_for(m), merchant_id=m)


async def _sqlstate_in_rolled_back_transaction(
    shard: Shard, statement: str, *args: object
) -> str | None:
    """Runs statement and always rolls back, so a missing guard cannot damage the shard."""
    async with shard.pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(statement, *args)
        except asyncpg.PostgresError as error:
            return str(error.sqlstate)
        finally:
            await transaction.rollback()
    return None


async def _count(shard: Shard, table: str, merchant_id: str) -> int:
    async with shard.pool.acquire() as conn:
        return int(
            await conn.fetchval(f"SELECT count(*) FROM {table} WHERE merchant_id = $1", merchant_id)
        )


@pytest.mark.parametrize("table", HISTORY_TABLES)
async def test_history_rows_cannot_be_updated(history: History, table: str) -> None:
    rows_before = await _count(history.shard, table, history.merchant_id)
    assert rows_before > 0
    state = await _sqlstate_in_rolled_back_transaction(
        history.shard,
        f"UPDATE {table} SET created_at = created_at + interval '1 day' WHERE merchant_id = $1",
        history.merchant_id,
    )
    assert state == APPEND_ONLY_STATE


@pytest.mark.parametrize("table", HISTORY_TABLES)
async def test_history_rows_cannot_be_deleted(history: History, table: str) -> None:
    rows_before = await _count(history.shard, table, history.merchant_id)
    assert rows_before > 0
    state = await _sqlstate_in_rolled_back_transaction(
        history.shard, f"DELETE FROM {table} WHERE merchant_id = $1", history.merchant_id
    )
    assert state == APPEND_ONLY_STATE
    assert await _count(history.shard, table, history.merchant_id) == rows_before


@pytest.mark.parametrize("table", HISTORY_TABLES)
async def test_history_tables_cannot_be_truncated(history: History, table: str) -> None:
    rows_before = await _count(history.shard, table, history.merchant_id)
    state = await _sqlstate_in_rolled_back_transaction(history.shard, f"TRUNCATE {table}")
    assert state == APPEND_ONLY_STATE
    assert await _count(history.shard, table, history.merchant_id) == rows_before


async def test_account_row_breaking_its_no_overdraft_flag_is_refused_by_a_check(
    service: Service,
) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "wallet", no_overdraft=True))
    shard = service.cluster.shard_for(m)
    state = await _sqlstate_in_rolled_back_transaction(
        shard,
        "UPDATE accounts SET debits_posted = credits_posted + 1 "
        "WHERE merchant_id = $1 AND account_id = 'wallet'",
        m,
    )
    assert state == CHECK_VIOLATION_STATE
    # Pending debits count against the flag too.
    state = await _sqlstate_in_rolled_back_transaction(
        shard,
        "UPDATE accounts SET debits_pending = 1 WHERE merchant_id = $1 AND account_id = 'wallet'",
        m,
    )
    assert state == CHECK_VIOLATION_STATE


async def test_account_row_breaking_its_no_credit_overdraft_flag_is_refused_by_a_check(
    service: Service,
) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "income", no_credit_overdraft=True))
    state = await _sqlstate_in_rolled_back_transaction(
        service.cluster.shard_for(m),
        "UPDATE accounts SET credits_posted = 5 WHERE merchant_id = $1 AND account_id = 'income'",
        m,
    )
    assert state == CHECK_VIOLATION_STATE


async def test_velocity_buckets_become_the_accounts_counters(
    fresh_conn: asyncpg.Connection,
) -> None:
    """Migration 0013 packs each limited account's buckets into rings on its row: a
    check then counts what the buckets held (those a window can still reach)."""
    before, counters_migration = migrations()[:12], migrations()[12]
    assert counters_migration.name == "0013_velocity_counters.sql"
    for migration in before:
        await fresh_conn.execute(migration.sql)
    rules = (
        '[{"rule_id": "d", "direction": 1, "metric": 1, "window_s": 600, "limit": 100},'
        ' {"rule_id": "c", "direction": 2, "metric": 2, "window_s": 86400, "limit": 5}]'
    )
    await fresh_conn.execute(
        "INSERT INTO merchants (merchant_id, state, epoch) VALUES ('m', 'active', 1)"
    )
    await fresh_conn.execute(
        "INSERT INTO accounts (merchant_id, account_id, currency, debits_must_not_exceed_credits,"
        " credits_must_not_exceed_debits, metadata, created_at, velocity_rules)"
        " VALUES ('m', 'limited', 'USD', false, false, '{}', now(), $1::jsonb),"
        " ('m', 'free', 'USD', false, false, '{}', now(), '[]')",
        rules,
    )
    now_s = await fresh_conn.fetchval("SELECT floor(extract(epoch FROM now()))::bigint")
    debit_width, credit_width = bucket_width_s(600), bucket_width_s(86400)
    debit_now, credit_now = now_s // debit_width, now_s // credit_width
    buckets = [
        # (direction, window_s, bucket_index, amount_minor, transfer_count)
        (1, 600, debit_now, 7, 1),
        (1, 600, debit_now - 5, 11, 2),
        (1, 600, debit_now - 20, 13, 1),  # the oldest a check now can reach
        (1, 600, debit_now - 40, 1000, 9),  # out of every window: dropped
        (2, 86400, credit_now - 1, 2**62, 3),
    ]
    await fresh_conn.executemany(
        "INSERT INTO velocity_buckets VALUES ('m', 'limited', $1, $2, $3, $4, $5)", buckets
    )
    await fresh_conn.execute(counters_migration.sql)
    rows = {
        r["account_id"]: r["velocity_counters"]
        for r in await fresh_conn.fetch("SELECT account_id, velocity_counters FROM accounts")
    }
    assert rows["free"] == b""
    assert velocity_counters.keys_of(rows["limited"]) == [
        (Direction.DEBIT, 600),
        (Direction.CREDIT, 86400),
    ]
    used = velocity_counters.usage(
        rows["limited"], [(Direction.DEBIT, 600), (Direction.CREDIT, 86400)], now_s
    )
    first_debit = (now_s - 600) // debit_width
    assert used[(Direction.DEBIT, 600)] == VelocityUsage(
        sum(b[3] for b in buckets if b[0] == 1 and b[2] >= first_debit),
        sum(b[4] for b in buckets if b[0] == 1 and b[2] >= first_debit),
    )
    assert used[(Direction.CREDIT, 86400)] == VelocityUsage(2**62, 3)
    assert "velocity_buckets" not in await _tables(fresh_conn)

"""Lookups by key stay index probes as a table grows under a plan made while it was
small. asyncpg keeps a statement's plan for its connection's life (replanned when
the table is next analysed), and a new shard's tables start empty: the transfers
read before every write hash-joined a sequential scan of every transfer, 38% of
PostgreSQL's time in the single benchmark (`bench.run --pg-statements`)."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.storage import move_statements as move_sql
from ledger.storage import saga_statements as saga_sql
from ledger.storage import statements as sql
from ledger.storage.migrate import apply_migrations
from ledger.storage.shard import SHARD_SERVER_SETTINGS
from tests.support import fresh_databases, scans_of, wait_until

GROWN_ROWS = 20_000
# Enough executions for PostgreSQL to settle on a plan it keeps (it tries a
# custom plan five times, then keeps the generic one if that costs no more).
EXECUTIONS_WHILE_SMALL = 8
KEYS_LOOKED_UP = 3

_FILL_TRANSFERS = """
INSERT INTO transfers (merchant_id, transfer_id, kind, action, debit_merchant_id,
    debit_account_id, credit_merchant_id, credit_account_id, amount_minor,
    amount_effective_minor, currency, pending_id, timeout_ms, linked, reversal_of, metadata,
    result, created_at, trace_id)
SELECT 'm' || (g % 100), $2 || g, 1, 1, 'm' || (g % 100), 'cash', 'm' || (g % 100), 'sales',
       5, 5, 'USD', '', 0, false, $2 || g, '{}', 1, now(), ''
FROM generate_series(1, $1) AS g
"""
_FILL_MERCHANTS = """
INSERT INTO merchants (merchant_id, state, epoch)
SELECT $2 || g, 'active', 1 FROM generate_series(1, $1) AS g
"""
_FILL_RESOLUTIONS = """
INSERT INTO pending_resolutions (merchant_id, pending_id, state, by_transfer_id, created_at)
SELECT 'm' || (g % 100), $2 || g, 2, 'b' || g, now() FROM generate_series(1, $1) AS g
"""

# An entry per account (the transfer's key as the account's: the lookups below
# name both with the same keys).
_FILL_ENTRIES = """
INSERT INTO entries (merchant_id, account_id, sequence, transfer_merchant_id, transfer_id,
    direction, kind, amount_minor, debits_posted, credits_posted, debits_pending,
    credits_pending, created_at, entry_hash)
SELECT 'm' || (g % 100), $2 || g, 1, 'm' || (g % 100), $2 || g, 2, 1, 5, 0, 5, 0, 0, now(),
       sha256(($2 || g)::bytea)
FROM generate_series(1, $1) AS g
"""


@dataclass(frozen=True)
class Lookup:
    name: str
    statement: str
    parameter_types: str
    table: str
    fill: str


LOOKUPS = [
    Lookup("transfers", sql.SELECT_TRANSFERS, "text[], text[]", "transfers", _FILL_TRANSFERS),
    Lookup(
        "transfers and the clock",
        sql.SELECT_TRANSFERS_AND_NOW,
        "text[], text[]",
        "transfers",
        _FILL_TRANSFERS,
    ),
    Lookup("reversals", sql.SUM_REVERSALS, "text[], text[]", "transfers", _FILL_TRANSFERS),
    Lookup(
        "resolutions",
        sql.SELECT_RESOLUTIONS,
        "text[], text[]",
        "pending_resolutions",
        _FILL_RESOLUTIONS,
    ),
    Lookup(
        "what originals posted to a reversal's account",
        saga_sql.CREDITED_BY_ORIGINALS,
        "text[], text[], text[], text[]",
        "entries",
        _FILL_ENTRIES,
    ),
    Lookup(
        "saga steps' transfers",
        saga_sql.READ_STEPS,
        "text[], text[], text[], text[], smallint[]",
        "transfers",
        _FILL_TRANSFERS,
    ),
]


@pytest.mark.parametrize("analysed_while_small", [False, True], ids=["never analysed", "analysed"])
@pytest.mark.parametrize("lookup", LOOKUPS, ids=[lookup.name for lookup in LOOKUPS])
async def test_a_lookup_planned_on_a_small_table_still_probes_by_key_once_it_grew(
    pg_server: EmbeddedPostgres, lookup: Lookup, analysed_while_small: bool
) -> None:
    """Planned as shard connections plan (SHARD_SERVER_SETTINGS). Analysed while it
    held a page, a table's generic plan read it whole once per key (a page costs
    less than an index probe) until it was analysed again, however it grew."""
    (spec,) = fresh_databases(pg_server, ["lookup"])
    conn = await asyncpg.connect(spec.dsn, server_settings=SHARD_SERVER_SETTINGS)
    try:
        await apply_migrations(conn)
        # No analysis while it grows: the plan made while it was small is the one used.
        await conn.execute(f"ALTER TABLE {lookup.table} SET (autovacuum_enabled = false)")
        if analysed_while_small:
            await conn.execute(lookup.fill, 2, "first-")
            await conn.execute(f"ANALYZE {lookup.table}")
        arity = lookup.parameter_types.count("[]")
        await conn.execute(f"PREPARE lookup({lookup.parameter_types}) AS {lookup.statement}")
        # Three keys that exist once the table grew (EXECUTE takes no bind parameters).
        keys = "ARRAY['m1', 'm2', 'm3'], ARRAY['grown-1', 'grown-2', 'grown-3']"
        kinds = ", ARRAY[1, 1, 1]::smallint[]"
        more = {2: "", 4: f", {keys}", 5: f", {keys}{kinds}"}[arity]
        execute = f"EXECUTE lookup({keys}{more})"
        for i in range(EXECUTIONS_WHILE_SMALL):
            await conn.execute(lookup.fill, 2, f"small{i}-")
            await conn.fetch(execute)
        await conn.execute(lookup.fill, GROWN_ROWS, "grown-")
        explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {execute}")
        rows, scans = scans_of(json.loads(explained)[0]["Plan"], lookup.table)
        assert scans and "Seq Scan" not in scans, scans
        assert rows <= 2 * KEYS_LOOKED_UP, f"read {rows} {lookup.table} rows for 3 keys"
    finally:
        await conn.close()


# Merchants read by id, by the fence (PL/pgSQL, migration 0015) before every write
# and by reads: on a never-analysed table of about 1,000 merchants (under ten
# pages, which PostgreSQL's estimate rounds up to ten) `merchant_id = ANY($1)`
# was planned as a sequential scan of every merchant (the benchmark's shards).
MERCHANT_READS = {"fence": sql.FENCE, "merchant states": sql.MERCHANT_STATES}


@pytest.mark.parametrize("merchants", [1_000, GROWN_ROWS])
@pytest.mark.parametrize("read", list(MERCHANT_READS))
async def test_merchants_are_read_by_key_on_a_table_never_analysed(
    pg_server: EmbeddedPostgres, read: str, merchants: int
) -> None:
    """Counted by the transaction's own scans of the table: EXPLAIN cannot show
    the plans of a PL/pgSQL function."""
    (spec,) = fresh_databases(pg_server, [f"merchants_{merchants}"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations(conn)
        await conn.execute(sql.INIT_META, "shard-a", 3, False)
        await conn.execute("ALTER TABLE merchants SET (autovacuum_enabled = false)")
        await conn.execute(_FILL_MERCHANTS, merchants, "m")
        keys = ["m1", "m2", "m3", "unknown"]
        scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = $1"
        async with conn.transaction():
            before = await conn.fetchrow(scans, "merchants")
            for _ in range(EXECUTIONS_WHILE_SMALL):
                rows = await conn.fetch(MERCHANT_READS[read], keys)
            after = await conn.fetchrow(scans, "merchants")
        assert after["seq_scan"] == before["seq_scan"], f"{read} scanned every merchant"
        assert after["idx_scan"] - before["idx_scan"] == EXECUTIONS_WHILE_SMALL * len(keys)
        assert sorted(r["merchant_id"] for r in rows) == ["m1", "m2", "m3"]
        assert {r["state"] for r in rows} == {"active"}
    finally:
        await conn.close()


async def test_the_fence_answers_one_row_when_it_knows_no_merchant(
    pg_server: EmbeddedPostgres,
) -> None:
    (spec,) = fresh_databases(pg_server, ["fence_none"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations(conn)
        await conn.execute(sql.INIT_META, "shard-a", 3, False)
        for keys in ([], ["nobody"], ["nobody", "nobody"]):
            async with conn.transaction():
                rows = await conn.fetch(sql.FENCE, keys)
            assert [(r["epoch"], r["merchant_id"], r["state"]) for r in rows] == [(3, None, None)]
        await conn.execute(_FILL_MERCHANTS, 2, "m")
        async with conn.transaction():
            rows = await conn.fetch(sql.FENCE, ["m1", "m1", "m2"])
        assert sorted((r["epoch"], r["merchant_id"]) for r in rows) == [(3, "m1"), (3, "m2")]
    finally:
        await conn.close()


async def test_accounts_are_locked_in_byte_order_once_each(pg_server: EmbeddedPostgres) -> None:
    """LOCK_ACCOUNTS probes and locks each account in one fixed order (merchant,
    then account, byte-wise), so two writes sharing accounts never deadlock."""
    (spec,) = fresh_databases(pg_server, ["lock_order"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations(conn)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(
            "INSERT INTO merchants (merchant_id, state, epoch) "
            "VALUES ('b', 'active', 1), ('a', 'active', 1), ('B', 'active', 1)"
        )
        keys = [("b", "x"), ("a", "y"), ("a", "X"), ("B", "z")]
        for merchant_id, account_id in keys:
            await conn.execute(
                "INSERT INTO accounts (merchant_id, account_id, currency, "
                "debits_must_not_exceed_credits, credits_must_not_exceed_debits, metadata, "
                "created_at) VALUES ($1, $2, 'USD', false, false, '{}', now())",
                merchant_id,
                account_id,
            )
        asked = [*keys, ("a", "y"), ("nobody", "q")]
        async with conn.transaction():
            rows = await conn.fetch(sql.LOCK_ACCOUNTS, [m for m, _ in asked], [a for _, a in asked])
            locked = await conn.fetch(
                "SELECT merchant_id, account_id FROM accounts "
                "WHERE xmax::text::bigint = txid_current()"
            )
        order = [("B", "z"), ("a", "X"), ("a", "y"), ("b", "x")]
        assert [(r["merchant_id"], r["account_id"]) for r in rows] == order
        assert sorted((r["merchant_id"], r["account_id"]) for r in locked) == sorted(order)
    finally:
        await conn.close()


async def test_accounts_are_locked_before_the_one_that_waits(pg_server: EmbeddedPostgres) -> None:
    """The order is the locks' order, not only the result's: while another
    transaction holds ('b', 'x'), LOCK_ACCOUNTS asked for it first has already
    locked ('a', 'y'), which sorts before it, when it starts to wait."""
    (spec,) = fresh_databases(pg_server, ["lock_wait"])
    holder, locker, observer = [await asyncpg.connect(spec.dsn) for _ in range(3)]
    try:
        await apply_migrations(holder)
        await holder.execute(
            "INSERT INTO merchants (merchant_id, state, epoch) "
            "VALUES ('a', 'active', 1), ('b', 'active', 1)"
        )
        for merchant_id, account_id in (("a", "y"), ("b", "x")):
            await holder.execute(
                "INSERT INTO accounts (merchant_id, account_id, currency, "
                "debits_must_not_exceed_credits, credits_must_not_exceed_debits, metadata, "
                "created_at) VALUES ($1, $2, 'USD', false, false, '{}', now())",
                merchant_id,
                account_id,
            )
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT 1 FROM accounts WHERE merchant_id = 'b' FOR UPDATE")
        locking = locker.transaction()
        await locking.start()
        waiting = asyncio.ensure_future(locker.fetch(sql.LOCK_ACCOUNTS, ["b", "a"], ["x", "y"]))
        locker_pid = locker.get_server_pid()

        async def locker_waits() -> bool:
            return bool(
                await observer.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    locker_pid,
                )
            )

        await wait_until(locker_waits, what="LOCK_ACCOUNTS waiting on ('b', 'x')")
        async with observer.transaction():
            with pytest.raises(asyncpg.LockNotAvailableError):
                await observer.execute(
                    "SELECT 1 FROM accounts WHERE merchant_id = 'a' FOR UPDATE NOWAIT"
                )
        await holding.rollback()
        rows = await waiting
        assert [(r["merchant_id"], r["account_id"]) for r in rows] == [("a", "y"), ("b", "x")]
        await locking.rollback()
    finally:
        for conn in (holder, locker, observer):
            await conn.close()


# Statements that take arrays of keys and, planned on empty tables, still read
# these tables whole: the audit of every open hold's route, which reads them all
# by nature (docs/performance.md). Any other statement with an array of keys
# must find its rows by key.
KNOWN_WHOLE_TABLE_READS = {
    "saga_statements.HOLD_ROUTE_SHARDS": {
        "credit_holds",
        "hold_relays",
        "merchants",
        "relay_passes",
    },
}
STATEMENT_MODULES = [
    "statements",
    "saga_statements",
    "event_statements",
    "move_statements",
    "chain_statements",
    "limits_statements",
]


def _parameters(statement: str) -> int:
    return max((int(n) for n in re.findall(r"\$(\d+)", statement)), default=0)


def _whole_table_reads(plan: dict[str, Any]) -> set[str]:
    found = {plan["Relation Name"]} if plan["Node Type"] == "Seq Scan" else set()
    for child in plan.get("Plans", ()):
        found |= _whole_table_reads(child)
    return found


async def test_statements_taking_arrays_of_keys_read_rows_by_key(
    pg_server: EmbeddedPostgres,
) -> None:
    """Every statement that takes keys as arrays, planned generically (the plan
    asyncpg keeps once PostgreSQL prefers it) on a new shard's empty, never-analysed
    tables: no table read whole, beyond the known ones. Joined to the arrays, such
    plans hash-joined a sequential scan of every account into every write's locks
    and balance updates, of every saga into step 3, and of every pending expiry and
    balance monitor."""
    (spec,) = fresh_databases(pg_server, ["every_statement"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations(conn)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        reads: dict[str, set[str]] = {}
        for module_name in STATEMENT_MODULES:
            module = importlib.import_module(f"ledger.storage.{module_name}")
            for name, statement in vars(module).items():
                # Statements only: private constants are fragments of them.
                public = name.isupper() and not name.startswith("_")
                if not (public and isinstance(statement, str) and "unnest(" in statement):
                    continue
                explain = f"EXPLAIN (FORMAT JSON) {statement}"
                if _parameters(statement):
                    prepared = f"s{len(reads)}"
                    await conn.execute(f"PREPARE {prepared} AS {statement}")
                    nulls = ", ".join(["NULL"] * _parameters(statement))
                    explain = f"EXPLAIN (FORMAT JSON) EXECUTE {prepared}({nulls})"
                explained = await conn.fetchval(explain)
                reads[f"{module_name}.{name}"] = _whole_table_reads(
                    json.loads(explained)[0]["Plan"]
                )
        assert len(reads) >= 20, sorted(reads)
        assert {k: v for k, v in reads.items() if v} == KNOWN_WHOLE_TABLE_READS
    finally:
        await conn.close()


# One transfer in a hundred pending (action 2), the rest posted, all applied, one in
# two pending ones resolved, each with a trace id of its own: the rows a move's
# checks and a trace lookup read.
_FILL_PENDINGS = """
WITH written AS (
    INSERT INTO transfers (merchant_id, transfer_id, kind, action, debit_merchant_id,
        debit_account_id, credit_merchant_id, credit_account_id, amount_minor,
        amount_effective_minor, currency, pending_id, timeout_ms, linked, reversal_of,
        metadata, result, created_at, trace_id)
    SELECT 'm' || (g % 100), 'p' || g, 1, CASE WHEN g % 100 = 1 THEN 2 ELSE 1 END,
           'm' || (g % 100), 'cash', 'm' || (g % 100),
           'sales', 5, 5, 'USD', '', 0, false, '', '{}', 1, now(), md5(g::text)
    FROM generate_series(1, $1) AS g
    RETURNING merchant_id, transfer_id, action
)
INSERT INTO pending_resolutions (merchant_id, pending_id, state, by_transfer_id, created_at)
SELECT merchant_id, transfer_id, 2, 'b' || transfer_id, now() FROM written
WHERE action = 2 AND right(transfer_id, 3) IN ('001', '201', '401', '601', '801')
UNION ALL
-- Resolutions of pending transfers long gone from this shard's view: the table
-- grows with every hold ever settled.
SELECT 'm' || (g % 100), 'old' || g, 2, 'b' || g, now() FROM generate_series(1, $1) AS g
"""
_FILL_SAGAS = """
INSERT INTO sagas (merchant_id, transfer_id, kind, state, next_step, peer_shard,
    debit_account_id, credit_merchant_id, credit_account_id, currency, credit_action,
    amount_minor, result, credit_outcome, next_attempt_at, trace_context, created_at,
    updated_at)
SELECT 'm' || (g % 100), 's' || g, 1, 2, 3, 'peer', 'cash', 'n', 'sales', 'USD', 2, 5, 1, 1,
       now(), '', now(), now()
FROM generate_series(1, $1) AS g
"""
# Reads by one merchant or one trace, with what each should cost at most in rows
# of each grown table read (the merchant has 1% of them).
READS_BY_MERCHANT_OR_TRACE = {
    "TRANSFERS_BY_TRACE": (sql.TRANSFERS_BY_TRACE, "md5('1'), 10", 2),
    "LOCAL_OPEN_PENDINGS": (move_sql.LOCAL_OPEN_PENDINGS, "'m1'", 2 * GROWN_ROWS // 100 + 10),
    "MERCHANT_BLOCKERS": (move_sql.MERCHANT_BLOCKERS, "'m1'", 2 * GROWN_ROWS // 100 + 10),
    # The dead-letter list: none dead among the grown sagas.
    "LIST_SAGAS": (saga_sql.LIST_SAGAS, "ARRAY[4, 4]::smallint[], 10", 2),
}


@pytest.mark.parametrize("read", list(READS_BY_MERCHANT_OR_TRACE))
async def test_reads_by_one_merchant_or_trace_probe_by_key_under_a_generic_plan(
    pg_server: EmbeddedPostgres, read: str
) -> None:
    """Shard connections plan generically (SHARD_SERVER_SETTINGS), and a generic plan
    cannot use a partial index whose predicate a parameter would have to imply: with
    the action and result as parameters, a move's checks read every transfer,
    resolution and saga of the shard for each merchant it moved, and a trace lookup
    (`trace_id = $1` against the index's `trace_id <> ''`) every transfer."""
    statement, arguments, rows_max = READS_BY_MERCHANT_OR_TRACE[read]
    (spec,) = fresh_databases(pg_server, ["by_merchant"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations(conn)
        await conn.execute(_FILL_PENDINGS, GROWN_ROWS)
        await conn.execute(_FILL_SAGAS, GROWN_ROWS)
        await conn.execute(_FILL_MERCHANTS, 1_000, "m")
        await conn.execute("ANALYZE")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE read AS {statement}")
        explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE read({arguments})")
        plan = json.loads(explained)[0]["Plan"]
        for table in ("transfers", "pending_resolutions", "sagas", "merchants"):
            rows, scans = scans_of(plan, table)
            assert "Seq Scan" not in scans, f"{read} read {table} whole"
            assert rows <= rows_max, f"{read} read {rows} {table} rows"
    finally:
        await conn.close()


async def test_every_table_a_move_reads_by_merchant_has_an_index_led_by_that_column(
    pg_server: EmbeddedPostgres,
) -> None:
    """A move copies, counts and cleans up a merchant's rows table by table, by the
    column that names the merchant (MOVED_TABLES): without an index led by it, each
    read every row of the shard, once per merchant moved. saga_credits, named by its
    credit side, had none until migration 0017."""
    (spec,) = fresh_databases(pg_server, ["moved_tables"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations(conn)
        led_by = {
            (r["table_name"], r["column_name"])
            for r in await conn.fetch(
                """
                SELECT t.relname AS table_name, a.attname AS column_name
                FROM pg_index i
                JOIN pg_class t ON t.oid = i.indrelid
                JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0]
                WHERE i.indpred IS NULL
                """
            )
        }
        unindexed = [(t, c) for t, c, _ in move_sql.MOVED_TABLES if (t, c) not in led_by]
        assert not unindexed, f"read whole for each merchant moved: {unindexed}"
    finally:
        await conn.close()

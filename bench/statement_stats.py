"""Where PostgreSQL's time goes, statement by statement, in each benchmark phase.

`python -m bench.run --pg-statements N` loads pg_stat_statements into the
bench's own PostgreSQL, resets it before each phase and reports the N
statements that took most of the phase's execution time, summed over the shard
databases: their share, execution time and WAL per transfer. The CPU split
says how much of the machine PostgreSQL took; this says for what (the event
stream's share of a batch, for instance: docs/performance.md).

The pip-installed PostgreSQL (pgserver) ships without contrib modules; point
LEDGER_PG_BIN at a server that has them, e.g. Debian's:
LEDGER_PG_BIN=/usr/lib/postgresql/15/bin.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import asyncpg

# Settings the bench's own server starts with when statements are measured.
PRELOAD_SETTINGS = (
    ("shared_preload_libraries", "pg_stat_statements"),
    # BEGIN and COMMIT are not where time goes, and would crowd the list.
    ("pg_stat_statements.track_utility", "off"),
)
# A statement is shown by its first characters, whitespace folded.
STATEMENT_CHARS_SHOWN = 100
CONNECT_TIMEOUT_S = 30.0

# Per statement text, in this database only (shards may share a server).
_STATEMENTS = """
SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), $1) AS statement,
       calls, total_exec_time AS exec_ms, wal_bytes,
       shared_blks_hit + shared_blks_read AS buffers
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


HOW_TO_ENABLE = (
    "the pip-installed PostgreSQL lacks pg_stat_statements: set LEDGER_PG_BIN to the bin/ "
    "folder of a server that has it (e.g. /usr/lib/postgresql/15/bin); with --config, "
    "load it on the shards' servers (shared_preload_libraries)"
)


class StatementStatsUnavailable(RuntimeError):
    """The server cannot count statements (the module is not installed or not loaded)."""


async def enable(dsns: Iterable[str]) -> None:
    for dsn in dsns:
        connection = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await connection.fetchval("SELECT count(*) FROM pg_stat_statements")
        except asyncpg.PostgresError as error:
            raise StatementStatsUnavailable(
                f"pg_stat_statements is not available on {dsn.rsplit('/', 1)[-1]} ({error}); "
                + HOW_TO_ENABLE
            ) from error
        finally:
            await connection.close()


async def reset(dsns: Iterable[str]) -> None:
    for dsn in dsns:
        connection = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            await connection.execute("SELECT pg_stat_statements_reset()")
        finally:
            await connection.close()


async def top(dsns: Iterable[str], *, transfers: float, limit: int) -> list[dict[str, Any]]:
    """The `limit` statements that took most execution time since the reset."""
    totals: dict[str, list[float]] = {}
    for dsn in dsns:
        connection = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            rows = await connection.fetch(_STATEMENTS, STATEMENT_CHARS_SHOWN)
        finally:
            await connection.close()
        for r in rows:
            total = totals.setdefault(r["statement"], [0, 0.0, 0, 0])
            total[0] += r["calls"]
            total[1] += r["exec_ms"]
            total[2] += int(r["wal_bytes"])
            total[3] += r["buffers"]
    exec_ms_all = sum(t[1] for t in totals.values()) or 1.0
    per_transfer = 1.0 / transfers if transfers else 0.0
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:limit]
    return [
        {
            "statement": statement,
            "calls": int(calls),
            "exec_share": round(exec_ms / exec_ms_all, 3),
            "exec_us_per_transfer": round(exec_ms * 1000 * per_transfer, 1),
            "wal_bytes_per_transfer": round(wal_bytes * per_transfer),
            # Pages read (from shared buffers or not): a scan shows here.
            "buffers_per_call": round(buffers / calls, 1) if calls else 0.0,
        }
        for statement, (calls, exec_ms, wal_bytes, buffers) in ranked
    ]

"""Tamper evidence: every edited, inserted or deleted entry is found and named.

Each test writes real transfers through the service, then plays an insider
with direct database access (triggers bypassed, as a superuser could), and
checks that `ChainStore.verify` (which `ledger reconcile` and `ledger verify`
run) names the entry. The chain itself is computed in Python when entries are
written and recomputed in SQL when they are verified, so these tests also
prove the two encodings agree.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import UTC

import asyncpg
import pytest

from ledger.domain.accounts import AccountKey, Balances
from ledger.domain.chain import GENESIS_HASH, chained_entry, checkpoint_digest
from ledger.domain.transfers import Direction, EntryKind, TransferKey
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.config import ShardConfig
from ledger.sagas.reconcile import reconcile
from ledger.storage import chain_statements as chain_sql
from ledger.storage.chain import ChainStore, ChainViolation, verification_snapshot
from ledger.storage.migrate import apply_migrations
from ledger.storage.shard import Shard
from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    apply_migrations_before,
    create_accounts,
    fresh_databases,
    ref,
    result_names,
    start_service,
    transfer,
    transfers,
    uid,
    write_config,
)

SHARDS = ("shard-a", "shard-b")
TRANSFERS = 6
# The verify command starts a Python process and reads two shards.
CLI_DEADLINE_S = 60.0


@pytest.fixture
async def fresh(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    """A service on shards of its own: these tests damage their history on purpose."""
    specs = fresh_databases(pg_server, SHARDS)
    path = write_config(
        tmp_path_factory.mktemp("chain") / "shards.toml", ShardConfig(epoch=1, shards=tuple(specs))
    )
    running = await start_service(path)
    try:
        yield running
    finally:
        await running.stop()


async def books(service: Service, *, merchant_prefix: str = "m") -> tuple[str, Shard]:
    """A merchant with two accounts and TRANSFERS transfers between them, and its shard."""
    merchant = service.merchant_on("shard-a", merchant_prefix)
    await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "wallet"))
    for n in range(TRANSFERS):
        answer = await transfers(
            service.stub,
            transfer(uid("t"), ref(merchant, "cash"), ref(merchant, "wallet"), 100 + n),
        )
        assert result_names(answer) == ["TRANSFER_RESULT_OK"]
    return merchant, service.cluster.shards["shard-a"]


async def tamper(shard: Shard, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Runs statements as an insider would: triggers (append-only) off."""
    async with shard.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for query, args in statements:
            await conn.execute(query, *args)


async def violations(shard: Shard) -> list[ChainViolation]:
    return (await ChainStore(shard).verify()).violations


async def test_untouched_history_verifies_and_reconcile_includes_the_chains(
    fresh: Service,
) -> None:
    merchant, shard = await books(fresh)
    assert await violations(shard) == []
    report = await reconcile(fresh.cluster)
    chain_findings = [f for f in report.findings if f.check.startswith("hash chains")]
    assert [f.check for f in chain_findings] == ["hash chains shard-a", "hash chains shard-b"]
    assert report.ok, report.render()
    async with shard.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT entry_hash, entry_count FROM accounts WHERE merchant_id = $1"
            " AND account_id = 'wallet'",
            merchant,
        )
        assert row is not None
        head, count = row["entry_hash"], row["entry_count"]
        last = await conn.fetchval(
            "SELECT entry_hash FROM entries WHERE merchant_id = $1 AND account_id = 'wallet'"
            " AND sequence = $2",
            merchant,
            count,
        )
    assert count == TRANSFERS
    assert head == last and head != GENESIS_HASH


async def test_verification_plans_its_whole_table_reads_as_sequential_scans(
    fresh: Service,
) -> None:
    # Shard connections plan without sequential scans (SHARD_SERVER_SETTINGS), but
    # verification reads every entry, for which one is the cheaper plan.
    _, shard = await books(fresh)
    plan = "EXPLAIN " + chain_sql.BROKEN_LINKS

    async def scans_entries_whole(conn: asyncpg.Connection) -> bool:
        lines = [r[0] for r in await conn.fetch(plan, 10, GENESIS_HASH)]
        return any("Seq Scan on entries" in line for line in lines)

    async with shard.pool.acquire() as conn:
        async with conn.transaction():
            assert not await scans_entries_whole(conn)
        async with verification_snapshot(conn):
            assert await scans_entries_whole(conn)


async def test_an_edited_amount_is_named_by_account_and_sequence(fresh: Service) -> None:
    merchant, shard = await books(fresh)
    await tamper(
        shard,
        (
            "UPDATE entries SET amount_minor = amount_minor + 1"
            " WHERE merchant_id = $1 AND account_id = 'wallet' AND sequence = 3",
            (merchant,),
        ),
    )
    found = await violations(shard)
    assert [(v.merchant_id, v.account_id, v.sequence) for v in found] == [(merchant, "wallet", 3)]
    assert "changed" in found[0].problem
    report = await reconcile(fresh.cluster)
    assert not report.ok
    assert f"{merchant}/wallet entry 3" in report.render()


async def test_a_deleted_entry_in_the_middle_is_named(fresh: Service) -> None:
    merchant, shard = await books(fresh)
    await tamper(
        shard,
        (
            "DELETE FROM entries WHERE merchant_id = $1 AND account_id = 'cash' AND sequence = 2",
            (merchant,),
        ),
    )
    found = await violations(shard)
    assert [(v.account_id, v.sequence) for v in found] == [("cash", 3)]
    assert "entry 2 before it is missing" in found[0].problem


async def test_a_deleted_last_entry_is_caught_by_the_accounts_head(fresh: Service) -> None:
    merchant, shard = await books(fresh)
    await tamper(
        shard,
        (
            "DELETE FROM entries WHERE merchant_id = $1 AND account_id = 'cash' AND sequence = $2",
            (merchant, TRANSFERS),
        ),
    )
    found = await violations(shard)
    assert [(v.account_id, v.sequence) for v in found] == [("cash", TRANSFERS - 1)]
    assert "head" in found[0].problem


async def test_an_inserted_entry_is_named(fresh: Service) -> None:
    """A forged entry slipped in after entry 2, later entries renumbered to make room."""
    merchant, shard = await books(fresh)
    await tamper(
        shard,
        (
            "UPDATE entries SET sequence = sequence + 100"
            " WHERE merchant_id = $1 AND account_id = 'wallet' AND sequence > 2",
            (merchant,),
        ),
        (
            "UPDATE entries SET sequence = sequence - 99"
            " WHERE merchant_id = $1 AND account_id = 'wallet' AND sequence > 100",
            (merchant,),
        ),
        (
            "INSERT INTO entries SELECT merchant_id, account_id, 3, transfer_merchant_id,"
            " 'forged', direction, kind, 1, debits_posted, credits_posted + 1, debits_pending,"
            " credits_pending, created_at, entry_hash FROM entries"
            " WHERE merchant_id = $1 AND account_id = 'wallet' AND sequence = 2",
            (merchant,),
        ),
        (
            "UPDATE accounts SET entry_count = entry_count + 1"
            " WHERE merchant_id = $1 AND account_id = 'wallet'",
            (merchant,),
        ),
    )
    found = await violations(shard)
    named = {(v.account_id, v.sequence) for v in found}
    assert ("wallet", 3) in named, found
    assert all(v.merchant_id == merchant and v.account_id == "wallet" for v in found)


async def test_history_rewritten_and_rehashed_to_its_end_is_caught_by_a_checkpoint(
    fresh: Service,
) -> None:
    """The insider recomputes every later hash and the head: only a checkpoint can tell."""
    merchant, shard = await books(fresh)
    checkpoint = await ChainStore(shard).checkpoint()
    assert checkpoint is not None and checkpoint.checkpoint_id == 1
    rehash = (
        "UPDATE entries e SET entry_hash = ledger_entry_hash(p.entry_hash, e)"
        " FROM entries p WHERE e.merchant_id = $1 AND e.account_id = 'wallet'"
        " AND e.sequence = $2 AND p.merchant_id = e.merchant_id"
        " AND p.account_id = e.account_id AND p.sequence = e.sequence - 1"
    )
    steps: list[tuple[str, tuple[object, ...]]] = [
        (
            "UPDATE entries SET amount_minor = 1"
            " WHERE merchant_id = $1 AND account_id = 'wallet' AND sequence = 2",
            (merchant,),
        )
    ]
    steps += [(rehash, (merchant, sequence)) for sequence in range(2, TRANSFERS + 1)]
    steps.append(
        (
            "UPDATE accounts a SET entry_hash = e.entry_hash FROM entries e"
            " WHERE a.merchant_id = $1 AND a.account_id = 'wallet'"
            " AND e.merchant_id = a.merchant_id AND e.account_id = a.account_id"
            " AND e.sequence = a.entry_count",
            (merchant,),
        )
    )
    await tamper(shard, *steps)
    found = await violations(shard)
    assert [(v.account_id, v.sequence) for v in found] == [("wallet", TRANSFERS)]
    assert "checkpoint 1" in found[0].problem


async def test_an_altered_checkpoint_is_caught(fresh: Service) -> None:
    await books(fresh)
    shard = fresh.cluster.shards["shard-a"]
    assert await ChainStore(shard).checkpoint() is not None
    await tamper(shard, ("UPDATE chain_checkpoints SET digest = $1", (bytes(32),)))
    found = await violations(shard)
    assert len(found) == 1 and "checkpoint 1 was altered" in found[0].problem


async def test_checkpoints_take_only_grown_heads_and_chain_their_digests(fresh: Service) -> None:
    merchant, shard = await books(fresh)
    store = ChainStore(shard)
    first = await store.checkpoint()
    assert first is not None and first.heads == 2
    assert await store.checkpoint() is None, "nothing grew: no empty checkpoint"
    answer = await transfers(
        fresh.stub, transfer(uid("t"), ref(merchant, "cash"), ref(merchant, "wallet"), 5)
    )
    assert result_names(answer) == ["TRANSFER_RESULT_OK"]
    other, _ = await books(fresh, merchant_prefix="n")
    second = await store.checkpoint()
    assert second is not None and second.checkpoint_id == 2
    assert second.heads == 4, "two grown accounts of the first merchant, two new ones"
    async with shard.pool.acquire() as conn:
        heads = await conn.fetch(
            "SELECT merchant_id, account_id, sequence, entry_hash FROM chain_checkpoint_heads"
            ' WHERE checkpoint_id = 2 ORDER BY merchant_id COLLATE "C", account_id COLLATE "C"'
        )
    assert second.digest == checkpoint_digest(first.digest, [tuple(h) for h in heads])
    assert {h["merchant_id"] for h in heads} == {merchant, other}
    report = await store.verify()
    assert report.violations == [] and report.last_checkpoint == second


async def test_non_ascii_ids_hash_the_same_in_python_and_sql(fresh: Service) -> None:
    merchant = fresh.merchant_on("shard-b", "mérchant-☃-")
    await create_accounts(fresh.stub, account(merchant, "caisse-€"), account(merchant, "wället"))
    answer = await transfers(
        fresh.stub,
        transfer("überweisung-😀", ref(merchant, "caisse-€"), ref(merchant, "wället"), 7),
    )
    assert result_names(answer) == ["TRANSFER_RESULT_OK"]
    assert await violations(fresh.cluster.shards["shard-b"]) == []


async def test_the_migration_hashes_entries_written_before_it(pg_server: EmbeddedPostgres) -> None:
    (spec,) = fresh_databases(pg_server, ["old"])
    conn = await asyncpg.connect(spec.dsn)
    try:
        await apply_migrations_before(conn, 4)
        await conn.execute(
            "INSERT INTO merchants (merchant_id, state, epoch) VALUES ('old', 'active', 1);"
            "INSERT INTO accounts (merchant_id, account_id, currency,"
            " debits_must_not_exceed_credits, credits_must_not_exceed_debits, metadata,"
            " credits_posted, entry_count, created_at)"
            " VALUES ('old', 'a', 'USD', false, false, '{}', 30, 2, now());"
            "INSERT INTO entries VALUES"
            " ('old', 'a', 1, 'old', 't1', 2, 1, 10, 0, 10, 0, 0, now()),"
            " ('old', 'a', 2, 'old', 't2', 2, 1, 20, 0, 30, 0, 0, now())"
        )
        applied = await apply_migrations(conn)
        assert "0004_hash_chain.sql" in applied
        rows = await conn.fetch(
            "SELECT sequence, entry_hash, ledger_entry_hash(CASE WHEN sequence = 1 THEN $1"
            " ELSE lag(entry_hash) OVER (ORDER BY sequence) END, entries) AS expected"
            " FROM entries ORDER BY sequence",
            GENESIS_HASH,
        )
        assert [r["entry_hash"] for r in rows] == [r["expected"] for r in rows]
        head = await conn.fetchval("SELECT entry_hash FROM accounts")
        assert head == rows[-1]["entry_hash"]
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute("UPDATE entries SET amount_minor = 1")
    finally:
        await conn.close()


async def test_ledger_verify_reports_each_shard_and_fails_on_a_violation(fresh: Service) -> None:
    merchant, shard = await books(fresh)
    await tamper(
        shard,
        (
            "UPDATE entries SET kind = 2 WHERE merchant_id = $1 AND sequence = 1"
            " AND account_id = 'cash'",
            (merchant,),
        ),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger.cli",
        "verify",
        "--config",
        str(fresh.config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), CLI_DEADLINE_S)
    text = out.decode()
    assert process.returncode == 1, text
    assert f"FAIL shard-a {merchant}/cash entry 1" in text
    assert "ok   shard-b: 0 violation(s)" in text


async def test_a_client_can_recompute_an_accounts_chain_from_list_entries(fresh: Service) -> None:
    """The hashes and fields ListEntries returns are enough to check the chain outside."""
    merchant, shard = await books(fresh)
    page = await fresh.stub.ListEntries(
        pb.ListEntriesRequest(account=ref(merchant, "wallet"), order=pb.ORDER_OLDEST_FIRST),
        timeout=RPC_TIMEOUT_S,
    )
    assert [e.sequence for e in page.entries] == list(range(1, TRANSFERS + 1))
    previous = GENESIS_HASH
    for e in page.entries:
        recomputed = chained_entry(
            previous,
            account=AccountKey(merchant, "wallet"),
            sequence=e.sequence,
            transfer=TransferKey(e.transfer_merchant_id, e.transfer_id),
            direction=Direction(e.direction),
            kind=EntryKind(e.kind),
            amount_minor=e.amount_minor,
            balances_after=Balances(
                e.debits_posted, e.credits_posted, e.debits_pending, e.credits_pending
            ),
            created_at=e.created_at.ToDatetime(tzinfo=UTC),
        )
        assert e.hash == recomputed.hash, e.sequence
        previous = e.hash
    async with shard.pool.acquire() as conn:
        head = await conn.fetchval(
            "SELECT entry_hash FROM accounts WHERE merchant_id = $1 AND account_id = 'wallet'",
            merchant,
        )
    assert previous == head

"""The append-only guard cannot be switched off by an ordinary connection (issue 23, item 3).

Before migration 0009, `SET LOCAL ledger.allow_history_cleanup = 'on'` let any
role that may DELETE remove entries. Now only a grant made by
ledger_allow_history_cleanup() (SECURITY DEFINER, owned by the NOLOGIN role
ledger_history_guard) lets a transaction delete history, and only of a merchant
that moved away or is being copied here. These tests connect as a plain role
with every table privilege the service has, as an insider holding the
service's credentials would (but not owning the tables).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.config import ShardConfig
from ledger.storage.shard import Shard
from tests.support import (
    Service,
    account,
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

APPEND_ONLY = "55000"  # object_not_in_prerequisite_state, the guard's SQLSTATE
INSUFFICIENT_PRIVILEGE = "42501"


@pytest.fixture
async def guarded(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    specs = fresh_databases(pg_server, ("shard-a",))
    path = write_config(
        tmp_path_factory.mktemp("guard") / "shards.toml",
        ShardConfig(epoch=1, shards=tuple(specs)),
    )
    running = await start_service(path)
    try:
        yield running
    finally:
        await running.stop()


async def books(service: Service) -> tuple[str, Shard]:
    merchant = service.merchant_on("shard-a")
    await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "wallet"))
    answer = await transfers(
        service.stub, transfer(uid("t"), ref(merchant, "cash"), ref(merchant, "wallet"), 10)
    )
    assert result_names(answer) == ["TRANSFER_RESULT_OK"]
    return merchant, service.cluster.shards["shard-a"]


async def plain_role(shard: Shard) -> asyncpg.Connection:  # type: ignore[type-arg]
    """A connection as a new role with the service's privileges on every table, not an owner."""
    role = uid("insider_")
    async with shard.pool.acquire() as conn:
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        await conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        dsn = shard.dsn
    user_part = dsn.split("://", 1)[1].split("@", 1)[0]
    return await asyncpg.connect(dsn.replace(f"://{user_part}@", f"://{role}@", 1))


async def entries_of(shard: Shard, merchant: str) -> int:
    async with shard.pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM entries WHERE merchant_id = $1", merchant
        )
    return count


async def test_the_session_setting_no_longer_lets_a_connection_delete_entries(
    guarded: Service,
) -> None:
    merchant, shard = await books(guarded)
    conn = await plain_role(shard)
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            async with conn.transaction():
                await conn.execute("SET LOCAL ledger.allow_history_cleanup = 'on'")
                await conn.execute("DELETE FROM entries WHERE merchant_id = $1", merchant)
        assert refused.value.sqlstate == APPEND_ONLY
        assert "append-only" in str(refused.value)
    finally:
        await conn.close()
    # The table owner's connection (the service's own pool) is refused the same way.
    with pytest.raises(asyncpg.PostgresError) as refused_owner:
        async with shard.pool.acquire() as owner, owner.transaction():
            await owner.execute("SET LOCAL ledger.allow_history_cleanup = 'on'")
            await owner.execute("DELETE FROM transfers WHERE merchant_id = $1", merchant)
    assert refused_owner.value.sqlstate == APPEND_ONLY
    assert await entries_of(shard, merchant) == 2


async def test_a_cleanup_grant_is_refused_for_a_merchant_this_shard_still_owns(
    guarded: Service,
) -> None:
    merchant, shard = await books(guarded)
    conn = await plain_role(shard)
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            async with conn.transaction():
                await conn.execute("SELECT ledger_allow_history_cleanup($1)", merchant)
        assert refused.value.sqlstate == APPEND_ONLY
        assert "moved away or is being copied here (state active)" in str(refused.value)
    finally:
        await conn.close()
    assert await entries_of(shard, merchant) == 2


async def test_an_ordinary_role_cannot_write_a_grant_of_its_own(guarded: Service) -> None:
    merchant, shard = await books(guarded)
    conn = await plain_role(shard)
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO ledger_guard.history_cleanup_grants"
                    " VALUES (pg_current_xact_id(), $1)",
                    merchant,
                )
        assert refused.value.sqlstate == INSUFFICIENT_PRIVILEGE
    finally:
        await conn.close()


async def test_a_grant_covers_only_the_moved_merchant_and_only_its_transaction(
    guarded: Service,
) -> None:
    moved, shard = await books(guarded)
    stays, _ = await books(guarded)
    async with shard.pool.acquire() as owner:
        # As a finished move leaves it (the guard role reads state, nothing else).
        await owner.execute(
            "UPDATE merchants SET state = 'moved', moved_to = 'shard-b' WHERE merchant_id = $1",
            moved,
        )
    conn = await plain_role(shard)
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            async with conn.transaction():
                await conn.execute("SELECT ledger_allow_history_cleanup($1)", moved)
                await conn.execute("DELETE FROM entries WHERE merchant_id = $1", stays)
        assert refused.value.sqlstate == APPEND_ONLY
        async with conn.transaction():
            await conn.execute("SELECT ledger_allow_history_cleanup($1)", moved)
            deleted = await conn.execute("DELETE FROM entries WHERE merchant_id = $1", moved)
        assert deleted == "DELETE 2"
        # The grant died with its transaction.
        with pytest.raises(asyncpg.PostgresError) as later:
            await conn.execute("DELETE FROM transfers WHERE merchant_id = $1", moved)
        assert later.value.sqlstate == APPEND_ONLY
    finally:
        await conn.close()
    assert await entries_of(shard, stays) == 2

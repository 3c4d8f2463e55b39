"""Shared test helpers: a real service over a real gRPC channel on real PostgreSQL shards."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2

from ledger.api.server import LedgerServer
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.cluster import Cluster
from ledger.routing.config import ShardConfig, ShardSpec, load_config, render_config
from ledger.routing.ring import ShardRing
from ledger.storage.move_statements import ADMIN_LOCK_HOLDER
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

# A condition a test waits for must hold within this long, or the test fails.
WAIT_DEADLINE_S = 20.0
# Each RPC a test makes has this deadline, so a hang fails instead of blocking.
RPC_TIMEOUT_S = 15.0

_database_counter = itertools.count()


def uid(prefix: str = "") -> str:
    """A fresh id. Its random digits never run 13 long (even after a prefix ending in
    digits), so no id is ever refused as a card number by chance."""
    random_hex = uuid.uuid4().hex
    return f"{prefix}{random_hex[:6]}x{random_hex[6:11]}"


def write_config(path: Path, config: ShardConfig) -> Path:
    path.write_text(render_config(config))
    return path


# Every database fresh_databases made, with its server: conftest drops a test
# module's when the module is done.
databases_made: list[tuple[EmbeddedPostgres, str]] = []


def fresh_databases(server: EmbeddedPostgres, names: Sequence[str]) -> list[ShardSpec]:
    """Creates one empty database per shard name on server (unique per call)."""
    specs = []
    run = next(_database_counter)
    for name in names:
        database = f"t{run}_{uuid.uuid4().hex[:6]}_{name.replace('-', '_')}"
        server.create_database(database)
        databases_made.append((server, database))
        specs.append(ShardSpec(name=name, dsn=server.dsn(database), weight=1))
    return specs


@dataclass
class Service:
    """A running LedgerServer on its own shards, and a stub connected to it."""

    cluster: Cluster
    server: LedgerServer
    channel: grpc.aio.Channel
    stub: ledger_pb2_grpc.LedgerServiceStub
    config_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def ring(self) -> ShardRing:
        return self.cluster.ring

    def merchant_on(self, shard_name: str, prefix: str = "m") -> str:
        """A fresh merchant id that the ring places on shard_name."""
        for _ in range(10_000):
            candidate = uid(prefix)
            if self.ring.shard_for(candidate) == shard_name:
                return candidate
        raise AssertionError(f"no merchant found for {shard_name}")

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(grace_s=1.0)
        await self.cluster.close()


async def start_service(
    config_path: Path,
    *,
    concurrent_rpcs_max: int = 256,
    mask_card_metadata: bool = False,
    polls_for_others: bool = True,
) -> Service:
    cluster = Cluster(load_config(config_path), config_path=config_path)
    await cluster.open()
    server = LedgerServer(
        cluster,
        listen="127.0.0.1:0",
        concurrent_rpcs_max=concurrent_rpcs_max,
        mask_card_metadata=mask_card_metadata,
        polls_for_others=polls_for_others,
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return Service(
        cluster=cluster,
        server=server,
        channel=channel,
        stub=ledger_pb2_grpc.LedgerServiceStub(channel),
        config_path=config_path,
    )


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, deadline_s: float = WAIT_DEADLINE_S, what: str
) -> None:
    """Polls condition until it holds; fails the test at the deadline."""
    end = time.monotonic() + deadline_s
    delay_s = 0.01
    while True:
        if await condition():
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.2)


async def wait_admin_locks_released(config_path: Path) -> None:
    """Waits until no session holds the admin lock of a shard of the config. A
    SIGKILLed rebalance's backends end, and free its locks, only once they read the
    closed sockets, a moment after the process: a rerun at once could find the
    shards busy (AdminBusy: the moves model's seed 280 once, on a busy machine)."""
    shards = load_config(config_path).shards

    async def released() -> bool:
        for spec in shards:
            conn = await asyncpg.connect(spec.dsn)
            try:
                if await conn.fetchval(ADMIN_LOCK_HOLDER) is not None:
                    return False
            finally:
                await conn.close()
        return True

    await wait_until(released, what="the killed run's admin locks released")


def ref(merchant_id: str, account_id: str) -> pb.AccountRef:
    return pb.AccountRef(merchant_id=merchant_id, account_id=account_id)


def account(
    merchant_id: str,
    account_id: str,
    currency: str = "USD",
    *,
    no_overdraft: bool = False,
    no_credit_overdraft: bool = False,
    metadata: dict[str, str] | None = None,
) -> pb.Account:
    return pb.Account(
        ref=ref(merchant_id, account_id),
        currency=currency,
        debits_must_not_exceed_credits=no_overdraft,
        credits_must_not_exceed_debits=no_credit_overdraft,
        metadata=metadata or {},
    )


def transfer(
    transfer_id: str,
    debit: pb.AccountRef,
    credit: pb.AccountRef | None,
    amount_minor: int,
    currency: str = "USD",
    *,
    action: int = pb.TRANSFER_ACTION_POST,
    **fields: object,
) -> pb.Transfer:
    return pb.Transfer(
        id=transfer_id,
        debit_account=debit,
        credit_account=credit,
        amount_minor=amount_minor,
        currency=currency,
        action=action,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


async def create_accounts(stub: ledger_pb2_grpc.LedgerServiceStub, *accounts: pb.Account) -> None:
    response = await stub.CreateAccounts(
        pb.CreateAccountsRequest(accounts=accounts), timeout=RPC_TIMEOUT_S
    )
    codes = [r.result for r in response.results]
    assert codes == [pb.ACCOUNT_RESULT_OK] * len(accounts), codes


async def transfers(
    stub: ledger_pb2_grpc.LedgerServiceStub, *items: pb.Transfer
) -> list[pb.CreateTransferResult]:
    response = await stub.CreateTransfers(
        pb.CreateTransfersRequest(transfers=items), timeout=RPC_TIMEOUT_S
    )
    return list(response.results)


async def balance(
    stub: ledger_pb2_grpc.LedgerServiceStub, merchant_id: str, account_id: str
) -> pb.Account:
    response = await stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[ref(merchant_id, account_id)]), timeout=RPC_TIMEOUT_S
    )
    assert len(response.accounts) == 1
    return response.accounts[0]


def result_names(results: Sequence[pb.CreateTransferResult]) -> list[str]:
    return [pb.TransferResult.Name(r.result) for r in results]


def status_details(error: grpc.aio.AioRpcError) -> list[object]:
    """Decodes the google.rpc details of a failed call (BadRequest, ErrorInfo, ...)."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if raw is None:
        return []
    status = status_pb2.Status.FromString(raw)  # type: ignore[arg-type]
    decoded: list[object] = []
    for detail in status.details:
        for kind in (
            error_details_pb2.BadRequest,
            error_details_pb2.ErrorInfo,
            error_details_pb2.PreconditionFailure,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                decoded.append(message)
    return decoded


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    violations: dict[str, str] = {}
    for detail in status_details(error):
        if isinstance(detail, error_details_pb2.BadRequest):
            for v in detail.field_violations:
                violations[v.field] = v.description
    return violations


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    for detail in status_details(error):
        if isinstance(detail, error_details_pb2.ErrorInfo):
            return detail.reason
    return None


async def count_rows(service: Service, table: str) -> int:
    """Rows in table summed over every shard (table names are constants in tests)."""
    assert table.isidentifier()
    total = 0
    for shard in service.cluster.shards.values():
        async with shard.pool.acquire() as conn:
            total += int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    return total


def scans_of(plan: dict[str, Any], table: str) -> tuple[int, list[str]]:
    """In an EXPLAIN (ANALYZE, FORMAT JSON) plan: the rows its scans of the table
    read (returned, and removed by their filters), and those scans' node types."""
    rows, scans = 0, []
    if plan.get("Relation Name") == table and "Scan" in plan["Node Type"]:
        rows += plan["Actual Rows"] * plan["Actual Loops"] + plan.get("Rows Removed by Filter", 0)
        scans.append(plan["Node Type"])
    for child in plan.get("Plans", ()):
        child_rows, child_scans = scans_of(child, table)
        rows += child_rows
        scans += child_scans
    return rows, scans


async def apply_migrations_before(conn: Any, version: int) -> None:
    """Brings a fresh database to the schema just before migration `version`, as a
    shard of that age would be (recorded, so that apply_migrations goes on from it)."""
    from ledger.storage.migrate import migrations

    await conn.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    for migration in migrations():
        if migration.version >= version:
            break
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            migration.version,
            migration.name,
        )


async def background_wake_times(server: LedgerServer) -> dict[str, float]:
    """When the expiry sweeper and the saga recovery worker wake by themselves (loop
    time; inf: only when woken), once both are asleep."""
    schedules = {
        "expiry sweeper": server.sweeper.schedule,
        "saga recovery": server.recovery.schedule,
    }

    async def all_asleep() -> bool:
        return all(s.sleeps_until is not None for s in schedules.values())

    await wait_until(all_asleep, what="the background workers to go to sleep")
    wakes = {name: s.sleeps_until for name, s in schedules.items()}
    return {name: at for name, at in wakes.items() if at is not None}


@contextlib.asynccontextmanager
async def account_row_locked(dsn: str, merchant_id: str, account_id: str) -> AsyncIterator[None]:
    """Holds FOR UPDATE on one account row of the shard database at dsn, so a saga
    step (or any write) that needs it waits until the block ends."""
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            locked = await conn.fetchval(
                "SELECT account_id FROM accounts WHERE merchant_id = $1 AND account_id = $2"
                " FOR UPDATE",
                merchant_id,
                account_id,
            )
            assert locked == account_id
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def refusing_connections(service: Service, name: str, admin_dsn: str) -> AsyncIterator[None]:
    """Shard name's database refuses new connections (ALTER DATABASE ... ALLOW_CONNECTIONS
    false, as during maintenance: SQLSTATE 55000) while its server keeps running, and
    the service's pooled connections to it are closed, until the block ends.
    admin_dsn: the shard's server, any other database of it."""
    database = urlsplit(service.cluster.config.shard(name).dsn).path.lstrip("/")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        # The pool's open connections would still work: make it connect anew.
        await service.cluster.shards[name].pool.expire_connections()
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()

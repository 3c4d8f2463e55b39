"""The `ledger` command: serve, migrate, route, and a few calls for trying the service."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
import uvloop
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

from ledger import limits
from ledger.api.server import LedgerServer
from ledger.client import LedgerClient
from ledger.domain.sagas import SagaKind, SagaState
from ledger.embedded.cluster import EmbeddedCluster
from ledger.moves.rebalance import MoveResult, Rebalancer
from ledger.routing.cluster import Cluster
from ledger.routing.config import load_config
from ledger.routing.ring import ShardRing
from ledger.sagas.reconcile import ReconcileReport
from ledger.sagas.reconcile import reconcile as run_reconcile
from ledger.sagas.runner import SagaSettings
from ledger.settings import Settings
from ledger.telemetry.logs import setup_logging
from ledger.telemetry.metrics import setup_metrics
from ledger.telemetry.tracing import setup_tracing
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

log = logging.getLogger("ledger")
app = typer.Typer(help="A sharded double-entry ledger service.", no_args_is_help=True)
accounts_app = typer.Typer(help="Create and inspect accounts.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
shards_app = typer.Typer(help="Plan and run online rebalancing of merchants.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
_NewConfig = Annotated[Path, typer.Option("--config", help="The new shard config.")]
_OldConfig = Annotated[
    Path | None,
    typer.Option("--from", help="The previous config, for shards the new one removes."),
]
sagas_app = typer.Typer(
    help="List, show, retry and resolve cross-shard sagas.", no_args_is_help=True
)
app.add_typer(sagas_app, name="sagas")
_KindOption = Annotated[str, typer.Option("--kind", help="transfer, settle or expire.")]
# Admin calls are quick reads or single repairs.
_ADMIN_TIMEOUT_S = 30.0
R = TypeVar("R")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Shard config file (default: embedded cluster).")
]
TargetOption = Annotated[str, typer.Option("--target", help="host:port of a ledger server.")]
DEFAULT_TARGET = "127.0.0.1:50051"


def main() -> None:
    app()


@app.command()
def serve(
    config: ConfigOption = None,
    listen: Annotated[str | None, typer.Option(help="host:port to listen on.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Embedded cluster data directory.")] = None,
) -> None:
    """Serve the ledger. Without --config, start the embedded PostgreSQL cluster first."""
    setup_logging()
    env = Settings.from_env()
    if setup_tracing() is not None:
        # Statement text only, never parameters: they hold money and merchant ids.
        AsyncPGInstrumentor(capture_parameters=False).instrument()  # type: ignore[no-untyped-call]
    _start_metrics(env.metrics_listen)
    config_path = config or env.config_path
    embedded = None
    if config_path is None:
        embedded = EmbeddedCluster(data_dir or env.data_dir)
        log.info("starting embedded PostgreSQL in %s", embedded.data_dir)
        embedded.start()
        config_path = embedded.config_path
    try:
        uvloop.run(_serve(config_path, listen or env.listen, env))
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded PostgreSQL stopped")


def _start_metrics(listen: str) -> None:
    if listen == "off":
        return
    host, _, port = listen.rpartition(":")
    try:
        bound = setup_metrics(host=host, port=int(port))
    except OSError as error:
        log.warning("metrics endpoint not started on %s: %s", listen, error)
        return
    log.info("metrics on http://%s:%d/metrics", host, bound)


async def _serve(config_path: Path, listen: str, settings: Settings) -> None:
    cluster = Cluster(load_config(config_path), config_path=config_path)
    await cluster.open()
    server = LedgerServer(
        cluster,
        listen=listen,
        concurrent_rpcs_max=settings.concurrent_rpcs_max,
        saga_settings=SagaSettings(
            attempts_max=settings.saga_attempts_max,
            retry_delay_s_max=settings.saga_retry_delay_s_max,
            lease_s=settings.saga_lease_s,
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP reloads the shard config without a restart.
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(cluster.reload()))
    try:
        port = await server.start()
        host = listen.rsplit(":", 1)[0]
        log.info("ledger serving on %s:%d (config %s)", host, port, config_path)
        await stop.wait()
        log.info("stopping: letting in-flight calls finish")
        await server.stop(limits.shutdown_grace_s)
    finally:
        await cluster.close()


@app.command()
def migrate(config: Annotated[Path, typer.Option("--config")]) -> None:
    """Apply the schema migrations to every shard in the config."""

    async def run() -> None:
        cluster = Cluster(load_config(config), config_path=config)
        try:
            await cluster.open(migrate=True)
        finally:
            await cluster.close()

    asyncio.run(run())
    typer.echo("migrated")


@app.command()
def reconcile(config: Annotated[Path, typer.Option("--config")]) -> None:
    """Check that the books balance on every shard and across the cluster."""

    async def run() -> ReconcileReport:
        cluster = Cluster(load_config(config), config_path=config)
        try:
            await cluster.open(migrate=False)
            return await run_reconcile(cluster)
        finally:
            await cluster.close()

    report = asyncio.run(run())
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)


@sagas_app.command("list")
def sagas_list(
    state: Annotated[
        str, typer.Option(help="running, completed, compensated, dead, or unfinished.")
    ] = "unfinished",
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    target: TargetOption = DEFAULT_TARGET,
) -> None:
    """List sagas by state, oldest first."""
    states = {"unfinished": 0, **{s.name.lower(): s.value for s in SagaState}}
    if state not in states:
        raise typer.BadParameter(f"state must be one of {', '.join(states)}")
    request = pb.ListSagasRequest(state=states[state], page_size=limit)  # type: ignore[arg-type]
    response = asyncio.run(
        _admin(target, lambda stub: stub.ListSagas(request, timeout=_ADMIN_TIMEOUT_S))
    )
    for saga in response.sagas:
        typer.echo(_saga_line(saga))
    typer.echo(f"{len(response.sagas)} saga(s)")
    if response.unreachable_shards:
        typer.echo(f"unreachable shards: {', '.join(response.unreachable_shards)}", err=True)


@sagas_app.command("show")
def sagas_show(
    merchant_id: str,
    transfer_id: str,
    kind: _KindOption = "transfer",
    target: TargetOption = DEFAULT_TARGET,
) -> None:
    """Show one saga with its step history and errors."""
    request = pb.GetSagaRequest(ref=_saga_ref(merchant_id, transfer_id, kind))
    saga = asyncio.run(_admin(target, lambda stub: stub.GetSaga(request, timeout=_ADMIN_TIMEOUT_S)))
    typer.echo(_saga_line(saga))
    for step in saga.steps:
        when = step.at.ToDatetime().isoformat(timespec="milliseconds")
        typer.echo(f"  {when} step {step.step} {step.outcome} {step.detail}")


@sagas_app.command("retry")
def sagas_retry(
    merchant_id: str,
    transfer_id: str,
    kind: _KindOption = "transfer",
    target: TargetOption = DEFAULT_TARGET,
) -> None:
    """Retry a dead (or running) saga now, with its attempts reset."""
    request = pb.GetSagaRequest(ref=_saga_ref(merchant_id, transfer_id, kind))
    saga = asyncio.run(
        _admin(target, lambda stub: stub.RetrySaga(request, timeout=_ADMIN_TIMEOUT_S))
    )
    typer.echo(_saga_line(saga))


@sagas_app.command("resolve")
def sagas_resolve(
    merchant_id: str,
    transfer_id: str,
    outcome: Annotated[str, typer.Argument(help="completed or compensated")],
    kind: _KindOption = "transfer",
    target: TargetOption = DEFAULT_TARGET,
) -> None:
    """Finish a stuck saga, only as the credit shard confirms is safe."""
    outcomes = {"completed": pb.SAGA_STATE_COMPLETED, "compensated": pb.SAGA_STATE_COMPENSATED}
    if outcome not in outcomes:
        raise typer.BadParameter("outcome must be completed or compensated")
    request = pb.ResolveSagaRequest(
        ref=_saga_ref(merchant_id, transfer_id, kind), outcome=outcomes[outcome]
    )
    saga = asyncio.run(
        _admin(target, lambda stub: stub.ResolveSaga(request, timeout=_ADMIN_TIMEOUT_S))
    )
    typer.echo(_saga_line(saga))


def _saga_ref(merchant_id: str, transfer_id: str, kind: str) -> pb.SagaRef:
    kinds = {k.name.lower(): k.value for k in SagaKind}
    if kind not in kinds:
        raise typer.BadParameter(f"kind must be one of {', '.join(kinds)}")
    return pb.SagaRef(merchant_id=merchant_id, transfer_id=transfer_id, kind=kinds[kind])  # type: ignore[arg-type]


def _saga_line(saga: pb.Saga) -> str:
    return (
        f"{saga.ref.merchant_id}/{saga.ref.transfer_id} {pb.SagaKind.Name(saga.ref.kind)} "
        f"{pb.SagaState.Name(saga.state)} {saga.debit_shard}->{saga.credit_shard} "
        f"{saga.amount_minor} {saga.currency} attempts={saga.attempts} "
        f"result={pb.TransferResult.Name(saga.result)}"
        + (f" last_error={saga.last_error!r}" if saga.last_error else "")
    )


async def _admin(target: str, call: Callable[[Any], Awaitable[R]]) -> R:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            return await call(ledger_pb2_grpc.LedgerAdminServiceStub(channel))
        except grpc.aio.AioRpcError as error:
            typer.echo(f"{error.code().name}: {error.details()}", err=True)
            raise typer.Exit(1) from None


async def _with_rebalancer(
    config: Path, old: Path | None, work: Callable[[Rebalancer], Awaitable[R]]
) -> R:
    rebalancer = Rebalancer(load_config(config), old=load_config(old) if old else None)
    try:
        await rebalancer.open()
        return await work(rebalancer)
    finally:
        await rebalancer.close()


@shards_app.command("plan")
def shards_plan(config: _NewConfig, old: _OldConfig = None) -> None:
    """Print which merchants move where under CONFIG, and how much data; changes nothing."""
    plan = asyncio.run(_with_rebalancer(config, old, lambda r: r.plan()))
    typer.echo(plan.render())


@shards_app.command("rebalance")
def shards_rebalance(config: _NewConfig, old: _OldConfig = None) -> None:
    """Move merchants online to their owners under CONFIG (rerun to resume)."""

    def progress(done: int, total: int, result: MoveResult, elapsed_s: float) -> None:
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        left_s = (total - done) / rate if rate > 0 else 0.0
        width = 30
        bar = "#" * (width * done // max(total, 1))
        pause = f", pause {result.pause_ms:.1f} ms" if result.pause_ms is not None else ""
        typer.echo(
            f"[{bar:<{width}}] {done}/{total} {rate:.1f}/s, ~{left_s:.0f}s left | "
            f"{result.move.merchant_id} {result.move.source}->{result.move.destination}: "
            f"{result.outcome}, {result.rows_copied} rows{pause}",
            err=True,
        )

    summary = asyncio.run(_with_rebalancer(config, old, lambda r: r.rebalance(progress=progress)))
    typer.echo(summary.render())
    if summary.pending:
        raise typer.Exit(1)


@shards_app.command("status")
def shards_status(config: _NewConfig, old: _OldConfig = None) -> None:
    """Show each shard's epoch, its merchants by state and moves in progress."""
    for line in asyncio.run(_with_rebalancer(config, old, lambda r: r.status())):
        typer.echo(line)


@shards_app.command("cleanup")
def shards_cleanup(config: _NewConfig, old: _OldConfig = None) -> None:
    """Delete old copies of merchants that moved, after checking the new owner has them."""
    merchants, rows = asyncio.run(_with_rebalancer(config, old, lambda r: r.cleanup()))
    typer.echo(f"removed old copies of {merchants} merchants ({rows} rows)")


@app.command()
def route(merchant_id: str, config: Annotated[Path, typer.Option("--config")]) -> None:
    """Print the shard that owns a merchant under a config."""
    typer.echo(ShardRing(load_config(config)).shard_for(merchant_id))


@accounts_app.command("create")
def accounts_create(
    merchant_id: str,
    account_id: str,
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "USD",
    no_overdraft: Annotated[
        bool, typer.Option(help="Debits may not exceed credits (a customer balance).")
    ] = False,
    target: TargetOption = DEFAULT_TARGET,
) -> None:
    """Create an account (idempotent)."""
    account = pb.Account(
        ref=pb.AccountRef(merchant_id=merchant_id, account_id=account_id),
        currency=currency,
        debits_must_not_exceed_credits=no_overdraft,
    )

    async def run() -> pb.CreateAccountsResponse:
        async with LedgerClient(target) as client:
            return await client.create_accounts([account])

    response = asyncio.run(run())
    typer.echo(pb.AccountResult.Name(response.results[0].result))


@accounts_app.command("balance")
def accounts_balance(
    merchant_id: str, account_id: str, target: TargetOption = DEFAULT_TARGET
) -> None:
    """Print an account's balances."""

    async def run() -> pb.GetBalanceResponse:
        async with LedgerClient(target) as client:
            return await client.get_balance(merchant_id, account_id)

    b = asyncio.run(run())
    typer.echo(
        f"{merchant_id}/{account_id} {b.currency}: debits_posted={b.debits_posted} "
        f"credits_posted={b.credits_posted} debits_pending={b.debits_pending} "
        f"credits_pending={b.credits_pending} "
        f"net_credit={b.credits_posted - b.debits_posted}"
    )


@app.command()
def transfer(
    transfer_id: str,
    debit: Annotated[str, typer.Argument(help="MERCHANT/ACCOUNT to debit.")],
    credit: Annotated[str, typer.Argument(help="MERCHANT/ACCOUNT to credit.")],
    amount_minor: Annotated[int, typer.Argument(help="Amount in minor units (cents).")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "USD",
    target: TargetOption = DEFAULT_TARGET,
) -> None:
    """Move money between two accounts (single phase, idempotent by TRANSFER_ID)."""
    request = pb.Transfer(
        id=transfer_id,
        debit_account=_ref(debit),
        credit_account=_ref(credit),
        amount_minor=amount_minor,
        currency=currency,
        action=pb.TRANSFER_ACTION_POST,
    )

    async def run() -> pb.CreateTransfersResponse:
        async with LedgerClient(target) as client:
            return await client.create_transfers([request])

    result = asyncio.run(run()).results[0]
    replayed = " (replayed)" if result.replayed else ""
    typer.echo(pb.TransferResult.Name(result.result) + replayed)
    if result.result != pb.TRANSFER_RESULT_OK:
        raise typer.Exit(1)


def _ref(text: str) -> pb.AccountRef:
    merchant_id, sep, account_id = text.partition("/")
    if not sep:
        raise typer.BadParameter(f"{text!r} must be MERCHANT/ACCOUNT")
    return pb.AccountRef(merchant_id=merchant_id, account_id=account_id)


if __name__ == "__main__":
    main()

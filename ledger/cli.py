"""The `ledger` command: serve, migrate, route, and a few calls for trying the service."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
import uvloop
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

from ledger import limits
from ledger.api.amqp_publisher import (
    DEFAULT_CONSUMER,
    DEFAULT_EXCHANGE,
    AmqpPublisher,
    PublisherRefused,
    PublisherSettings,
    redacted_url,
)
from ledger.api.auth import Scope, TokenFileError, TokenTable, new_token, token_entry
from ledger.api.connections import raise_file_limit
from ledger.api.server import LedgerServer
from ledger.api.tls import ServerTls
from ledger.cli_defaults import DEFAULT_ADDRESS, NoConfigFound, resolve_address, resolve_config
from ledger.client import ClientCredentials, LedgerClient
from ledger.core.checkpoints import ChainCheckpointer, verify_against_export
from ledger.domain.sagas import SagaKind, SagaState
from ledger.embedded.cluster import EmbeddedCluster
from ledger.moves.rebalance import MoveResult, Rebalancer, ShardPinned
from ledger.routing.cluster import Cluster
from ledger.routing.config import load_config
from ledger.routing.ring import ShardRing
from ledger.sagas.reconcile import ReconcileReport
from ledger.sagas.reconcile import reconcile as run_reconcile
from ledger.sagas.runner import SagaSettings
from ledger.settings import Settings, SettingsError, checkpoint_keys_from_env
from ledger.storage.chain import ChainStore
from ledger.storage.checkpoint_export import CheckpointExport
from ledger.storage.errors import ShardUnavailable
from ledger.storage.event_lease import ShardLease
from ledger.storage.events import ConsumerLapsed, EventStore
from ledger.storage.moves import AdminBusy
from ledger.telemetry.logs import setup_logging
from ledger.telemetry.metrics import setup_metrics
from ledger.telemetry.redaction import redact
from ledger.telemetry.textfile import reconcile_gauges, write_gauges
from ledger.telemetry.tracing import setup_tracing
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from ledger.workers import WorkerRole, default_count, supervise

log = logging.getLogger("ledger")
app = typer.Typer(help="A sharded double-entry ledger service.", no_args_is_help=True)
accounts_app = typer.Typer(help="Create and inspect accounts.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
shards_app = typer.Typer(help="Plan and run online rebalancing of merchants.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
_NewConfig = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="The new shard config (default: $LEDGER_CONFIG, else the embedded cluster's).",
    ),
]
_OldConfig = Annotated[
    Path | None,
    typer.Option("--from", help="The previous config, for shards the new one removes."),
]
sagas_app = typer.Typer(
    help="List, show, retry and resolve cross-shard sagas.", no_args_is_help=True
)
app.add_typer(sagas_app, name="sagas")
auth_app = typer.Typer(help="Make bearer tokens for the token file.", no_args_is_help=True)
app.add_typer(auth_app, name="auth")
events_app = typer.Typer(
    help="Publish the event stream to RabbitMQ; list and drop registered consumers.",
    no_args_is_help=True,
)
app.add_typer(events_app, name="events")
_KindOption = Annotated[str, typer.Option("--kind", help="transfer, settle or expire.")]
# Admin calls are quick reads or single repairs.
_ADMIN_TIMEOUT_S = 30.0
R = TypeVar("R")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Shard config file (default: embedded cluster).")
]
# Admin commands that read the shards: --config, else $LEDGER_CONFIG, else the config
# the embedded cluster (`ledger serve` without a config) wrote in the current folder.
AdminConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Shard config file (default: $LEDGER_CONFIG, else the embedded cluster's "
        "$LEDGER_DATA_DIR/shard_config.toml, ./.ledger-data by default).",
    ),
]
# Client commands: --address, else $LEDGER_ADDRESS, else the default listen address.
TargetOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        "--target",
        help=f"host:port of a ledger server (default: $LEDGER_ADDRESS, else {DEFAULT_ADDRESS}).",
    ),
]


def main() -> None:
    app()


def _config(option: Path | None) -> Path:
    """The shard config this admin command uses (said on stderr unless given as --config);
    exits 2 if there is none."""
    try:
        resolved = resolve_config(option, os.environ)
    except NoConfigFound as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if option is None:
        # Not chosen on the command line: say where it came from.
        typer.echo(resolved.describe("config"), err=True)
    return Path(resolved.value)


def _address(option: str | None) -> str:
    """The service address this client command calls (said on stderr unless given)."""
    resolved = resolve_address(option, os.environ)
    if option is None:
        typer.echo(resolved.describe("address"), err=True)
    return resolved.value


@app.command()
def serve(
    config: ConfigOption = None,
    listen: Annotated[str | None, typer.Option(help="host:port to listen on.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Embedded cluster data directory.")] = None,
    auth_file: Annotated[
        Path | None, typer.Option(help="Bearer token file (see `ledger auth token`).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Service processes on the one port, each with its own pools and background "
            "work (default: the cores this process may use).",
        ),
    ] = None,
) -> None:
    """Serve the ledger. Without --config, start the embedded PostgreSQL cluster first."""
    role = WorkerRole.from_env()
    count = workers if workers is not None else default_count()
    supervising = role is None and count > 1
    # gRPC's C core writes its own lines to stderr: they become JSON records too. A
    # parent of workers runs no gRPC, and its workers write their JSON to its stderr.
    setup_logging(route_native_stderr=not supervising)
    try:
        env = Settings.from_env()
    except SettingsError as error:
        raise typer.BadParameter(str(error)) from None
    if not 1 <= count <= limits.workers_max:
        raise typer.BadParameter(f"--workers must be 1 to {limits.workers_max}, got {count}")
    listen = listen or env.listen
    # Before the workers and the embedded cluster start: they inherit it.
    raise_file_limit()
    tokens = _tokens(auth_file or env.auth_file, listen, env.allow_unauthenticated)
    tls = None
    if env.tls_cert_file is not None or env.tls_key_file is not None:
        if env.tls_cert_file is None or env.tls_key_file is None:
            raise typer.BadParameter("LEDGER_TLS_CERT_FILE and LEDGER_TLS_KEY_FILE go together")
        tls = ServerTls(env.tls_cert_file, env.tls_key_file, env.tls_client_ca_file)
    elif env.tls_client_ca_file is not None:
        raise typer.BadParameter("LEDGER_TLS_CLIENT_CA_FILE needs LEDGER_TLS_CERT_FILE")
    if supervising:
        _supervise(count, config or env.config_path, listen, env, data_dir, auth_file)
        return
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
        uvloop.run(_serve(config_path, listen, env, tokens, tls, role))
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded PostgreSQL stopped")


def _supervise(
    count: int,
    config_path: Path | None,
    listen: str,
    env: Settings,
    data_dir: Path | None,
    auth_file: Path | None,
) -> None:
    """`serve --workers N`: this process starts PostgreSQL if embedded, then N service
    processes on the one port, and stops them all on SIGINT/SIGTERM (ledger/workers.py)."""
    embedded = None
    if config_path is None:
        embedded = EmbeddedCluster(data_dir or env.data_dir)
        log.info("starting embedded PostgreSQL in %s", embedded.data_dir)
        embedded.start()
        config_path = embedded.config_path
    extra_args = ["--auth-file", str(auth_file)] if auth_file is not None else []
    try:
        code = uvloop.run(
            supervise(
                count=count,
                listen=listen,
                config_path=config_path,
                metrics_listen=env.metrics_listen,
                extra_args=extra_args,
            )
        )
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded PostgreSQL stopped")
    if code != 0:
        raise typer.Exit(code)


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


def _tokens(auth_file: Path | None, listen: str, allow_unauthenticated: bool) -> TokenTable | None:
    """The token table, or None; refuses to serve other hosts without authentication."""
    if auth_file is not None:
        try:
            return TokenTable.load(auth_file)
        except TokenFileError as error:
            raise typer.BadParameter(str(error)) from None
    host = listen.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1") and not allow_unauthenticated:
        raise typer.BadParameter(
            f"listening on {host} without authentication: set LEDGER_AUTH_FILE "
            "(or LEDGER_ALLOW_UNAUTHENTICATED=true on a trusted network)"
        )
    if auth_file is None:
        log.warning("authentication is off: every caller may move money")
    return None


async def _serve(
    config_path: Path,
    listen: str,
    settings: Settings,
    tokens: TokenTable | None,
    tls: ServerTls | None,
    role: WorkerRole | None,
) -> None:
    cluster = Cluster(
        load_config(config_path),
        config_path=config_path,
        pool_connections_max=(
            role.pool_connections_max() if role is not None else limits.pool_connections_max
        ),
    )
    await cluster.open()
    server = LedgerServer(
        cluster,
        listen=listen,
        concurrent_rpcs_max=settings.concurrent_rpcs_max,
        incoming_connections_max=settings.incoming_connections_max,
        saga_settings=SagaSettings(
            attempts_max=settings.saga_attempts_max,
            retry_delay_s_max=settings.saga_retry_delay_s_max,
            lease_s=settings.saga_lease_s,
        ),
        tokens=tokens,
        tls=tls,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        checkpoint_keys=settings.checkpoint_keys,
        checkpoint_export_dir=settings.checkpoint_export_dir,
        mask_card_metadata=settings.mask_card_metadata,
        page_token_key=settings.page_token_key,
        reuse_port=role is not None,
        polls_for_others=role is None or role.index == 0,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP reloads the shard config and the token file without a restart.
    reloads: set[asyncio.Future[bool]] = set()

    def on_hangup() -> None:
        reload = asyncio.ensure_future(cluster.reload())
        reloads.add(reload)
        reload.add_done_callback(reloads.discard)
        server.reload_tokens()

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        port = await server.start()
        _tune_gc()
        if role is None:
            host = listen.rsplit(":", 1)[0]
            log.info("ledger serving on %s:%d (config %s)", host, port, config_path)
        else:
            # The parent says "ledger serving on" once every worker serves.
            role.watch_parent(loop, stop)
            role.report_ready(port)
        await stop.wait()
        log.info("stopping: letting in-flight calls finish")
        await server.stop(limits.shutdown_grace_s)
    finally:
        await cluster.close()


def _tune_gc() -> None:
    """Everything allocated while starting (modules, the server, the pools) lives as
    long as the process: frozen, the collector no longer walks it on every full pass.
    Calls allocate many short-lived objects without cycles; a higher first threshold
    makes the collector run less often for them (memory stays bounded: CPython still
    frees non-cyclic garbage at once by reference counting)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(limits.gc_young_threshold, gen1, gen2)


@auth_app.command("token")
def auth_token(
    name: Annotated[str, typer.Argument(help="Who the token is for, e.g. a service name.")],
    scopes: Annotated[
        str, typer.Option(help="Comma-separated: read, write, admin.")
    ] = "read,write",
    merchants: Annotated[
        str, typer.Option(help="Comma-separated merchant ids the token is limited to.")
    ] = "",
    expires_in_days: Annotated[
        float | None, typer.Option(help="The token stops working this many days from now.")
    ] = None,
) -> None:
    """Make a new token: prints it once, and the entry (its hash only) for the token file."""
    if expires_in_days is not None and expires_in_days <= 0:
        raise typer.BadParameter("--expires-in-days must be positive")
    try:
        scope_list = [Scope(s.strip()) for s in scopes.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter("scopes must be among read, write, admin") from None
    if not scope_list:
        raise typer.BadParameter("at least one scope")
    token = new_token()
    merchant_list = [m.strip() for m in merchants.split(",") if m.strip()]
    typer.echo(f"# token for {name} (shown once; give it to the caller as LEDGER_TOKEN):")
    typer.echo(f"# {token}")
    expires_at = (
        datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days is not None else None
    )
    typer.echo(token_entry(name, token, scope_list, merchant_list, expires_at=expires_at))


@app.command()
def migrate(config: AdminConfigOption = None) -> None:
    """Apply the schema migrations to every shard in the config."""
    config_path = _config(config)

    async def run() -> None:
        cluster = Cluster(load_config(config_path), config_path=config_path, audit=True)
        try:
            await cluster.open(migrate=True)
        finally:
            await cluster.close()

    asyncio.run(run())
    typer.echo("migrated")


@app.command()
def reconcile(
    config: AdminConfigOption = None,
    metrics_file: Annotated[
        Path | None,
        typer.Option(
            help="Also write the result as Prometheus gauges to this file (for "
            "node-exporter's textfile collector; see docs/alerts.md)."
        ),
    ] = None,
) -> None:
    """Check that the books balance on every shard and across the cluster."""
    config_path = _config(config)
    started_s = time.monotonic()

    try:
        keys = checkpoint_keys_from_env()
    except SettingsError as error:
        raise typer.BadParameter(str(error)) from None

    async def run() -> ReconcileReport:
        cluster = Cluster(load_config(config_path), config_path=config_path, audit=True)
        try:
            await cluster.open(migrate=False)
            # With LEDGER_CHECKPOINT_KEY, the hash-chain check includes the checkpoint MACs.
            return await run_reconcile(cluster, checkpoint_keys=keys)
        finally:
            await cluster.close()

    try:
        report = asyncio.run(run())
    except BaseException:
        # A reconcile that could not run (a shard down) proves nothing: say so to the alert.
        if metrics_file is not None:
            _write_reconcile_metrics(metrics_file, None, time.monotonic() - started_s)
        raise
    if metrics_file is not None:
        _write_reconcile_metrics(metrics_file, report, time.monotonic() - started_s)
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)


def _write_reconcile_metrics(path: Path, report: ReconcileReport | None, duration_s: float) -> None:
    discrepancies = -1 if report is None else sum(not f.ok for f in report.findings)
    write_gauges(
        path,
        reconcile_gauges(
            ok=report is not None and report.ok,
            discrepancies=discrepancies,
            duration_s=duration_s,
            at_s=time.time(),
        ),
    )


@app.command()
def verify(
    config: AdminConfigOption = None,
    checkpoint: Annotated[
        bool, typer.Option(help="Record (and export) a checkpoint of the current heads first.")
    ] = False,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="A checkpoint export directory (LEDGER_CHECKPOINT_EXPORT_DIR): fail on any "
            "history that does not match what was exported.",
        ),
    ] = None,
) -> None:
    """Has anyone touched the books? Checks every shard's hash chains, account balances
    against their entries, checkpoint MACs (with LEDGER_CHECKPOINT_KEY and any
    LEDGER_CHECKPOINT_KEYS_RETIRED) and, with --against, the exported checkpoints.
    Names each edited, inserted or deleted entry."""
    try:
        keys = checkpoint_keys_from_env()
    except SettingsError as error:
        raise typer.BadParameter(str(error)) from None
    if keys is None:
        typer.echo("note: LEDGER_CHECKPOINT_KEY is not set; checkpoint MACs are not checked")
    config_path = _config(config)

    async def run() -> bool:
        cluster = Cluster(load_config(config_path), config_path=config_path, audit=True)
        intact = True
        try:
            await cluster.open(migrate=False)
            if checkpoint:
                export_dir = Settings.from_env().checkpoint_export_dir
                await ChainCheckpointer(
                    cluster,
                    interval_s=limits.chain_checkpoint_interval_s,
                    keys=keys,
                    export=CheckpointExport(export_dir) if export_dir else None,
                ).checkpoint_once()
            for name, shard in cluster.shards.items():
                report = await ChainStore(shard).verify(keys=keys)
                for violation in report.violations:
                    typer.echo(f"FAIL {name} {violation.render()}")
                last = report.last_checkpoint
                anchor = (
                    f"checkpoint {last.checkpoint_id} digest {last.digest.hex()}"
                    if last
                    else "no checkpoint yet"
                )
                status = "ok  " if not report.violations else "FAIL"
                typer.echo(f"{status} {name}: {len(report.violations)} violation(s); {anchor}")
                intact = intact and not report.violations
            if against is not None:
                for check in await verify_against_export(
                    cluster, CheckpointExport(against), keys=keys
                ):
                    for violation in check.violations:
                        typer.echo(f"FAIL {check.shard} export: {violation.render()}")
                    status = "ok  " if not check.violations else "FAIL"
                    typer.echo(
                        f"{status} {check.shard} export: {len(check.violations)} violation(s); "
                        f"matches exported checkpoints through {check.exported_through}, "
                        f"{check.unexported} newer not yet exported"
                    )
                    intact = intact and not check.violations
        finally:
            await cluster.close()
        return intact

    if not asyncio.run(run()):
        raise typer.Exit(1)


@sagas_app.command("list")
def sagas_list(
    state: Annotated[
        str, typer.Option(help="running, completed, compensated, dead, or unfinished.")
    ] = "unfinished",
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    target: TargetOption = None,
) -> None:
    """List sagas by state, oldest first."""
    states = {"unfinished": 0, **{s.name.lower(): s.value for s in SagaState}}
    if state not in states:
        raise typer.BadParameter(f"state must be one of {', '.join(states)}")
    request = pb.ListSagasRequest(state=states[state], page_size=limit)  # type: ignore[arg-type]
    response = asyncio.run(_admin(target, "ListSagas", request))
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
    target: TargetOption = None,
) -> None:
    """Show one saga with its step history and errors."""
    request = pb.GetSagaRequest(ref=_saga_ref(merchant_id, transfer_id, kind))
    saga = asyncio.run(_admin(target, "GetSaga", request))
    typer.echo(_saga_line(saga))
    for step in saga.steps:
        when = step.at.ToDatetime().isoformat(timespec="milliseconds")
        typer.echo(f"  {when} step {step.step} {step.outcome} {step.detail}")


@sagas_app.command("retry")
def sagas_retry(
    merchant_id: str,
    transfer_id: str,
    kind: _KindOption = "transfer",
    target: TargetOption = None,
) -> None:
    """Retry a dead (or running) saga now, with its attempts reset."""
    request = pb.GetSagaRequest(ref=_saga_ref(merchant_id, transfer_id, kind))
    saga = asyncio.run(_admin(target, "RetrySaga", request))
    typer.echo(_saga_line(saga))


@sagas_app.command("resolve")
def sagas_resolve(
    merchant_id: str,
    transfer_id: str,
    outcome: Annotated[str, typer.Argument(help="completed or compensated")],
    kind: _KindOption = "transfer",
    target: TargetOption = None,
) -> None:
    """Finish a stuck saga, only as the credit shard confirms is safe."""
    outcomes = {"completed": pb.SAGA_STATE_COMPLETED, "compensated": pb.SAGA_STATE_COMPENSATED}
    if outcome not in outcomes:
        raise typer.BadParameter("outcome must be completed or compensated")
    request = pb.ResolveSagaRequest(
        ref=_saga_ref(merchant_id, transfer_id, kind), outcome=outcomes[outcome]
    )
    saga = asyncio.run(_admin(target, "ResolveSaga", request))
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


async def _admin(target: str | None, method: str, request: Any) -> Any:
    """Calls an admin method with the caller's credentials from the environment."""
    credentials = ClientCredentials.from_env()
    async with credentials.channel(_address(target)) as channel:
        call = getattr(ledger_pb2_grpc.LedgerAdminServiceStub(channel), method)
        try:
            return await call(request, timeout=_ADMIN_TIMEOUT_S, metadata=credentials.metadata)
        except grpc.aio.AioRpcError as error:
            typer.echo(f"{error.code().name}: {error.details()}", err=True)
            raise typer.Exit(1) from None


async def _with_rebalancer(
    config: Path,
    old: Path | None,
    work: Callable[[Rebalancer], Awaitable[R]],
    *,
    riding_out_losses: bool = False,
) -> R:
    def on_starting(shard_name: str) -> None:
        typer.echo(
            f"shard {shard_name} is starting up; waiting up to "
            f"{limits.shard_starting_wait_s:.0f} s for it",
            err=True,
        )

    def on_lost(lost: ShardUnavailable) -> None:
        typer.echo(
            f"{lost}; waiting up to {limits.rebalance_shard_lost_wait_s:.0f} s for it, "
            "then going on where the run stopped",
            err=True,
        )

    rebalancer = Rebalancer(
        load_config(config),
        old=load_config(old) if old else None,
        on_starting=on_starting,
        on_lost=on_lost,
    )
    try:
        await rebalancer.open(riding_out_losses=riding_out_losses)
        return await work(rebalancer)
    except ShardUnavailable as unavailable:
        # Every step is idempotent: a rerun once the shard answers picks up here.
        typer.echo(f"{unavailable}; nothing is lost: run this again once it answers", err=True)
        raise typer.Exit(1) from None
    except AdminBusy as busy:
        typer.echo(
            f"another `ledger shards rebalance` or `cleanup` is running (it holds {busy}); "
            "run this again when it has finished",
            err=True,
        )
        raise typer.Exit(2) from None
    except ShardPinned as pinned:
        typer.echo(f"refused: {pinned}", err=True)
        raise typer.Exit(2) from None
    finally:
        await rebalancer.close()


@shards_app.command("plan")
def shards_plan(config: _NewConfig = None, old: _OldConfig = None) -> None:
    """Print which merchants move where under CONFIG, and how much data; changes nothing."""
    plan = asyncio.run(_with_rebalancer(_config(config), old, lambda r: r.plan()))
    typer.echo(plan.render())


@shards_app.command("rebalance")
def shards_rebalance(config: _NewConfig = None, old: _OldConfig = None) -> None:
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

    summary = asyncio.run(
        _with_rebalancer(
            _config(config),
            old,
            lambda r: r.rebalance(progress=progress),
            riding_out_losses=True,
        )
    )
    typer.echo(summary.render())
    if not summary.finished:
        raise typer.Exit(1)


@shards_app.command("status")
def shards_status(config: _NewConfig = None, old: _OldConfig = None) -> None:
    """Show each shard's epoch, its merchants by state and moves in progress."""
    for line in asyncio.run(_with_rebalancer(_config(config), old, lambda r: r.status())):
        typer.echo(line)


@shards_app.command("cleanup")
def shards_cleanup(config: _NewConfig = None, old: _OldConfig = None) -> None:
    """Delete old copies of merchants that moved, after checking the new owner has them."""
    merchants, rows = asyncio.run(
        _with_rebalancer(_config(config), old, lambda r: r.cleanup(), riding_out_losses=True)
    )
    typer.echo(f"removed old copies of {merchants} merchants ({rows} rows)")


@events_app.command("publish")
def events_publish(
    amqp: Annotated[
        str,
        typer.Option(
            "--amqp",
            help="The broker, amqp://user:password@host:5672/vhost (or $LEDGER_AMQP_URL).",
            envvar="LEDGER_AMQP_URL",
            show_default=False,
        ),
    ],
    config: AdminConfigOption = None,
    exchange: Annotated[
        str, typer.Option(help="The topic exchange (its dead letters: EXCHANGE.dead).")
    ] = DEFAULT_EXCHANGE,
    consumer: Annotated[
        str, typer.Option(help="The registered consumer that records what was published.")
    ] = DEFAULT_CONSUMER,
    queue: Annotated[
        str | None,
        typer.Option(help="Also declare this durable queue, bound to every event."),
    ] = None,
) -> None:
    """Forward every shard's events to a RabbitMQ exchange, at least once, until stopped.

    Each shard is published by one publisher at a time (a lease); another takes over.
    SIGTERM or SIGINT: the batch in flight is confirmed and acknowledged, then exit 0.
    """
    setup_logging()
    config_path = _config(config)
    if not 1 <= len(consumer.encode()) <= limits.event_consumer_name_bytes_max:
        raise typer.BadParameter(
            f"--consumer must be 1 to {limits.event_consumer_name_bytes_max} bytes"
        )
    settings = PublisherSettings(amqp_url=amqp, exchange=exchange, consumer=consumer, queue=queue)

    async def run() -> None:
        cluster = Cluster(load_config(config_path), config_path=config_path, audit=True)
        publisher = AmqpPublisher(cluster, settings)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, publisher.stop)
        try:
            await cluster.open(migrate=False)
            await publisher.run()
        finally:
            await cluster.close()
        log.info("publisher stopped after publishing %d events", publisher.published)

    try:
        uvloop.run(run())
    except (PublisherRefused, ConsumerLapsed) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except Exception as error:
        # Logged with its traceback (redacted) where it happened; the reason here.
        typer.echo(
            f"error: the publisher to {redacted_url(amqp)} failed: "
            f"{type(error).__name__}: {redact(str(error))}",
            err=True,
        )
        raise typer.Exit(1) from None


@events_app.command("consumers")
def events_consumers(
    config: AdminConfigOption = None,
    drop: Annotated[
        str | None,
        typer.Option(
            "--drop",
            metavar="NAME",
            help="Delete this consumer on every shard (a lapsed one, to register it anew).",
        ),
    ] = None,
) -> None:
    """List the registered event consumers per shard: position, lag, lapsed or not."""
    config_path = _config(config)

    unreachable: list[str] = []

    async def run() -> list[str]:
        cluster = Cluster(load_config(config_path), config_path=config_path, audit=True)
        await cluster.open(migrate=False)
        lines: list[str] = []
        try:
            for name, shard in sorted(cluster.shards.items()):
                store = EventStore(shard)
                try:
                    if drop is not None:
                        dropped = await store.drop(drop)
                        lines.append(
                            f"{name}: dropped {drop!r}" if dropped else f"{name}: no {drop!r}"
                        )
                        continue
                    for c in await store.consumers():
                        state = "LAPSED" if c.lapsed else "live"
                        # A publisher (ledger events publish) holding the shard's lease.
                        holder = await ShardLease.holder(shard, c.consumer)
                        lines.append(
                            f"{name:<16} {c.consumer:<32} {c.position:>12} {c.lag_events:>12} "
                            f"{c.lag_s:>10.1f} {state}" + (f" ({holder})" if holder else "")
                        )
                except ShardUnavailable as error:
                    unreachable.append(name)
                    lines.append(f"{name}: unreachable ({error})")
        finally:
            await cluster.close()
        return lines

    lines = asyncio.run(run())
    if drop is None:
        typer.echo(
            f"{'shard':<16} {'consumer':<32} {'position':>12} {'lag events':>12} "
            f"{'lag s':>10} state"
        )
    for line in lines:
        typer.echo(line)
    if unreachable:
        raise typer.Exit(1)


@app.command()
def route(merchant_id: str, config: AdminConfigOption = None) -> None:
    """Print the shard that owns a merchant under a config."""
    typer.echo(ShardRing(load_config(_config(config))).shard_for(merchant_id))


@accounts_app.command("create")
def accounts_create(
    merchant_id: str,
    account_id: str,
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "USD",
    no_overdraft: Annotated[
        bool, typer.Option(help="Debits may not exceed credits (a customer balance).")
    ] = False,
    target: TargetOption = None,
) -> None:
    """Create an account (idempotent)."""
    account = pb.Account(
        ref=pb.AccountRef(merchant_id=merchant_id, account_id=account_id),
        currency=currency,
        debits_must_not_exceed_credits=no_overdraft,
    )

    response = _call_service(target, lambda c: c.create_accounts([account]))
    typer.echo(pb.AccountResult.Name(response.results[0].result))


@accounts_app.command("balance")
def accounts_balance(merchant_id: str, account_id: str, target: TargetOption = None) -> None:
    """Print an account's balances."""

    b = _call_service(target, lambda c: c.get_balance(merchant_id, account_id))
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
    target: TargetOption = None,
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

    result = _call_service(target, lambda c: c.create_transfers([request])).results[0]
    replayed = " (replayed)" if result.replayed else ""
    typer.echo(pb.TransferResult.Name(result.result) + replayed)
    if result.result != pb.TRANSFER_RESULT_OK:
        raise typer.Exit(1)


def _call_service(target: str | None, call: Callable[[LedgerClient], Awaitable[R]]) -> R:
    """Runs one client call with the caller's credentials; a failed call exits 1 with its status."""

    address = _address(target)

    async def run() -> R:
        async with LedgerClient(address, credentials=ClientCredentials.from_env()) as client:
            return await call(client)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as error:
        typer.echo(f"{error.code().name}: {error.details()}", err=True)
        raise typer.Exit(1) from None


def _ref(text: str) -> pb.AccountRef:
    merchant_id, sep, account_id = text.partition("/")
    if not sep:
        raise typer.BadParameter(f"{text!r} must be MERCHANT/ACCOUNT")
    return pb.AccountRef(merchant_id=merchant_id, account_id=account_id)


# Spending controls: an account's limits (ledger.v1 SetAccountLimits) and monitor crossings.

limits_app = typer.Typer(
    help="Show and change an account's limits: overdraft flags, velocity rules, monitors.",
    no_args_is_help=True,
)
accounts_app.add_typer(limits_app, name="limits")
monitors_app = typer.Typer(help="Balance monitor crossings.", no_args_is_help=True)
app.add_typer(monitors_app, name="monitors")
_DIRECTIONS = {"debit": pb.DIRECTION_DEBIT, "credit": pb.DIRECTION_CREDIT}
_METRICS = {"amount": pb.VELOCITY_METRIC_AMOUNT, "count": pb.VELOCITY_METRIC_COUNT}
_BALANCES = {
    "net_posted": pb.MONITORED_BALANCE_NET_POSTED,
    "available": pb.MONITORED_BALANCE_AVAILABLE,
}


def _rule(text: str) -> pb.VelocityRule:
    """RULE_ID=DIRECTION,METRIC,WINDOW_S,LIMIT, e.g. daily=debit,amount,86400,500000."""
    rule_id, sep, spec = text.partition("=")
    parts = spec.split(",")
    if not sep or len(parts) != 4 or parts[0] not in _DIRECTIONS or parts[1] not in _METRICS:
        raise typer.BadParameter(
            f"{text!r}: a rule is RULE_ID=debit|credit,amount|count,WINDOW_S,LIMIT"
        )
    try:
        window_s, limit = int(parts[2]), int(parts[3])
    except ValueError:
        raise typer.BadParameter(f"{text!r}: WINDOW_S and LIMIT are integers") from None
    return pb.VelocityRule(
        rule_id=rule_id,
        direction=_DIRECTIONS[parts[0]],
        metric=_METRICS[parts[1]],
        window_s=window_s,
        limit=limit,
    )


def _monitor(text: str) -> pb.BalanceMonitor:
    """MONITOR_ID=BALANCE,THRESHOLD_MINOR, e.g. low-reserve=net_posted,10000."""
    monitor_id, sep, spec = text.partition("=")
    parts = spec.split(",")
    if not sep or len(parts) != 2 or parts[0] not in _BALANCES:
        raise typer.BadParameter(
            f"{text!r}: a monitor is MONITOR_ID=net_posted|available,THRESHOLD_MINOR"
        )
    try:
        threshold_minor = int(parts[1])
    except ValueError:
        raise typer.BadParameter(f"{text!r}: THRESHOLD_MINOR is an integer") from None
    return pb.BalanceMonitor(
        monitor_id=monitor_id,
        balance=_BALANCES[parts[0]],
        threshold_minor=threshold_minor,
    )


def _limits_lines(limits_now: pb.AccountLimits) -> list[str]:
    lines = [
        f"debits_must_not_exceed_credits={limits_now.debits_must_not_exceed_credits} "
        f"credits_must_not_exceed_debits={limits_now.credits_must_not_exceed_debits}"
    ]
    for r in limits_now.velocity_rules:
        lines.append(
            f"rule {r.rule_id}: {pb.Direction.Name(r.direction)} "
            f"{pb.VelocityMetric.Name(r.metric)} <= {r.limit} per {r.window_s}s"
        )
    for m in limits_now.monitors:
        lines.append(
            f"monitor {m.monitor_id}: {pb.MonitoredBalance.Name(m.balance)} "
            f"threshold {m.threshold_minor}"
        )
    return lines


@limits_app.command("show")
def accounts_limits_show(
    merchant_id: str,
    account_id: str,
    history: Annotated[int, typer.Option(help="Changes of history to print.")] = 10,
    target: TargetOption = None,
) -> None:
    """Print an account's limits and their latest changes (who, when, why)."""
    request = pb.GetAccountLimitsRequest(
        account=pb.AccountRef(merchant_id=merchant_id, account_id=account_id),
        page_size=history,
    )
    response = asyncio.run(_admin(target, "GetAccountLimits", request))
    for line in _limits_lines(response.limits):
        typer.echo(line)
    for c in response.history:
        typer.echo(
            f"change {c.sequence} {c.change_id!r} at {c.changed_at.ToJsonString()} "
            f"by {c.changed_by}: {c.reason}"
        )


@limits_app.command("set")
def accounts_limits_set(
    merchant_id: str,
    account_id: str,
    change_id: Annotated[str, typer.Option(help="Idempotency key of this change.")],
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")],
    rule: Annotated[
        list[str] | None,
        typer.Option(help="RULE_ID=debit|credit,amount|count,WINDOW_S,LIMIT (repeatable)."),
    ] = None,
    monitor: Annotated[
        list[str] | None,
        typer.Option(help="MONITOR_ID=net_posted|available,THRESHOLD_MINOR (repeatable)."),
    ] = None,
    no_overdraft: Annotated[bool, typer.Option(help="Debits may not exceed credits.")] = False,
    no_credit_overdraft: Annotated[
        bool, typer.Option(help="Credits may not exceed debits.")
    ] = False,
    target: TargetOption = None,
) -> None:
    """Replace an account's limits as a whole (rules and monitors not given are cleared)."""
    request = pb.SetAccountLimitsRequest(
        account=pb.AccountRef(merchant_id=merchant_id, account_id=account_id),
        change_id=change_id,
        reason=reason,
        limits=pb.AccountLimits(
            debits_must_not_exceed_credits=no_overdraft,
            credits_must_not_exceed_debits=no_credit_overdraft,
            velocity_rules=[_rule(r) for r in rule or []],
            monitors=[_monitor(m) for m in monitor or []],
        ),
    )
    response = asyncio.run(_admin(target, "SetAccountLimits", request))
    c = response.change
    replayed = " (replayed)" if response.replayed else ""
    typer.echo(f"change {c.sequence} recorded by {c.changed_by}{replayed}")
    for line in _limits_lines(c.limits):
        typer.echo(line)


@monitors_app.command("list")
def monitors_list(
    merchant_id: str,
    after: Annotated[int, typer.Option(help="Crossings after this position.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many.")] = limits.page_size_default,
    target: TargetOption = None,
) -> None:
    """List a merchant's balance monitor crossings, oldest first."""
    request = pb.ListMonitorCrossingsRequest(
        merchant_id=merchant_id, after_sequence=after, page_size=limit
    )
    response = asyncio.run(_admin(target, "ListMonitorCrossings", request))
    for c in response.crossings:
        direction = pb.MonitorCrossingDirection.Name(c.direction).removeprefix(
            "MONITOR_CROSSING_DIRECTION_"
        )
        typer.echo(
            f"{c.sequence} {c.crossed_at.ToJsonString()} {c.monitor_id} "
            f"{c.account.merchant_id}/{c.account.account_id} {direction} "
            f"balance={c.balance_after_minor} threshold={c.threshold_minor} "
            f"by {c.transfer.merchant_id}/{c.transfer.transfer_id}"
        )


if __name__ == "__main__":
    main()

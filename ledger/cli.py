"""The `ledger` command: serve, migrate, route, and a few calls for trying the service."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from ledger import limits
from ledger.api.server import LedgerServer
from ledger.client import LedgerClient
from ledger.embedded.cluster import EmbeddedCluster
from ledger.routing.cluster import Cluster
from ledger.routing.config import load_config
from ledger.routing.ring import ShardRing
from ledger.settings import Settings
from ledger.v1 import ledger_pb2 as pb

app = typer.Typer(help="A sharded double-entry ledger service.", no_args_is_help=True)
accounts_app = typer.Typer(help="Create and inspect accounts.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")

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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    env = Settings.from_env()
    config_path = config or env.config_path
    embedded = None
    if config_path is None:
        embedded = EmbeddedCluster(data_dir or env.data_dir)
        typer.echo(f"starting embedded PostgreSQL in {embedded.data_dir}", err=True)
        embedded.start()
        config_path = embedded.config_path
    try:
        asyncio.run(_serve(config_path, listen or env.listen, env.concurrent_rpcs_max))
    finally:
        if embedded is not None:
            embedded.stop()
            typer.echo("embedded PostgreSQL stopped", err=True)


async def _serve(config_path: Path, listen: str, concurrent_rpcs_max: int) -> None:
    cluster = Cluster(load_config(config_path), config_path=config_path)
    await cluster.open()
    server = LedgerServer(cluster, listen=listen, concurrent_rpcs_max=concurrent_rpcs_max)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP reloads the shard config without a restart.
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(cluster.reload()))
    try:
        port = await server.start()
        host = listen.rsplit(":", 1)[0]
        typer.echo(f"ledger serving on {host}:{port} (config {config_path})", err=True)
        await stop.wait()
        typer.echo("stopping: letting in-flight calls finish", err=True)
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

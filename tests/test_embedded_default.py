"""The real `ledger` CLI: `serve` with no config runs an embedded cluster; `route`, `migrate`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc

from ledger.cli_defaults import Resolved, resolve_address
from ledger.embedded.postgres import EmbeddedPostgres, EmbeddedPostgresError
from ledger.routing.config import ShardConfig, ShardSpec, load_config
from ledger.routing.ring import ShardRing
from ledger.settings import Settings
from ledger.v1 import ledger_pb2_grpc
from tests.support import (
    account,
    balance,
    create_accounts,
    fresh_databases,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    write_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# The first start runs initdb and fsyncs it (the embedded cluster is durable); slow disks
# take tens of seconds. Past this, the server is not coming up.
SERVE_START_DEADLINE_S = 60.0
# SIGINT lets in-flight calls finish (limits.shutdown_grace_s = 5 s) and then stops
# PostgreSQL with a fast shutdown and its checkpoint.
SERVE_EXIT_DEADLINE_S = 45.0
# route and migrate import the package and do little else.
COMMAND_TIMEOUT_S = 60.0
SHARD_NAMES = ("shard-a", "shard-b", "shard-c")
_SERVING_LINE = re.compile(r"ledger serving on 127\.0\.0\.1:(\d+)")


def _ledger_command() -> list[str]:
    return [sys.executable, "-m", "ledger.cli"]


def _child_env() -> dict[str, str]:
    # LEDGER_* settings from the outer environment would redirect the CLI away from the test's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def _run_cli(
    *args: str, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_ledger_command(), *args],
        capture_output=True,
        text=True,
        env={**_child_env(), **(env or {})},
        cwd=cwd,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


@dataclass
class Serving:
    process: asyncio.subprocess.Process
    port: int
    stderr_lines: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    def log(self) -> str:
        return "".join(self.stderr_lines)


async def _read_until_serving(serving: Serving) -> int:
    assert serving.process.stderr is not None
    while True:
        raw = await serving.process.stderr.readline()
        if not raw:
            raise AssertionError(f"ledger serve exited before serving:\n{serving.log()}")
        line = raw.decode(errors="replace")
        serving.stderr_lines.append(line)
        match = _SERVING_LINE.search(line)
        if match:
            return int(match.group(1))


async def _drain(serving: Serving) -> None:
    assert serving.process.stderr is not None
    async for raw in serving.process.stderr:
        serving.stderr_lines.append(raw.decode(errors="replace"))


@asynccontextmanager
async def ledger_serve(data_dir: Path, *, cwd: Path | None = None) -> AsyncIterator[Serving]:
    """Runs `ledger serve --data-dir`, or with cwd plain `ledger serve` in cwd (data_dir must
    then be cwd/.ledger-data); kills it and its PostgreSQL if the test did not stop them."""
    data_dir_args: tuple[str, ...] = ("--data-dir", str(data_dir))
    if cwd is not None:
        assert data_dir == cwd / ".ledger-data", "plain `ledger serve` uses ./.ledger-data"
        data_dir_args = ()
    process = await asyncio.create_subprocess_exec(
        *_ledger_command(),
        *("serve", *data_dir_args, "--listen", "127.0.0.1:0"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Metrics off: the default port may be taken by another server on this machine.
        env={**_child_env(), "LEDGER_METRICS_LISTEN": "off"},
        cwd=cwd or REPO_ROOT,
    )
    serving = Serving(process=process, port=0)
    try:
        serving.port = await asyncio.wait_for(_read_until_serving(serving), SERVE_START_DEADLINE_S)
        serving.drain = asyncio.create_task(_drain(serving))
        yield serving
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if serving.drain is not None:
            with suppress(asyncio.CancelledError):
                await serving.drain
        # Whatever the test did, no PostgreSQL of this data dir may outlive it.
        postgres_dir = data_dir / "postgres"
        if (postgres_dir / "postmaster.pid").exists():
            await asyncio.to_thread(_stop_or_kill, EmbeddedPostgres(data_dir=postgres_dir))


def _stop_or_kill(server: EmbeddedPostgres) -> None:
    try:
        server.stop(mode="immediate")
    except EmbeddedPostgresError:
        # pg_ctl itself could not run; never leak the server: SIGQUIT is an immediate stop.
        pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGQUIT)
        raise


async def _interrupt_and_wait(serving: Serving) -> int:
    serving.process.send_signal(signal.SIGINT)
    try:
        return await asyncio.wait_for(serving.process.wait(), SERVE_EXIT_DEADLINE_S)
    except TimeoutError:
        raise AssertionError(f"ledger serve ignored SIGINT:\n{serving.log()}") from None


def _postmaster_pid(postgres_dir: Path) -> tuple[int, int]:
    """(pid, port) from postmaster.pid: line 1 is the pid, line 4 the port."""
    lines = (postgres_dir / "postmaster.pid").read_text().splitlines()
    return int(lines[0]), int(lines[3])


def _process_alive(pid: int) -> bool:
    # A zombie (exited, not yet reaped by a container's init) is not running.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_ledger_cli_module_is_runnable_with_python_dash_m() -> None:
    completed = _run_cli("--help")
    assert completed.returncode == 0, completed.stderr
    for command in ("serve", "migrate", "route"):
        assert command in completed.stdout


async def test_serve_without_config_runs_embedded_cluster_and_keeps_data_across_restarts(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "ledger-data"
    postgres_dir = data_dir / "postgres"
    merchant = uid("m")
    transfer_id = uid("t")

    async with ledger_serve(data_dir) as serving:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving.port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            await create_accounts(stub, account(merchant, "cash"), account(merchant, "wallet"))
            results = await transfers(
                stub, transfer(transfer_id, ref(merchant, "cash"), ref(merchant, "wallet"), 125)
            )
            assert result_names(results) == ["TRANSFER_RESULT_OK"]
        postgres_pid, postgres_port = _postmaster_pid(postgres_dir)
        assert _process_alive(postgres_pid)

        assert await _interrupt_and_wait(serving) == 0, serving.log()
        assert not (postgres_dir / "postmaster.pid").exists(), serving.log()
        assert not _process_alive(postgres_pid)
        assert not _port_accepts(postgres_port)
        assert not _port_accepts(serving.port)

    async with ledger_serve(data_dir) as serving:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving.port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            wallet = await balance(stub, merchant, "wallet")
            cash = await balance(stub, merchant, "cash")
            assert (wallet.credits_posted, cash.debits_posted) == (125, 125)
            replay = await transfers(
                stub, transfer(transfer_id, ref(merchant, "cash"), ref(merchant, "wallet"), 125)
            )
            assert result_names(replay) == ["TRANSFER_RESULT_OK"]
            assert replay[0].replayed
        postgres_pid, postgres_port = _postmaster_pid(postgres_dir)
        assert await _interrupt_and_wait(serving) == 0, serving.log()
        assert not _process_alive(postgres_pid)
        assert not _port_accepts(postgres_port)


def test_route_prints_the_same_shard_as_the_ring(tmp_path: Path) -> None:
    config = ShardConfig(
        epoch=1,
        shards=tuple(
            ShardSpec(name=n, dsn=f"postgresql://nobody@db-{n}:5432/ledger", weight=1)
            for n in SHARD_NAMES
        ),
    )
    path = write_config(tmp_path / "shards.toml", config)
    ring = ShardRing(config)
    # One merchant per shard, so a CLI that always printed one name would fail.
    wanted: dict[str, str] = {}
    while len(wanted) < len(SHARD_NAMES):
        candidate = uid("m")
        wanted.setdefault(ring.shard_for(candidate), candidate)
    for shard_name, merchant in wanted.items():
        completed = _run_cli("route", merchant, "--config", str(path))
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.strip() == shard_name


async def _schema_state(dsn: str) -> tuple[list[int], str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        versions = [
            r["version"]
            for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        ]
        meta = await conn.fetchrow("SELECT shard_name, epoch FROM shard_meta")
        assert meta is not None
        return versions, meta["shard_name"], int(meta["epoch"])
    finally:
        await conn.close()


async def test_migrate_prepares_every_fresh_shard_database_and_is_repeatable(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    specs = fresh_databases(pg_server, SHARD_NAMES)
    path = write_config(tmp_path / "shards.toml", ShardConfig(epoch=2, shards=tuple(specs)))
    for _ in range(2):
        completed = await asyncio.to_thread(_run_cli, "migrate", "--config", str(path))
        assert completed.returncode == 0, completed.stderr
        assert "migrated" in completed.stdout
    for spec in specs:
        versions, shard_name, epoch = await _schema_state(spec.dsn)
        assert versions and versions == list(range(1, len(versions) + 1))
        assert (shard_name, epoch) == (spec.name, 2)


def test_route_without_config_is_a_usage_error_naming_every_source(tmp_path: Path) -> None:
    # An empty folder: no --config, no LEDGER_CONFIG, no embedded cluster here.
    completed = _run_cli("route", "m1", cwd=tmp_path)
    assert completed.returncode == 2, completed.stdout
    for source in ("--config", "LEDGER_CONFIG", "ledger serve", ".ledger-data"):
        assert source in completed.stderr, completed.stderr


# Every command that reads the shards, as an admin types it next to `ledger serve`.
_ADMIN_COMMANDS_WITHOUT_FLAGS = (
    ("migrate",),
    ("reconcile",),
    ("verify",),
    ("shards", "status"),
    ("shards", "plan"),
    ("shards", "rebalance"),
    ("shards", "cleanup"),
)


async def test_admin_commands_find_the_embedded_cluster_they_run_next_to(tmp_path: Path) -> None:
    """`ledger serve` in a folder, then every admin command in the same folder with no flags:
    each uses ./.ledger-data/shard_config.toml and says so on stderr."""
    data_dir = tmp_path / ".ledger-data"
    config_path = data_dir / "shard_config.toml"
    merchant = uid("m")
    used_embedded = f"config: {config_path} (from the embedded cluster's config in the current"
    async with ledger_serve(data_dir, cwd=tmp_path) as serving:
        # Client commands find the service by LEDGER_ADDRESS (the port is the test's).
        address = {"LEDGER_ADDRESS": f"127.0.0.1:{serving.port}"}
        for args in (
            ("accounts", "create", merchant, "cash"),
            ("accounts", "create", merchant, "till"),
        ):
            created = await asyncio.to_thread(_run_cli, *args, cwd=tmp_path, env=address)
            assert created.returncode == 0, created.stderr
            assert f"address: 127.0.0.1:{serving.port} (from LEDGER_ADDRESS)" in created.stderr
        moved = await asyncio.to_thread(
            _run_cli,
            "transfer",
            uid("t"),
            f"{merchant}/cash",
            f"{merchant}/till",
            "700",
            cwd=tmp_path,
            env=address,
        )
        assert moved.stdout.strip() == "TRANSFER_RESULT_OK", moved.stderr

        routed = await asyncio.to_thread(_run_cli, "route", merchant, cwd=tmp_path)
        assert routed.returncode == 0, routed.stderr
        ring = ShardRing(load_config(config_path))
        assert routed.stdout.strip() == ring.shard_for(merchant)
        assert used_embedded in routed.stderr

        for args in _ADMIN_COMMANDS_WITHOUT_FLAGS:
            completed = await asyncio.to_thread(_run_cli, *args, cwd=tmp_path)
            assert completed.returncode == 0, (args, completed.stdout, completed.stderr)
            assert used_embedded in completed.stderr, (args, completed.stderr)
            assert "Missing option" not in completed.stderr
        listed = await asyncio.to_thread(
            _run_cli, "sagas", "list", "--state", "dead", cwd=tmp_path, env=address
        )
        assert listed.returncode == 0, listed.stderr
        assert "0 saga(s)" in listed.stdout

        # The books the commands read are the server's: reconcile saw the transfer's shard.
        reconciled = await asyncio.to_thread(_run_cli, "reconcile", cwd=tmp_path)
        assert "reconcile passed" in reconciled.stdout
        assert ring.shard_for(merchant) in reconciled.stdout
        assert await _interrupt_and_wait(serving) == 0, serving.log()


def test_ledger_config_overrides_the_embedded_cluster_and_config_overrides_both(
    tmp_path: Path,
) -> None:
    """Precedence: --config, then LEDGER_CONFIG, then ./.ledger-data/shard_config.toml."""
    names = {"embedded": ("e-1",), "env": ("env-1",), "flag": ("flag-1",)}
    paths: dict[str, Path] = {}
    for source, shard_names in names.items():
        config = ShardConfig(
            epoch=1,
            shards=tuple(
                ShardSpec(name=n, dsn=f"postgresql://nobody@db-{n}:5432/ledger", weight=1)
                for n in shard_names
            ),
        )
        paths[source] = write_config(tmp_path / f"{source}.toml", config)
    (tmp_path / ".ledger-data").mkdir()
    paths["embedded"].rename(tmp_path / ".ledger-data" / "shard_config.toml")
    env = {"LEDGER_CONFIG": str(paths["env"])}

    embedded = _run_cli("route", "m1", cwd=tmp_path)
    from_env = _run_cli("route", "m1", cwd=tmp_path, env=env)
    from_flag = _run_cli("route", "m1", "--config", str(paths["flag"]), cwd=tmp_path, env=env)

    assert [c.stdout.strip() for c in (embedded, from_env, from_flag)] == [
        "e-1",
        "env-1",
        "flag-1",
    ], (embedded.stderr, from_env.stderr, from_flag.stderr)
    assert f"config: {paths['env']} (from LEDGER_CONFIG)" in from_env.stderr
    # Chosen on the command line: nothing to announce (stderr stays the command's own).
    assert from_flag.stderr == ""


def test_client_commands_call_address_then_ledger_address_then_the_default_listen() -> None:
    assert resolve_address("10.0.0.5:7000", {"LEDGER_ADDRESS": "10.0.0.6:7000"}) == Resolved(
        "10.0.0.5:7000", "--address"
    )
    assert resolve_address(None, {"LEDGER_ADDRESS": "10.0.0.6:7000"}) == Resolved(
        "10.0.0.6:7000", "LEDGER_ADDRESS"
    )
    # The default is where `ledger serve` listens by default.
    assert resolve_address(None, {}).value == Settings.from_env().listen == "127.0.0.1:50051"

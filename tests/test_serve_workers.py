"""`ledger serve --workers N`: several service processes on one port (ledger/workers.py).

A real `ledger serve --workers 2` process tree on real shards: both workers take
calls on the one port (told apart by their own metrics endpoints), the books
are the same through either, and SIGTERM to the parent stops every worker.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.config import ShardConfig
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from ledger.workers import metrics_listen_of, pool_share
from tests.support import (
    RPC_TIMEOUT_S,
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
SHARD_NAMES = ("shard-a", "shard-b", "shard-c")
# Two workers each connect to and migrate three shards before the parent says it serves.
SERVE_START_DEADLINE_S = 60.0
# SIGTERM lets in-flight calls finish (limits.shutdown_grace_s = 5 s) in every worker.
SERVE_EXIT_DEADLINE_S = 45.0
# The kernel hashes each new connection to a worker: the chance that this many
# connections all land on one of two workers is 2^-63.
CONNECTIONS_MAX = 64
_SERVING = re.compile(r"ledger serving on 127\.0\.0\.1:(\d+) \(config .*, (\d+) workers\)")
_WORKER = re.compile(r"worker (\d+) \(pid (\d+)\) serving on port (\d+)")
_METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


@dataclass
class Workers:
    process: asyncio.subprocess.Process
    port: int = 0
    worker_pids: dict[int, int] = field(default_factory=dict)
    metrics_ports: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    def log(self) -> str:
        return "".join(self.lines[-200:])


async def _read_until_serving(workers: Workers) -> None:
    stream = workers.process.stderr
    assert stream is not None
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError(f"ledger serve exited before serving:\n{workers.log()}")
        line = raw.decode(errors="replace")
        workers.lines.append(line)
        if match := _WORKER.search(line):
            workers.worker_pids[int(match.group(1))] = int(match.group(2))
        if match := _METRICS.search(line):
            workers.metrics_ports.append(int(match.group(1)))
        if match := _SERVING.search(line):
            workers.port = int(match.group(1))
            assert int(match.group(2)) == 2
            return


async def _drain(workers: Workers) -> None:
    stream = workers.process.stderr
    assert stream is not None
    async for raw in stream:
        workers.lines.append(raw.decode(errors="replace"))


@asynccontextmanager
async def serve_two_workers(config_path: Path) -> AsyncIterator[Workers]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    # Port 0: each worker picks its own metrics port and logs it.
    env["LEDGER_METRICS_LISTEN"] = "127.0.0.1:0"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli", "serve", "--config", str(config_path),
        "--listen", "127.0.0.1:0", "--workers", "2",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    workers = Workers(process)
    try:
        await asyncio.wait_for(_read_until_serving(workers), SERVE_START_DEADLINE_S)
        workers.drain = asyncio.create_task(_drain(workers))
        yield workers
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in workers.worker_pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if workers.drain is not None:
            await asyncio.wait_for(workers.drain, SERVE_EXIT_DEADLINE_S)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _requests_served(metrics_port: int) -> float:
    """The sum of ledger_requests_total on one worker's metrics endpoint."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ledger_requests_total{")
    )


@pytest.mark.timeout(180)
async def test_two_workers_share_one_port_both_take_calls_and_sigterm_stops_both(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    specs = fresh_databases(pg_server, SHARD_NAMES)
    config_path = write_config(tmp_path / "shards.toml", ShardConfig(epoch=1, shards=tuple(specs)))
    async with serve_two_workers(config_path) as workers:
        assert sorted(workers.worker_pids) == [0, 1], workers.log()
        assert len(set(workers.metrics_ports)) == 2, workers.log()
        assert workers.process.pid not in workers.worker_pids.values()

        merchant = uid("m-")
        target = f"127.0.0.1:{workers.port}"
        channels: list[grpc.aio.Channel] = []
        try:
            # Each channel its own connection (no shared subchannel), so the kernel
            # places each anew; calls go on until both workers have answered some.
            for index in range(CONNECTIONS_MAX):
                channel = grpc.aio.insecure_channel(
                    target, options=[("grpc.use_local_subchannel_pool", 1)]
                )
                channels.append(channel)
                stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                if index == 0:
                    await create_accounts(
                        stub, account(merchant, "cash"), account(merchant, "sales")
                    )
                results = await transfers(
                    stub, transfer(uid("t-"), ref(merchant, "cash"), ref(merchant, "sales"), 1)
                )
                assert result_names(results) == ["TRANSFER_RESULT_OK"]
                served = await asyncio.gather(
                    *(asyncio.to_thread(_requests_served, p) for p in workers.metrics_ports)
                )
                if all(count > 0 for count in served):
                    break
            else:
                raise AssertionError(f"one worker took every call: {served}\n{workers.log()}")
            # Every transfer, whichever worker took it, is in the same books.
            for channel in (channels[0], channels[-1]):
                stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                cash = await balance(stub, merchant, "cash")
                assert cash.debits_posted == len(channels)
            # A page token one worker signed is good on every connection, so on both
            # workers (they share the key the parent made: none was configured).
            first = await ledger_pb2_grpc.LedgerServiceStub(channels[0]).ListAccounts(
                pb.ListAccountsRequest(merchant_id=merchant, page_size=1), timeout=RPC_TIMEOUT_S
            )
            assert [a.ref.account_id for a in first.accounts] == ["cash"]
            for channel in channels:
                rest = await ledger_pb2_grpc.LedgerServiceStub(channel).ListAccounts(
                    pb.ListAccountsRequest(
                        merchant_id=merchant, page_size=1, page_token=first.next_page_token
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
                assert [a.ref.account_id for a in rest.accounts] == ["sales"]
        finally:
            for channel in channels:
                await channel.close()

        workers.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(workers.process.wait(), SERVE_EXIT_DEADLINE_S)
        assert code == 0, workers.log()
        assert not any(_alive(pid) for pid in workers.worker_pids.values()), workers.log()
        assert workers.drain is not None
        await asyncio.wait_for(workers.drain, SERVE_EXIT_DEADLINE_S)
        log = workers.log()
        assert log.count("stopping: letting in-flight calls finish") == 2, log


@pytest.mark.timeout(180)
async def test_a_dead_worker_stops_the_replica_with_an_error(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """The replica is restarted whole by whatever runs it, rather than serving on
    with part of its workers."""
    specs = fresh_databases(pg_server, SHARD_NAMES)
    config_path = write_config(tmp_path / "shards.toml", ShardConfig(epoch=1, shards=tuple(specs)))
    async with serve_two_workers(config_path) as workers:
        os.kill(workers.worker_pids[1], signal.SIGKILL)
        code = await asyncio.wait_for(workers.process.wait(), SERVE_EXIT_DEADLINE_S)
        assert code == 1, workers.log()
        assert not _alive(workers.worker_pids[0]), workers.log()
        assert workers.drain is not None
        await asyncio.wait_for(workers.drain, SERVE_EXIT_DEADLINE_S)
        assert "worker 1 (pid" in workers.log() and "stopping the others" in workers.log()


def test_each_worker_gets_its_own_metrics_port_and_a_share_of_each_pool() -> None:
    assert metrics_listen_of("127.0.0.1:9464", 0) == "127.0.0.1:9464"
    assert metrics_listen_of("127.0.0.1:9464", 3) == "127.0.0.1:9467"
    assert metrics_listen_of("127.0.0.1:0", 3) == "127.0.0.1:0"
    assert metrics_listen_of("off", 1) == "off"
    # limits.pool_connections_max (16) split, rounded up, never below one.
    assert pool_share(1) == 16
    assert pool_share(2) == 8
    assert pool_share(3) == 6
    assert pool_share(64) == 1

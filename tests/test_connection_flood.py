"""A flood of connections from anyone who reaches the port cannot stop valid callers.

A TCP connect needs no token, and every connection the server accepts is a
file descriptor of its process, as is every connection to a shard. Before, the
server accepted connections until the process's file limit: a flood past it
left no descriptor for the shard pools, and valid callers' calls on channels
they already held failed UNAVAILABLE ("shard ... is unavailable (OSError)":
35 of 64 calls on a process with 400 descriptors and 1,500 connections). Now
callers' connections are bounded by a share of the file limit (gRPC closes
the ones past it as they arrive), and a connection that does not finish its
handshake is closed after a deadline (ledger/api/connections.py). The metrics
endpoint, a thread per connection, did the same with its own flood; it now
holds a few connections at once, each with a read deadline
(ledger/telemetry/metrics_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ledger import limits
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.embedded.service_process import serve_command, wait_serving
from ledger.routing.config import load_config
from ledger.routing.ring import ShardRing
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.auth_support import child_env, shard_config
from tests.support import RPC_TIMEOUT_S, account, uid, wait_until

# The service's file limit, soft and hard (so it cannot raise it).
FILE_LIMIT = 256
# What the bound lets callers hold at once (ledger/api/connections.py).
SHARE_PERCENT = limits.incoming_connections_file_share_percent
CALLERS_CONNECTIONS_MAX = FILE_LIMIT * SHARE_PERCENT // 100
# Well past the file limit.
FLOOD_CONNECTIONS = 400
# More calls at once than the shard pools hold open at start: they must grow.
CALLS = 64
SERVICE_START_DEADLINE_S = 60.0
# A connect the server does not take in this long fails the test (before its bound,
# the metrics port started a thread per connection behind a queue of 5, and the
# flood's connects stalled).
CONNECT_TIMEOUT_S = 10.0
# Connections past the bound are closed as gRPC accepts them.
REFUSED_WITHIN_S = 10.0
# A connection that sends nothing is closed this long after its deadline.
SILENT_CLOSED_MARGIN_S = 20.0
METRICS_SERVING = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")


@dataclass(frozen=True)
class Target:
    """A port the flood is aimed at: how many connections it holds at once, and how
    long a silent one keeps its slot."""

    name: str
    connections_max: int
    silent_deadline_s: float


TARGETS = (
    Target("grpc", CALLERS_CONNECTIONS_MAX, limits.connection_handshake_timeout_ms / 1000),
    Target("metrics", limits.metrics_connections_max, limits.metrics_request_timeout_s),
)

# Sets the file limit, then runs the command in this process (argv[2:]).
WITH_FILE_LIMIT = (
    "import os, resource, sys; "
    "n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def spawn_with_file_limit(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", WITH_FILE_LIMIT, str(FILE_LIMIT), *serve_command(config)]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            env=child_env({"LEDGER_METRICS_LISTEN": "127.0.0.1:0"}),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


@contextlib.asynccontextmanager
async def service_with_file_limit(config: Path, log_path: Path) -> AsyncIterator[dict[str, int]]:
    """`ledger serve` with FILE_LIMIT descriptors; yields its ports by target name."""
    process = spawn_with_file_limit(config, log_path)
    try:
        port = await wait_serving(process, log_path, 0, deadline_s=SERVICE_START_DEADLINE_S)
        metrics = METRICS_SERVING.search(await asyncio.to_thread(log_path.read_text))
        assert metrics is not None, "the service serves metrics"
        yield {"grpc": port, "metrics": int(metrics.group(1))}
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def flood(port: int, count: int) -> Iterator[list[socket.socket]]:
    """count TCP connections to port that never say anything."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S)
            s.setblocking(False)
            sockets.append(s)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed s (reading what it sent first, its HTTP/2 settings)."""
    while True:
        try:
            if s.recv(65536) == b"":
                return True
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True


async def create_account(stub: ledger_pb2_grpc.LedgerServiceStub, merchant_id: str) -> str:
    """The call's outcome: "ok" or its status and details."""
    try:
        response = await stub.CreateAccounts(
            pb.CreateAccountsRequest(accounts=[account(merchant_id, "cash")]),
            timeout=RPC_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}: {error.details()}"
    return pb.AccountResult.Name(response.results[0].result)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=RPC_TIMEOUT_S) as r:
        return str(r.read().decode())


async def served_anew(target: Target, ports: dict[str, int]) -> None:
    """A caller that connects now is served."""
    if target.name == "metrics":
        assert "ledger_" in await asyncio.to_thread(scrape, ports["metrics"])
        return
    late = grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}")
    try:
        outcome = await create_account(ledger_pb2_grpc.LedgerServiceStub(late), uid("late"))
        assert outcome == "ACCOUNT_RESULT_OK"
    finally:
        await late.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
async def test_a_connection_flood_leaves_valid_callers_served(
    pg_server: EmbeddedPostgres, tmp_path: Path, target: Target
) -> None:
    config = shard_config(pg_server, tmp_path)
    ring = ShardRing(load_config(config))
    merchants = [uid("flood") for _ in range(CALLS)]
    # Every shard's pool must open connections during the flood.
    assert {ring.shard_for(m) for m in merchants} == {s.name for s in load_config(config).shards}
    log_path = tmp_path / "service.log"
    async with service_with_file_limit(config, log_path) as ports:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}")
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        assert await create_account(stub, uid("before")) == "ACCOUNT_RESULT_OK"
        with flood(ports[target.name], FLOOD_CONNECTIONS) as sockets:

            async def refused_past_the_bound() -> bool:
                closed = sum(closed_by_server(s) for s in sockets)
                return closed >= FLOOD_CONNECTIONS - target.connections_max

            await wait_until(
                refused_past_the_bound,
                deadline_s=REFUSED_WITHIN_S,
                what="the connections past the bound closed",
            )
            outcomes = await asyncio.gather(*(create_account(stub, m) for m in merchants))
            failed = [o for o in outcomes if o != "ACCOUNT_RESULT_OK"]
            assert not failed, f"{len(failed)} of {CALLS} valid calls failed: {failed[:3]}"

            async def silent_ones_closed() -> bool:
                return all(closed_by_server(s) for s in sockets)

            await wait_until(
                silent_ones_closed,
                deadline_s=target.silent_deadline_s + SILENT_CLOSED_MARGIN_S,
                what="the silent connections closed after their deadline",
            )
            # The flood still holds its sockets open, but none holds a slot.
            await served_anew(target, ports)
        await channel.close()
    log = log_path.read_text(errors="replace")
    assert "is unavailable" not in log
    assert f"leaves callers {CALLERS_CONNECTIONS_MAX} connections" in log


def test_serve_raises_its_soft_file_limit_to_the_hard_one() -> None:
    """The callers' share grows with the soft limit, so `ledger serve` raises it first
    (a shell's default soft limit, 1,024, is often far below the hard one)."""
    probe = (
        "import resource; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 600)); "
        "from ledger.api.connections import incoming_connections_max, raise_file_limit; "
        "print(raise_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], "
        "incoming_connections_max())"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["600", "600", str(600 * SHARE_PERCENT // 100)], done
    assert "the file limit (600) leaves callers 300 connections" in done.stderr, done.stderr

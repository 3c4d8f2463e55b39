"""A flood of connections from anyone who reaches the port cannot stop valid callers.

A TCP connect needs no token, and every connection the server accepts is a
file descriptor of its process, as is every connection to a shard. Before, the
server accepted connections until the process's file limit: a flood past it
left no descriptor for the shard pools, and valid callers' calls on channels
they already held failed UNAVAILABLE ("shard ... is unavailable (OSError)":
35 of 64 calls on a process with 400 descriptors and 1,500 connections). Now
callers' connections are bounded by a share of the file limit (gRPC closes
the ones past it as they arrive), and a connection that does not finish its
handshake is closed after a deadline (ledger/api/connections.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
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
CALLERS_CONNECTIONS_MAX = FILE_LIMIT * limits.incoming_connections_file_share_percent // 100
# Well past the file limit.
FLOOD_CONNECTIONS = 400
# More calls at once than the shard pools hold open at start: they must grow.
CALLS = 64
SERVICE_START_DEADLINE_S = 60.0
# Connections past the bound are closed as gRPC accepts them.
REFUSED_WITHIN_S = 10.0
# A connection that sends nothing is closed once its handshake deadline passes.
SILENT_CLOSED_WITHIN_S = limits.connection_handshake_timeout_ms / 1000 + 20.0

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
            command, env=child_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )


@contextlib.asynccontextmanager
async def service_with_file_limit(config: Path, log_path: Path) -> AsyncIterator[int]:
    """`ledger serve` with FILE_LIMIT descriptors; yields its port."""
    process = spawn_with_file_limit(config, log_path)
    try:
        yield await wait_serving(process, log_path, 0, deadline_s=SERVICE_START_DEADLINE_S)
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def flood(port: int, count: int) -> Iterator[list[socket.socket]]:
    """count TCP connections to port that never say anything."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
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


@pytest.mark.timeout(180)
async def test_a_connection_flood_leaves_valid_callers_served(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    config = shard_config(pg_server, tmp_path)
    ring = ShardRing(load_config(config))
    merchants = [uid("flood") for _ in range(CALLS)]
    # Every shard's pool must open connections during the flood.
    assert {ring.shard_for(m) for m in merchants} == {s.name for s in load_config(config).shards}
    log_path = tmp_path / "service.log"
    async with service_with_file_limit(config, log_path) as port:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        assert await create_account(stub, uid("before")) == "ACCOUNT_RESULT_OK"
        with flood(port, FLOOD_CONNECTIONS) as sockets:

            async def refused_past_the_bound() -> bool:
                closed = sum(closed_by_server(s) for s in sockets)
                return closed >= FLOOD_CONNECTIONS - CALLERS_CONNECTIONS_MAX

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
                deadline_s=SILENT_CLOSED_WITHIN_S,
                what="the silent connections closed after their handshake deadline",
            )
            # The flood still holds its sockets open, but none holds a slot.
            late = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                outcome = await create_account(ledger_pb2_grpc.LedgerServiceStub(late), uid("late"))
                assert outcome == "ACCOUNT_RESULT_OK"
            finally:
                await late.close()
        await channel.close()
    log = log_path.read_text(errors="replace")
    assert "is unavailable" not in log
    assert f"leaves callers {CALLERS_CONNECTIONS_MAX} connections" in log

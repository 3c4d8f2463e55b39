"""The service's listener runs on gRPC's I/O manager, not its EventEngine
(ledger/grpc_engine.py): one thread hand-off fewer per read and write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ledger.grpc_engine import (
    GRPC_EXPERIMENTS_VARIABLE,
    SERVICE_GRPC_EXPERIMENTS,
    choose_listener_engine,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# A process that imports the package first, as `ledger serve` does, then serves one
# health call over TCP. gRPC's tcp trace names the source file of every endpoint
# operation: tcp_posix.cc is the I/O manager's, endpoint.cc the EventEngine's.
PROBE = """
import asyncio
import ledger
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    await server.stop(0)
    print(reply.status)

asyncio.run(main())
"""
PROBE_TIMEOUT_S = 60
IO_MANAGER_ENDPOINT = "tcp_posix.cc"


def _probe_trace(**experiments: str) -> str:
    env = {
        key: value for key, value in os.environ.items() if key != GRPC_EXPERIMENTS_VARIABLE
    }
    env |= {"GRPC_VERBOSITY": "debug", "GRPC_TRACE": "tcp", "PYTHONPATH": str(REPO_ROOT)}
    env |= experiments
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=True,
    )
    assert done.stdout.strip() == "1", done.stdout  # SERVING
    return done.stderr


def test_the_listener_is_set_when_nobody_chose() -> None:
    environ: dict[str, str] = {}
    assert choose_listener_engine(environ, loaded_modules=())
    assert environ == {GRPC_EXPERIMENTS_VARIABLE: SERVICE_GRPC_EXPERIMENTS}


def test_an_operators_choice_is_kept_even_when_empty() -> None:
    for chosen in ("", "-event_engine_client"):
        environ = {GRPC_EXPERIMENTS_VARIABLE: chosen}
        assert not choose_listener_engine(environ, loaded_modules=())
        assert environ == {GRPC_EXPERIMENTS_VARIABLE: chosen}


def test_nothing_is_set_once_grpc_has_loaded_as_it_would_not_be_read() -> None:
    environ: dict[str, str] = {}
    assert not choose_listener_engine(environ, loaded_modules=("grpc",))
    assert environ == {}


def test_accepted_connections_are_served_by_the_io_manager() -> None:
    assert IO_MANAGER_ENDPOINT in _probe_trace()


def test_an_operator_can_have_grpcs_default_engine_back() -> None:
    # The control: the trace tells the engines apart.
    assert IO_MANAGER_ENDPOINT not in _probe_trace(GRPC_EXPERIMENTS="")

"""A cluster for fault tests: one PostgreSQL server per shard, the service as a real process.

Each shard has a server of its own, so a test can stop one shard's PostgreSQL;
the service runs as `python -m ledger.cli serve`, so a test can SIGKILL it
(or make it SIGKILL itself at a crash point, see ledger/faults.py) and start
it again on the same shards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.embedded.service_process import (
    ServiceExited,
    ServiceNotServing,
    spawn_service,
    wait_serving,
)
from ledger.routing.cluster import Cluster
from ledger.routing.config import ShardConfig, ShardSpec, load_config
from ledger.routing.ring import ShardRing
from ledger.sagas.reconcile import ReconcileReport, reconcile
from ledger.v1 import ledger_pb2_grpc
from tests.support import uid, write_config

# A service process must be serving within this long of being started.
SERVICE_START_DEADLINE_S = 60.0
# A process asked to stop (SIGINT) must be gone within this long.
SERVICE_STOP_DEADLINE_S = 30.0
ROOT = Path(__file__).resolve().parent.parent


class ShardServers:
    """One durable PostgreSQL server per shard name, under base_dir."""

    def __init__(self, base_dir: Path, names: tuple[str, ...]) -> None:
        self.names = names
        self.servers = {
            name: EmbeddedPostgres(data_dir=base_dir / name, durable=True) for name in names
        }

    def start(self) -> None:
        for server in self.servers.values():
            server.start()
            server.create_database("ledger")

    def stop(self, name: str, *, mode: str = "immediate") -> None:
        self.servers[name].stop(mode=mode)  # type: ignore[arg-type]

    def start_one(self, name: str) -> None:
        self.servers[name].start()

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop(mode="immediate")

    def config(self, *, epoch: int = 1) -> ShardConfig:
        return ShardConfig(
            epoch=epoch,
            shards=tuple(
                ShardSpec(name=n, dsn=self.servers[n].dsn("ledger"), weight=1) for n in self.names
            ),
        )


@dataclass
class ServiceProcess:
    """`ledger serve` in a child process, with a stub once it serves."""

    config_path: Path
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    channel: grpc.aio.Channel | None = None
    stub: ledger_pb2_grpc.LedgerServiceStub | None = None
    admin: ledger_pb2_grpc.LedgerAdminServiceStub | None = None

    async def start(self, **extra_env: str) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        env = {**os.environ, **self.env, **extra_env, "PYTHONUNBUFFERED": "1"}
        self.process, offset = spawn_service(self.config_path, self.log_path, env=env, cwd=ROOT)
        try:
            self.port = await wait_serving(
                self.process, self.log_path, offset, deadline_s=SERVICE_START_DEADLINE_S
            )
        except (ServiceExited, ServiceNotServing) as error:
            raise AssertionError(f"{error}:\n{error.output}") from None
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)
        self.admin = ledger_pb2_grpc.LedgerAdminServiceStub(self.channel)

    async def _close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        await self.wait_exit()
        await self._close_channel()

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            await self.wait_exit()
        await self._close_channel()

    async def wait_exit(self, deadline_s: float = SERVICE_STOP_DEADLINE_S) -> int:
        assert self.process is not None
        end = time.monotonic() + deadline_s
        while self.process.poll() is None:
            if time.monotonic() > end:
                self.process.kill()
                raise AssertionError("service did not exit in time")
            await asyncio.sleep(0.02)
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ProcessCluster:
    """Three shard servers, a config, and a service process over them."""

    def __init__(self, base_dir: Path, names: tuple[str, ...] = ("shard-a", "shard-b", "shard-c")):
        self.base_dir = base_dir
        self.shards = ShardServers(base_dir / "pg", names)
        self.config_path = base_dir / "shards.toml"
        self.service = ServiceProcess(self.config_path, base_dir / "service.log")

    def start_shards(self) -> None:
        self.shards.start()
        write_config(self.config_path, self.shards.config())

    @property
    def ring(self) -> ShardRing:
        return ShardRing(load_config(self.config_path))

    def merchant_on(self, shard_name: str, prefix: str = "m") -> str:
        for _ in range(10_000):
            candidate = uid(prefix)
            if self.ring.shard_for(candidate) == shard_name:
                return candidate
        raise AssertionError(f"no merchant found for {shard_name}")

    async def reconcile(self) -> ReconcileReport:
        """Runs reconcile in this process, straight against the shards."""
        cluster = Cluster(load_config(self.config_path), config_path=self.config_path)
        await cluster.open(migrate=False)
        try:
            return await reconcile(cluster)
        finally:
            await cluster.close()

    async def close(self) -> None:
        await self.service.kill()
        self.shards.stop_all()

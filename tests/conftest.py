"""Fixtures: one throwaway PostgreSQL server per test session, fresh shard databases per module."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

# The tests fork PostgreSQL tools from a process that runs gRPC threads; gRPC's
# fork handlers can crash the child, and nothing here needs gRPC after a fork.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from collections.abc import AsyncIterator, Iterator

import pytest

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.config import ShardConfig
from tests.ledger4 import ALL_SHARDS, FIRST_SHARDS, Ledger4
from tests.process_cluster import ProcessCluster
from tests.support import Service, databases_made, fresh_databases, start_service, write_config

SHARD_NAMES = ("shard-a", "shard-b", "shard-c")

# Workers for `-n auto` (pytest-xdist): each starts its own PostgreSQL servers and
# services, so a big machine gains little past a few, and the tests' own waits
# have deadlines sized for a small one.
TEST_WORKERS_MAX = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(os.cpu_count() or 1, TEST_WORKERS_MAX))


@pytest.fixture(scope="module", autouse=True)
def drop_module_databases(request: pytest.FixtureRequest) -> Iterator[None]:
    """Drops the databases a test module made once it is done (its services are
    stopped first: this fixture is set up before them), unless one of its tests
    failed, to leave them to look into. Kept, a whole suite left 3 GB on each
    worker's session server."""
    failed_before = request.session.testsfailed
    made_before = len(databases_made)
    yield
    made = databases_made[made_before:]
    del databases_made[made_before:]
    if request.session.testsfailed != failed_before:
        return
    by_server: dict[EmbeddedPostgres, list[str]] = defaultdict(list)
    for server, name in made:
        by_server[server].append(name)
    for server, names in by_server.items():
        if server.is_running():
            server.drop_databases(names)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of the tests' own (durability off: it is thrown away)."""
    server = EmbeddedPostgres(data_dir=tmp_path_factory.mktemp("pg") / "data", durable=False)
    server.start()
    try:
        yield server
    finally:
        server.stop(mode="immediate")


@pytest.fixture(scope="module")
async def service(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    """A real LedgerServer on three fresh shard databases, reached over a real channel.

    Shared by the tests of one module; tests keep apart by using fresh merchant ids.
    """
    specs = fresh_databases(pg_server, SHARD_NAMES)
    path = write_config(
        tmp_path_factory.mktemp("config") / "shards.toml", ShardConfig(epoch=1, shards=tuple(specs))
    )
    running = await start_service(path)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def process_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ProcessCluster]:
    """Three shard servers of their own and the service as a real process (started)."""
    cluster = ProcessCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start_shards()
    await cluster.service.start()
    try:
        yield cluster
    finally:
        await cluster.close()


@pytest.fixture
async def ledger4(pg_server: EmbeddedPostgres, tmp_path: Path) -> AsyncIterator[Ledger4]:
    specs = {s.name: s for s in fresh_databases(pg_server, ALL_SHARDS)}
    config_path = tmp_path / "shards.toml"
    first = ShardConfig(epoch=1, shards=tuple(specs[n] for n in FIRST_SHARDS))
    write_config(config_path, first)
    service = await start_service(config_path)
    try:
        yield Ledger4(specs=specs, config_path=config_path, tmp_path=tmp_path, service=service)
    finally:
        await service.stop()

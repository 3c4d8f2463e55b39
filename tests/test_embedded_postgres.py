"""EmbeddedPostgres runs real servers from the pip-installed binaries, each under tmp_path.

When the tests run as root, the library runs the server as `ledgerpg` and makes the folders
above tmp_path (/tmp/pytest-of-root/...) traversable itself; the tests need nothing extra.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from ledger.embedded.postgres import EmbeddedPostgres, EmbeddedPostgresError

# Each test runs initdb once and a few starts and stops: a few seconds normally, so a minute
# means a hang, not slowness.
TEST_TIMEOUT_S = 60
# A local server answers in milliseconds; ten seconds means it is not really up.
CONNECT_TIMEOUT_S = 10.0

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "pgdata"


@pytest.fixture
def server(data_dir: Path) -> Iterator[EmbeddedPostgres]:
    """A throwaway server object, not yet started; whatever runs on data_dir is stopped after."""
    postgres = EmbeddedPostgres(data_dir=data_dir, durable=False)
    try:
        yield postgres
    finally:
        postgres.stop(mode="immediate")


async def _fetch_value(postgres: EmbeddedPostgres, sql: str, database: str = "postgres") -> object:
    connection = await asyncpg.connect(postgres.dsn(database), timeout=CONNECT_TIMEOUT_S)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def _execute(postgres: EmbeddedPostgres, sql: str, database: str = "postgres") -> None:
    connection = await asyncpg.connect(postgres.dsn(database), timeout=CONNECT_TIMEOUT_S)
    try:
        await connection.execute(sql)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()[0])


async def test_started_server_accepts_connections_and_creates_databases(
    server: EmbeddedPostgres,
) -> None:
    server.start()

    assert server.is_running()
    assert server.dsn("ledger_a") == f"postgresql://postgres@127.0.0.1:{server.port}/ledger_a"
    server.create_database("ledger_a")
    server.create_database("ledger_a")  # idempotent, and fine inside a running event loop
    assert await _fetch_value(server, "SELECT current_database()", "ledger_a") == "ledger_a"
    assert await _fetch_value(server, "SHOW listen_addresses") == "127.0.0.1"
    assert await _fetch_value(server, "SHOW max_connections") == "200"
    assert await _fetch_value(server, "SHOW max_prepared_transactions") == "0"
    assert await _fetch_value(server, "SHOW fsync") == "off"  # durable=False
    assert await _fetch_value(server, "SHOW server_encoding") == "UTF8"
    assert server.log_path.is_file()


async def test_rows_survive_fast_stop_and_restart_on_the_remembered_port(
    server: EmbeddedPostgres, data_dir: Path
) -> None:
    server.start()
    port_first = server.port
    await _execute(server, "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (7)")

    server.stop()
    assert not server.is_running()
    restarted = EmbeddedPostgres(data_dir=data_dir, durable=False)  # no port given: remembered
    restarted.start()

    assert restarted.port == port_first
    assert await _fetch_value(restarted, "SELECT id FROM kept") == 7


async def test_committed_rows_survive_immediate_stop_through_crash_recovery(
    data_dir: Path,
) -> None:
    durable = EmbeddedPostgres(data_dir=data_dir, durable=True)
    try:
        durable.start()
        assert await _fetch_value(durable, "SHOW fsync") == "on"
        await _execute(durable, "CREATE TABLE kept (id int); INSERT INTO kept VALUES (42)")

        durable.stop(mode="immediate")
        assert not durable.is_running()
        durable.start()

        assert await _fetch_value(durable, "SELECT id FROM kept") == 42
        assert "not properly shut down" in durable.log_path.read_text(encoding="utf-8")
    finally:
        durable.stop(mode="immediate")


def test_start_is_idempotent_while_running(server: EmbeddedPostgres, data_dir: Path) -> None:
    server.start()
    pid_first = _postmaster_pid(data_dir)

    server.start()

    assert server.is_running()
    assert _postmaster_pid(data_dir) == pid_first


async def test_second_object_on_same_data_dir_reuses_running_server(
    server: EmbeddedPostgres, data_dir: Path
) -> None:
    server.start()
    pid_first = _postmaster_pid(data_dir)

    second = EmbeddedPostgres(data_dir=data_dir, durable=False)
    assert second.is_running()
    second.start()

    assert second.port == server.port
    assert _postmaster_pid(data_dir) == pid_first
    assert await _fetch_value(second, "SELECT 1") == 1


def test_second_object_with_a_different_port_is_refused(
    server: EmbeddedPostgres, data_dir: Path
) -> None:
    server.start()
    port_other = server.port + 1 if server.port < 65535 else server.port - 1

    with pytest.raises(EmbeddedPostgresError, match="already runs on port"):
        EmbeddedPostgres(data_dir=data_dir, port=port_other).start()


def test_stop_when_not_running_is_a_no_op(server: EmbeddedPostgres) -> None:
    server.stop()  # never started, data dir does not even exist
    server.start()
    server.stop()
    server.stop(mode="immediate")

    assert not server.is_running()


def test_start_refuses_a_port_used_by_another_process(data_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port_taken: int = squatter.getsockname()[1]
        postgres = EmbeddedPostgres(data_dir=data_dir, port=port_taken, durable=False)

        with pytest.raises(EmbeddedPostgresError, match="in use by another process"):
            postgres.start()

    assert not postgres.is_running()


def test_start_failure_reports_tail_of_postgres_log(
    server: EmbeddedPostgres, data_dir: Path
) -> None:
    server.start()
    server.stop()
    with (data_dir / "postgresql.conf").open("a", encoding="utf-8") as config:
        config.write("\nthis line = is not = valid\n")

    with pytest.raises(EmbeddedPostgresError) as raised:
        server.start()

    assert "tail of" in str(raised.value)
    assert "contains errors" in str(raised.value)  # the FATAL line from postgres.log
    assert not server.is_running()


async def test_drop_databases_drops_each_named_one_even_with_connections_open(
    server: EmbeddedPostgres,
) -> None:
    server.start()
    for name in ("ledger_a", "ledger_b", "ledger_c"):
        server.create_database(name)
    held = await asyncpg.connect(server.dsn("ledger_a"), timeout=CONNECT_TIMEOUT_S)
    try:
        # One missing: dropped where they exist.
        server.drop_databases(["ledger_a", "ledger_b", "ledger_missing"])
    finally:
        await held.close(timeout=CONNECT_TIMEOUT_S)
    names = await _fetch_value(
        server,
        "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database"
        " WHERE datname LIKE 'ledger%'",
    )
    assert names == "ledger_c"


def test_invalid_database_names_are_rejected_before_any_sql(server: EmbeddedPostgres) -> None:
    for name in ("Ledger", "1ledger", "ledger-a", 'x"; DROP', "a" * 64, ""):
        with pytest.raises(ValueError, match="database name"):
            server.create_database(name)
        with pytest.raises(ValueError, match="database name"):
            server.drop_databases([name])

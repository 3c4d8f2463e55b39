"""An admin's rebalance waits for a shard that is starting up, instead of failing.

Right after a shard's server restarts (or recovers from a crash) it answers
"cannot connect now" (SQLSTATE 57P03) while it replays its WAL; the first
`ledger shards rebalance` then failed at once with ShardUnavailable (seen in
chaos runs), and the admin had to run it again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from ledger import limits
from ledger.embedded.postgres import EmbeddedPostgres, find_bin_dir
from ledger.routing.config import ShardConfig, ShardSpec
from tests.ledger4 import FIRST_SHARDS, Ledger4
from tests.support import write_config
from tests.test_rebalance import REPO_ROOT, create_merchants, merchants_moving

DATABASE = "ledger"
MOVERS = 3
# A server started as a standby with hot standby off stays in recovery, answering
# 57P03, until promoted: the state of a shard replaying its WAL, held for the test.
STARTING_SETTINGS = (("hot_standby", "off"),)
# Each wait here is bounded well inside the rebalance's own wait for the shard.
WAIT_S = limits.shard_starting_wait_s / 2
PROMOTE_TIMEOUT_S = 30


async def refuses_for_now(dsn: str) -> bool:
    try:
        connection = await asyncpg.connect(dsn, timeout=2)
    except asyncpg.exceptions.CannotConnectNowError:
        return True
    except OSError:
        return False  # not listening yet
    await connection.close()
    return False


def promote(server: EmbeddedPostgres) -> None:
    """Ends the server's recovery, as its owner (the embedded server's own user)."""
    owner = os.stat(server.data_dir)
    as_owner = owner.st_uid != os.getuid()
    subprocess.run(
        [
            *(str(find_bin_dir() / "pg_ctl"), "promote", "-D", str(server.data_dir)),
            *("-w", "-t", str(PROMOTE_TIMEOUT_S)),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=PROMOTE_TIMEOUT_S + 5,
        user=owner.st_uid if as_owner else None,
        group=owner.st_gid if as_owner else None,
        extra_groups=[] if as_owner else None,
    )


@pytest.mark.timeout(180)
async def test_a_rebalance_waits_for_a_shard_that_is_starting_up(
    ledger4: Ledger4, tmp_path: Path
) -> None:
    server = EmbeddedPostgres(
        data_dir=tmp_path / "pg-shard-d", durable=False, settings=STARTING_SETTINGS
    )
    await asyncio.to_thread(server.start)
    starting: asyncio.Future[None] | None = None
    rebalance: asyncio.subprocess.Process | None = None
    try:
        await asyncio.to_thread(server.create_database, DATABASE)
        old = ledger4.service.cluster.config
        new = ShardConfig(
            epoch=2,
            shards=(
                *(ledger4.specs[n] for n in FIRST_SHARDS),
                ShardSpec(name="shard-d", dsn=server.dsn(DATABASE), weight=1),
            ),
        )
        movers = merchants_moving(old, new, MOVERS, destination="shard-d")
        await create_merchants(ledger4.service, movers)

        # The shard restarts and stays in recovery until promoted below.
        await asyncio.to_thread(server.stop)
        (server.data_dir / "standby.signal").touch()
        starting = asyncio.ensure_future(asyncio.to_thread(server.start))
        deadline = time.monotonic() + WAIT_S
        while not await refuses_for_now(server.dsn(DATABASE)):
            assert time.monotonic() < deadline, "the shard never answered 'cannot connect now'"
            await asyncio.sleep(0.1)

        config_path = write_config(tmp_path / "new.toml", new)
        rebalance = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "ledger.cli", "shards", "rebalance", "--config", str(config_path)),
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRPC_ENABLE_FORK_SUPPORT": "false"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert rebalance.stderr is not None and rebalance.stdout is not None
        said: list[str] = []
        async with asyncio.timeout(WAIT_S):
            while "shard shard-d is starting up" not in (said[-1] if said else ""):
                line = await rebalance.stderr.readline()
                assert line, f"the rebalance ended without waiting: {''.join(said)}"
                said.append(line.decode())

        await asyncio.to_thread(promote, server)
        await starting
        async with asyncio.timeout(WAIT_S * 2):
            out, err = await rebalance.communicate()
        assert rebalance.returncode == 0, "".join(said) + err.decode()
        assert f"moved {MOVERS} merchants" in out.decode(), out.decode()
    finally:
        if rebalance is not None and rebalance.returncode is None:
            rebalance.kill()
            await rebalance.wait()
        if starting is not None and not starting.done():
            await asyncio.to_thread(promote, server)
            await starting
        await asyncio.to_thread(server.stop)

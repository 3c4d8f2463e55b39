"""Merchant moves (ledger/moves/rebalance.py) under faults, against real processes.

Four PostgreSQL servers, one per shard (shard-a..d); the cluster starts on a
3-shard config (epoch 1) and grows to 4 shards (epoch 2), so merchants move
from shard-a, shard-b and shard-c to shard-d. The service replicas and the
rebalance command run as child processes (`python -m ledger.cli ...`), so the
rebalance can SIGKILL itself at a crash point (ledger/faults.py).

Each test gets fresh shard databases on the module's servers (the last two
share one cluster that has finished its move), so the epochs and merchant
states of one test never leak into another. Merchants are chosen
by the two rings: a "mover" is owned by shard-a/b/c under the old ring and by
shard-d under the new one; a "stayer" has the same owner under both.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest

from ledger import faults
from ledger.domain.accounts import AccountKey
from ledger.domain.transfers import TransferAction, TransferRequest
from ledger.embedded.postgres import EmbeddedPostgres, EmbeddedPostgresError
from ledger.routing.cluster import Cluster
from ledger.routing.config import ShardConfig, ShardSpec, load_config
from ledger.routing.ring import ShardRing
from ledger.sagas.reconcile import ReconcileReport, reconcile
from ledger.storage.errors import MerchantsNotOwned
from ledger.storage.shard import Fence, Shard
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.process_cluster import ROOT, ServiceProcess, ShardServers
from tests.support import (
    RPC_TIMEOUT_S,
    account,
    balance,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    wait_admin_locks_released,
    wait_until,
    write_config,
)

SHARD_NAMES = ("shard-a", "shard-b", "shard-c", "shard-d")
OLD_SHARD_NAMES = SHARD_NAMES[:3]
NEW_SHARD = "shard-d"
OLD_EPOCH = 1
NEW_EPOCH = 2
# The crash points of the rebalance command (the others are the saga's).
REBALANCE_CRASH_POINTS = tuple(p for p in faults.POINTS if p.startswith(("rebalance.", "move.")))
assert len(REBALANCE_CRASH_POINTS) == 6, REBALANCE_CRASH_POINTS
# Replicas share one host: no metrics port for them to fight over. Short saga leases
# and back-off so a saga left behind by anything resumes quickly.
SERVICE_ENV = {
    "LEDGER_METRICS_LISTEN": "off",
    "LEDGER_SAGA_LEASE_S": "1",
    "LEDGER_SAGA_RETRY_DELAY_S_MAX": "1",
}
# A CLI command (Python start-up, a rebalance of a handful of merchants, a reconcile)
# finishes within this, or the test fails instead of hanging.
CLI_DEADLINE_S = 60.0
# initdb and pg_ctl run in a forked child of a process with gRPC threads, where gRPC's
# fork handlers now and then kill the child before it execs; one more try is safe.
PG_CTL_ATTEMPTS_MAX = 2
# Ring lookups a test may make to find a merchant id with the owners it wants.
MERCHANT_SEARCH_MAX = 10_000
ACCOUNT_IDS = ("cash", "sales")
CURRENCY = "USD"
# How long one LookupTransfers waits (server side) for a saga to leave IN_PROGRESS.
SAGA_WAIT_MS = 5_000

# Writers in the two-replica test: bounded loops with a retry pause that grows.
WRITES_PER_WRITER_MAX = 2_000
WRITE_AMOUNT_MINOR = 7
# A replica on the current config retries one id this many times: enough to cover the
# time from the config edit to the rebalance raising the epochs, and every fence.
CURRENT_REPLICA_ATTEMPTS_MAX = 100
# A replica on the old config is refused for good after the epoch bump; it gives an id
# up after this many tries (and the test retries that id through the other replica).
STALE_REPLICA_ATTEMPTS_MAX = 4
RETRY_PAUSE_S_MIN = 0.02
RETRY_PAUSE_S_MAX = 0.2
# Acknowledged writes each writer must make before the rebalance starts, and how many
# the current replica must make, and the stale one be refused, after it finished.
WRITES_BEFORE_MOVE_MIN = 3
WRITES_AFTER_MOVE_MIN = 3
REFUSALS_AFTER_MOVE_MIN = 3
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

_MOVED_LINE = re.compile(r"^moved (\d+) merchants", re.MULTILINE)
_PROGRESS_LINE = re.compile(
    r"\| (?P<merchant>\S+) (?P<source>[\w-]+)->(?P<destination>[\w-]+): (?P<outcome>[^,]+),"
)


# The cluster.


async def _start_server(server: EmbeddedPostgres) -> None:
    """Starts a fresh server off the event loop, retried as above. A failed first start
    can leave a half-initialised data dir behind (initdb cut short), which a second
    start would adopt as it is: it is thrown away first (it never held data)."""
    failures: list[str] = []
    for _ in range(PG_CTL_ATTEMPTS_MAX):
        try:
            await asyncio.to_thread(server.start)
            return
        except EmbeddedPostgresError as error:
            failures.append(str(error))
            if not server.is_running():
                await asyncio.to_thread(shutil.rmtree, server.data_dir, True)
    raise AssertionError("PostgreSQL did not start:\n" + "\n---\n".join(failures))


async def _stop_server(server: EmbeddedPostgres) -> None:
    for attempt in range(1, PG_CTL_ATTEMPTS_MAX + 1):
        try:
            await asyncio.to_thread(functools.partial(server.stop, mode="immediate"))
            return
        except EmbeddedPostgresError:
            if attempt == PG_CTL_ATTEMPTS_MAX:
                raise


@pytest.fixture(scope="module")
async def shard_servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ShardServers]:
    """One PostgreSQL server per shard, shard-a..d; each test makes its own databases."""
    servers = ShardServers(tmp_path_factory.mktemp("rebalance-pg"), SHARD_NAMES)
    try:
        for server in servers.servers.values():
            await _start_server(server)
        yield servers
    finally:
        for server in servers.servers.values():
            await _stop_server(server)


async def _create_database(server: EmbeddedPostgres, database: str) -> None:
    conn = await asyncpg.connect(server.dsn("postgres"), timeout=RPC_TIMEOUT_S)
    try:
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


@dataclass
class Deployment:
    """Fresh databases for shard-a..d, the old (3-shard) and new (4-shard) configs,
    and the replicas started over them."""

    base_dir: Path
    old: ShardConfig
    new: ShardConfig
    replicas: list[ServiceProcess] = field(default_factory=list)

    @classmethod
    async def create(cls, servers: ShardServers, base_dir: Path) -> Deployment:
        tag = uid("rb")
        specs = []
        for name in SHARD_NAMES:
            database = f"{tag}_{name.replace('-', '_')}"
            server = servers.servers[name]
            await _create_database(server, database)
            specs.append(ShardSpec(name=name, dsn=server.dsn(database), weight=1))
        return cls(
            base_dir=base_dir,
            old=ShardConfig(epoch=OLD_EPOCH, shards=tuple(specs[: len(OLD_SHARD_NAMES)])),
            new=ShardConfig(epoch=NEW_EPOCH, shards=tuple(specs)),
        )

    def config_file(self, name: str, config: ShardConfig) -> Path:
        return write_config(self.base_dir / name, config)

    async def start_replica(self, config_path: Path, name: str) -> ServiceProcess:
        replica = ServiceProcess(config_path, self.base_dir / f"{name}.log", env=SERVICE_ENV)
        self.replicas.append(replica)
        await replica.start()
        return replica

    def merchant(self, source: str, *, moves: bool, prefix: str = "m") -> str:
        """A fresh merchant on source under the old ring, on shard-d (moves) or still
        on source under the new one."""
        old_ring, new_ring = ShardRing(self.old), ShardRing(self.new)
        wanted = NEW_SHARD if moves else source
        for _ in range(MERCHANT_SEARCH_MAX):
            candidate = uid(prefix)
            if old_ring.shard_for(candidate) == source and new_ring.shard_for(candidate) == wanted:
                return candidate
        raise AssertionError(f"no merchant found on {source} that {'moves' if moves else 'stays'}")

    async def fetch(self, shard_name: str, query: str, *args: object) -> list[asyncpg.Record]:
        """One query straight against a shard's database, around the service."""
        conn = await asyncpg.connect(self.new.shard(shard_name).dsn, timeout=RPC_TIMEOUT_S)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def states(
        self, merchant_ids: Sequence[str]
    ) -> dict[str, dict[str, tuple[str, str | None]]]:
        """Per shard, each listed merchant's (state, moved_to) where the shard knows it."""
        found: dict[str, dict[str, tuple[str, str | None]]] = {}
        for name in SHARD_NAMES:
            rows = await self.fetch(
                name,
                "SELECT merchant_id, state, moved_to FROM merchants WHERE merchant_id = ANY($1)",
                list(merchant_ids),
            )
            found[name] = {r["merchant_id"]: (r["state"], r["moved_to"]) for r in rows}
        return found

    async def close(self) -> None:
        for replica in self.replicas:
            if replica.process is not None:
                await replica.kill()


@pytest.fixture
async def deployment(
    shard_servers: ShardServers, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    created = await Deployment.create(shard_servers, tmp_path_factory.mktemp("deployment"))
    try:
        yield created
    finally:
        await created.close()


# Commands.


async def _run_cli(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Runs `python -m ledger.cli ARGS`; returns its exit code and output (stderr included)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger.cli",
        *args,
        cwd=ROOT,
        env={**os.environ, **SERVICE_ENV, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), CLI_DEADLINE_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"ledger {' '.join(args)} ran past {CLI_DEADLINE_S}s") from None
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def _rebalance(config_path: Path, *, crash_point: str | None = None) -> tuple[int, str]:
    env = {faults.CRASH_POINT_ENV: crash_point} if crash_point else {}
    code, output = await _run_cli("shards", "rebalance", "--config", str(config_path), env=env)
    if code == -signal.SIGKILL:
        await wait_admin_locks_released(config_path)
    return code, output


def _moved_count(output: str) -> int:
    match = _MOVED_LINE.search(output)
    assert match is not None, f"no summary in the rebalance output:\n{output}"
    return int(match.group(1))


def _moved_by_run(output: str) -> dict[str, tuple[str, str]]:
    """Merchants the run's progress lines report moved: merchant -> (source, destination)."""
    return {
        m["merchant"]: (m["source"], m["destination"])
        for m in _PROGRESS_LINE.finditer(output)
        if m["outcome"] in ("moved", "already moved")
    }


async def _assert_reconcile_cli_passes(config_path: Path) -> None:
    code, report = await _run_cli("reconcile", "--config", str(config_path))
    assert code == 0 and "reconcile passed" in report, report


async def _reconcile_in_process(config_path: Path) -> ReconcileReport:
    cluster = Cluster(load_config(config_path), config_path=config_path)
    await cluster.open(migrate=False)
    try:
        return await reconcile(cluster)
    finally:
        await cluster.close()


async def _wait_for_reload(replica: ServiceProcess, epoch: int) -> None:
    """Waits until the replica's log says it loaded the config of this epoch."""

    async def reloaded() -> bool:
        return f"loaded shard config epoch {epoch}" in replica.log()

    await wait_until(reloaded, what=f"the replica to load config epoch {epoch}")


# Books.


def _stub(replica: ServiceProcess) -> ledger_pb2_grpc.LedgerServiceStub:
    assert replica.stub is not None, "replica not started"
    return replica.stub


async def _final_results(
    stub: ledger_pb2_grpc.LedgerServiceStub, items: Sequence[pb.Transfer]
) -> list[str]:
    """Creates the transfers; waits for cross-shard ones that came back IN_PROGRESS."""
    results = await transfers(stub, *items)
    names = result_names(results)
    for index, result in enumerate(results):
        if result.result != pb.TRANSFER_RESULT_IN_PROGRESS:
            continue
        item = items[index]
        response = await stub.LookupTransfers(
            pb.LookupTransfersRequest(
                refs=[
                    pb.TransferRef(merchant_id=item.debit_account.merchant_id, transfer_id=item.id)
                ],
                wait_timeout_ms=SAGA_WAIT_MS,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        names[index] = pb.TransferResult.Name(response.transfers[0].result)
    return names


async def _open_books(
    stub: ledger_pb2_grpc.LedgerServiceStub,
    *,
    movers: Mapping[str, str],
    stayers: Mapping[str, str],
) -> None:
    """Accounts and history for every merchant: local posts, a two-phase transfer posted
    in part, cross-shard transfers (sagas) in, out and between movers, and holds the
    move must carry: each mover's own, and one each way with the stayer beside it and
    with a stayer on the next shard."""
    merchants = [*movers.values(), *stayers.values()]
    await create_accounts(stub, *(account(m, a, CURRENCY) for m in merchants for a in ACCOUNT_IDS))
    holds = {m: uid("hold") for m in merchants}
    local = [
        item
        for m in merchants
        for item in (
            transfer(uid("pay"), ref(m, "cash"), ref(m, "sales"), 1_000),
            transfer(uid("pay"), ref(m, "sales"), ref(m, "cash"), 250),
            transfer(
                holds[m], ref(m, "cash"), ref(m, "sales"), 300, action=pb.TRANSFER_ACTION_PENDING
            ),
        )
    ]
    assert set(await _final_results(stub, local)) == {"TRANSFER_RESULT_OK"}
    settles = [
        pb.Transfer(
            id=uid("settle"),
            debit_account=ref(m, "cash"),
            amount_minor=200,
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=holds[m],
        )
        for m in merchants
    ]
    assert set(await _final_results(stub, settles)) == {"TRANSFER_RESULT_OK"}
    a, b, c = (movers[s] for s in OLD_SHARD_NAMES)
    sa, sb, sc = (stayers[s] for s in OLD_SHARD_NAMES)
    cross = [
        transfer(uid("x"), ref(a, "cash"), ref(sb, "sales"), 500),  # mover pays a stayer
        transfer(uid("x"), ref(sc, "cash"), ref(b, "sales"), 400),  # a stayer pays a mover
        transfer(uid("x"), ref(c, "cash"), ref(a, "sales"), 300),  # mover pays mover
        transfer(uid("x"), ref(sa, "cash"), ref(sc, "sales"), 100),  # stayers only
    ]
    for item in cross:
        assert await _final_results(stub, [item]) == ["TRANSFER_RESULT_OK"], item.id
    pending = pb.TRANSFER_ACTION_PENDING
    shards = list(movers)
    next_to = {s: shards[(i + 1) % len(shards)] for i, s in enumerate(shards)}
    open_holds = [
        item
        for shard, m in movers.items()
        for item in (
            transfer(uid("own"), ref(m, "cash"), ref(m, "sales"), 40, action=pending),
            transfer(uid("out"), ref(m, "cash"), ref(stayers[shard], "sales"), 30, action=pending),
            transfer(uid("in"), ref(stayers[shard], "cash"), ref(m, "sales"), 20, action=pending),
            transfer(
                uid("xo"), ref(m, "cash"), ref(stayers[next_to[shard]], "sales"), 11, action=pending
            ),
            transfer(
                uid("xi"), ref(stayers[next_to[shard]], "cash"), ref(m, "sales"), 13, action=pending
            ),
        )
    ]
    assert set(await _final_results(stub, open_holds)) == {"TRANSFER_RESULT_OK"}


async def _accounts(
    stub: ledger_pb2_grpc.LedgerServiceStub, merchants: Sequence[str]
) -> dict[tuple[str, str], pb.Account]:
    refs = [ref(m, a) for m in merchants for a in ACCOUNT_IDS]
    response = await stub.LookupAccounts(pb.LookupAccountsRequest(refs=refs), timeout=RPC_TIMEOUT_S)
    found = {(x.ref.merchant_id, x.ref.account_id): x for x in response.accounts}
    assert len(found) == len(refs), f"lookup found {len(found)} of {len(refs)} accounts"
    return found


async def _history_counts(
    deployment: Deployment, shard_name: str, merchant_id: str
) -> tuple[int, int]:
    """(transfers, entries) the shard holds for the merchant."""
    rows = await deployment.fetch(
        shard_name,
        "SELECT (SELECT count(*) FROM transfers WHERE merchant_id = $1) AS transfers,"
        " (SELECT count(*) FROM entries WHERE merchant_id = $1) AS entries",
        merchant_id,
    )
    return int(rows[0]["transfers"]), int(rows[0]["entries"])


async def _transfer_rows(
    deployment: Deployment, shard_name: str, merchant_id: str, transfer_ids: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Per transfer id found on the shard: (transfer rows, entry rows) for it."""
    rows = await deployment.fetch(
        shard_name,
        "SELECT t.transfer_id, count(DISTINCT t.transfer_id) AS transfers,"
        " (SELECT count(*) FROM entries e WHERE e.transfer_merchant_id = t.merchant_id"
        "    AND e.transfer_id = t.transfer_id) AS entries"
        " FROM transfers t WHERE t.merchant_id = $1 AND t.transfer_id = ANY($2)"
        " GROUP BY t.merchant_id, t.transfer_id",
        merchant_id,
        list(transfer_ids),
    )
    return {r["transfer_id"]: (int(r["transfers"]), int(r["entries"])) for r in rows}


# 1. The rebalance command crashes at each step and is run again.


@pytest.mark.parametrize("crash_point", REBALANCE_CRASH_POINTS)
async def test_rebalance_killed_at_a_crash_point_finishes_on_rerun_and_keeps_every_balance(
    deployment: Deployment, crash_point: str
) -> None:
    live = deployment.config_file("live.toml", deployment.old)
    replica = await deployment.start_replica(live, "replica")
    stub = _stub(replica)
    movers = {s: deployment.merchant(s, moves=True, prefix="mover") for s in OLD_SHARD_NAMES}
    stayers = {s: deployment.merchant(s, moves=False, prefix="stayer") for s in OLD_SHARD_NAMES}
    merchants = [*movers.values(), *stayers.values()]
    await _open_books(stub, movers=movers, stayers=stayers)
    before = await _accounts(stub, merchants)

    # The admin's workflow: the new config over the live file, then the command.
    write_config(live, deployment.new)
    code, output = await _rebalance(live, crash_point=crash_point)
    assert code == -signal.SIGKILL, f"exit {code}, expected a SIGKILL at {crash_point}:\n{output}"
    states = await deployment.states(merchants)
    handed_over = {m for s, m in movers.items() if states[s].get(m, ("", ""))[0] == "moved"}
    if crash_point == "move.after_hand_over":
        assert len(handed_over) == 1, (handed_over, states)
    else:
        assert not handed_over, (handed_over, states)

    code, output = await _rebalance(live)
    assert code == 0, output
    assert "NOT MOVED" not in output, output
    moved = _moved_by_run(output)
    expected = {m: (s, NEW_SHARD) for s, m in movers.items() if m not in handed_over}
    assert moved == expected, output
    assert _moved_count(output) == len(expected), output

    code, output = await _rebalance(live)
    assert code == 0, output
    assert _moved_count(output) == 0 and not _moved_by_run(output), output

    states = await deployment.states(merchants)
    for source, m in movers.items():
        assert states[source][m] == ("moved", NEW_SHARD), (m, states)
        assert states[NEW_SHARD][m] == ("active", None), (m, states)
    for source, m in stayers.items():
        assert states[source][m] == ("active", None), (m, states)
        assert m not in states[NEW_SHARD], (m, states)
    for name in SHARD_NAMES:
        unfinished = await deployment.fetch(
            name, "SELECT merchant_id, state FROM merchants WHERE state IN ('moving', 'incoming')"
        )
        assert not unfinished, (name, unfinished)
    code, status = await _run_cli("shards", "status", "--config", str(live))
    assert code == 0, status
    assert "in progress" not in status and "claims paused" not in status, status
    shard_lines = [line for line in status.splitlines() if line.startswith("shard-")]
    assert [line.count(f": epoch {NEW_EPOCH},") for line in shard_lines] == [1] * len(
        SHARD_NAMES
    ), status

    assert await _accounts(stub, merchants) == before
    await _assert_reconcile_cli_passes(live)

    # Writes keep working for moved merchants, on their new shard, local and cross-shard.
    writes = {m: uid("after") for m in movers.values()}
    for source, m in movers.items():
        local = transfer(writes[m], ref(m, "cash"), ref(m, "sales"), 11)
        assert await _final_results(stub, [local]) == ["TRANSFER_RESULT_OK"]
        paid = transfer(uid("after-x"), ref(m, "cash"), ref(stayers[source], "sales"), 13)
        assert await _final_results(stub, [paid]) == ["TRANSFER_RESULT_OK"]
        assert await _transfer_rows(deployment, NEW_SHARD, m, [writes[m]]) == {writes[m]: (1, 2)}
        assert await _transfer_rows(deployment, source, m, [writes[m]]) == {}
    after = await _accounts(stub, merchants)
    for source, m in movers.items():
        assert after[(m, "cash")].debits_posted == before[(m, "cash")].debits_posted + 11 + 13
        assert after[(m, "sales")].credits_posted == before[(m, "sales")].credits_posted + 11
        stayer = stayers[source]
        assert (
            after[(stayer, "sales")].credits_posted == before[(stayer, "sales")].credits_posted + 13
        )
    report = await _reconcile_in_process(live)
    assert report.ok, report.render()


# 2. Two replicas write the same merchants during a move, one on the old config.


@dataclass
class WriterLog:
    """What one writer (a replica, a merchant) saw."""

    replica: str
    merchant_id: str
    acked: list[tuple[str, float]] = field(default_factory=list)  # (id, monotonic time)
    given_up: list[str] = field(default_factory=list)
    refusals: list[tuple[grpc.StatusCode, float, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def acked_after(self, when: float) -> int:
        return sum(1 for _, at in self.acked if at > when)

    def refused_after(self, when: float) -> int:
        return sum(1 for _, at, _ in self.refusals if at > when)


async def _write_loop(
    stub: ledger_pb2_grpc.LedgerServiceStub,
    log: WriterLog,
    stop: asyncio.Event,
    *,
    attempts_max: int,
    give_up_on_stop: bool,
) -> None:
    """Transfers cash -> sales of one merchant, one new id at a time, until stop
    (bounded by WRITES_PER_WRITER_MAX); an id not acknowledged is logged as given up."""
    m = log.merchant_id
    for n in range(WRITES_PER_WRITER_MAX):
        if stop.is_set():
            return
        item = transfer(
            f"{log.replica}-{n}-{uid()}", ref(m, "cash"), ref(m, "sales"), WRITE_AMOUNT_MINOR
        )
        acked = await _write_with_retries(
            stub, item, log, stop, attempts_max=attempts_max, give_up_on_stop=give_up_on_stop
        )
        if not acked:
            log.given_up.append(item.id)


async def _write_with_retries(
    stub: ledger_pb2_grpc.LedgerServiceStub,
    item: pb.Transfer,
    log: WriterLog,
    stop: asyncio.Event,
    *,
    attempts_max: int,
    give_up_on_stop: bool,
) -> bool:
    """Sends the transfer, again with the same id after a retryable status; True once
    acknowledged, False when refused for good, out of attempts or stopped."""
    pause_s = RETRY_PAUSE_S_MIN
    for _ in range(attempts_max):
        try:
            results = await transfers(stub, item)
        except grpc.aio.AioRpcError as error:
            log.refusals.append((error.code(), time.monotonic(), error.details() or ""))
            if error.code() not in RETRYABLE_CODES:
                log.unexpected.append(f"{item.id}: {error.code().name} {error.details()}")
                return False
            if give_up_on_stop and stop.is_set():
                return False
            await asyncio.sleep(pause_s)  # back-off between retries, not synchronisation
            pause_s = min(pause_s * 2, RETRY_PAUSE_S_MAX)
            continue
        name = result_names(results)[0]
        if name != "TRANSFER_RESULT_OK":
            log.unexpected.append(f"{item.id}: {name}")
            return False
        log.acked.append((item.id, time.monotonic()))
        return True
    return False


async def test_replica_on_the_old_config_is_refused_and_never_writes_where_a_merchant_left(
    deployment: Deployment,
) -> None:
    path_a = deployment.config_file("replica-a.toml", deployment.old)
    path_b = deployment.config_file("replica-b.toml", deployment.old)  # never updated
    replica_a = await deployment.start_replica(path_a, "replica-a")
    replica_b = await deployment.start_replica(path_b, "replica-b")
    movers = {s: deployment.merchant(s, moves=True, prefix="mover") for s in OLD_SHARD_NAMES}
    await create_accounts(
        _stub(replica_a), *(account(m, a, CURRENCY) for m in movers.values() for a in ACCOUNT_IDS)
    )
    logs = [WriterLog(replica=name, merchant_id=m) for name in ("a", "b") for m in movers.values()]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            _write_loop(
                _stub(replica_a if log.replica == "a" else replica_b),
                log,
                stop,
                attempts_max=(
                    CURRENT_REPLICA_ATTEMPTS_MAX
                    if log.replica == "a"
                    else STALE_REPLICA_ATTEMPTS_MAX
                ),
                give_up_on_stop=log.replica == "b",
            )
        )
        for log in logs
    ]
    try:

        async def all_writing() -> bool:
            return all(len(log.acked) >= WRITES_BEFORE_MOVE_MIN for log in logs)

        await wait_until(all_writing, what="both replicas to write every merchant")
        # The admin's workflow: the new config over A's file; A picks it up; the command.
        write_config(path_a, deployment.new)
        await _wait_for_reload(replica_a, NEW_EPOCH)
        code, output = await _rebalance(path_a)
        rebalance_done = time.monotonic()
        if code != 0:
            owners = await deployment.states(list(movers.values()))
            raise AssertionError(
                f"rebalance exited {code}; merchants per shard {owners}:\n{output}"
            )
        assert _moved_by_run(output) == {m: (s, NEW_SHARD) for s, m in movers.items()}, output

        async def settled() -> bool:
            return all(
                log.acked_after(rebalance_done) >= WRITES_AFTER_MOVE_MIN
                if log.replica == "a"
                else log.refused_after(rebalance_done) >= REFUSALS_AFTER_MOVE_MIN
                for log in logs
            )

        await wait_until(settled, what="A to keep writing and B to be refused after the move")
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    stale = [log for log in logs if log.replica == "b"]
    current = [log for log in logs if log.replica == "a"]
    # The stale replica: only retryable refusals, and none of its writes acknowledged
    # once the move was over.
    for log in stale:
        assert not log.unexpected, log.unexpected
        assert {code for code, _, _ in log.refusals} == {grpc.StatusCode.UNAVAILABLE}, log.refusals
        assert log.acked_after(rebalance_done) == 0, log.acked
    # The replica on the new config: nothing but bounded retryable statuses, and every
    # write through.
    for log in current:
        assert not log.unexpected, log.unexpected[:5]
        assert not log.given_up, log.given_up[:5]
        assert {code for code, _, _ in log.refusals} <= RETRYABLE_CODES, log.refusals[:5]

    states = await deployment.states(list(movers.values()))
    for source, m in movers.items():
        assert states[source][m] == ("moved", NEW_SHARD), states
        assert states[NEW_SHARD][m] == ("active", None), states
        # Nothing landed on the old shard after it marked the merchant moved...
        late = await deployment.fetch(
            source,
            "SELECT (SELECT count(*) FROM transfers t WHERE t.merchant_id = m.merchant_id"
            "          AND t.created_at > m.updated_at) AS transfers,"
            "       (SELECT count(*) FROM entries e WHERE e.merchant_id = m.merchant_id"
            "          AND e.created_at > m.updated_at) AS entries"
            " FROM merchants m WHERE m.merchant_id = $1 AND m.state = 'moved'",
            m,
        )
        assert [tuple(r) for r in late] == [(0, 0)], (m, late)
        # ...and everything the old shard has, the new owner has too.
        old_ids = {
            r["transfer_id"]
            for r in await deployment.fetch(
                source, "SELECT transfer_id FROM transfers WHERE merchant_id = $1", m
            )
        }
        found = await _transfer_rows(deployment, NEW_SHARD, m, sorted(old_ids))
        assert set(found) == old_ids, sorted(old_ids - set(found))

    # Every acknowledged transfer exists exactly once, with its two entries, on the owner.
    for log in logs:
        acked = [transfer_id for transfer_id, _ in log.acked]
        found = await _transfer_rows(deployment, NEW_SHARD, log.merchant_id, acked)
        missing = sorted(set(acked) - set(found))
        assert not missing, (log.replica, log.merchant_id, missing)
        assert set(found.values()) <= {(1, 2)}, found

    # What the stale replica gave up on converges when retried, with the same ids,
    # through the current replica; then the books hold exactly every attempted id.
    stub_a = _stub(replica_a)
    for log in stale:
        for transfer_id in log.given_up:
            item = transfer(
                transfer_id,
                ref(log.merchant_id, "cash"),
                ref(log.merchant_id, "sales"),
                WRITE_AMOUNT_MINOR,
            )
            assert result_names(await transfers(stub_a, item)) == ["TRANSFER_RESULT_OK"]
    for m in movers.values():
        attempted = {
            transfer_id
            for log in logs
            if log.merchant_id == m
            for transfer_id in [*(t for t, _ in log.acked), *log.given_up]
        }
        on_owner = {
            r["transfer_id"]
            for r in await deployment.fetch(
                NEW_SHARD, "SELECT transfer_id FROM transfers WHERE merchant_id = $1", m
            )
        }
        assert on_owner == attempted, (sorted(attempted - on_owner), sorted(on_owner - attempted))
        cash = await balance(stub_a, m, "cash")
        assert cash.debits_posted == WRITE_AMOUNT_MINOR * len(attempted), cash

    await _assert_reconcile_cli_passes(path_a)


# 3. Writes for a moved merchant sent to its old shard.


@dataclass
class MovedCluster:
    deployment: Deployment
    current: ServiceProcess
    stale: ServiceProcess
    stale_path: Path
    movers: dict[str, str]


@pytest.fixture(scope="module")
async def moved_cluster(
    shard_servers: ShardServers, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MovedCluster]:
    """Movers with history, moved to shard-d; replica `current` on the live config
    (updated), replica `stale` on a copy that still says epoch 1."""
    created = await Deployment.create(shard_servers, tmp_path_factory.mktemp("moved"))
    try:
        live = created.config_file("live.toml", created.old)
        stale_path = created.config_file("stale.toml", created.old)
        current = await created.start_replica(live, "current")
        stale = await created.start_replica(stale_path, "stale")
        movers = {s: created.merchant(s, moves=True, prefix="mover") for s in OLD_SHARD_NAMES}
        stub = _stub(current)
        await create_accounts(
            stub, *(account(m, a, CURRENCY) for m in movers.values() for a in ACCOUNT_IDS)
        )
        history = [
            transfer(uid("pay"), ref(m, "cash"), ref(m, "sales"), 100) for m in movers.values()
        ]
        assert set(await _final_results(stub, history)) == {"TRANSFER_RESULT_OK"}
        write_config(live, created.new)
        code, output = await _rebalance(live)
        assert code == 0, output
        assert _moved_by_run(output) == {m: (s, NEW_SHARD) for s, m in movers.items()}, output
        await _wait_for_reload(current, NEW_EPOCH)
        yield MovedCluster(created, current, stale, stale_path, movers)
    finally:
        await created.close()


async def test_stale_replica_gets_unavailable_for_a_moved_merchant_until_its_config_catches_up(
    moved_cluster: MovedCluster,
) -> None:
    cluster = moved_cluster
    source, m = "shard-a", cluster.movers["shard-a"]
    current, stale = _stub(cluster.current), _stub(cluster.stale)
    # The new owner moves on: the old copy is now behind.
    newer = transfer(uid("newer"), ref(m, "cash"), ref(m, "sales"), 40)
    assert result_names(await transfers(current, newer)) == ["TRANSFER_RESULT_OK"]
    fresh = await balance(current, m, "cash")
    old_counts = await _history_counts(cluster.deployment, source, m)
    new_counts = await _history_counts(cluster.deployment, NEW_SHARD, m)

    # A read through the stale replica is refused or current, never the old copy.
    try:
        seen = await balance(stale, m, "cash")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    else:
        assert seen == fresh, (seen, fresh)

    refused = transfer(uid("stale"), ref(m, "cash"), ref(m, "sales"), 9)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await transfers(stale, refused)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
    assert await _history_counts(cluster.deployment, source, m) == old_counts
    assert await _history_counts(cluster.deployment, NEW_SHARD, m) == new_counts
    assert await _transfer_rows(cluster.deployment, source, m, [refused.id]) == {}
    assert await _transfer_rows(cluster.deployment, NEW_SHARD, m, [refused.id]) == {}

    # Its config file catches up; it reloads (file watch) and the same id goes through.
    write_config(cluster.stale_path, cluster.deployment.new)
    outcome: list[str] = []

    async def accepted() -> bool:
        try:
            outcome[:] = result_names(await transfers(stale, refused))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        return True

    await wait_until(accepted, what="the stale replica to reload and accept the write")
    assert outcome == ["TRANSFER_RESULT_OK"]
    assert await _transfer_rows(cluster.deployment, NEW_SHARD, m, [refused.id]) == {
        refused.id: (1, 2)
    }
    assert await _history_counts(cluster.deployment, source, m) == old_counts
    after = await balance(current, m, "cash")
    assert after.debits_posted == fresh.debits_posted + 9
    assert await balance(stale, m, "cash") == after


async def test_old_shard_refuses_a_current_epoch_write_for_a_moved_merchant_naming_its_owner(
    moved_cluster: MovedCluster,
) -> None:
    """The fence itself, without a router: the epoch matches, the ring (claimable) says
    the old shard, and still the old shard refuses, because the merchant moved."""
    cluster = moved_cluster
    source, m = "shard-b", cluster.movers["shard-b"]
    before = await _history_counts(cluster.deployment, source, m)
    spec = cluster.deployment.new.shard(source)
    shard = Shard(name=spec.name, dsn=spec.dsn)
    await shard.open()
    try:
        request = TransferRequest(
            id=uid("direct"),
            debit=AccountKey(m, "cash"),
            credit=AccountKey(m, "sales"),
            amount_minor=5,
            currency=CURRENCY,
            action=TransferAction.POST,
        )
        fence = Fence(epoch=NEW_EPOCH, claimable=frozenset({m}))
        with pytest.raises(MerchantsNotOwned) as raised:
            await shard.create_transfers([request], fence)
        assert raised.value.owners == {m: NEW_SHARD}
    finally:
        await shard.close()
    assert await _history_counts(cluster.deployment, source, m) == before
    assert await _transfer_rows(cluster.deployment, source, m, [request.id]) == {}

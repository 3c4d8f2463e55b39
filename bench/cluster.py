"""What the benchmark runs against: shards, the service process, and its memory.

By default one durable embedded PostgreSQL server holds three shard databases
in a temporary directory that is removed afterwards; with --config the run
targets existing shards instead (and leaves nothing of its raw tables there).
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import asyncpg
import grpc

from bench import raw_sql
from bench.workload import ACCOUNT_IDS, CURRENCY, Workload, place_merchants
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.embedded.service_process import SERVING, serve_command
from ledger.routing.config import ShardConfig, ShardSpec, load_config, render_config
from ledger.routing.ring import ShardRing
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_SHARD_NAMES = ("shard-a", "shard-b", "shard-c")
# The service must be serving within this long: it connects and migrates every shard.
SERVICE_START_TIMEOUT_S = 60.0
# After SIGINT the service lets in-flight calls finish (its grace is seconds)
# and closes its pools; past this it is killed.
SERVICE_STOP_TIMEOUT_S = 30.0
# The stderr reader has copied everything once the process is gone; it needs
# no longer than this to drain the pipe.
LOG_DRAIN_TIMEOUT_S = 5.0
# The service's memory is read this often; peaks shorter than this can be
# missed, but a Python heap does not grow and shrink that fast.
RSS_SAMPLE_INTERVAL_S = 0.1
# Set-up calls (CreateAccounts of up to 1000 accounts) and set-up SQL
# (CHECKPOINT of a busy server, seeding raw accounts) get this long each.
SETUP_CALL_TIMEOUT_S = 120.0
MERCHANTS_PER_CREATE_CALL = 500
# The bench's own PostgreSQL keeps checkpoints out of the measured windows (a
# CHECKPOINT runs before every phase instead), so no phase pays for another's WAL.
EMBEDDED_MAX_WAL_SIZE = "8GB"
# py-spy samples the service this often; 100 Hz costs it a few percent.
PY_SPY_RATE_HZ = 100
# py-spy writes its stacks within seconds of the recording's end.
PY_SPY_WRITE_TIMEOUT_S = 60.0
# A process tree walk stops at this depth; the service has no grandchildren.
PROCESS_TREE_DEPTH_MAX = 4


@dataclass
class Shards:
    config: ShardConfig
    config_path: Path
    # Set when this run started its own PostgreSQL (and owns the temp dir).
    embedded: EmbeddedPostgres | None = None
    temp_dir: Path | None = None

    @property
    def dsns(self) -> tuple[tuple[str, str], ...]:
        return tuple((s.name, s.dsn) for s in self.config.shards)

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop(mode="fast")
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_embedded_shards(settings: Sequence[tuple[str, str]] = ()) -> Shards:
    temp_dir = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    shards = Shards(ShardConfig(epoch=1, shards=()), temp_dir / "shards.toml", temp_dir=temp_dir)
    try:
        server = EmbeddedPostgres(data_dir=temp_dir / "pg", durable=True, settings=settings)
        shards.embedded = server
        server.start()
        specs = []
        for name in EMBEDDED_SHARD_NAMES:
            database = name.replace("-", "_")
            server.create_database(database)
            specs.append(ShardSpec(name=name, dsn=server.dsn(database), weight=1))
        shards.config = ShardConfig(epoch=1, shards=tuple(specs))
        shards.config_path.write_text(render_config(shards.config))
        asyncio.run(_raise_max_wal_size(server.dsn("postgres")))
    except BaseException:
        shards.close()
        raise
    return shards


def existing_shards(config_path: Path) -> Shards:
    return Shards(load_config(config_path), config_path.resolve())


async def _raise_max_wal_size(dsn: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=SETUP_CALL_TIMEOUT_S)
    try:
        await connection.execute(f"ALTER SYSTEM SET max_wal_size = '{EMBEDDED_MAX_WAL_SIZE}'")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()


class ServiceProcess:
    """`python -m ledger.cli serve` on the shards; its log goes to log_path."""

    def __init__(self, config_path: Path, log_path: Path, *, workers: int = 1) -> None:
        self.config_path = config_path
        self.workers = workers
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.target = ""
        self._serving = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> str:
        """Starts the service and returns host:port once it says it serves."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            serve_command(self.config_path, workers=self.workers),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.PIPE,
        )
        assert self.process.stderr is not None
        self._reader = threading.Thread(
            target=self._copy_log, args=(self.process.stderr, log), daemon=True
        )
        self._reader.start()
        # The reader sets the event on the serving line, and also at EOF (the process died).
        if not self._serving.wait(SERVICE_START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(
                f"service not serving after {SERVICE_START_TIMEOUT_S}s; see {self.log_path}"
            )
        if not self.target:
            self.stop()
            raise RuntimeError(f"service exited at start:\n{self.log_path.read_text()[-4000:]}")
        return self.target

    def _copy_log(self, stream: IO[bytes], log: IO[bytes]) -> None:
        with log:
            for line in stream:
                log.write(line)
                if not self.target:
                    match = SERVING.search(line.decode(errors="replace"))
                    if match:
                        self.target = f"{match.group(1)}:{match.group(2)}"
                        self._serving.set()
                log.flush()
        self._serving.set()

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=SERVICE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=SERVICE_STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=LOG_DRAIN_TIMEOUT_S)


class PySpy:
    """py-spy recording the service for one phase, as collapsed stacks (one line per
    stack with its sample count: what flamegraph.pl and speedscope read)."""

    def __init__(self, pid: int, output: Path, *, seconds: float) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        self.output = output
        self.process = subprocess.Popen(
            [
                "py-spy", "record", "--pid", str(pid), "--output", str(output),
                "--duration", str(math.ceil(seconds)), "--rate", str(PY_SPY_RATE_HZ),
                "--format", "raw", "--nonblocking", "--gil",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def wait(self) -> None:
        try:
            _, stderr = self.process.communicate(timeout=PY_SPY_WRITE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise RuntimeError(f"py-spy did not finish writing {self.output}") from None
        if self.process.returncode != 0:
            raise RuntimeError(f"py-spy failed: {stderr.decode(errors='replace')[-2000:]}")
        print(f"  py-spy stacks: {self.output}", file=sys.stderr)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/PID/task/*/children."""
    found = [pid]
    frontier = [pid]
    for _ in range(PROCESS_TREE_DEPTH_MAX):
        children: list[int] = []
        for parent in frontier:
            children += _children(parent)
        if not children:
            break
        found += children
        frontier = children
    return found


def _children(pid: int) -> list[int]:
    result: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                result += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return result


def status_kb(pid: int, field: str) -> int:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


class RssSampler:
    """Samples the summed VmRSS of a process tree; peak() gives the largest since reset()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._peak_kb = 0
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _sample_until_stopped(self) -> None:
        # Event.wait is the sampling interval, and returns at once on stop().
        while not self._stop.wait(RSS_SAMPLE_INTERVAL_S):
            self.sample()

    def sample(self) -> None:
        rss_kb = sum(status_kb(p, "VmRSS") for p in process_tree(self.pid))
        with self._lock:
            self._peak_kb = max(self._peak_kb, rss_kb)

    def reset(self) -> None:
        with self._lock:
            self._peak_kb = 0
        self.sample()

    def peak_mb(self) -> float:
        self.sample()
        with self._lock:
            return self._peak_kb / 1024.0

    def hwm_mb(self) -> float:
        """The kernel's lifetime peak (VmHWM) over the tree, which sampling cannot miss."""
        return sum(status_kb(p, "VmHWM") for p in process_tree(self.pid)) / 1024.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=RSS_SAMPLE_INTERVAL_S * 10)


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process and of its children that exited
    (0 if it is gone). Counting the exited children keeps a process tree's sum
    steady when a child ends mid-phase: PostgreSQL ends pool connections that sat
    idle for 5 minutes, and their CPU then moves to the postmaster's account."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces; the fields after it do not.
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # utime, stime, cutime, cstime are fields 14 to 17 of stat, 12 to 15 after the name.
    return sum(int(v) for v in fields[11:15]) / _CLOCK_TICKS_PER_S


def machine_cpu_s() -> tuple[float, float, float]:
    """(busy, total, interrupts) CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    return (
        busy / _CLOCK_TICKS_PER_S,
        (busy + idle + iowait) / _CLOCK_TICKS_PER_S,
        (irq + softirq) / _CLOCK_TICKS_PER_S,
    )


class CpuMeter:
    """Where the machine's CPU went during a phase: the service, PostgreSQL, the
    client processes, interrupts, and everything else (other work on the machine)."""

    def __init__(self, *, service_pid: int, postgres_pid: int | None) -> None:
        self.service_pid = service_pid
        self.postgres_pid = postgres_pid
        self.client_pids: list[int] = []
        self._start: dict[str, float] = {}

    def _snapshot(self) -> dict[str, float]:
        busy, total, interrupts = machine_cpu_s()
        postgres = (
            sum(cpu_s(p) for p in process_tree(self.postgres_pid))
            if self.postgres_pid is not None
            else 0.0
        )
        return {
            "service": sum(cpu_s(p) for p in process_tree(self.service_pid)),
            "postgres": postgres,
            "clients": sum(cpu_s(p) for p in self.client_pids),
            # Mostly loopback TCP between the processes, charged to no process.
            "interrupts": interrupts,
            "busy": busy,
            "total": total,
        }

    def start(self) -> None:
        self._start = self._snapshot()

    def cores(self) -> dict[str, float]:
        """Average cores used since start() by each part, plus other and idle."""
        end = self._snapshot()
        used = {k: end[k] - self._start[k] for k in end}
        cores_total = os.cpu_count() or 1
        wall_s = used["total"] / cores_total
        if wall_s <= 0:
            return {}
        parts = {k: used[k] / wall_s for k in ("service", "postgres", "clients", "interrupts")}
        if self.postgres_pid is None:
            del parts["postgres"]
        parts["other"] = max(0.0, used["busy"] / wall_s - sum(parts.values()))
        parts["idle"] = max(0.0, cores_total - used["busy"] / wall_s)
        return {k: round(v, 2) for k, v in parts.items()}


def postmaster_pid(shards: Shards) -> int | None:
    if shards.embedded is None:
        return None
    try:
        return int((shards.embedded.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# Set-up over gRPC and SQL.


def one_caller_workload(shards: Shards, *, merchants: int, batch_size: int) -> Workload:
    """Fresh merchants spread over the shards for one caller (the CPU-per-call benches)."""
    run_id = uuid.uuid4().hex[:8]
    return Workload(
        run_id=run_id,
        merchants=place_merchants(
            run_id=run_id,
            count=merchants,
            ring=ShardRing(shards.config),
            shards=tuple(s.name for s in shards.config.shards),
        ),
        shard_dsns=shards.dsns,
        batch_size=batch_size,
        callers_total=1,
    )


async def create_accounts(target: str, workload: Workload) -> None:
    """Two accounts per merchant through the service (which claims the merchants)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        merchants = workload.merchants
        for start in range(0, len(merchants), MERCHANTS_PER_CREATE_CALL):
            chunk = merchants[start : start + MERCHANTS_PER_CREATE_CALL]
            request = pb.CreateAccountsRequest(
                accounts=[
                    pb.Account(
                        ref=pb.AccountRef(merchant_id=m.merchant_id, account_id=a),
                        currency=CURRENCY,
                    )
                    for m in chunk
                    for a in ACCOUNT_IDS
                ]
            )
            response = await stub.CreateAccounts(request, timeout=SETUP_CALL_TIMEOUT_S)
            refused = [r for r in response.results if r.result != pb.ACCOUNT_RESULT_OK]
            if refused:
                raise RuntimeError(f"{len(refused)} accounts not created, first: {refused[0]}")


# --velocity-rules: three rules on every account (debit amount per day, debit count
# per 10 minutes, credit amount per day), loose enough never to refuse a transfer
# of the benchmark: they measure what checking and counting cost.
VELOCITY_RULES = (
    pb.VelocityRule(
        rule_id="debits-daily",
        direction=pb.DIRECTION_DEBIT,
        metric=pb.VELOCITY_METRIC_AMOUNT,
        window_s=86_400,
        limit=2**62,
    ),
    pb.VelocityRule(
        rule_id="debits-burst",
        direction=pb.DIRECTION_DEBIT,
        metric=pb.VELOCITY_METRIC_COUNT,
        window_s=600,
        limit=2**62,
    ),
    pb.VelocityRule(
        rule_id="credits-daily",
        direction=pb.DIRECTION_CREDIT,
        metric=pb.VELOCITY_METRIC_AMOUNT,
        window_s=86_400,
        limit=2**62,
    ),
)


async def set_velocity_rules(target: str, workload: Workload) -> None:
    """VELOCITY_RULES on every account of the workload (LedgerAdminService)."""
    async with grpc.aio.insecure_channel(target) as channel:
        admin = ledger_pb2_grpc.LedgerAdminServiceStub(channel)
        for m in workload.merchants:
            for account_id in ACCOUNT_IDS:
                await admin.SetAccountLimits(
                    pb.SetAccountLimitsRequest(
                        account=pb.AccountRef(merchant_id=m.merchant_id, account_id=account_id),
                        change_id="bench-velocity",
                        reason="benchmark: the cost of three velocity rules",
                        limits=pb.AccountLimits(velocity_rules=VELOCITY_RULES),
                    ),
                    timeout=SETUP_CALL_TIMEOUT_S,
                )


async def create_raw_tables(workload: Workload) -> None:
    """Fresh bench_ tables on every shard, seeded with the same accounts as the service's."""
    for name, dsn in workload.shard_dsns:
        mine = [m.merchant_id for m in workload.merchants if m.shard == name]
        connection = await asyncpg.connect(dsn, timeout=SETUP_CALL_TIMEOUT_S)
        try:
            async with connection.transaction():
                await connection.execute(raw_sql.DROP_TABLES)
                await connection.execute(raw_sql.DROP_PGBENCH_MERCHANTS)
                await connection.execute(raw_sql.CREATE_TABLES)
                await connection.execute(raw_sql.CREATE_PGBENCH_MERCHANTS)
                await connection.execute(raw_sql.INSERT_PGBENCH_MERCHANTS, mine)
                await connection.execute(
                    raw_sql.INSERT_ACCOUNTS,
                    [m for m in mine for _ in ACCOUNT_IDS],
                    [a for _ in mine for a in ACCOUNT_IDS],
                    timeout=SETUP_CALL_TIMEOUT_S,
                )
            # The service's tables get analysed by autovacuum as they grow; the
            # baseline starts with statistics too.
            await connection.execute(
                f"ANALYZE bench_accounts, {raw_sql.PGBENCH_MERCHANTS_TABLE}, accounts"
            )
        finally:
            await connection.close()


async def drop_raw_tables(dsns: Iterable[str]) -> None:
    for dsn in dsns:
        connection = await asyncpg.connect(dsn, timeout=SETUP_CALL_TIMEOUT_S)
        try:
            await connection.execute(raw_sql.DROP_TABLES)
            await connection.execute(raw_sql.DROP_PGBENCH_MERCHANTS)
        finally:
            await connection.close()


def _one_dsn_per_server(dsns: Iterable[str]) -> dict[str, str]:
    servers: dict[str, str] = {}
    for dsn in dsns:
        parts = urlsplit(dsn)
        servers.setdefault(f"{parts.hostname}:{parts.port}", dsn)
    return servers


# Bytes of WAL written since the server started, and full-page images among them
# (pg_stat_wal, PostgreSQL 14 on; reset only by pg_stat_reset_shared).
WAL_WRITTEN = """
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS position,
       (SELECT wal_fpi FROM pg_stat_wal) AS full_page_images
"""


async def wal_written(dsns: Iterable[str]) -> tuple[int, int]:
    """(WAL position in bytes, full-page images so far) summed over the servers:
    the difference across a phase is the WAL its writes cost."""
    position = images = 0
    for dsn in _one_dsn_per_server(dsns).values():
        connection = await asyncpg.connect(dsn, timeout=SETUP_CALL_TIMEOUT_S)
        try:
            row = await connection.fetchrow(WAL_WRITTEN, timeout=SETUP_CALL_TIMEOUT_S)
        finally:
            await connection.close()
        assert row is not None
        position += row["position"]
        images += row["full_page_images"]
    return position, images


async def checkpoint(dsns: Iterable[str]) -> list[str]:
    """CHECKPOINT once per PostgreSQL server; returns the servers that refused it."""
    refused = []
    for server, dsn in _one_dsn_per_server(dsns).items():
        connection = await asyncpg.connect(dsn, timeout=SETUP_CALL_TIMEOUT_S)
        try:
            await connection.execute("CHECKPOINT", timeout=SETUP_CALL_TIMEOUT_S)
        except asyncpg.InsufficientPrivilegeError:
            refused.append(server)
        finally:
            await connection.close()
    return refused

"""The system under test: one PostgreSQL server per shard, a proxy in front of each,
and the service replicas as real processes, with the faults the nemesis injects.

The replicas' shard config points at the proxies (service.toml); the checker reads
the shards directly (direct.toml), so a fault never hides what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc

from chaos.checkpoints import CheckpointKeyring
from chaos.plan import REPLICA_NAMES, SHARD_NAMES
from chaos.proxy import TcpProxy
from ledger.embedded.postgres import EmbeddedPostgres, EmbeddedPostgresError
from ledger.embedded.service_process import (
    ServiceExited,
    ServiceNotServing,
    spawn_service,
    wait_serving,
)
from ledger.routing.config import ShardConfig, ShardSpec, render_config
from ledger.v1 import ledger_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "ledger"
# A replica connects to and migrates every shard before it serves: seconds, or more
# on a loaded machine while another replica or a shard is starting.
SERVICE_START_DEADLINE_S = 60.0
# After SIGINT a replica lets in-flight calls finish (limits.shutdown_grace_s = 5 s)
# and closes its pools; past this it is killed.
SERVICE_STOP_DEADLINE_S = 30.0
# A replica that exits at start is started again, as a process supervisor would,
# after this pause, until this deadline; past it the run fails.
REPLICA_RESTART_PAUSE_S = 0.5
REPLICA_RESTART_DEADLINE_S = 60.0
# pg_ctl and initdb run in a forked child of a process with gRPC threads, where
# gRPC's fork handlers now and then crash the child before it execs (nothing was
# done then); one more try is safe (as tests/test_saga_faults.py does).
PG_CTL_ATTEMPTS_MAX = 2
# Every replica gets these. A killed replica's sagas are resumed by the other once
# its lease runs out, and saga back-off is capped, so recovery takes seconds here
# rather than the production defaults' tens of seconds.
# `ledger shards rebalance` is run again after a failure (a shard down, a kill,
# merchants deferred, another run still holding the lock) after this pause,
# until it finishes or this deadline passes.
REBALANCE_RETRY_PAUSE_S = 0.5
REBALANCE_DEADLINE_S = 30.0
# How a fault's detail marks a rebalance left unfinished at that deadline (counted in
# the run's summary: moves deferred by holds that nobody settled meanwhile).
UNFINISHED_MARK = "; unfinished: "
# A drain reruns `ledger shards rebalance` (settling the holds its shard relays
# between runs) until it says DRAINED, or this passes: then the drain did not
# finish, which the run reports as a violation. Each run moves the shard's
# merchants (deferring those with sagas in flight, up to ~5 s) and starts a
# Python process, several times over on a loaded 2-core machine; a shard stopped
# or partitioned meanwhile (up to 5 s) makes runs fail until it is back.
DRAIN_DEADLINE_S = 60.0
# One run of an admin command is killed past this.
ADMIN_COMMAND_DEADLINE_S = 120.0
# Connections a replica's start opens per worker when it runs several: the kernel
# places each on a worker by its address, so a few per worker give every worker calls.
CHANNELS_PER_WORKER = 3
SERVICE_ENV = {
    "GRPC_ENABLE_FORK_SUPPORT": "false",
    "LEDGER_METRICS_LISTEN": "off",
    "LEDGER_SAGA_LEASE_S": "2",
    "LEDGER_SAGA_RETRY_DELAY_S_MAX": "1",
    "PYTHONUNBUFFERED": "1",
}


ShardState = Literal["active", "draining", "retired"]


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What a drain came to: finished once a rebalance said DRAINED within the deadline."""

    finished: bool
    epoch: int
    runs: tuple[str, ...]
    # The rebalance's last DRAINING/DRAINED/NOT MOVED lines.
    last_lines: tuple[str, ...]
    # What the between-runs step did each time (settled holds, ...).
    steps: tuple[str, ...]
    elapsed_s: float

    def describe(self) -> str:
        outcome = "DRAINED" if self.finished else "NOT DRAINED"
        return (
            f"epoch {self.epoch}: {outcome} after {self.elapsed_s:.1f}s, "
            f"{', '.join(_runs_of(self.runs))}; "
            f"between runs: {'; '.join(_runs_of(self.steps)) or 'nothing'}; "
            f"last: {list(self.last_lines)}"
        )


def _runs_of(items: tuple[str, ...]) -> list[str]:
    """Items with each run of equal neighbours said once ("exit 1 x 12")."""
    said: list[str] = []
    for item, group in itertools.groupby(items):
        count = len(list(group))
        said.append(f"{item} x {count}" if count > 1 else item)
    return said


class HarnessError(RuntimeError):
    """The test system itself could not be set up or driven (not a finding about the service)."""


class ReplicaExited(HarnessError):
    """A replica exited before it served; reason is the last line of its log."""

    def __init__(self, name: str, code: int, reason: str) -> None:
        super().__init__(f"{name} exited {code} at start: {reason}")
        self.reason = reason


def _children(pid: int) -> list[int]:
    """The child processes of pid (Linux)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class Replica:
    """`python -m ledger.cli serve` in a child process, and a stub for its current port."""

    name: str
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub | None = None
    admin: ledger_pb2_grpc.LedgerAdminServiceStub | None = None
    starts: int = 0
    # Settings given to every start on top of SERVICE_ENV (the cluster's checkpoint
    # keys: one dict shared by the replicas, changed when the key is rotated), and
    # what the current process got.
    env: dict[str, str] = field(default_factory=dict)
    started_env: dict[str, str] = field(default_factory=dict)
    # Starts that ended before serving, with the reason each gave.
    failed_starts: list[str] = field(default_factory=list)
    # Service processes on the replica's port (`ledger serve --workers`): the kernel
    # spreads connections over them, so each start opens CHANNELS_PER_WORKER
    # connections per worker and clients take them in turn.
    workers: int = 1
    stubs: list[ledger_pb2_grpc.LedgerServiceAsyncStub] = field(default_factory=list)
    _next_stub: int = 0
    # Every channel ever opened; the old ones fail fast after a kill and are closed
    # only at the end, so a client mid-call never sees its channel closed under it.
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def start(self) -> None:
        if self.running:
            raise HarnessError(f"{self.name} is already running")
        self.started_env = dict(self.env)
        env = {**os.environ, **SERVICE_ENV, **self.started_env}
        self.process, offset = spawn_service(
            self.config_path, self.log_path, env=env, cwd=ROOT, workers=self.workers
        )
        try:
            self.port = await wait_serving(
                self.process, self.log_path, offset, deadline_s=SERVICE_START_DEADLINE_S
            )
        except ServiceExited as exited:
            lines = [line.strip() for line in exited.output.splitlines() if line.strip()]
            reason = lines[-1] if lines else "no output"
            raise ReplicaExited(self.name, exited.returncode, reason) from None
        except ServiceNotServing:
            raise HarnessError(
                f"{self.name} not serving after {SERVICE_START_DEADLINE_S}s"
            ) from None
        # A channel argument of its own keeps each channel on a connection of its own.
        channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{self.port}", options=[("chaos.connection", self.starts * 1000 + i)]
            )
            for i in range(self.workers * CHANNELS_PER_WORKER if self.workers > 1 else 1)
        ]
        self._channels.extend(channels)
        self.stubs = [ledger_pb2_grpc.LedgerServiceStub(c) for c in channels]
        self.stub = self.stubs[0]
        self.admin = ledger_pb2_grpc.LedgerAdminServiceStub(channels[0])
        self.starts += 1

    def any_stub(self) -> ledger_pb2_grpc.LedgerServiceAsyncStub | None:
        """The next of the current start's stubs, in turn (None before the first start)."""
        if not self.stubs:
            return None
        self._next_stub = (self._next_stub + 1) % len(self.stubs)
        return self.stubs[self._next_stub]

    async def start_supervised(self) -> None:
        """Starts the replica, and again after each exit at start, until the deadline."""
        deadline = time.monotonic() + REPLICA_RESTART_DEADLINE_S
        while True:
            try:
                await self.start()
                return
            except ReplicaExited as error:
                self.failed_starts.append(error.reason)
                if time.monotonic() > deadline:
                    raise
            # A supervisor's back-off between restarts (it paces, it waits for nothing).
            await asyncio.sleep(REPLICA_RESTART_PAUSE_S)

    async def kill(self) -> None:
        """SIGKILL, as a crash would: the replica's every process (its workers first,
        which would otherwise stop gracefully once their parent is gone)."""
        if self.process is not None and self.process.poll() is None:
            for pid in _children(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.send_signal(signal.SIGKILL)
        await self._wait_exit()

    async def stop(self) -> None:
        """SIGINT (graceful), then SIGKILL past the deadline."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        await self._wait_exit()

    async def _wait_exit(self) -> None:
        process = self.process
        if process is None:
            return
        try:
            await asyncio.to_thread(process.wait, SERVICE_STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, SERVICE_STOP_DEADLINE_S)

    async def close_channels(self) -> None:
        channels, self._channels = self._channels, []
        for channel in channels:
            await channel.close(None)


@dataclass
class ShardServer:
    name: str
    postgres: EmbeddedPostgres
    proxy: TcpProxy | None = None

    @property
    def direct_dsn(self) -> str:
        return self.postgres.dsn(DATABASE)

    @property
    def proxied_dsn(self) -> str:
        assert self.proxy is not None
        return f"postgresql://postgres@127.0.0.1:{self.proxy.port}/{DATABASE}"


async def _pg_ctl(action: Callable[[], None]) -> None:
    """A blocking PostgreSQL server action off the event loop, retried as above."""
    for attempt in range(1, PG_CTL_ATTEMPTS_MAX + 1):
        try:
            await asyncio.to_thread(action)
            return
        except EmbeddedPostgresError:
            if attempt == PG_CTL_ATTEMPTS_MAX:
                raise


# The lines of a rebalance summary that say what is left to do.
_SUMMARY_PREFIXES = ("moved ", "NOT ", "DRAINING ", "DRAINED ")


# How much of a failed run's last line a summary keeps.
RUN_ERROR_CHARS_MAX = 300


def _run_summary(code: int, output: str) -> str:
    """One `ledger shards rebalance` run: how it ended and what it moved."""
    ended = "killed" if code == -signal.SIGKILL else f"exit {code}"
    moved = [ln.split(",")[0] for ln in output.splitlines() if ln.startswith("moved ")]
    if moved:
        return f"{ended} ({moved[-1]})"
    # A run that ended without its summary (an error, such as a shard stopped under
    # it by another fault): the merchants its progress lines say it moved before
    # that, and what it said last. Its rerun finds those moved already.
    progress_moved = sum(1 for ln in output.splitlines() if ": moved, " in ln)
    said = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if not code or not said:
        return ended
    return f"{ended} (moved {progress_moved} merchants) [{said[-1][:RUN_ERROR_CHARS_MAX]}]"


class ChaosCluster:
    """Three shard servers behind proxies and two replicas, all under base_dir."""

    def __init__(self, base_dir: Path, *, workers: int = 1) -> None:
        self.base_dir = base_dir
        self.shards = {
            name: ShardServer(name, EmbeddedPostgres(data_dir=base_dir / "pg" / name, durable=True))
            for name in SHARD_NAMES
        }
        self.service_config_path = base_dir / "service.toml"
        self.direct_config_path = base_dir / "direct.toml"
        self.keyring = CheckpointKeyring(base_dir / "checkpoints")
        self.replicas = [
            Replica(
                name,
                self.service_config_path,
                base_dir / f"{name}.log",
                env=self.keyring.env,
                workers=workers,
            )
            for name in REPLICA_NAMES
        ]
        # The cluster's config: rebalances raise the epoch and change weights,
        # drains a shard's state.
        self.epoch = 1
        self.weights = dict.fromkeys(SHARD_NAMES, 1)
        self.states: dict[str, ShardState] = dict.fromkeys(SHARD_NAMES, "active")

    def replica(self, name: str) -> Replica:
        for replica in self.replicas:
            if replica.name == name:
                return replica
        raise KeyError(name)

    @property
    def direct_config(self) -> ShardConfig:
        return self._config(direct=True)

    def _config(self, *, direct: bool) -> ShardConfig:
        return ShardConfig(
            epoch=self.epoch,
            shards=tuple(
                ShardSpec(
                    name=s.name,
                    dsn=s.direct_dsn if direct else s.proxied_dsn,
                    weight=self.weights[s.name],
                    state=self.states[s.name],
                )
                for s in self.shards.values()
            ),
        )

    def write_configs(self) -> None:
        """The replicas' config (through the proxies; they reload it when it changes)
        and the checker's (straight to the shards)."""
        self.service_config_path.write_text(render_config(self._config(direct=False)))
        self.direct_config_path.write_text(render_config(self.direct_config))

    def reconfigure(
        self, *, weights: dict[str, int] | None = None, states: dict[str, ShardState] | None = None
    ) -> None:
        """A new config at the next epoch over the live file (the replicas reload it)."""
        self.epoch += 1
        if weights is not None:
            self.weights = dict(weights)
        if states is not None:
            self.states = dict(states)
        self.write_configs()

    async def rebalance(
        self,
        weights: dict[str, int],
        *,
        kill_after_s: float | None,
        states: dict[str, ShardState] | None = None,
    ) -> str:
        """The admin's workflow: a new config (next epoch) over the live file, then
        `ledger shards rebalance`, run again until it finishes (the first run killed
        after kill_after_s, if given). Returns what it took."""
        self.reconfigure(weights=weights, states=states)
        _, runs = await self._rebalance_until_finished(kill_after_s)
        return runs

    async def retire(self, name: str) -> tuple[bool, str]:
        """A drained shard's last step: `state = "retired"` (next epoch), then `ledger
        shards rebalance` until it says the shard is RETIRED. It is refused (exit 2)
        until every event consumer registered there has acknowledged the shard's stream
        to its end. A run may say RETIRED and exit 1 for a move between other shards
        that waits for a hold (chaos seed 294): the shard is retired all the same.
        Returns whether it finished, and what it took."""
        self.reconfigure(states={**self.states, name: "retired"})
        said = f"RETIRED {name}:"
        return await self._rebalance_until_finished(
            None, done=lambda code, output: any(ln.startswith(said) for ln in output.splitlines())
        )

    async def finish_moves(self) -> str:
        """After the run's holds are settled: `ledger shards rebalance` again until it
        finishes, as an admin reruns one that deferred merchants whose holds could not
        move yet, then `ledger shards cleanup` for the copies those moves leave."""
        _, runs = await self._rebalance_until_finished(None)
        return f"{runs}; cleanup: {await self.cleanup()}"

    async def _rebalance_until_finished(
        self,
        kill_after_s: float | None,
        *,
        done: Callable[[int, str], bool] = lambda code, output: code == 0,
    ) -> tuple[bool, str]:
        """Runs `ledger shards rebalance` until done(exit code, output) (by default:
        it exits 0) or the deadline passes: (finished, what the runs did)."""
        deadline = time.monotonic() + REBALANCE_DEADLINE_S
        runs: list[str] = []
        while True:
            kill = kill_after_s if not runs else None
            code, output = await self._admin("shards", "rebalance", kill_after_s=kill)
            # Every run's moves are reported: a run that exits 1 (a merchant deferred)
            # has moved others, and the rerun that exits 0 may move none.
            runs.append(_run_summary(code, output))
            if done(code, output):
                return True, f"epoch {self.epoch}: {', '.join(runs)}"
            if time.monotonic() > deadline:
                # Merchants with holds that cannot move yet stay deferred: the next
                # rebalance (or none) takes it from there.
                last = [ln for ln in output.splitlines() if ln.startswith(("moved", "NOT"))]
                return False, f"epoch {self.epoch}: {', '.join(runs)}{UNFINISHED_MARK}{last}"
            await asyncio.sleep(REBALANCE_RETRY_PAUSE_S)

    async def drain(
        self, name: str, *, between_runs: Callable[[int, tuple[str, ...]], Awaitable[str]]
    ) -> DrainResult:
        """The admin's drain: `state = "draining"` for shard name (next epoch), then
        `ledger shards rebalance` until it says DRAINED, or the deadline
        passes. between_runs(round, summary) runs after each unfinished run, with
        that run's summary lines (the callers settling what the shard still relays
        and the holds its merchants' moves wait for) and says what it did."""
        if self.states[name] != "active":
            raise HarnessError(f"{name} is {self.states[name]}, not active: nothing to drain")
        self.reconfigure(states={**self.states, name: "draining"})
        started = time.monotonic()
        deadline = started + DRAIN_DEADLINE_S
        runs: list[str] = []
        steps: list[str] = []
        last: tuple[str, ...] = ()
        while True:
            code, output = await self._admin("shards", "rebalance", kill_after_s=None)
            lines = [ln for ln in output.splitlines() if ln.startswith(_SUMMARY_PREFIXES)]
            runs.append(_run_summary(code, output))
            last = tuple(lines) or tuple(output.strip().splitlines()[-1:])
            # The summary's line for this shard says whether it is drained; the exit
            # code also counts moves between other shards (one deferred for a hold
            # elsewhere makes a run that drained the shard exit 1).
            if any(ln.startswith(f"DRAINED {name}:") for ln in lines):
                return DrainResult(
                    True, self.epoch, tuple(runs), last, tuple(steps), time.monotonic() - started
                )
            if time.monotonic() > deadline:
                return DrainResult(
                    False, self.epoch, tuple(runs), last, tuple(steps), time.monotonic() - started
                )
            step = await between_runs(len(runs), last)
            if step:
                steps.append(step)
            # Paces the reruns, as REBALANCE_RETRY_PAUSE_S does for rebalances.
            await asyncio.sleep(REBALANCE_RETRY_PAUSE_S)

    async def cleanup(self) -> str:
        """`ledger shards cleanup`: old copies of moved merchants go. Run again while
        another admin run holds the lock (exit 2), as an admin would, until the
        deadline: a killed rebalance's lock lasts until its server notices."""
        deadline = time.monotonic() + REBALANCE_DEADLINE_S
        while True:
            code, output = await self._admin("shards", "cleanup", kill_after_s=None, direct=True)
            if code != 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(REBALANCE_RETRY_PAUSE_S)
        if code != 0:
            raise HarnessError(f"cleanup failed ({code}): {output[-800:]}")
        return output.strip().splitlines()[-1] if output.strip() else ""

    async def _admin(
        self, *args: str, kill_after_s: float | None, direct: bool = False
    ) -> tuple[int, str]:
        config = self.direct_config_path if direct else self.service_config_path
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ledger.cli",
            *args,
            "--config",
            str(config),
            cwd=ROOT,
            env={**os.environ, **SERVICE_ENV},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        wait_s = kill_after_s if kill_after_s is not None else ADMIN_COMMAND_DEADLINE_S
        try:
            output, _ = await asyncio.wait_for(process.communicate(), wait_s)
        except TimeoutError:
            process.kill()
            output, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, output.decode(errors="replace")

    async def start(self) -> None:
        """Shards (at once), proxies, configs, then the replicas one after the other
        (the first migrates the shards)."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.gather(*(self._start_new_shard(s) for s in self.shards.values()))
        for shard in self.shards.values():
            shard.proxy = TcpProxy(
                name=shard.name, upstream_host="127.0.0.1", upstream_port=shard.postgres.port
            )
            await shard.proxy.start()
        self.write_configs()
        for replica in self.replicas:
            await replica.start()

    async def _start_new_shard(self, shard: ShardServer) -> None:
        await _pg_ctl(shard.postgres.start)
        await _pg_ctl(lambda: shard.postgres.create_database(DATABASE))

    # Faults and their repair.

    async def stop_shard(self, name: str) -> None:
        """pg_ctl stop -m immediate: every backend dies at once, as in a crash."""
        postgres = self.shards[name].postgres
        await _pg_ctl(lambda: postgres.stop(mode="immediate"))

    async def start_shard(self, name: str) -> None:
        await _pg_ctl(self.shards[name].postgres.start)

    def proxy(self, name: str) -> TcpProxy:
        proxy = self.shards[name].proxy
        assert proxy is not None, "proxies start with the cluster"
        return proxy

    async def heal(self) -> list[str]:
        """Everything back: proxies clean, every shard up, every replica serving.
        Returns what had to be repaired."""
        repaired = []
        for name, shard in self.shards.items():
            if shard.proxy is not None and not shard.proxy.clean:
                shard.proxy.heal()
                repaired.append(f"proxy {name} cleaned")
            if not shard.postgres.is_running():
                await self.start_shard(name)
                repaired.append(f"shard {name} started")
        for replica in self.replicas:
            if not replica.running:
                await replica.start_supervised()
                repaired.append(f"{replica.name} started")
        return repaired

    async def restart_with_current_keys(self) -> list[str]:
        """The end of a rolling key rotation: each replica still on older checkpoint
        settings is stopped and started again, one after the other."""
        restarted = []
        for replica in self.replicas:
            if replica.started_env != self.keyring.env:
                await replica.stop()
                await replica.start_supervised()
                restarted.append(f"{replica.name} restarted with the rotated checkpoint key")
        return restarted

    async def close(self) -> list[str]:
        """Stops everything, whatever state it is in; returns what could not be stopped."""
        problems: list[str] = []
        await _each(problems, [r.stop for r in self.replicas])
        await _each(problems, [r.close_channels for r in self.replicas])
        await _each(problems, [s.proxy.close for s in self.shards.values() if s.proxy])
        await _each(problems, [self._stopper(name) for name in self.shards])
        return problems

    def _stopper(self, name: str) -> Callable[[], Awaitable[None]]:
        async def stop() -> None:
            postgres = self.shards[name].postgres
            if postgres.data_dir.exists():
                await _pg_ctl(lambda: postgres.stop(mode="immediate"))

        return stop


async def _each(problems: list[str], actions: list[Callable[[], Awaitable[None]]]) -> None:
    """Runs every action even when some fail; notes the failures."""
    for action in actions:
        try:
            await action()
        except Exception as error:
            problems.append(f"{type(error).__name__}: {error}")

"""Several service processes on one port: `ledger serve --workers N`.

One Python process uses one core at most (the event loop and the GIL), so a
replica on a machine with more cores runs N worker processes that all listen
on the same address (SO_REUSEPORT). Each is a whole service: its own shard
pools (limits.pool_connections_max split between them, so a replica keeps its
connection count), its own group commit, saga runner and background workers.
Nothing is shared between them in memory; what they must agree on (fences,
saga claims, idempotency) is already decided in PostgreSQL, as between
replicas.

The kernel spreads incoming *connections* over the listening processes, not
calls: a client with one HTTP/2 connection reaches one worker. Callers that want
the whole replica open several connections (the bench opens one per caller).

The parent (this module's supervise) validates the settings, starts the
embedded PostgreSQL when there is no config, reserves the port (a bound socket
that never listens, so port 0 resolves once for all workers), starts the
workers, says "ledger serving on HOST:PORT" once every worker serves, forwards
SIGHUP, and on SIGINT/SIGTERM stops them all (each lets its in-flight calls
finish) before it stops PostgreSQL. If a worker dies, the parent stops the rest
and exits 1: the replica is restarted whole by whatever runs it, rather than
serving on in part.

Keys a lone process would make at random (page tokens, pseudonyms) are made
once by the parent when unset and shared by its workers.

Each worker's metrics are its own: with LEDGER_METRICS_LISTEN host:P worker i
serves them on host:P+i (port 0: each picks one and logs it), so Prometheus
scrapes N targets and sums them, as it does for replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ledger import limits
from ledger.telemetry.pseudonym import PSEUDONYM_KEY_ENV

log = logging.getLogger(__name__)

# The parent's side of the protocol with its workers (environment variables):
# which worker this is, of how many; the pipe to write "ready" to once serving;
# the pipe whose end of file means the parent is gone.
WORKER_INDEX_ENV = "LEDGER_WORKER_INDEX"
WORKER_COUNT_ENV = "LEDGER_WORKER_COUNT"
WORKER_READY_FD_ENV = "LEDGER_WORKER_READY_FD"
WORKER_LIFELINE_FD_ENV = "LEDGER_WORKER_LIFELINE_FD"
PAGE_TOKEN_KEY_ENV = "LEDGER_PAGE_TOKEN_KEY"


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process knows of its place, from its environment."""

    index: int
    count: int
    ready_fd: int
    lifeline_fd: int

    @classmethod
    def from_env(cls) -> WorkerRole | None:
        if WORKER_INDEX_ENV not in os.environ:
            return None
        return cls(
            index=int(os.environ[WORKER_INDEX_ENV]),
            count=int(os.environ[WORKER_COUNT_ENV]),
            ready_fd=int(os.environ[WORKER_READY_FD_ENV]),
            lifeline_fd=int(os.environ[WORKER_LIFELINE_FD_ENV]),
        )

    def pool_connections_max(self) -> int:
        return pool_share(self.count)

    def report_ready(self, port: int) -> None:
        os.write(self.ready_fd, f"{self.index} {os.getpid()} {port}\n".encode())
        os.close(self.ready_fd)

    def watch_parent(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """Stops this worker when the parent's end of the lifeline closes (it died)."""

        def parent_gone() -> None:
            loop.remove_reader(self.lifeline_fd)
            log.error("worker %d: the parent process is gone; stopping", self.index)
            stop.set()

        loop.add_reader(self.lifeline_fd, parent_gone)


def default_count() -> int:
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def pool_share(count: int) -> int:
    """Connections per shard for each of count workers: the replica's limit, split."""
    return max(1, -(-limits.pool_connections_max // count))


def metrics_listen_of(listen: str, index: int) -> str:
    """Worker index's metrics address: host:P+index, or as given for "off" and port 0."""
    if listen == "off":
        return listen
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return listen
    return f"{host}:{int(port) + index}"


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """A socket bound to listen with SO_REUSEPORT and never listening: it fixes the
    port (port 0 picks one) for the workers, who bind it too. Returns it and host:port."""
    host, _, port = listen.rpartition(":")
    bare_host = host.strip("[]") or "0.0.0.0"
    family, kind, proto, _, address = socket.getaddrinfo(
        bare_host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    reserved = socket.socket(family, kind, proto)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(address)
    except OSError:
        reserved.close()
        raise
    bound_port = reserved.getsockname()[1]
    return reserved, f"{host}:{bound_port}"


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    lifeline_w: int


async def supervise(
    *,
    count: int,
    listen: str,
    config_path: Path,
    metrics_listen: str,
    extra_args: Sequence[str] = (),
) -> int:
    """Runs count workers on listen until SIGINT/SIGTERM or a worker's death; returns
    the exit code (0 after a requested stop, 1 if a worker died or did not start)."""
    reserved, address = reserve_port(listen)
    shared = _replica_keys(os.environ)
    workers: list[_Worker] = []
    ready_r, ready_w = os.pipe()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _signal_all(workers, signal.SIGHUP))
    try:
        for index in range(count):
            lifeline_r, lifeline_w = os.pipe()
            env = {
                **os.environ,
                WORKER_INDEX_ENV: str(index),
                WORKER_COUNT_ENV: str(count),
                WORKER_READY_FD_ENV: str(ready_w),
                WORKER_LIFELINE_FD_ENV: str(lifeline_r),
                **shared,
                "LEDGER_METRICS_LISTEN": metrics_listen_of(metrics_listen, index),
            }
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ledger.cli", "serve",
                "--config", str(config_path), "--listen", address, "--workers", "1",
                *extra_args,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(ready_w, lifeline_r),
            )  # fmt: skip
            os.close(lifeline_r)
            workers.append(_Worker(index, process, lifeline_w))
        os.close(ready_w)
        ready_w = -1
        served = await _wait_ready(ready_r, workers, stop)
        if served:
            host = address.rsplit(":", 1)[0]
            port = int(address.rsplit(":", 1)[1])
            log.info(
                "ledger serving on %s:%d (config %s, %d workers)", host, port, config_path, count
            )
            exited = [asyncio.ensure_future(w.process.wait()) for w in workers]
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([stopping, *exited], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stopping not in done:
                dead = next(w for w in workers if w.process.returncode is not None)
                log.error(
                    "worker %d (pid %d) exited with %s: stopping the others",
                    dead.index, dead.process.pid, dead.process.returncode,
                )  # fmt: skip
                served = False
        log.info("stopping %d workers", count)
        await _stop_all(workers)
        # A stop asked for while the workers were starting is a clean stop too.
        return 0 if served or stop.is_set() else 1
    finally:
        for worker in workers:
            if worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()
            os.close(worker.lifeline_w)
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
        reserved.close()


def _replica_keys(env: Mapping[str, str]) -> dict[str, str]:
    """Keys a process makes at random when they are not set, made once here so that
    every worker of the replica uses the same: a page token from one worker is
    then valid on the others (a client's next connection may reach another), and
    a merchant has one pseudonym in all of the replica's telemetry."""
    keys = {}
    for name in (PAGE_TOKEN_KEY_ENV, PSEUDONYM_KEY_ENV):
        if not env.get(name):
            log.warning("%s is not set: the workers share a random key made for this replica", name)
            keys[name] = secrets.token_hex(32)
    return keys


async def _wait_ready(ready_r: int, workers: list[_Worker], stop: asyncio.Event) -> bool:
    """True once every worker wrote its ready line; False if one exited, a stop was
    asked for, or limits.worker_start_timeout_s passed first."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(ready_r), "rb")
    )
    pending = {w.index for w in workers}
    try:
        async with asyncio.timeout(limits.worker_start_timeout_s):
            for _ in range(len(workers)):
                line = asyncio.ensure_future(reader.readline())
                stopping = asyncio.ensure_future(stop.wait())
                exits = [asyncio.ensure_future(w.process.wait()) for w in workers]
                done, _ = await asyncio.wait(
                    [line, stopping, *exits], return_when=asyncio.FIRST_COMPLETED
                )
                for future in (stopping, *exits):
                    future.cancel()
                if line not in done:
                    line.cancel()
                    if not stop.is_set():
                        log.error("a worker exited before it served")
                    return False
                fields = line.result().split()
                if not fields:
                    log.error("the workers' ready pipe closed early")
                    return False
                pending.discard(int(fields[0]))
                log.info("worker %s (pid %s) serving on port %s", *(f.decode() for f in fields))
    except TimeoutError:
        log.error(
            "workers %s not serving after %.0f s", sorted(pending), limits.worker_start_timeout_s
        )
        return False
    finally:
        transport.close()
    return not pending


def _signal_all(workers: list[_Worker], signum: int) -> None:
    for worker in workers:
        if worker.process.returncode is None:
            worker.process.send_signal(signum)


async def _stop_all(workers: list[_Worker]) -> None:
    """SIGTERM to every worker; each lets in-flight calls finish within the shutdown
    grace; any still running after limits.worker_stop_timeout_s is killed."""
    _signal_all(workers, signal.SIGTERM)
    waits = [w.process.wait() for w in workers if w.process.returncode is None]
    if not waits:
        return
    try:
        async with asyncio.timeout(limits.worker_stop_timeout_s):
            await asyncio.gather(*waits)
    except TimeoutError:
        for worker in workers:
            if worker.process.returncode is None:
                log.error("worker %d did not stop in time: killing it", worker.index)
                worker.process.kill()

"""One PostgreSQL server on 127.0.0.1, run from binaries that pip installed.

The `pgserver` wheel bundles PostgreSQL binaries; we run them directly (initdb, pg_ctl,
pg_isready, psql) instead of through pgserver's own server class, because we need TCP on a
known port, our own settings and explicit control over start and stop.

Authentication is `trust` on 127.0.0.1: anyone on this machine can connect as the superuser.
That is the point for development and tests, and the reason this is never a production setup.

PostgreSQL refuses to run as root. When this process is root (CI containers), the server runs as
the system user `ledgerpg`, created on first use; the data directory is handed to that user and
every folder above it and above the binaries is made traversable (search permission only).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pwd
import re
import shlex
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

__all__ = [
    "PG_BIN_ENV_VAR",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "find_bin_dir",
]

# --- Limits: every wait is bounded; each says why it is as long as it is. ---

# Starting includes crash recovery after an immediate stop, which replays WAL; on a loaded CI
# machine that takes seconds, rarely tens of seconds. Past a minute something is broken.
START_TIMEOUT_S: Final = 60.0
# A fast stop ends with a shutdown checkpoint that writes every dirty buffer (up to
# shared_buffers = 128MB) and, when durable, fsyncs it; slow disks need tens of seconds.
STOP_TIMEOUT_S: Final = 60.0
# initdb writes and (when durable) fsyncs three template databases, ~40MB on slow CI disks.
INITDB_TIMEOUT_S: Final = 120.0
# psql here runs catalogue lookups and CREATE DATABASE, which copies the small template1.
PSQL_TIMEOUT_S: Final = 30.0
# Databases one psql call drops: each drop waits for a checkpoint (a second or two on
# a loaded machine), so a few fit well inside PSQL_TIMEOUT_S.
DROP_DATABASES_PER_PSQL_MAX: Final = 4
# libpq's connect_timeout takes whole seconds; a local server answers in milliseconds.
PSQL_CONNECT_TIMEOUT_S: Final = 10
# pg_isready's own timeout, in whole seconds, for one readiness probe of a local server.
READY_PROBE_TIMEOUT_S: Final = 2
# Pause between readiness probes: short enough to add no visible latency to start().
READY_POLL_INTERVAL_S: Final = 0.1
# useradd edits /etc/passwd and /etc/group; it finishes in milliseconds unless something is wrong.
USERADD_TIMEOUT_S: Final = 30.0
# pg_ctl enforces its own -t; this margin lets it report its own error before we kill it.
SUBPROCESS_GRACE_S: Final = 10.0
# The end of postgres.log that explains a failed start, small enough for an exception message.
LOG_TAIL_BYTES_MAX: Final = 8192
# A free port we just picked can be taken by another process before postgres binds it; try a
# few fresh ports, never forever.
PORT_PICK_ATTEMPTS_MAX: Final = 3


def _check_limits() -> None:
    # Relationships between the limits, checked at import so a bad edit fails loudly.
    if not READY_POLL_INTERVAL_S < READY_PROBE_TIMEOUT_S < START_TIMEOUT_S:
        raise AssertionError("readiness polling must fit many times inside START_TIMEOUT_S")
    if not PSQL_CONNECT_TIMEOUT_S < PSQL_TIMEOUT_S:
        raise AssertionError("psql must be able to connect before its overall timeout")
    if PORT_PICK_ATTEMPTS_MAX < 1 or LOG_TAIL_BYTES_MAX < 1024:
        raise AssertionError("port attempts and log tail must be positive and useful")


_check_limits()

# --- Names and settings. ---

PG_BIN_ENV_VAR: Final = "LEDGER_PG_BIN"  # points at a system PostgreSQL's bin/ folder instead
SERVER_USER_WHEN_ROOT: Final = "ledgerpg"
SUPERUSER: Final = "postgres"
LISTEN_HOST: Final = "127.0.0.1"
LOG_FILE_NAME: Final = "postgres.log"
PORT_FILE_NAME: Final = "ledger_port"  # the port chosen once, so restarts keep their DSN
_REQUIRED_BINARIES: Final = ("initdb", "pg_ctl", "postgres", "pg_isready", "psql")
_POSTGRES_PROCESS_NAMES: Final = frozenset({b"postgres", b"postmaster"})
_PG_VERSION_FILE_NAME: Final = "PG_VERSION"
_POSTMASTER_PID_FILE_NAME: Final = "postmaster.pid"
_IDENTIFIER_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DUPLICATE_DATABASE_SQLSTATE: Final = "42P04"
_PORT_MIN: Final = 1
_PORT_MAX: Final = 65535

_SETTINGS_ALWAYS: Final[tuple[tuple[str, str], ...]] = (
    ("listen_addresses", LISTEN_HOST),
    # TCP only: unix socket paths under deep temp dirs exceed the 107-byte limit.
    ("unix_socket_directories", ""),
    # Several shards' pools, saga workers and tests share one server in development.
    ("max_connections", "200"),
    ("shared_buffers", "128MB"),
    # Cross-shard work is a saga, never two-phase commit; 0 forbids forgotten prepared xacts.
    ("max_prepared_transactions", "0"),
    # pg_ctl -l sends the server's stderr to postgres.log; no second logging process.
    ("logging_collector", "off"),
)
# Throwaway test servers trade crash safety of the OS for speed; a process crash still recovers
# (the OS page cache survives), but committed work may be lost on an immediate stop.
_SETTINGS_NOT_DURABLE: Final[tuple[tuple[str, str], ...]] = (
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
)

# Install roots whose permissions this process already fixed, so start() stays cheap.
_permission_fixed_roots: set[Path] = set()
_module_lock = threading.Lock()


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be set up, started, stopped or queried."""


@dataclass(frozen=True, slots=True)
class _ServerUser:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class _PostmasterPid:
    """What postmaster.pid says: line 1 pid, 2 data dir, 4 port, 8 status."""

    pid: int
    data_dir: Path
    port: int | None
    status: str | None


@dataclass(frozen=True, slots=True)
class _CommandResult:
    returncode: int
    output: str


class EmbeddedPostgres:
    """One throwaway-or-persistent PostgreSQL server on 127.0.0.1.

    It runs from the binaries pip installed (or those in $LEDGER_PG_BIN), keeps its data, its
    log (postgres.log) and its remembered port in `data_dir`, and reuses a server that already
    runs on that data dir. Methods block; they are safe to call from inside an event loop.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int | None = None,
        durable: bool = True,
        settings: Sequence[tuple[str, str]] = (),
    ) -> None:
        if port is not None and not _PORT_MIN <= port <= _PORT_MAX:
            raise ValueError(f"port must be in [{_PORT_MIN}, {_PORT_MAX}], got {port}")
        # Server settings on top of the defaults (the bench's statement counting).
        self._settings_extra: Final = tuple(settings)
        self._data_dir: Final = Path(data_dir).expanduser().resolve()
        self._port_requested: Final = port
        self._port: int | None = port
        self._durable: Final = durable
        self._bin_dir: Final = find_bin_dir()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"EmbeddedPostgres(data_dir={self._data_dir!s}, port={self._port}, "
            f"durable={self._durable})"
        )

    # --- Public surface. ---

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self._data_dir / LOG_FILE_NAME

    @property
    def port(self) -> int:
        if self._port is not None:
            return self._port
        port_stored = self._read_port_file()
        if port_stored is None:
            raise EmbeddedPostgresError(
                f"no port chosen yet for {self._data_dir}: call start() or pass port="
            )
        self._port = port_stored
        return port_stored

    def dsn(self, database: str = "postgres") -> str:
        _validate_identifier(database, what="database name")
        return f"postgresql://{SUPERUSER}@{LISTEN_HOST}:{self.port}/{database}"

    def start(self) -> None:
        """Initialise the data dir if needed and start the server; reuse one already running."""
        deadline_s = time.monotonic() + START_TIMEOUT_S
        with self._lock:
            running = self._running_postmaster()
            if running is not None:
                self._adopt_running(running)
                self._wait_until_ready(deadline_s=deadline_s)
                return
            self._remove_stale_postmaster_pid()
            self._prepare_data_dir()
            if not (self._data_dir / _PG_VERSION_FILE_NAME).exists():
                self._initdb()
            self._start_with_port_retries(deadline_s=deadline_s)

    def stop(self, *, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server (pg_ctl stop -m mode -w); a no-op when it is not running."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"mode must be 'fast' or 'immediate', got {mode!r}")
        with self._lock:
            if self._running_postmaster() is None:
                return
            self._ensure_traversable()
            result = self._run(
                [
                    *(self._binary("pg_ctl"), "stop", "-D", str(self._data_dir)),
                    *("-m", mode, "-w", "-t", str(math.ceil(STOP_TIMEOUT_S))),
                ],
                timeout_s=STOP_TIMEOUT_S + SUBPROCESS_GRACE_S,
                as_server_user=True,
            )
            # pg_ctl fails if the server stopped on its own meanwhile; that is not an error.
            if self._running_postmaster() is not None:
                raise self._error(f"could not stop the server ({mode})", result)

    def is_running(self) -> bool:
        return self._running_postmaster() is not None

    def _ensure_traversable(self) -> None:
        # Another program (pytest resets /tmp/pytest-of-root to 0700) may have taken away
        # the server user's search permission on the data dir's parents since start().
        if _server_user() is not None:
            _grant_traverse_on_prefixes(self._data_dir)

    def create_database(self, name: str) -> None:
        """Create database `name` unless it exists. Blocks briefly; safe inside an event loop."""
        _validate_identifier(name, what="database name")
        if not self.is_running():
            raise EmbeddedPostgresError(f"server for {self._data_dir} is not running")
        # The name matched a strict pattern, so quoting it as literal and identifier is safe.
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if exists.output.strip() == "1":
            return
        created = self._psql(f'CREATE DATABASE "{name}"', check=False)
        if created.returncode == 0:
            return
        # Another caller created it between our check and our CREATE: that is success too.
        if _DUPLICATE_DATABASE_SQLSTATE not in created.output:
            raise self._error(f"could not create database {name!r}", created)

    def drop_databases(self, names: Sequence[str]) -> None:
        """Drop these databases where they exist, closing their connections (a test
        suite's clean-up: its servers' data would grow with every database made)."""
        for name in names:
            _validate_identifier(name, what="database name")
        # A few per psql, each call within PSQL_TIMEOUT_S: every DROP DATABASE waits
        # for a checkpoint, and 80 at once (a long moves-model run's module) took
        # longer than that on a loaded machine.
        for start in range(0, len(names), DROP_DATABASES_PER_PSQL_MAX):
            chunk = names[start : start + DROP_DATABASES_PER_PSQL_MAX]
            self._psql(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in chunk))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop(mode="fast")

    # --- Start, step by step. ---

    def _adopt_running(self, running: _PostmasterPid) -> None:
        if running.port is None:
            raise EmbeddedPostgresError(f"running server for {self._data_dir} reports no port")
        if self._port_requested is not None and running.port != self._port_requested:
            raise EmbeddedPostgresError(
                f"server for {self._data_dir} already runs on port {running.port}, "
                f"not on the requested port {self._port_requested}"
            )
        self._port = running.port
        if self._read_port_file() != running.port:
            self._write_port_file(running.port)

    def _start_with_port_retries(self, *, deadline_s: float) -> None:
        for attempt in range(1, PORT_PICK_ATTEMPTS_MAX + 1):
            port, picked_now = self._choose_port()
            if not picked_now and not _port_is_free(port):
                raise EmbeddedPostgresError(
                    f"port {port} on {LISTEN_HOST} is in use by another process; "
                    f"cannot start the server for {self._data_dir}"
                )
            try:
                self._start_server(port=port, deadline_s=deadline_s)
                return
            except EmbeddedPostgresError:
                lost_port_race = picked_now and not _port_is_free(port)
                if not lost_port_race or attempt == PORT_PICK_ATTEMPTS_MAX:
                    raise
                self._forget_port()

    def _choose_port(self) -> tuple[int, bool]:
        """The port to start on, and whether it was picked just now (not requested, not stored)."""
        port_stored = self._read_port_file()
        if self._port_requested is not None:
            port, picked_now = self._port_requested, False
        elif port_stored is not None:
            port, picked_now = port_stored, False
        else:
            port, picked_now = _pick_free_port(), True
        if port_stored != port:
            self._write_port_file(port)
        self._port = port
        return port, picked_now

    def _start_server(self, *, port: int, deadline_s: float) -> None:
        settings = (*_SETTINGS_ALWAYS, *self._settings_extra, ("port", str(port)))
        if not self._durable:
            settings = (*settings, *_SETTINGS_NOT_DURABLE)
        # pg_ctl hands -o to /bin/sh, so every setting is shell-quoted.
        server_options = " ".join(f"-c {shlex.quote(f'{key}={value}')}" for key, value in settings)
        timeout_s = max(1.0, deadline_s - time.monotonic())
        result = self._run(
            [
                *(self._binary("pg_ctl"), "start", "-D", str(self._data_dir)),
                *("-w", "-t", str(math.ceil(timeout_s)), "-l", str(self.log_path)),
                *("-o", server_options),
            ],
            timeout_s=timeout_s + SUBPROCESS_GRACE_S,
            as_server_user=True,
        )
        if result.returncode != 0:
            self._stop_half_started()
            raise self._error("could not start the server", result)
        try:
            self._wait_until_ready(deadline_s=deadline_s)
        except EmbeddedPostgresError:
            self._stop_half_started()
            raise

    def _wait_until_ready(self, *, deadline_s: float) -> None:
        """Poll pg_isready until it accepts connections, the postmaster exits or time ends."""
        probe = [
            *(self._binary("pg_isready"), "-h", LISTEN_HOST, "-p", str(self.port)),
            *("-U", SUPERUSER, "-d", "postgres", "-t", str(READY_PROBE_TIMEOUT_S)),
        ]
        result = _CommandResult(returncode=-1, output="")
        while time.monotonic() < deadline_s:
            result = self._run(
                probe,
                timeout_s=READY_PROBE_TIMEOUT_S + SUBPROCESS_GRACE_S,
                as_server_user=False,
            )
            if result.returncode == 0:
                return
            if self._running_postmaster() is None:
                raise self._error("the server exited while starting", result)
            time.sleep(READY_POLL_INTERVAL_S)
        raise self._error(
            f"the server did not accept connections within {START_TIMEOUT_S:.0f} s", result
        )

    def _stop_half_started(self) -> None:
        # A server that started too late or never became ready must not outlive our error.
        if self._running_postmaster() is None:
            return
        self._ensure_traversable()
        self._run(
            [
                *(self._binary("pg_ctl"), "stop", "-D", str(self._data_dir)),
                *("-m", "immediate", "-w", "-t", str(math.ceil(STOP_TIMEOUT_S))),
            ],
            timeout_s=STOP_TIMEOUT_S + SUBPROCESS_GRACE_S,
            as_server_user=True,
        )

    def _prepare_data_dir(self) -> None:
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        server_user = _server_user()
        if server_user is None:
            return
        _ensure_install_readable(self._bin_dir)
        _grant_traverse_on_prefixes(self._data_dir)
        owner_uid = self._data_dir.stat().st_uid
        if owner_uid == server_user.uid:
            return
        if (self._data_dir / _PG_VERSION_FILE_NAME).exists():
            raise EmbeddedPostgresError(
                f"{self._data_dir} holds a cluster owned by uid {owner_uid}, "
                f"not by {server_user.name}; refusing to take it over"
            )
        os.chown(self._data_dir, server_user.uid, server_user.gid)
        self._data_dir.chmod(0o700)

    def _initdb(self) -> None:
        args = [
            *(self._binary("initdb"), "-D", str(self._data_dir), "-U", SUPERUSER),
            *("--auth=trust", "--encoding=UTF8", "--no-locale"),
        ]
        if not self._durable:
            args.append("--no-sync")  # a throwaway cluster need not survive an OS crash
        result = self._run(args, timeout_s=INITDB_TIMEOUT_S, as_server_user=True)
        if result.returncode != 0:
            raise self._error("initdb failed", result)

    # --- The postmaster.pid file and the port file. ---

    def _running_postmaster(self) -> _PostmasterPid | None:
        info = _read_postmaster_pid(self._data_dir)
        if info is None or not _process_is_alive(info.pid):
            return None
        if info.data_dir != self._data_dir or _process_is_postgres(info.pid) is False:
            return None
        return info

    def _remove_stale_postmaster_pid(self) -> None:
        # postgres removes a lock file whose pid is dead, but refuses one whose pid was reused by
        # another live process (common in containers); remove only that case, once proven.
        info = _read_postmaster_pid(self._data_dir)
        if info is None or not _process_is_alive(info.pid):
            return
        if info.data_dir != self._data_dir or _process_is_postgres(info.pid) is False:
            (self._data_dir / _POSTMASTER_PID_FILE_NAME).unlink(missing_ok=True)

    def _read_port_file(self) -> int | None:
        try:
            text = (self._data_dir / PORT_FILE_NAME).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        if not text.isdigit() or not _PORT_MIN <= int(text) <= _PORT_MAX:
            raise EmbeddedPostgresError(
                f"{self._data_dir / PORT_FILE_NAME} holds no port: {text!r}"
            )
        return int(text)

    def _write_port_file(self, port: int) -> None:
        path = self._data_dir / PORT_FILE_NAME
        path_tmp = path.with_name(f"{PORT_FILE_NAME}.tmp")
        path_tmp.write_text(f"{port}\n", encoding="ascii")
        server_user = _server_user()
        if server_user is not None:  # the whole data dir belongs to the server user
            os.chown(path_tmp, server_user.uid, server_user.gid)
        path_tmp.replace(path)  # atomic: a reader sees the old port or the new, never half

    def _forget_port(self) -> None:
        (self._data_dir / PORT_FILE_NAME).unlink(missing_ok=True)
        self._port = self._port_requested

    # --- Running the binaries. ---

    def _binary(self, name: str) -> str:
        return str(self._bin_dir / name)

    def _psql(self, *statements: str, check: bool = True) -> _CommandResult:
        """Runs each statement on its own (one -c each: not in one transaction)."""
        result = self._run(
            [
                *(self._binary("psql"), "-X", "-q", "-A", "-t"),
                *("-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=sqlstate"),
                *("-h", LISTEN_HOST, "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres"),
                *(arg for statement in statements for arg in ("-c", statement)),
            ],
            timeout_s=PSQL_TIMEOUT_S,
            as_server_user=False,
        )
        if check and result.returncode != 0:
            raise self._error(f"psql failed: {'; '.join(statements)}", result)
        return result

    def _run(self, args: list[str], *, timeout_s: float, as_server_user: bool) -> _CommandResult:
        """Run a binary with output to a file: pg_ctl's postmaster would hold a pipe open."""
        server_user = _server_user() if as_server_user else None
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output_file:
            try:
                completed = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=output_file,
                    stderr=subprocess.STDOUT,
                    env=_child_env(),
                    cwd=self._data_dir if self._data_dir.is_dir() else None,
                    timeout=timeout_s,
                    check=False,
                    user=None if server_user is None else server_user.uid,
                    group=None if server_user is None else server_user.gid,
                    extra_groups=None if server_user is None else [],
                )
            except subprocess.TimeoutExpired as error:
                output_file.seek(0)
                raise self._error(
                    f"{Path(args[0]).name} did not finish within {timeout_s:.0f} s",
                    _CommandResult(returncode=-1, output=output_file.read()),
                ) from error
            output_file.seek(0)
            return _CommandResult(returncode=completed.returncode, output=output_file.read())

    def _error(self, summary: str, result: _CommandResult) -> EmbeddedPostgresError:
        return EmbeddedPostgresError(
            f"{summary} (data dir {self._data_dir}, exit code {result.returncode})\n"
            f"--- command output ---\n{result.output.strip()}\n"
            f"--- tail of {self.log_path} ---\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log_file:
                size_bytes = log_file.seek(0, os.SEEK_END)
                log_file.seek(max(0, size_bytes - LOG_TAIL_BYTES_MAX))
                tail = log_file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        if size_bytes > LOG_TAIL_BYTES_MAX:
            tail = tail.partition("\n")[2]  # drop the cut first line
        return tail.strip()


# --- Module helpers. ---


def _validate_identifier(name: str, *, what: str) -> None:
    if not _IDENTIFIER_RE.fullmatch(name):
        raise ValueError(f"{what} must match {_IDENTIFIER_RE.pattern}, got {name!r}")


def find_bin_dir() -> Path:
    """The PostgreSQL server binaries the embedded servers run: $LEDGER_PG_BIN, else
    pgserver's (tools such as pg_dump are found beside them)."""
    override = os.environ.get(PG_BIN_ENV_VAR, "")
    if override:
        bin_dir = Path(override).expanduser().resolve()
    else:
        # find_spec locates the package without importing it: importing pgserver creates a
        # runtime dir and a lock file we do not use.
        spec = importlib.util.find_spec("pgserver")
        if spec is None or spec.origin is None:
            raise EmbeddedPostgresError(f"pgserver is not installed and {PG_BIN_ENV_VAR} is unset")
        bin_dir = Path(spec.origin).resolve().parent / "pginstall" / "bin"
    missing = [name for name in _REQUIRED_BINARIES if not (bin_dir / name).is_file()]
    if missing:
        raise EmbeddedPostgresError(
            f"{bin_dir} lacks PostgreSQL binaries {missing}; set {PG_BIN_ENV_VAR} to a bin/ folder"
        )
    return bin_dir


def _child_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, PGHOST, PGOPTIONS, ...) would silently redirect the binaries.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = str(PSQL_CONNECT_TIMEOUT_S)
    return env


def _server_user() -> _ServerUser | None:
    """None when we are not root; otherwise the system user that runs the server, created once."""
    if os.geteuid() != 0:
        return None
    with _module_lock:
        try:
            entry = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
        except KeyError:
            entry = _create_system_user(SERVER_USER_WHEN_ROOT)
    return _ServerUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def _create_system_user(name: str) -> pwd.struct_passwd:
    completed = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "-s",
            "/usr/sbin/nologin",
            name,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=USERADD_TIMEOUT_S,
        check=False,
    )
    try:
        return pwd.getpwnam(name)  # another process may have created it concurrently
    except KeyError:
        raise EmbeddedPostgresError(
            f"could not create system user {name!r} (exit code {completed.returncode}): "
            f"{completed.stderr.strip()}"
        ) from None


def _grant_traverse_on_prefixes(path: Path) -> None:
    """Let other users search (not list) every folder above `path`."""
    search_bits = stat.S_IXGRP | stat.S_IXOTH
    for folder in path.parents:
        mode = folder.stat().st_mode
        if mode & search_bits != search_bits:
            folder.chmod(stat.S_IMODE(mode) | search_bits)


def _ensure_install_readable(bin_dir: Path) -> None:
    """Let the server user reach, read and run the install (bin, lib, share); once per process."""
    install_root = bin_dir.parent
    with _module_lock:
        if install_root in _permission_fixed_roots:
            return
        _grant_traverse_on_prefixes(install_root)
        read_bits = stat.S_IRGRP | stat.S_IROTH
        search_bits = stat.S_IXGRP | stat.S_IXOTH
        for folder, _, file_names in os.walk(install_root):
            _add_mode_bits(Path(folder), read_bits | search_bits)
            for file_name in file_names:
                file_path = Path(folder) / file_name
                if file_path.is_symlink():
                    continue
                executable = file_path.stat().st_mode & stat.S_IXUSR
                _add_mode_bits(file_path, read_bits | (search_bits if executable else 0))
        _permission_fixed_roots.add(install_root)


def _add_mode_bits(path: Path, bits: int) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & bits != bits:
        path.chmod(mode | bits)


def _read_postmaster_pid(data_dir: Path) -> _PostmasterPid | None:
    try:
        lines = (data_dir / _POSTMASTER_PID_FILE_NAME).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    # A postmaster that is still writing the file may leave it short; read what is there.
    if not lines or not lines[0].strip().isdigit():
        return None
    port_text = lines[3].strip() if len(lines) > 3 else ""
    return _PostmasterPid(
        pid=int(lines[0].strip()),
        data_dir=Path(lines[1].strip()).resolve() if len(lines) > 1 else Path(),
        port=int(port_text) if port_text.isdigit() else None,
        status=lines[7].strip() if len(lines) > 7 else None,
    )


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _process_is_postgres(pid: int) -> bool | None:
    """True or False where /proc tells; None where it cannot (no /proc, or no permission)."""
    if not Path("/proc/self").exists():
        return None
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:
        return None
    program = command_line.split(b"\0", 1)[0].rsplit(b"/", 1)[-1]
    return program in _POSTGRES_PROCESS_NAMES


def _pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LISTEN_HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR as postgres itself binds: TIME_WAIT leftovers of our last run do not count.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LISTEN_HOST, port))
        except OSError:
            return False
    return True

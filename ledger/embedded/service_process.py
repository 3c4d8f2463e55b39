"""`ledger serve` as a child process, for harnesses that kill, restart or measure it.

Used by the fault tests, the chaos workload and the benchmark: the service
prints "ledger serving on HOST:PORT" once it listens (on a port it picked).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

SERVING = re.compile(r"ledger serving on ([\d.]+):(\d+)")
# How often a starting service's log is read for its serving line.
SERVING_POLL_INTERVAL_S = 0.05


class ServiceExited(Exception):
    """The service ended before it served; output is what it logged."""

    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"service exited {returncode} at start")
        self.returncode = returncode
        self.output = output


class ServiceNotServing(Exception):
    def __init__(self, deadline_s: float, output: str) -> None:
        super().__init__(f"service not serving after {deadline_s}s")
        self.output = output


def serve_command(config_path: Path, *, workers: int = 1) -> list[str]:
    """One service process by default (what the fault tests kill, stop and restart is
    one pid); the bench asks for more to measure `--workers` (ledger/workers.py)."""
    return [
        sys.executable,
        "-m",
        "ledger.cli",
        "serve",
        "--config",
        str(config_path),
        "--listen",
        "127.0.0.1:0",
        "--workers",
        str(workers),
    ]


def spawn_service(
    config_path: Path, log_path: Path, *, env: Mapping[str, str], cwd: Path, workers: int = 1
) -> tuple[subprocess.Popen[bytes], int]:
    """Starts the service with its output appended to log_path; returns the process (with
    workers > 1, the parent of the workers) and the log offset its output starts at."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            serve_command(config_path, workers=workers),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    return process, offset


async def wait_serving(
    process: subprocess.Popen[bytes], log_path: Path, offset: int, *, deadline_s: float
) -> int:
    """The port, once the service's log says it serves; raises if it exits or the deadline
    passes first."""
    deadline = time.monotonic() + deadline_s
    while True:
        # A small local log file: reading it does not stall the loop noticeably.
        text = log_path.read_bytes()[offset:].decode(errors="replace")  # noqa: ASYNC240
        match = SERVING.search(text)
        if match:
            return int(match.group(2))
        if process.poll() is not None:
            raise ServiceExited(process.returncode, text)
        if time.monotonic() > deadline:
            raise ServiceNotServing(deadline_s, text)
        await asyncio.sleep(SERVING_POLL_INTERVAL_S)

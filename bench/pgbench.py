"""The raw limit again, driven by pgbench (the C client that ships with PostgreSQL).

`pgbench_single` and `pgbench_batch` send the raw modes' transactions (BEGIN,
lock, WRITE_BATCH, COMMIT; bench/raw_sql.py) to the same servers at the same
concurrency, from pgbench instead of Python client processes: what PostgreSQL
itself can take, with no Python client's CPU on the same cores. The service
is compared with both limits, so neither client's cost flatters a ratio.

One pgbench process per shard database holds that shard's share of the
callers (pgbench connects to one database); each logs every transaction, and
only those that finish inside the measured window count, as in the other modes.
"""

from __future__ import annotations

import math
import resource
import shutil
import subprocess
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import raw_sql
from bench.worker import PhaseResult
from bench.workload import Workload

PGBENCH_MODES = ("pgbench_single", "pgbench_batch")
# The service's per-call limit, which the bench's --batch-size keeps to.
BATCH_MAX = 1000
# pgbench ends its run at -T seconds; past this much more it is stuck.
PGBENCH_EXIT_GRACE_S = 30.0


def available() -> bool:
    return shutil.which("pgbench") is not None


def script(batch: int) -> str:
    """One transaction: the raw modes' statements, with pgbench variables for parameters.
    The batch size is written into the text: PostgreSQL then plans for the rows it
    will get, and keeps one plan per statement instead of planning every execution."""
    if not 1 <= batch <= BATCH_MAX:
        raise ValueError(f"batch must be 1 to {BATCH_MAX}, got {batch}")
    lock = raw_sql.PGBENCH_PICK_AND_LOCK.replace(":batch", str(batch))
    write = (
        raw_sql.WRITE_BATCH.replace("$1", ":transfer_rows")
        .replace("$2", ":entry_rows")
        .replace("$3", ":head_rows")
        .replace("$4", ":now")
    )
    return "\n".join(
        [
            # This caller's merchants on the shard: :first, :first + :stride, ...
            r"\set first (:offset + :client_id) % :stride",
            r"\set slots (:merchants - :first + :stride - 1) / :stride",
            rf"\set seq :seq + {batch}",
            "BEGIN;",
            lock.strip(),
            r"\gset",
            write.strip(),
            r"\gset written_",
            "COMMIT;",
            "",
        ]
    )


@dataclass(frozen=True, slots=True)
class ShardShare:
    """One pgbench process: a shard database, its callers and their place among all callers."""

    shard: str
    dsn: str
    merchants: int
    callers: int
    caller_offset: int


def shares(workload: Workload, callers_total: int) -> list[ShardShare]:
    """Callers split over the shards as evenly as whole callers allow."""
    names = workload.shards
    result = []
    offset = 0
    for index, (name, dsn) in enumerate(workload.shard_dsns):
        callers = callers_total // len(names) + (1 if index < callers_total % len(names) else 0)
        merchants = sum(1 for m in workload.merchants if m.shard == name)
        if callers:
            result.append(ShardShare(name, dsn, merchants, callers, offset))
        offset += callers
    return result


def run_phase(
    workload: Workload,
    *,
    mode: str,
    warmup_s: float,
    duration_s: float,
    callers_total: int,
    run_tag: str,
) -> tuple[list[PhaseResult], float]:
    """Runs one pgbench mode; returns a result per shard process (transfers and
    latencies of transactions that finished in the window) and pgbench's CPU seconds."""
    if mode not in PGBENCH_MODES:
        raise ValueError(f"unknown pgbench mode {mode!r}")
    batch = 1 if mode == "pgbench_single" else workload.batch_size
    work_dir = Path(tempfile.mkdtemp(prefix="ledger-pgbench-"))
    try:
        script_path = work_dir / "transaction.sql"
        script_path.write_text(script(batch))
        seconds = max(1, math.ceil(warmup_s + duration_s))
        cpu_before = _children_cpu_s()
        started = time.time()
        processes = []
        for share in shares(workload, callers_total):
            # Single transfers pick any merchant of the shard, as raw_single does;
            # batches pick from the caller's own share, as raw_batch does.
            stride = 1 if batch == 1 else callers_total
            command = [
                "pgbench", "--no-vacuum", "--protocol=prepared",
                f"--client={share.callers}", "--jobs=1", f"--time={seconds}",
                f"--file={script_path}", "--log",
                f"--log-prefix={work_dir / share.shard}",
                "-D", f"offset={share.caller_offset}", "-D", f"stride={stride}",
                "-D", f"merchants={share.merchants}", "-D", "seq=0",
                "-D", f"prefix=pgb-{run_tag}-{mode}",
                share.dsn,
            ]  # fmt: skip
            processes.append(
                subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=work_dir
                )
            )
        outputs = []
        for process in processes:
            out, _ = process.communicate(timeout=seconds + PGBENCH_EXIT_GRACE_S)
            outputs.append(out.decode(errors="replace"))
        cpu_s = _children_cpu_s() - cpu_before
        for process, output in zip(processes, outputs, strict=True):
            if process.returncode != 0:
                raise RuntimeError(f"pgbench failed ({process.returncode}):\n{output[-4000:]}")
        window_start = started + warmup_s
        window_end = window_start + duration_s
        results = []
        for index, share in enumerate(shares(workload, callers_total)):
            result = PhaseResult(worker=index, mode=mode)
            for log in sorted(work_dir.glob(f"{share.shard}.*")):
                _read_log(log, result, batch=batch, window=(window_start, window_end))
            results.append(result)
        return results, cpu_s
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _read_log(path: Path, result: PhaseResult, *, batch: int, window: tuple[float, float]) -> None:
    """pgbench's per-transaction log: client, number, latency us, script, end s, end us
    (a failed transaction's latency reads "failed" or "serialization"/"deadlock")."""
    latencies: array[float] = result.latencies_ms
    errors: Counter[str] = result.errors
    with path.open() as lines:
        for line in lines:
            fields = line.split()
            if len(fields) < 6:
                continue
            result.calls_started += 1
            if not fields[2].isdigit():
                errors[f"pgbench {fields[2]}"] += 1
                continue
            finished = int(fields[4]) + int(fields[5]) / 1e6
            if window[0] <= finished <= window[1]:
                result.calls_ok += 1
                result.transfers_ok += batch
                latencies.append(int(fields[2]) / 1000.0)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

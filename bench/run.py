"""The benchmark: `python -m bench.run --mode smoke|full [options]`.

One run on one machine: start (or target) the shards, start the service as a
process, create N merchants with two accounts each, then drive each mode for a
fixed time from K client processes with C callers in total, and measure the
raw PostgreSQL limit for the same writes with the same processes. Prints a
table, writes <out>/latest.json and <out>/latest.png. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import multiprocessing
import os
import platform
import sys
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench import cluster, events_load, grpc_floor, pgbench, report, statement_stats
from bench.worker import (
    CALL_TIMEOUT_S,
    PHASE_END_GRACE_S,
    VELOCITY_MODES,
    VELOCITY_SUFFIX,
    Phase,
    PhaseResult,
    WorkerSpec,
    worker_main,
)
from bench.workload import Workload, place_merchants
from ledger.embedded.postgres import EmbeddedPostgresError
from ledger.routing.ring import ShardRing

# A client process must be ready for a phase within this long; the first phase
# includes starting Python, importing grpc and asyncpg, and opening connections.
CLIENT_READY_TIMEOUT_S = 60.0
# Joining a client process that was told to stop.
CLIENT_STOP_TIMEOUT_S = 15.0
# On top of a phase's own length, the orchestrator waits this long for results
# (a few MB of latencies per process through a pipe).
RESULT_MARGIN_S = 30.0
DEFAULT_OUT_DIR = Path("bench/results")
# CPU used by processes outside the benchmark (kernel threads, a shell) stays
# well under this on a quiet machine; above it the run says it was disturbed.
OTHER_CPU_CORES_NOTE_MIN = 0.15
# A full round is about 3.5 minutes; more rounds than this is a mistake.
ROUNDS_MAX = 9
# More statements per mode than this is a log, not a summary.
PG_STATEMENTS_SHOWN_MAX = 50


@dataclass(frozen=True, slots=True)
class Profile:
    """Defaults per --mode; any option given on the command line wins."""

    duration_s: float
    warmup_s: float
    merchants: int
    concurrency: int
    batch_size: int
    clients: int
    # `ledger serve --workers`: service processes on the one port.
    workers: int = 1
    # gRPC connections per client process (0: one per caller).
    connections: int = 0


PROFILES = {
    # Seconds in CI: a handful of merchants, two client processes, tiny batches.
    "smoke": Profile(
        duration_s=2.0, warmup_s=0.5, merchants=12, concurrency=4, batch_size=10, clients=2
    ),
    # The 2-core development machine: 32 callers keep the service and
    # PostgreSQL busy without queueing far past the shard pools (16 per
    # shard); 3000 merchants give every caller its own ~31 per shard for
    # batches, so batches of different callers do not wait on each other's locks.
    "full": Profile(
        duration_s=30.0, warmup_s=3.0, merchants=3000, concurrency=32, batch_size=100, clients=2
    ),
}


@dataclass(frozen=True, slots=True)
class Options:
    run_mode: str
    profile: Profile
    out_dir: Path
    config_path: Path | None
    # The modes to measure, in report.MODES order (all by default).
    modes: tuple[str, ...] = report.MODES
    # Where py-spy writes a flame graph of the service per gRPC mode, if set.
    py_spy_dir: Path | None = None
    # Times the whole sequence of modes runs; figures are per-mode medians.
    rounds: int = 1
    # Also single and batch over a twin set of merchants whose accounts have three
    # loose velocity rules (bench/cluster.py, VELOCITY_RULES), each right after its
    # base mode, their ratio per round: what the rules cost (issue 21).
    velocity_rules: bool = False
    # The event stream's consumers measured beside single and batch (bench/events_load.py).
    events: events_load.EventsOptions = events_load.NO_EVENTS
    # Statements shown per phase by PostgreSQL's execution time (bench/statement_stats.py).
    pg_statements: int = 0


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the ledger service against raw PostgreSQL in one run.",
    )
    parser.add_argument("--mode", choices=sorted(PROFILES), default="full")
    parser.add_argument("--duration-s", type=float, help="measured seconds per mode")
    parser.add_argument("--warmup-s", type=float, help="unmeasured seconds before each mode")
    parser.add_argument("--merchants", type=int, help="merchants, two accounts each")
    parser.add_argument("--concurrency", type=int, help="concurrent callers in total")
    parser.add_argument("--batch-size", type=int, help="transfers per call in batch modes")
    parser.add_argument("--clients", type=int, help="client processes")
    parser.add_argument(
        "--workers", type=int, help="service processes on the one port (ledger serve --workers)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        help="gRPC connections per client process, callers spread over them (0: one per caller)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="results directory")
    parser.add_argument(
        "--config", type=Path, help="shard config of existing shards (default: a temporary cluster)"
    )
    parser.add_argument(
        "--modes",
        help="comma-separated modes to measure (default: all; the pgbench modes only if "
        "pgbench is on PATH); a ratio needs both its modes",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record py-spy stacks of the service per gRPC mode into DIR (slows it down)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the modes this many times in turn and report medians (the machine drifts)",
    )
    parser.add_argument(
        "--velocity-rules",
        action="store_true",
        help="also measure single and batch over as many other merchants whose accounts "
        "have three velocity rules (never refusing), each right after its base mode: "
        "single_velocity and batch_velocity, their ratio the rules' cost",
    )
    parser.add_argument(
        "--pg-statements",
        type=int,
        default=0,
        metavar="N",
        help="show per mode the N statements that took most of PostgreSQL's execution "
        "time (pg_stat_statements: needs LEDGER_PG_BIN=/usr/lib/postgresql/15/bin or "
        "another server with contrib modules)",
    )
    events_load.add_arguments(parser)
    args = parser.parse_args(argv)
    base = PROFILES[args.mode]
    profile = Profile(
        duration_s=args.duration_s if args.duration_s is not None else base.duration_s,
        warmup_s=args.warmup_s if args.warmup_s is not None else base.warmup_s,
        merchants=args.merchants if args.merchants is not None else base.merchants,
        concurrency=args.concurrency if args.concurrency is not None else base.concurrency,
        batch_size=args.batch_size if args.batch_size is not None else base.batch_size,
        clients=args.clients if args.clients is not None else base.clients,
        workers=args.workers if args.workers is not None else base.workers,
        connections=args.connections if args.connections is not None else base.connections,
    )
    problems = []
    if profile.duration_s <= 0 or profile.warmup_s < 0:
        problems.append("--duration-s must be > 0 and --warmup-s >= 0")
    if profile.clients < 1 or profile.concurrency < profile.clients:
        problems.append("need --clients >= 1 and --concurrency >= --clients")
    if not 1 <= profile.batch_size <= 1000:
        problems.append("--batch-size must be 1 to 1000 (the service's per-call limit)")
    if not 1 <= profile.workers <= 64 or profile.connections < 0:
        problems.append("--workers must be 1 to 64 and --connections >= 0")
    if profile.merchants < 2:
        problems.append("--merchants must be at least 2")
    if args.velocity_rules and args.events:
        # Each adds modes measured right after their base mode; together neither
        # would follow it.
        problems.append("--velocity-rules and --events are measured in separate runs")
    modes: tuple[str, ...] = tuple(
        m for m in report.MODES if pgbench.available() or m not in pgbench.PGBENCH_MODES
    )
    if args.modes:
        wanted = {m.strip() for m in args.modes.split(",") if m.strip()}
        if unknown := wanted - set(report.MODES):
            problems.append(f"unknown modes {sorted(unknown)}; known: {', '.join(report.MODES)}")
        if wanted & set(report.HALF_PEAK_MODES) and "single" not in wanted:
            problems.append("the half-peak modes are paced from single's figure: add single")
        modes = tuple(m for m in report.MODES if m in wanted)
        if wanted & set(pgbench.PGBENCH_MODES) and not pgbench.available():
            problems.append("the pgbench modes need pgbench (PostgreSQL's client tools) on PATH")
    if not 0 <= args.pg_statements <= PG_STATEMENTS_SHOWN_MAX:
        problems.append(f"--pg-statements must be 0 to {PG_STATEMENTS_SHOWN_MAX}")
    if not 1 <= args.rounds <= ROUNDS_MAX:
        problems.append(f"--rounds must be 1 to {ROUNDS_MAX}")
    events, events_problems = events_load.options_from(args)
    problems += events_problems
    if problems:
        parser.error("; ".join(problems))
    return Options(
        args.mode,
        profile,
        args.out,
        args.config,
        modes,
        args.py_spy,
        args.rounds,
        args.velocity_rules,
        events,
        args.pg_statements,
    )


class ClientPool:
    """K client processes (spawned, so none inherits this process's gRPC or loops)."""

    def __init__(self, specs: Sequence[WorkerSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._pipes: list[Connection] = []
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(child, spec),
                name=f"bench-client-{spec.index}",
                daemon=True,
            )
            process.start()
            child.close()
            self._processes.append(process)
            self._pipes.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def run_phase(self, phase: Phase, cpu: cluster.CpuMeter) -> list[PhaseResult]:
        for pipe in self._pipes:
            pipe.send(("phase", phase))
        for pipe in self._pipes:
            self._expect(pipe, "ready", CLIENT_READY_TIMEOUT_S)
        # Every process is connected and waiting: start them together.
        cpu.start()
        for pipe in self._pipes:
            pipe.send(("go", None))
        wait_s = (
            phase.warmup_s + phase.duration_s + CALL_TIMEOUT_S + PHASE_END_GRACE_S + RESULT_MARGIN_S
        )
        results: list[PhaseResult] = [self._expect(p, "result", wait_s) for p in self._pipes]
        return results

    @staticmethod
    def _expect(pipe: Connection, kind: str, timeout_s: float) -> Any:
        if not pipe.poll(timeout_s):
            raise TimeoutError(f"no {kind!r} from a client process within {timeout_s}s")
        try:
            got, payload = pipe.recv()
        except EOFError as error:
            raise RuntimeError("a client process exited unexpectedly") from error
        if got == "error":
            raise RuntimeError(payload)
        if got != kind:
            raise RuntimeError(f"expected {kind!r} from a client process, got {got!r}")
        return payload

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(("stop", None))
            except (OSError, ValueError):
                pass
        for process in self._processes:
            process.join(CLIENT_STOP_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(CLIENT_STOP_TIMEOUT_S)
        for pipe in self._pipes:
            pipe.close()


def with_velocity_modes(modes: Sequence[str], *, velocity_first: bool) -> tuple[str, ...]:
    """The modes in order, single and batch each beside its run over the limited
    merchants (bench/worker.py, VELOCITY_MODES): after it, or before it when
    velocity_first. Rounds alternate, because a mode measured second finds bigger
    tables than the first (a batch phase adds ~150,000 transfers): in one order
    only, that drift would count as the rules' cost."""
    paired = []
    for m in modes:
        if m + VELOCITY_SUFFIX not in VELOCITY_MODES:
            paired.append(m)
            continue
        pair = (m, m + VELOCITY_SUFFIX)
        paired.extend(reversed(pair) if velocity_first else pair)
    return tuple(paired)


def worker_specs(
    target: str, workload: Workload, profile: Profile, limited: Workload | None = None
) -> list[WorkerSpec]:
    specs = []
    offset = 0
    for index in range(profile.clients):
        callers = profile.concurrency // profile.clients + (
            1 if index < profile.concurrency % profile.clients else 0
        )
        specs.append(
            WorkerSpec(
                index=index,
                callers=callers,
                caller_offset=offset,
                target=target,
                workload=workload,
                seed=index + 1,
                connections=profile.connections or callers,
                limited=limited,
            )
        )
        offset += callers
    return specs


def run(options: Options) -> dict[str, Any]:
    profile = options.profile
    notes: list[str] = []
    if not pgbench.available():
        notes.append("pgbench is not on PATH: no pgbench_single/pgbench_batch limits")
    started_at = dt.datetime.now(dt.UTC)
    wall_start = time.monotonic()
    with ExitStack() as stack:
        if options.config_path is None:
            print(
                "starting a durable embedded PostgreSQL with 3 shard databases...", file=sys.stderr
            )
            try:
                shards = cluster.start_embedded_shards(
                    statement_stats.PRELOAD_SETTINGS if options.pg_statements else ()
                )
            except EmbeddedPostgresError as error:
                if options.pg_statements:
                    # The usual cause: the server cannot load the module it was told to.
                    raise statement_stats.StatementStatsUnavailable(
                        f"{statement_stats.HOW_TO_ENABLE} ({error})"
                    ) from error
                raise
        else:
            shards = cluster.existing_shards(options.config_path)
        stack.callback(shards.close)
        if options.pg_statements:
            asyncio.run(statement_stats.enable(dsn for _, dsn in shards.dsns))
        log_path = options.out_dir / "service.log"
        service = cluster.ServiceProcess(shards.config_path, log_path, workers=profile.workers)
        stack.callback(service.stop)
        target = service.start()
        print(f"service pid {service.pid} serving on {target} (log {log_path})", file=sys.stderr)
        sampler = cluster.RssSampler(service.pid)
        sampler.start()
        stack.callback(sampler.stop)

        run_id = uuid.uuid4().hex[:8]
        ring = ShardRing(shards.config)
        names = tuple(s.name for s in shards.config.shards)
        workload = Workload(
            run_id=run_id,
            merchants=place_merchants(
                run_id=run_id, count=profile.merchants, ring=ring, shards=names
            ),
            shard_dsns=shards.dsns,
            batch_size=profile.batch_size,
            callers_total=profile.concurrency,
        )
        if len({m.shard for m in workload.merchants}) < 2:
            raise RuntimeError("cross-shard transfers need merchants on at least two shards")
        asyncio.run(cluster.create_accounts(target, workload))
        limited = None
        measured = events_load.with_event_modes(options.modes, options.events)
        if options.velocity_rules:
            limited = dataclasses.replace(
                workload,
                merchants=place_merchants(
                    run_id=run_id, count=profile.merchants, ring=ring, shards=names, tag="v"
                ),
            )
            asyncio.run(cluster.create_accounts(target, limited))
            asyncio.run(cluster.set_velocity_rules(target, limited))
            print(
                f"created {2 * len(limited.merchants)} accounts with three velocity rules each",
                file=sys.stderr,
            )
        dsns = [dsn for _, dsn in shards.dsns]
        asyncio.run(cluster.create_raw_tables(workload))
        if options.config_path is not None:
            stack.callback(lambda: asyncio.run(cluster.drop_raw_tables(dsns)))
        print(f"created {2 * len(workload.merchants)} accounts and the raw tables", file=sys.stderr)

        clients = ClientPool(worker_specs(target, workload, profile, limited))
        stack.callback(clients.close)
        cpu = cluster.CpuMeter(service_pid=service.pid, postgres_pid=cluster.postmaster_pid(shards))
        cpu.client_pids = clients.pids
        rounds: list[dict[str, dict[str, Any]]] = []
        for round_index in range(options.rounds):
            if options.rounds > 1:
                print(f"round {round_index + 1} of {options.rounds}", file=sys.stderr)
            modes: dict[str, dict[str, Any]] = {}
            rounds.append(modes)
            ordered = (
                with_velocity_modes(measured, velocity_first=round_index % 2 == 1)
                if limited is not None
                else measured
            )
            for mode in ordered:
                rate_per_s = None
                if events_load.base_mode(mode) in report.HALF_PEAK_MODES:
                    rate_per_s = report.HALF_PEAK_FRACTION * modes["single"]["transfers_per_s"]
                refused = asyncio.run(cluster.checkpoint(dsns))
                if refused and not notes:
                    notes.append(f"CHECKPOINT refused on {refused}; phases may share checkpoints")
                sampler.reset()
                wal_before = asyncio.run(cluster.wal_written(dsns))
                if options.pg_statements:
                    asyncio.run(statement_stats.reset(dsns))
                spy = (
                    cluster.PySpy(
                        service.pid,
                        options.py_spy_dir / f"{mode}.txt",
                        seconds=profile.warmup_s + profile.duration_s,
                    )
                    if options.py_spy_dir is not None
                    and not mode.startswith(report.NOT_THE_SERVICE)
                    and round_index == 0
                    else None
                )
                consumers = events_load.attach(
                    mode,
                    options.events,
                    target=target,
                    config_path=shards.config_path,
                    log_dir=options.out_dir,
                    cpu=cpu,
                )
                if mode in pgbench.PGBENCH_MODES:
                    results, cores = _run_pgbench(
                        workload, mode, profile, cpu, run_tag=f"{run_id}-{round_index}"
                    )
                elif mode in report.FLOOR_MODES:
                    results, cores = _run_floor(workload, mode, profile, cpu.postgres_pid)
                else:
                    results = clients.run_phase(
                        Phase(
                            mode=events_load.base_mode(mode),
                            warmup_s=profile.warmup_s,
                            duration_s=profile.duration_s,
                            rate_per_s=rate_per_s / profile.clients if rate_per_s else None,
                        ),
                        cpu,
                    )
                    cores = cpu.cores()
                if spy is not None:
                    spy.wait()
                modes[mode] = report.summarize(
                    results, duration_s=profile.duration_s, rss_mb_peak=sampler.peak_mb()
                )
                modes[mode]["cpu_cores"] = cores
                if mode not in report.FLOOR_MODES:
                    modes[mode]["wal"] = _wal_figures(
                        wal_before, asyncio.run(cluster.wal_written(dsns)), modes[mode], profile
                    )
                if options.pg_statements:
                    modes[mode]["pg_statements"] = asyncio.run(
                        statement_stats.top(
                            dsns,
                            transfers=_phase_transfers(modes[mode], profile),
                            limit=options.pg_statements,
                        )
                    )
                modes[mode].update(consumers.detach())
                if rate_per_s is not None:
                    modes[mode]["target_rate_per_s"] = rate_per_s
                print(
                    f"  {mode}: {modes[mode]['transfers_per_s']:,.0f} transfers/s", file=sys.stderr
                )
        modes, ratios = report.median_rounds(rounds)
        every_phase = [(k, m) for r in rounds for k, m in r.items()]
        busiest, busiest_phase = max(
            every_phase, key=lambda phase: phase[1]["cpu_cores"].get("other", 0.0)
        )
        other_cores = busiest_phase["cpu_cores"].get("other", 0.0)
        if other_cores > OTHER_CPU_CORES_NOTE_MIN:
            notes.append(
                f"other processes used up to {other_cores:.2f} cores (in {busiest}): "
                "the machine was not quiet, so ratios and latencies are disturbed"
            )
        rss_mb_peak = max(
            m["service_rss_mb_peak"]
            for k, m in every_phase
            if not k.startswith(report.NOT_THE_SERVICE)
        )
        vmhwm_mb = sampler.hwm_mb()
    return {
        "benchmark": "ledger bench",
        "format_version": 1,
        "run_mode": options.run_mode,
        "velocity_rules": options.velocity_rules,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall_start, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {
            "duration_s": profile.duration_s,
            "warmup_s": profile.warmup_s,
            "merchants": profile.merchants,
            "concurrency": profile.concurrency,
            "batch_size": profile.batch_size,
            "clients": profile.clients,
            "workers": profile.workers,
            "connections_per_client": profile.connections,
            "target": str(options.config_path) if options.config_path else "embedded",
            "shards": list(names),
            "rounds": options.rounds,
            "tracing_env": sorted(k for k in os.environ if k.startswith("OTEL_")),
        },
        "modes": modes,
        "ratios": ratios,
        "single_half_peak_p99_ms": modes.get("single_half_peak", {})
        .get("latency_ms", {})
        .get("p99"),
        "raw_half_peak_p99_ms": modes.get("raw_half_peak", {}).get("latency_ms", {}).get("p99"),
        "service": {"rss_mb_peak": rss_mb_peak, "vmhwm_mb": vmhwm_mb},
        "targets": report.TARGETS,
        "notes": notes,
    }


def _wal_figures(
    before: tuple[int, int], after: tuple[int, int], figures: dict[str, Any], profile: Profile
) -> dict[str, float]:
    """WAL per transfer over the phase, warm-up included (the warm-up's transfers are
    estimated at the measured rate): what the writes cost PostgreSQL's log."""
    transfers = _phase_transfers(figures, profile)
    written, images = after[0] - before[0], after[1] - before[1]
    return {
        "bytes_per_transfer": round(written / transfers) if transfers else 0,
        "full_page_images": images,
    }


def _phase_transfers(figures: dict[str, Any], profile: Profile) -> float:
    """Transfers over the phase, warm-up included (at the measured rate)."""
    return float(figures["transfers_per_s"] * (profile.warmup_s + profile.duration_s))


def _run_pgbench(
    workload: Workload, mode: str, profile: Profile, cpu: cluster.CpuMeter, *, run_tag: str
) -> tuple[list[PhaseResult], dict[str, float]]:
    """A pgbench mode, with pgbench's CPU shown as the clients' (it is not one of
    the client processes the meter knows)."""
    cpu.start()
    results, pgbench_cpu_s = pgbench.run_phase(
        workload,
        mode=mode,
        warmup_s=profile.warmup_s,
        duration_s=profile.duration_s,
        callers_total=profile.concurrency,
        run_tag=run_tag,
    )
    cores = cpu.cores()
    wall_s = profile.warmup_s + profile.duration_s
    if cores and wall_s > 0:
        pgbench_cores = pgbench_cpu_s / wall_s
        cores["clients"] = round(cores.get("clients", 0.0) + pgbench_cores, 2)
        cores["other"] = round(max(0.0, cores.get("other", 0.0) - pgbench_cores), 2)
    return results, cores


def _run_floor(
    workload: Workload, mode: str, profile: Profile, postgres_pid: int | None
) -> tuple[list[PhaseResult], dict[str, float]]:
    """A floor mode: client processes of their own, the same callers, against a bare
    server doing no work; its CPU is shown as the service's. PostgreSQL's stays
    its own (its background work after the phases before), not other work's."""
    with grpc_floor.started() as (floor_target, floor_pid):
        clients = ClientPool(worker_specs(floor_target, workload, profile))
        try:
            cpu = cluster.CpuMeter(service_pid=floor_pid, postgres_pid=postgres_pid)
            cpu.client_pids = clients.pids
            phase = Phase(
                mode=report.FLOOR_MODES[mode],
                warmup_s=profile.warmup_s,
                duration_s=profile.duration_s,
            )
            return clients.run_phase(phase, cpu), cpu.cores()
        finally:
            clients.close()


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        figures = run(options)
    except statement_stats.StatementStatsUnavailable as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    json_path = options.out_dir / "latest.json"
    png_path = options.out_dir / "latest.png"
    report.write_json(figures, json_path)
    report.write_chart(figures, png_path)
    print(report.render_table(figures))
    print(f"\nwrote {json_path} and {png_path} in {figures['wall_s']:.0f} s")
    idle = [m for m, v in figures["modes"].items() if v["transfers"] == 0]
    if idle:
        # Not a threshold: a mode that applied nothing means the benchmark is broken.
        print(f"no transfer was applied in: {', '.join(idle)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Service CPU per call: `python -m bench.cpu_cost [--calls N]`.

The throughput benchmark (bench/run.py) says how fast; this says where a change
moved the cost. One caller makes calls one after another, so nothing is
batched or queued, and the service's CPU time (/proc, user + system) is divided
by the calls: microseconds per single transfer, per batch of B and per item of
it, per cross-shard transfer (its saga runs inline). PostgreSQL's CPU per call
is printed beside it. Sequential calls pay every per-transaction cost in full,
as at low load, which is what sets latency at half the peak rate.

The figures move by a few percent between runs; an A/B of a change is two runs
of each, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import cluster, grpc_floor
from bench.worker import CALL_TIMEOUT_S, _to_proto
from bench.workload import Picker
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

MERCHANTS = 300
# Unmeasured calls first: connections open, statements get prepared, caches fill.
WARMUP_CALLS = 200
# Batch calls are this many times fewer than single calls: enough transfers
# (calls / 20 x B) for clock-tick CPU accounting to settle per transfer.
BATCH_CALLS_DIVISOR = 20
# CPU time is counted in clock ticks (10 ms): over 15 s the idle figure reads in
# steps of 0.67 ms/s (over 5 s it read in steps of 2, so 3.3 could show as 6.0
# against a target of 5).
IDLE_MEASURE_S = 15.0


async def _health_us(channel: grpc.aio.Channel, pid: int, calls: int) -> float:
    """Service CPU (the process tree of pid) per health call, after a warm-up."""
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(WARMUP_CALLS):
        await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    before = _tree_cpu_s(pid)
    for _ in range(calls):
        await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    return 1e6 * (_tree_cpu_s(pid) - before) / calls


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of the service: its process and, with --workers, its workers."""
    return sum(cluster.cpu_s(p) for p in cluster.process_tree(pid))


async def _measure(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    pick: object,
    calls: int,
    *,
    service_pid: int,
    postgres_pid: int | None,
) -> tuple[float, float, int]:
    """(service CPU s, PostgreSQL CPU s, transfers) for `calls` sequential calls."""
    assert callable(pick)

    def postgres_s() -> float:
        if postgres_pid is None:
            return 0.0
        return sum(cluster.cpu_s(p) for p in cluster.process_tree(postgres_pid))

    service_before, postgres_before = _tree_cpu_s(service_pid), postgres_s()
    transfers = 0
    for _ in range(calls):
        _, specs = pick()
        response = await stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=[_to_proto(t) for t in specs]),
            timeout=CALL_TIMEOUT_S,
        )
        bad = [r for r in response.results if r.result != pb.TRANSFER_RESULT_OK]
        if bad:
            raise RuntimeError(f"transfers not applied: {bad[:3]}")
        transfers += len(specs)
    return (
        _tree_cpu_s(service_pid) - service_before,
        postgres_s() - postgres_before,
        transfers,
    )


async def _run(
    shards: cluster.Shards,
    service: cluster.ServiceProcess,
    calls: int,
    batch_size: int,
    *,
    velocity_rules: bool = False,
) -> None:
    target = service.target
    workload = cluster.one_caller_workload(shards, merchants=MERCHANTS, batch_size=batch_size)
    await cluster.create_accounts(target, workload)
    if velocity_rules:
        await cluster.set_velocity_rules(target, workload)
        print("three velocity rules on every account", flush=True)
    picker = Picker(workload, caller_global=0, seed=1)
    postgres_pid = cluster.postmaster_pid(shards)
    # Background work (sweepers, recovery polls, config watch) costs CPU with no
    # calls at all; shown so that it is not mistaken for per-call cost.
    idle_before = _tree_cpu_s(service.pid)
    await asyncio.sleep(IDLE_MEASURE_S)
    idle_ms_per_s = 1e3 * (_tree_cpu_s(service.pid) - idle_before) / IDLE_MEASURE_S
    print(f"idle    service {idle_ms_per_s:.1f} ms CPU per s", flush=True)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        # The floor: a health check passes the same server and interceptors, no
        # ledger work; a bare grpc.aio server's, measured next, is gRPC's own share.
        health_us = await _health_us(channel, service.pid, calls)
        with grpc_floor.started() as (floor_target, floor_pid):
            async with grpc.aio.insecure_channel(floor_target) as floor_channel:
                bare_us = await _health_us(floor_channel, floor_pid, calls)
        print(
            f"health  {calls:>6} calls  service {health_us:>8.0f} us/call   "
            f"bare grpc.aio {bare_us:>5.0f} us/call   service/bare {health_us / bare_us:>5.2f}",
            flush=True,
        )
        for name, pick, count in (
            ("single", picker.local_single, calls),
            ("batch", picker.local_batch, max(1, calls // BATCH_CALLS_DIVISOR)),
            ("cross", picker.cross_single, max(1, calls // 4)),
        ):
            await _measure(
                stub, pick, WARMUP_CALLS // 4, service_pid=service.pid, postgres_pid=None
            )
            service_s, postgres_s, transfers = await _measure(
                stub, pick, count, service_pid=service.pid, postgres_pid=postgres_pid
            )
            per_call_us = 1e6 * service_s / count
            print(
                f"{name:<7} {count:>6} calls  service {per_call_us:>8.0f} us/call "
                f"{1e6 * service_s / transfers:>7.0f} us/transfer   "
                f"postgres {1e6 * postgres_s / count:>7.0f} us/call   "
                # PostgreSQL does the same work on both sides of an A/B, so this ratio
                # cancels the machine's speed, which drifts between runs.
                f"service/postgres {service_s / postgres_s if postgres_s else 0.0:>5.2f}",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=3000, help="single calls (batch: /B)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--velocity-rules",
        action="store_true",
        help="three velocity rules (never refusing) on every account: their cost",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="service processes (ledger serve --workers); one caller's one connection "
        "reaches one of them, so this shows what idle workers cost",
    )
    args = parser.parse_args(argv)
    shards = cluster.start_embedded_shards()
    service = cluster.ServiceProcess(
        shards.config_path, shards.config_path.parent / "svc.log", workers=args.workers
    )
    try:
        service.start()
        asyncio.run(
            _run(
                shards,
                service,
                args.calls,
                args.batch_size,
                velocity_rules=args.velocity_rules,
            )
        )
    finally:
        service.stop()
        shards.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

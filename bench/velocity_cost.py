"""What velocity rules cost, A/B in one run: `python -m bench.velocity_cost [--blocks N]`.

The machine's speed drifts, and other work shares its cores, by more than the
difference to measure; two runs (bench/run.py with and without
--velocity-rules) compare two moments as much as two codes. Here one service
on one cluster serves two sets of merchants, A with no limits and B with the
three rules of bench/cluster.py VELOCITY_RULES on every account (never
refusing), and one caller alternates blocks of calls to A and to B, so both
sides see the same machine. Per side: service and PostgreSQL CPU per transfer
and wall time per transfer (sequential calls), for single transfers and
batches of B; the ratio B / A is the cost of the rules. On a CPU-bound machine
throughput goes as 1 / (CPU per transfer).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence

import grpc

from bench import cluster
from bench.worker import CALL_TIMEOUT_S, _to_proto
from bench.workload import Picker, TransferSpec, Workload, place_merchants
from ledger.routing.ring import ShardRing
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

MERCHANTS_PER_SIDE = 300
# Calls per block: long enough for clock-tick (10 ms) CPU accounting per block.
SINGLE_CALLS_PER_BLOCK = 200
BATCH_CALLS_PER_BLOCK = 10
BLOCKS_DEFAULT = 8
BLOCKS_MAX = 100
WARMUP_CALLS = 100

Pick = Callable[[], tuple[str, list[TransferSpec]]]


async def _block(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    pick: Pick,
    calls: int,
    *,
    service_pid: int,
    postgres_pid: int | None,
) -> tuple[float, float, float, int]:
    """(service CPU s, PostgreSQL CPU s, wall s, transfers) of `calls` sequential calls."""

    def postgres_s() -> float:
        if postgres_pid is None:
            return 0.0
        return sum(cluster.cpu_s(p) for p in cluster.process_tree(postgres_pid))

    service_before, postgres_before = cluster.cpu_s(service_pid), postgres_s()
    started = time.perf_counter()
    transfers = 0
    for _ in range(calls):
        _, specs = pick()
        response = await stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=[_to_proto(t) for t in specs]),
            timeout=CALL_TIMEOUT_S,
        )
        if any(r.result != pb.TRANSFER_RESULT_OK for r in response.results):
            raise RuntimeError("a transfer was refused: the rules must never refuse here")
        transfers += len(specs)
    return (
        cluster.cpu_s(service_pid) - service_before,
        postgres_s() - postgres_before,
        time.perf_counter() - started,
        transfers,
    )


async def _run(
    shards: cluster.Shards, service: cluster.ServiceProcess, blocks: int, batch_size: int
) -> None:
    names = tuple(s.name for s in shards.config.shards)
    ring = ShardRing(shards.config)
    sides: dict[str, Workload] = {}
    for side in ("A", "B"):
        run_id = f"{side.lower()}{uuid.uuid4().hex[:7]}"
        sides[side] = Workload(
            run_id=run_id,
            merchants=place_merchants(
                run_id=run_id, count=MERCHANTS_PER_SIDE, ring=ring, shards=names
            ),
            shard_dsns=shards.dsns,
            batch_size=batch_size,
            callers_total=1,
        )
        await cluster.create_accounts(service.target, sides[side])
    await cluster.set_velocity_rules(service.target, sides["B"])
    pickers = {side: Picker(w, caller_global=0, seed=1) for side, w in sides.items()}
    postgres_pid = cluster.postmaster_pid(shards)
    async with grpc.aio.insecure_channel(service.target) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        for mode, calls in (("single", SINGLE_CALLS_PER_BLOCK), ("batch", BATCH_CALLS_PER_BLOCK)):
            picks = {
                side: p.local_single if mode == "single" else p.local_batch
                for side, p in pickers.items()
            }
            for side in ("A", "B"):
                await _block(
                    stub, picks[side], WARMUP_CALLS // (1 if mode == "single" else 10),
                    service_pid=service.pid, postgres_pid=None,
                )  # fmt: skip
            per: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
            for block in range(blocks):
                # Alternate which side goes first, so neither always follows the other.
                order = ("A", "B") if block % 2 == 0 else ("B", "A")
                for side in order:
                    service_s, postgres_s, wall_s, n = await _block(
                        stub, picks[side], calls, service_pid=service.pid,
                        postgres_pid=postgres_pid,
                    )  # fmt: skip
                    per[side].append((service_s / n, postgres_s / n, wall_s / n))
            figures = {}
            for side in ("A", "B"):
                service_us = 1e6 * statistics.median(x[0] for x in per[side])
                postgres_us = 1e6 * statistics.median(x[1] for x in per[side])
                wall_us = 1e6 * statistics.median(x[2] for x in per[side])
                figures[side] = (service_us, postgres_us, wall_us)
                label = "no rules" if side == "A" else "3 rules "
                print(
                    f"{mode:<6} {label}  service {service_us:>7.0f} us/transfer  "
                    f"postgres {postgres_us:>7.0f} us/transfer  "
                    f"both {service_us + postgres_us:>7.0f}  wall {wall_us:>7.0f} us/transfer",
                    flush=True,
                )
            a, b = figures["A"], figures["B"]
            print(
                f"{mode:<6} rules / none: service {b[0] / a[0]:.3f}  postgres {b[1] / a[1]:.3f}  "
                f"CPU (both) {(b[0] + b[1]) / (a[0] + a[1]):.3f}  wall {b[2] / a[2]:.3f}  "
                f"(medians of {blocks} alternating blocks)",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.velocity_cost", description=__doc__)
    parser.add_argument("--blocks", type=int, default=BLOCKS_DEFAULT, help="blocks per side")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    if not 1 <= args.blocks <= BLOCKS_MAX:
        parser.error(f"--blocks must be 1 to {BLOCKS_MAX}")
    shards = cluster.start_embedded_shards()
    service = cluster.ServiceProcess(shards.config_path, shards.config_path.parent / "svc.log")
    try:
        service.start()
        asyncio.run(_run(shards, service, args.blocks, args.batch_size))
    finally:
        service.stop()
        shards.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

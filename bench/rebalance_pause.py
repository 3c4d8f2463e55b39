"""The write pause of an online move, under load.

Starts the benchmark's embedded PostgreSQL (durable, three shard databases and
a fourth to add), the service on the first three, and callers sending single
local transfers to every merchant without pause. Once warm, the config gains
shard-d and `ledger shards rebalance` moves merchants to it while the callers
go on. Reported: the rebalance's own per-merchant write pause (fence to hand
over, from its summary) and the callers' side: for each moved merchant, the
longest a caller waited for one of its writes to succeed during the rebalance
(from the first attempt to the answer, retries and redirects included), beside
the same figure for the merchants that did not move.

    python -m bench.rebalance_pause [--merchants 200] [--callers 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.cluster import ROOT, ServiceProcess, Shards, start_embedded_shards
from ledger.routing.config import ShardConfig, ShardSpec, render_config
from ledger.routing.ring import ShardRing
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

# Every call gets this deadline; a caller retries retryable failures at once.
CALL_TIMEOUT_S = 10.0
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
# Load runs this long before the rebalance starts, and this long after it ends.
WARM_UP_S = 3.0
COOL_DOWN_S = 1.0
# The rebalance command must finish within this.
REBALANCE_DEADLINE_S = 300.0
ADDED_SHARD = "shard-d"
_PAUSES = re.compile(r"pause (\d+\.\d) ms")


@dataclass
class Load:
    merchants: list[str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Per merchant, (first attempt, success) times (monotonic) of its writes.
    writes: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    calls: int = 0
    failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))


async def caller(stub: ledger_pb2_grpc.LedgerServiceAsyncStub, load: Load, index: int) -> None:
    sequence = 0
    while not load.stop.is_set():
        merchant = load.merchants[(index + sequence * 7919) % len(load.merchants)]
        sequence += 1
        request = pb.CreateTransfersRequest(
            transfers=[
                pb.Transfer(
                    id=f"p{index}-{sequence}",
                    debit_account=pb.AccountRef(merchant_id=merchant, account_id="cash"),
                    credit_account=pb.AccountRef(merchant_id=merchant, account_id="sales"),
                    amount_minor=1,
                    currency="USD",
                    action=pb.TRANSFER_ACTION_POST,
                )
            ]
        )
        first_attempt = time.monotonic()
        while not load.stop.is_set():
            try:
                response = await stub.CreateTransfers(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                load.failures[f"{error.code().name}: {error.details()}"[:120]] += 1
                if error.code() not in RETRYABLE:
                    break
                continue
            load.calls += 1
            if response.results[0].result == pb.TRANSFER_RESULT_OK:
                load.writes[merchant].append((first_attempt, time.monotonic()))
                break
            load.failures[pb.TransferResult.Name(response.results[0].result)] += 1


def percentile(values: list[float], percent: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def longest_wait_ms(writes: list[tuple[float, float]], start: float, end: float) -> float:
    """The longest a write of the merchant waited, among those answered in the window."""
    waits = [done - first for first, done in writes if start <= done <= end]
    return 1000 * max(waits, default=0.0)


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "p50": round(percentile(ordered, 50), 1),
        "p99": round(percentile(ordered, 99), 1),
        "max": round(ordered[-1], 1),
    }


async def measure(shards: Shards, merchants_count: int, callers: int) -> dict[str, Any]:
    service: ServiceProcess | None = None
    try:
        assert shards.embedded is not None
        shards.embedded.create_database("shard_d")
        added = ShardSpec(ADDED_SHARD, shards.embedded.dsn("shard_d"), 1)
        first = shards.config
        new = ShardConfig(epoch=2, shards=(*first.shards, added))
        log_path = Path(tempfile.mkdtemp(prefix="ledger-pause-")) / "service.log"
        service = ServiceProcess(shards.config_path, log_path)
        target = service.start()
        old_ring, new_ring = ShardRing(first), ShardRing(new)
        merchants = [f"pause-{i:05d}" for i in range(merchants_count)]
        moving = [m for m in merchants if old_ring.shard_for(m) != new_ring.shard_for(m)]
        load = Load(merchants)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            accounts = [
                pb.Account(ref=pb.AccountRef(merchant_id=m, account_id=a), currency="USD")
                for m in merchants
                for a in ("cash", "sales")
            ]
            for start in range(0, len(accounts), 1000):
                await stub.CreateAccounts(
                    pb.CreateAccountsRequest(accounts=accounts[start : start + 1000]),
                    timeout=CALL_TIMEOUT_S * 6,
                )
            tasks = [asyncio.create_task(caller(stub, load, i)) for i in range(callers)]
            await asyncio.sleep(WARM_UP_S)
            calls_before = load.calls
            shards.config_path.write_text(render_config(new))
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ledger.cli",
                "shards",
                "rebalance",
                "--config",
                str(shards.config_path),
                cwd=ROOT,
                env={**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "false"},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(process.communicate(), REBALANCE_DEADLINE_S)
            ended = time.monotonic()
            calls_during = load.calls - calls_before
            await asyncio.sleep(COOL_DOWN_S)
            load.stop.set()
            await asyncio.gather(*tasks)
        text = output.decode(errors="replace")
        pauses = sorted(float(p) for p in _PAUSES.findall(text))
        staying = [m for m in merchants if m not in set(moving)]
        waits = {m: longest_wait_ms(load.writes[m], started, ended) for m in merchants}
        summary = [ln for ln in text.splitlines() if not ln.startswith("[")]
        return {
            "merchants": merchants_count,
            "callers": callers,
            "moved": len(pauses),
            "planned_moves": len(moving),
            "rebalance_s": round(ended - started, 2),
            "calls_per_s_during": round(calls_during / (ended - started), 1),
            "pause_ms": spread(pauses),
            "callers_longest_wait_ms_moved": spread([waits[m] for m in moving]),
            "callers_longest_wait_ms_not_moved": spread([waits[m] for m in staying]),
            "failures": dict(load.failures),
            "rebalance_exit": process.returncode,
            "rebalance_summary": summary[-6:],
        }
    finally:
        if service is not None:
            service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shards = start_embedded_shards()
    try:
        result = asyncio.run(measure(shards, args.merchants, args.callers))
    finally:
        shards.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if result["rebalance_exit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU per delivered event: `python -m bench.event_cost [--transfers N]` (issue 20).

The throughput benchmark (`bench/run.py --events`) says what the event stream's
consumers cost under load, on a machine whose speed drifts by 10-20% between
runs; this says where a change moved the cost, and is robust to that load. On
an otherwise idle service it writes a backlog of transfers (batches of
--batch-size, one event each), waits until they are sequenced, then:

- `subscriber`: one `SubscribeEvents` call (one event per message) reads the
  whole backlog from the oldest event; the service's CPU (and PostgreSQL's)
  divided by the events delivered;
- `batches`: the same with `SubscribeEventBatches` (several events per message);
- `publisher`: `ledger events publish` is started, caught up on what exists,
  frozen (SIGSTOP) while another backlog is written and sequenced, then let go
  (SIGCONT); its CPU from there until it acknowledged the last event, divided
  by the events, so its start (imports, connecting) is not counted. Needs a
  broker (--amqp-url); skipped without one.

Sequential and alone on the service, so the figure is the cost of delivery
itself; A/B a change with two runs of each, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import asyncpg
import grpc

from bench import cluster
from bench.worker import CALL_TIMEOUT_S, _to_proto
from bench.workload import Picker
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

MERCHANTS = 300
# Waiting for the sequencer to number a backlog, or a consumer to catch up.
CATCH_UP_TIMEOUT_S = 300.0
# How often the catch-up waits look at the shards.
POLL_S = 0.2
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def _positions(dsns: Sequence[tuple[str, str]], query: str) -> dict[str, int]:
    positions = {}
    for name, dsn in dsns:
        conn = await asyncpg.connect(dsn)
        try:
            positions[name] = int(await conn.fetchval(query) or 0)
        finally:
            await conn.close()
    return positions


async def _sequenced(dsns: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Waits until every shard's outbox is empty; the last positions."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        backlog = await _positions(dsns, "SELECT count(*) FROM event_queue")
        if not any(backlog.values()):
            return await _positions(dsns, "SELECT last_position FROM event_positions")
        await asyncio.sleep(POLL_S)
    raise TimeoutError("the outbox was not sequenced in time")


async def _write(stub: ledger_pb2_grpc.LedgerServiceAsyncStub, picker: Picker, calls: int) -> int:
    transfers = 0
    for _ in range(calls):
        _, specs = picker.local_batch()
        response = await stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=[_to_proto(t) for t in specs]),
            timeout=CALL_TIMEOUT_S,
        )
        bad = [r for r in response.results if r.result != pb.TRANSFER_RESULT_OK]
        if bad:
            raise RuntimeError(f"transfers not applied: {bad[:3]}")
        transfers += len(specs)
    return transfers


def _service_s(service: cluster.ServiceProcess) -> float:
    return sum(cluster.cpu_s(p) for p in cluster.process_tree(service.pid))


def _postgres_s(pid: int | None) -> float:
    return 0.0 if pid is None else sum(cluster.cpu_s(p) for p in cluster.process_tree(pid))


# Where --py-spy writes the stacks (set by main), and for how long it records.
SPY_DIR: list[Path] = []
SPY_S = 4.0


def _spy(pid: int, name: str) -> cluster.PySpy | None:
    if not SPY_DIR:
        return None
    return cluster.PySpy(pid, SPY_DIR[0] / f"{name}.txt", seconds=SPY_S)


async def _read_all(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub, total: int, *, batches: bool
) -> int:
    """Reads every event from the oldest; how many were delivered."""
    got = 0
    request = pb.SubscribeEventsRequest()
    if batches:
        batch_call = stub.SubscribeEventBatches(request)
        async for batch in batch_call:
            got += len(batch.events)
            if got >= total:
                break
        batch_call.cancel()
    else:
        event_call = stub.SubscribeEvents(request)
        async for _ in event_call:
            got += 1
            if got >= total:
                break
        event_call.cancel()
    return got


async def _measure_subscriber(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    service: cluster.ServiceProcess,
    postgres_pid: int | None,
    total: int,
    *,
    batches: bool,
) -> None:
    spy = _spy(service.pid, "batches" if batches else "subscriber")
    service_before, postgres_before = _service_s(service), _postgres_s(postgres_pid)
    started = time.monotonic()
    got = await _read_all(stub, total, batches=batches)
    if spy is not None:
        spy.wait()
    elapsed_s = time.monotonic() - started
    service_s = _service_s(service) - service_before
    postgres_s = _postgres_s(postgres_pid) - postgres_before
    name = "batches" if batches else "subscriber"
    print(
        f"{name:<10} {got:>7} events  service {1e6 * service_s / got:>6.1f} us/event   "
        f"postgres {1e6 * postgres_s / got:>6.1f} us/event   {got / elapsed_s:>7.0f} events/s",
        flush=True,
    )


async def _run(
    args: argparse.Namespace, shards: cluster.Shards, svc: cluster.ServiceProcess
) -> None:
    target = svc.target
    workload = cluster.one_caller_workload(shards, merchants=MERCHANTS, batch_size=args.batch_size)
    await cluster.create_accounts(target, workload)
    picker = Picker(workload, caller_global=0, seed=1)
    postgres_pid = cluster.postmaster_pid(shards)
    calls = max(1, args.transfers // args.batch_size)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        await _write(stub, picker, calls)
        last = await _sequenced(shards.dsns)
        total = sum(last.values())
        print(f"backlog {total} events on {len(last)} shards", flush=True)
        # The first read warms the service (statements prepared, code paths taken).
        await _read_all(stub, min(total, 2000), batches=False)
        for _ in range(args.repeats):
            await _measure_subscriber(stub, svc, postgres_pid, total, batches=False)
            if not args.no_batches:
                await _measure_subscriber(stub, svc, postgres_pid, total, batches=True)
        if args.amqp_url:
            await _measure_publisher(args, shards, stub, picker, calls)


async def _measure_publisher(
    args: argparse.Namespace,
    shards: cluster.Shards,
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    picker: Picker,
    calls: int,
) -> None:
    consumer = f"bench-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "ledger.cli", "events", "publish"]
    command += ["--config", str(shards.config_path), "--amqp", args.amqp_url]
    command += ["--consumer", consumer, *args.publisher_args]
    log = (shards.config_path.parent / "publisher.log").open("wb")
    publisher = _start(command, log)
    acked = f"SELECT position FROM event_consumers WHERE consumer = '{consumer}'"
    try:
        await _caught_up(shards, acked, await _sequenced(shards.dsns), publisher)
        before_positions = await _positions(shards.dsns, acked)
        publisher.send_signal(signal.SIGSTOP)
        await _write(stub, picker, calls)
        last = await _sequenced(shards.dsns)
        events = sum(last.values()) - sum(before_positions.values())
        postgres_pid = cluster.postmaster_pid(shards)
        cpu_before, postgres_before = cluster.cpu_s(publisher.pid), _postgres_s(postgres_pid)
        started = time.monotonic()
        publisher.send_signal(signal.SIGCONT)
        spy = _spy(publisher.pid, "publisher")
        await _caught_up(shards, acked, last, publisher)
        if spy is not None:
            spy.wait()
        elapsed_s = time.monotonic() - started
        cpu_s = cluster.cpu_s(publisher.pid) - cpu_before
        postgres_s = _postgres_s(postgres_pid) - postgres_before
        print(
            f"publisher  {events:>7} events  publisher {1e6 * cpu_s / events:>6.1f} us/event   "
            f"postgres {1e6 * postgres_s / events:>6.1f} us/event   "
            f"{events / elapsed_s:>7.0f} events/s",
            flush=True,
        )
    finally:
        publisher.send_signal(signal.SIGCONT)
        publisher.terminate()
        publisher.wait(30)
        log.close()


def _start(command: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


async def _caught_up(
    shards: cluster.Shards, acked: str, last: dict[str, int], publisher: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        if publisher.poll() is not None:
            raise RuntimeError(f"the publisher exited {publisher.returncode}: see publisher.log")
        positions = await _positions(shards.dsns, acked)
        if all(positions.get(name, 0) >= p for name, p in last.items()):
            return
        await asyncio.sleep(POLL_S)
    raise TimeoutError("the publisher did not catch up in time")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.event_cost", description=__doc__)
    parser.add_argument("--transfers", type=int, default=20_000, help="backlog, in transfers")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="reads of the backlog")
    parser.add_argument("--no-batches", action="store_true", help="skip SubscribeEventBatches")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL, help="'' skips the publisher")
    parser.add_argument(
        "--publisher-args", nargs=argparse.REMAINDER, default=[], help="passed to publish"
    )
    parser.add_argument("--py-spy", type=Path, help="record py-spy stacks into DIR (slower)")
    args = parser.parse_args(argv)
    if args.py_spy:
        SPY_DIR.append(args.py_spy)
    shards = cluster.start_embedded_shards()
    service = cluster.ServiceProcess(shards.config_path, shards.config_path.parent / "svc.log")
    try:
        service.start()
        asyncio.run(_run(args, shards, service))
    finally:
        service.stop()
        shards.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

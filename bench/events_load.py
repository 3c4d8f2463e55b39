"""The event stream's cost under load: `--events subscriber[,publisher]` (issue 20).

With --events, `single` and `batch` are each measured twice in a row: as ever,
then again with the event stream's consumers attached (`single_events`,
`batch_events`), so the ratio of the two (shown like the other ratios) is what
the consumers cost, measured back to back on the same server state; and
`single_half_peak`, if measured, is followed by `single_half_peak_events` at the
same offered rate, for the delay from commit to delivery at half the peak.

- `subscriber`: N processes (--event-subscribers, default 1), each one gRPC
  channel with one unfiltered `SubscribeEventBatches(from_now)` call (or
  `SubscribeEvents`, one message per event, with --event-rpc events), reading
  every event of every shard for the whole phase (warm-up included) and timing
  each from its `committed_at` to its receipt: the delay from commit to delivery
  (p50, p99 over every event received, as the subscriber's clock sees it; the
  service runs on the same machine, so one clock).
- `publisher`: `python -m ledger.cli events publish --config FILE --amqp URL
  --consumer bench-publisher` (--amqp-url) as a process beside the service, for
  the phase, acknowledged up to every shard's last event first so that it
  publishes the phase's events, not the history nor what phases without it
  wrote (no queue bound: the broker routes each message and drops it).

The consumers' processes run on the same cores as everything else; their CPU
is counted with the client processes' (`cpu_cores.clients`), so `other` still
means work outside the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench.cluster import CpuMeter, cpu_s
from bench.report import percentile
from ledger.routing.config import load_config
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

PARTS = ("subscriber", "publisher")
RPCS = ("batches", "events")
# The modes measured again with the consumers attached, and the name they get:
# single and batch for the cost (the ratio), single at half its peak rate for the
# delay at a comfortable load (at the peak every queue in the service is full,
# and the sequencer and the subscription wait in them with the writes).
MEASURED_MODES = ("single", "batch", "single_half_peak")
SUFFIX = "_events"
# More subscriber processes than this on a 2-core machine measures the subscribers.
SUBSCRIBERS_MAX = 16
# A subscriber connects to a local service within this long (it imports grpc first).
SUBSCRIBER_READY_TIMEOUT_S = 60.0
# Told to stop, a subscriber sends its figures within this long.
SUBSCRIBER_RESULT_TIMEOUT_S = 30.0
# Joining a subscriber or publisher process after its figures.
PROCESS_STOP_TIMEOUT_S = 15.0
# Delay samples kept per subscriber: a phase of 33 s at the batch mode's ~10,000
# events/s is ~330,000; past this the rest are counted, not timed.
DELAY_SAMPLES_MAX = 2_000_000
# `ledger events publish --help` answers within this long when the command exists.
PUBLISHER_PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class EventsOptions:
    parts: tuple[str, ...] = ()
    subscribers: int = 1
    amqp_url: str = ""
    # The subscribers' RPC: "batches" (SubscribeEventBatches) or "events".
    rpc: str = "batches"


NO_EVENTS = EventsOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events",
        default="",
        help="also measure single and batch with the event stream's consumers attached: "
        "subscriber, publisher, or both (comma-separated)",
    )
    parser.add_argument(
        "--event-subscribers", type=int, default=1, help="subscriber processes with --events"
    )
    parser.add_argument("--amqp-url", default="", help="the broker of --events publisher")
    parser.add_argument(
        "--event-rpc",
        choices=RPCS,
        default="batches",
        help="the subscribers read SubscribeEventBatches (batches) or SubscribeEvents (events)",
    )


def options_from(args: argparse.Namespace) -> tuple[EventsOptions, list[str]]:
    """The --events options, and what is wrong with them."""
    parts = tuple(p.strip() for p in args.events.split(",") if p.strip())
    problems = []
    if unknown := set(parts) - set(PARTS):
        problems.append(f"--events: unknown {sorted(unknown)}; known: {', '.join(PARTS)}")
    if not 1 <= args.event_subscribers <= SUBSCRIBERS_MAX:
        problems.append(f"--event-subscribers must be 1 to {SUBSCRIBERS_MAX}")
    if "publisher" in parts:
        if not args.amqp_url:
            problems.append("--events publisher needs --amqp-url")
        elif not publisher_exists():
            problems.append(
                "--events publisher: `ledger events publish` does not exist in this tree yet"
            )
    ordered = tuple(p for p in PARTS if p in parts)
    options = EventsOptions(ordered, args.event_subscribers, args.amqp_url, args.event_rpc)
    return options, problems


def publisher_exists() -> bool:
    try:
        probe = subprocess.run(
            [sys.executable, "-m", "ledger.cli", "events", "publish", "--help"],
            capture_output=True,
            timeout=PUBLISHER_PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def with_event_modes(modes: Sequence[str], options: EventsOptions) -> tuple[str, ...]:
    """The modes in order, each measured mode followed by its run with consumers."""
    if not options.parts:
        return tuple(modes)
    return tuple(name for m in modes for name in ((m, m + SUFFIX) if m in MEASURED_MODES else (m,)))


def base_mode(mode: str) -> str:
    """What the client processes run in a mode (the consumers are not theirs)."""
    return mode.removesuffix(SUFFIX)


# The subscriber process.


@dataclass
class SubscriberResult:
    events: int = 0
    # Seconds from commit to receipt, per event (up to DELAY_SAMPLES_MAX).
    delays_s: array[float] = field(default_factory=lambda: array("d"))
    error: str = ""


def subscriber_main(pipe: Connection, target: str, rpc: str = "batches") -> None:
    try:
        result = asyncio.run(_subscribe(pipe, target, rpc))
        pipe.send(("result", result))
    except BaseException:  # the orchestrator reports it
        pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


async def _subscribe(pipe: Connection, target: str, rpc: str) -> SubscriberResult:
    result = SubscriberResult()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The orchestrator's next message, whatever it is, means stop.
    loop.add_reader(pipe.fileno(), stop.set)
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), SUBSCRIBER_READY_TIMEOUT_S)
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        request = pb.SubscribeEventsRequest(from_now=True)
        call: Any = (
            stub.SubscribeEventBatches(request)
            if rpc == "batches"
            else stub.SubscribeEvents(request)
        )

        def received(events: Sequence[pb.Event]) -> None:
            received_at = time.time()
            result.events += len(events)
            for event in events:
                if len(result.delays_s) < DELAY_SAMPLES_MAX:
                    result.delays_s.append(received_at - event.committed_at.ToNanoseconds() / 1e9)

        async def read() -> None:
            async for message in call:
                received(message.events if rpc == "batches" else (message,))

        reader = asyncio.create_task(read())
        pipe.send(("ready", None))
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({reader, stopped}, return_when=asyncio.FIRST_COMPLETED)
        loop.remove_reader(pipe.fileno())
        if reader in done:
            # The stream ended before it was told to stop: a broken phase.
            error = reader.exception()
            result.error = f"the subscription ended: {error or 'without a status'}"
        call.cancel()
        reader.cancel()
        stopped.cancel()
        await asyncio.gather(reader, stopped, return_exceptions=True)
    pipe.recv()
    return result


# Attaching the consumers to one phase.


class Consumers:
    """The consumers of one phase: started by attach(), figures from detach()."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self._publisher: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._cpu: CpuMeter | None = None
        self._client_pids: list[int] = []
        self.rpc = ""

    def detach(self) -> dict[str, Any]:
        """Stops the consumers; their figures for the mode (nothing when none ran)."""
        if not self._subscribers and self._publisher is None:
            return {}
        elapsed_s = time.monotonic() - self._started_at
        # Each consumer process's own CPU over the phase (its start included), before
        # it exits: what the consumers cost, apart from the client processes'.
        subscriber_cpu_s = [cpu_s(p.pid) if p.pid else 0.0 for p, _ in self._subscribers]
        publisher_cpu_s = cpu_s(self._publisher.pid) if self._publisher is not None else 0.0
        results: list[SubscriberResult] = []
        for _, pipe in self._subscribers:
            pipe.send(("stop", None))
        for process, pipe in self._subscribers:
            if not pipe.poll(SUBSCRIBER_RESULT_TIMEOUT_S):
                raise TimeoutError(
                    f"no figures from an event subscriber in {SUBSCRIBER_RESULT_TIMEOUT_S}s"
                )
            kind, payload = pipe.recv()
            if kind != "result":
                raise RuntimeError(f"an event subscriber failed: {payload}")
            results.append(payload)
            process.join(PROCESS_STOP_TIMEOUT_S)
            pipe.close()
        if self._cpu is not None:
            self._cpu.client_pids = self._client_pids
        publisher_exit = None
        if self._publisher is not None:
            self._publisher.terminate()
            try:
                publisher_exit = self._publisher.wait(PROCESS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._publisher.kill()
                publisher_exit = self._publisher.wait(PROCESS_STOP_TIMEOUT_S)
        figures: dict[str, Any] = {"event_consumers": list(self.parts)}
        if results:
            figures["event_rpc"] = self.rpc
        if results:
            delays = sorted(d for r in results for d in r.delays_s)
            figures["event_subscribers"] = {
                "processes": len(results),
                "events": [r.events for r in results],
                "events_per_s": sum(r.events for r in results) / len(results) / elapsed_s,
                "delivery_delay_ms": {
                    "p50": percentile(delays, 0.50) * 1000,
                    "p99": percentile(delays, 0.99) * 1000,
                    "max": (delays[-1] if delays else 0.0) * 1000,
                },
                "errors": [r.error for r in results if r.error],
                "cpu_cores": [c / elapsed_s for c in subscriber_cpu_s],
            }
        if self._publisher is not None:
            figures["event_publisher"] = {
                "exit": publisher_exit,
                "cpu_cores": publisher_cpu_s / elapsed_s,
            }
        return figures

    @property
    def parts(self) -> tuple[str, ...]:
        return (("subscriber",) if self._subscribers else ()) + (
            ("publisher",) if self._publisher is not None else ()
        )


# The bench publisher's registered consumer name.
PUBLISHER_CONSUMER = "bench-publisher"
# Registers consumer at every shard's last position, or moves it there.
ACKNOWLEDGE_ALL = """
INSERT INTO event_consumers (consumer, position)
SELECT $1, last_position FROM event_positions
ON CONFLICT (consumer) DO UPDATE
SET position = EXCLUDED.position, lapsed_at = NULL, acked_at = clock_timestamp()
"""


async def _acknowledge_all(config_path: Path, consumer: str) -> None:
    for shard in load_config(config_path).shards:
        connection = await asyncpg.connect(shard.dsn)
        try:
            await connection.execute(ACKNOWLEDGE_ALL, consumer)
        finally:
            await connection.close()


def attach(
    mode: str,
    options: EventsOptions,
    *,
    target: str,
    config_path: Path,
    log_dir: Path,
    cpu: CpuMeter,
) -> Consumers:
    """Starts the mode's consumers (none unless it is a *_events mode)."""
    consumers = Consumers()
    consumers.rpc = options.rpc
    if not mode.endswith(SUFFIX) or not options.parts:
        return consumers
    if "publisher" in options.parts:
        # This phase's events only: a registered publisher resumes where it was
        # acknowledged (a new one at the oldest event kept), so it would spend the
        # phase on the history and on every phase measured without it.
        asyncio.run(_acknowledge_all(config_path, PUBLISHER_CONSUMER))
        log = (log_dir / "publisher.log").open("ab")
        command = [sys.executable, "-m", "ledger.cli", "events", "publish"]
        command += ["--consumer", PUBLISHER_CONSUMER]
        consumers._publisher = subprocess.Popen(
            [*command, "--config", str(config_path), "--amqp", options.amqp_url],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        log.close()
    if "subscriber" in options.parts:
        context = multiprocessing.get_context("spawn")
        for index in range(options.subscribers):
            parent, child = context.Pipe()
            process = context.Process(
                target=subscriber_main,
                args=(child, target, options.rpc),
                name=f"bench-event-subscriber-{index}",
                daemon=True,
            )
            process.start()
            child.close()
            consumers._subscribers.append((process, parent))
        for _, pipe in consumers._subscribers:
            if not pipe.poll(SUBSCRIBER_READY_TIMEOUT_S):
                raise TimeoutError("an event subscriber did not connect in time")
            kind, payload = pipe.recv()
            if kind != "ready":
                raise RuntimeError(f"an event subscriber failed: {payload}")
    # Their CPU is the clients' for this phase.
    consumers._cpu = cpu
    consumers._client_pids = list(cpu.client_pids)
    cpu.client_pids = [
        *cpu.client_pids,
        *(p.pid for p, _ in consumers._subscribers if p.pid is not None),
        *([consumers._publisher.pid] if consumers._publisher is not None else []),
    ]
    consumers._started_at = time.monotonic()
    return consumers

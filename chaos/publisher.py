"""The AMQP publisher under chaos (`--amqp URL`): `ledger events publish` rides out
the faults, SIGKILLed now and then, and the queue it fills must hold every event.

The publisher runs as a process of its own with the replicas' config, so it reaches
the shards through their proxies: shard stops, partitions and slow links hit it as
they hit the replicas, and the drains' retirements wait for it (it is a registered
consumer: a shard retires only once it has published the shard's whole stream). It
publishes to an exchange and a queue of this run's own. On a schedule drawn from
the seed, apart from the plan (plans and their digests stay as they were), it is
SIGKILLed and started again.

At the end, after the event subscriber's check (which proves the subscriber took
every position of every shard), it waits until the publisher has acknowledged
every shard's last position, stops it, and reads the queue. Delivery is at least
once, so duplicates are dropped by message id, as a consumer does; then every
event the subscriber took must be in the queue, and every message must be an
event the subscriber took, at the same shard and position.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import asyncpg

from chaos.checker import SHARD_CONNECT_TIMEOUT_S, SHARD_QUERY_TIMEOUT_S, CheckReport
from chaos.cluster import ROOT, SERVICE_ENV

# The registered consumer whose acknowledged positions say what was published.
CONSUMER = "chaos-publisher"
# SIGKILLs per run, at times drawn from the seed within the workload.
KILLS = 2
RESTART_PAUSE_S = 0.5
# At the end: how long the publisher may take to publish what the run left (it
# backs off up to seconds after a shard stopped answering), and to stop once
# asked (a batch in flight is confirmed first; a confirm may take 30 s).
CAUGHT_UP_DEADLINE_S = 90.0
CAUGHT_UP_POLL_S = 0.5
STOP_DEADLINE_S = 45.0
BROKER_CONNECT_TIMEOUT_S = 5.0
# Reading the queue ends once no message came for this long (the publisher stopped).
QUEUE_IDLE_S = 2.0
# Problems reported per kind; the counts say how many there were.
PROBLEMS_PER_KIND_MAX = 20

_POSITIONS = """
SELECT c.position, p.last_position
FROM event_positions AS p LEFT JOIN event_consumers AS c ON c.consumer = $1
"""


@dataclass(frozen=True, slots=True)
class Published:
    """One message as the queue gave it."""

    event_id: str
    shard: str
    position: int


@dataclass
class ChaosPublisher:
    amqp_url: str
    config_path: Path
    log_path: Path
    seed: int
    duration_s: float
    # This run's own exchange and queue: runs never read each other's messages.
    exchange: str = field(init=False)
    kills: int = 0
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    _process: asyncio.subprocess.Process | None = None

    def __post_init__(self) -> None:
        self.exchange = f"chaos.{self.seed}.{uuid.uuid4().hex[:8]}"

    @property
    def queue(self) -> str:
        return f"{self.exchange}.all"

    def kill_times_s(self) -> list[float]:
        rng = random.Random(f"chaos/{self.seed}/publisher")
        return sorted(rng.uniform(0.1, 0.9) * self.duration_s for _ in range(KILLS))

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "ledger.cli", "events", "publish", "--amqp", self.amqp_url),
                *("--config", str(self.config_path), "--exchange", self.exchange),
                *("--consumer", CONSUMER, "--queue", self.queue),
                cwd=ROOT,
                env={**os.environ, **SERVICE_ENV},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.starts += 1

    async def run_kills(self, *, start: float) -> None:
        """SIGKILLs the publisher at the seed's times (start: the workload's zero on
        the event loop's clock) and starts it again after a pause."""
        loop = asyncio.get_running_loop()
        for at_s in self.kill_times_s():
            await asyncio.sleep(max(0.0, start + at_s - loop.time()))
            process = self._process
            if process is None or process.returncode is not None:
                continue
            process.kill()
            await process.wait()
            self.kills += 1
            await asyncio.sleep(RESTART_PAUSE_S)
            await self.start()

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL past the deadline; its exit code (None: not running)."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_DEADLINE_S)
            except TimeoutError:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        self.exit_codes.append(process.returncode)
        return process.returncode

    async def caught_up(self, dsns: Mapping[str, str]) -> dict[str, tuple[int, int]]:
        """Waits until the publisher has acknowledged every shard's last position;
        the shards it has not, as (acknowledged, last) (empty when caught up)."""
        deadline = time.monotonic() + CAUGHT_UP_DEADLINE_S
        while True:
            # A publisher that exited on its own publishes nothing more: no waiting.
            exited = self._process is None or self._process.returncode is not None
            behind: dict[str, tuple[int, int]] = {}
            for name, dsn in sorted(dsns.items()):
                connection = await asyncpg.connect(dsn, timeout=SHARD_CONNECT_TIMEOUT_S)
                try:
                    row = await connection.fetchrow(
                        _POSITIONS, CONSUMER, timeout=SHARD_QUERY_TIMEOUT_S
                    )
                finally:
                    await connection.close()
                assert row is not None
                acknowledged = -1 if row["position"] is None else int(row["position"])
                if acknowledged < row["last_position"]:
                    behind[name] = (acknowledged, int(row["last_position"]))
            if not behind or exited or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(CAUGHT_UP_POLL_S)

    async def read_queue(self) -> list[Published]:
        """Every message in the run's queue, in the order the queue gives them."""
        connection = await aio_pika.connect(self.amqp_url, timeout=BROKER_CONNECT_TIMEOUT_S)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(self.queue, ensure=True)
            messages: list[Published] = []
            async with queue.iterator(no_ack=True) as iterator:
                while True:
                    try:
                        message = await asyncio.wait_for(iterator.__anext__(), QUEUE_IDLE_S)
                    except (TimeoutError, StopAsyncIteration):
                        break
                    messages.append(_published(message))
            return messages
        finally:
            await connection.close()

    async def delete_topology(self) -> None:
        """The run's queues and exchanges go with it (the broker is shared)."""
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(self.amqp_url, timeout=BROKER_CONNECT_TIMEOUT_S)
            try:
                channel = await connection.channel()
                for queue in (self.queue, f"{self.exchange}.dead"):
                    with contextlib.suppress(Exception):
                        await channel.queue_delete(queue)
                for exchange in (self.exchange, f"{self.exchange}.dead"):
                    with contextlib.suppress(Exception):
                        await channel.exchange_delete(exchange)
            finally:
                await connection.close()

    def summary(self, messages: int, duplicates: int) -> dict[str, Any]:
        return {
            "starts": self.starts,
            "kills": self.kills,
            "exit_codes": self.exit_codes,
            "messages": messages,
            "duplicates_dropped": duplicates,
        }


def _published(message: aio_pika.abc.AbstractIncomingMessage) -> Published:
    headers = dict(message.headers)
    return Published(
        event_id=message.message_id or "",
        shard=str(headers.get("shard", "")),
        position=int(str(headers.get("position", 0))),
    )


def compare_published(
    messages: list[Published], seen: Mapping[str, tuple[str, int]], report: CheckReport
) -> int:
    """Holds the queue to the subscriber's events (event id -> (shard, position)):
    each event there once after dedupe, and nothing else. Returns the duplicates."""
    taken: dict[str, Published] = {}
    duplicates = 0
    problems: dict[str, int] = {}

    def problem(kind: str, where: str, detail: str) -> None:
        problems[kind] = problems.get(kind, 0) + 1
        if problems[kind] <= PROBLEMS_PER_KIND_MAX:
            report.add("published", where, detail)

    for message in messages:
        first = taken.get(message.event_id)
        if first is not None:
            duplicates += 1
            if first != message:
                problem(
                    "moved",
                    f"event {message.event_id}",
                    f"published as {message.shard}#{message.position}, "
                    f"first as {first.shard}#{first.position}",
                )
            continue
        taken[message.event_id] = message
        expected = seen.get(message.event_id)
        if expected is None:
            problem(
                "unknown",
                f"event {message.event_id}",
                f"published as {message.shard}#{message.position}, never delivered by the stream",
            )
        elif expected != (message.shard, message.position):
            problem(
                "moved",
                f"event {message.event_id}",
                f"published as {message.shard}#{message.position}, "
                f"delivered as {expected[0]}#{expected[1]}",
            )
    missing = sorted(
        (shard, position, event_id)
        for event_id, (shard, position) in seen.items()
        if event_id not in taken
    )
    for shard, position, event_id in missing:
        problem("missing", f"shard {shard}", f"event {event_id} (#{position}) never published")
    return duplicates


async def check_published(
    publisher: ChaosPublisher,
    seen: Mapping[str, tuple[str, int]],
    dsns: Mapping[str, str],
    report: CheckReport,
) -> dict[str, Any]:
    """After the event stream's check: the publisher catches up, stops, and its queue
    holds every event once after dedupe. Returns its figures for the summary."""
    behind = await publisher.caught_up(dsns)
    for name, (acknowledged, last) in behind.items():
        report.add(
            "published",
            f"shard {name}",
            f"acknowledged to #{acknowledged} of #{last} after {CAUGHT_UP_DEADLINE_S:.0f} s",
        )
    code = await publisher.stop()
    if code not in (0, None):
        report.add("published", "ledger events publish", f"exit {code} when stopped")
    messages = await publisher.read_queue()
    duplicates = compare_published(messages, seen, report)
    return publisher.summary(len(messages), duplicates)

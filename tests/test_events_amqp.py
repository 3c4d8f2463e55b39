"""The RabbitMQ publisher (`ledger events publish`) against a real broker: every event
arrives, in per-shard order, as SubscribeEvents delivers it; a publisher SIGKILLed
mid-stream (at seeded random points, checked against a model of what may repeat) or
between a confirm and its acknowledgement loses nothing and sends again only what it
had not acknowledged; a message the broker refuses (nack) keeps its batch
unacknowledged until it is confirmed; a broker outage (through a TCP proxy) loses
nothing; of two publishers one at a time publishes a shard, and one takes over from
a dead one; a rejected message is dead-lettered; a refused login exits 1 without the
password.

The broker is RabbitMQ at 127.0.0.1:5672 (guest/guest), or $LEDGER_TEST_AMQP_URL;
without one these tests skip and say why. The publisher runs as a real process
(`python -m ledger.cli events publish`) against the service fixture's shards.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import pytest
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from google.protobuf import json_format

from ledger import limits
from ledger.api.amqp_publisher import AmqpPublisher, PublisherSettings
from ledger.storage.event_lease import ShardLease
from ledger.storage.events import EventStore
from ledger.storage.shard import Shard
from ledger.telemetry.redaction import redact
from ledger.v1 import ledger_pb2 as pb
from tests.event_support import collect_until
from tests.ledger4 import ALL_SHARDS, Ledger4, merchant_on
from tests.support import (
    Service,
    account,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    wait_until,
)
from tests.test_events_shard_changes import grow_to_four
from tests.test_moves_settle_routing import rebalance_to

AMQP_URL = os.environ.get("LEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parent.parent
SHARDS = ("shard-a", "shard-b", "shard-c")
# A publisher process starts (imports, connects, takes leases) and catches up within
# this long, even on a loaded machine.
PUBLISHER_DEADLINE_S = 90.0
# A publisher asked to stop confirms its batch in flight and exits within this long.
PUBLISHER_STOP_DEADLINE_S = 45.0
BROKER_CONNECT_TIMEOUT_S = 5.0
# Each test starts publisher processes and waits on a few conditions, each within
# PUBLISHER_DEADLINE_S: more than the suite's default of 120 s may pass on a loaded
# machine before one of them fails on its own deadline (a clearer failure).
pytestmark = pytest.mark.timeout(300)


@dataclass
class Received:
    """One message as a consumer of the test's queue got it."""

    routing_key: str
    message_id: str
    content_type: str | None
    headers: dict[str, object]
    body: bytes
    event: pb.Event
    # The other properties (docs/events.md, "Messages").
    properties: dict[str, object] = field(default_factory=dict)


@dataclass
class Topology:
    """The test's own exchange (and dead letters) and queue, so that tests and parallel
    runs never see each other's messages; deleted at the end."""

    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    tag: str = field(default_factory=lambda: uid("t"))
    received: list[Received] = field(default_factory=list)

    @property
    def exchange(self) -> str:
        return f"ledger.events.{self.tag}"

    @property
    def dead_letter(self) -> str:
        return f"{self.exchange}.dead"

    @property
    def queue(self) -> str:
        return f"ledger.test.{self.tag}"

    async def declare(self) -> aio_pika.abc.AbstractQueue:
        """What the publisher declares, with the same arguments (so a difference fails
        the publisher with PRECONDITION_FAILED)."""
        await self.channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self.channel.declare_queue(
            self.queue, durable=True, arguments={"x-dead-letter-exchange": self.dead_letter}
        )
        await queue.bind(self.exchange, routing_key="#")
        return queue

    async def consume(self, queue: aio_pika.abc.AbstractQueue) -> None:
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.received.append(_received(message))
            await message.ack()

        await queue.consume(on_message)

    async def delete(self) -> None:
        for queue in (self.queue, self.dead_letter):
            await self.channel.queue_delete(queue)
        for exchange in (self.exchange, self.dead_letter):
            await self.channel.exchange_delete(exchange)

    def unique(self) -> dict[str, Received]:
        """The received messages by message_id (the first of each)."""
        first: dict[str, Received] = {}
        for r in self.received:
            first.setdefault(r.message_id, r)
        return first

    def positions(self) -> dict[str, set[int]]:
        got: dict[str, set[int]] = {name: set() for name in SHARDS}
        for r in self.received:
            got[r.event.shard].add(r.event.position)
        return got

    def has_all(self, last: dict[str, int]) -> bool:
        got = self.positions()
        return all(set(range(1, last[name] + 1)) <= got[name] for name in last)


def _received(message: aio_pika.abc.AbstractIncomingMessage) -> Received:
    assert message.message_id is not None
    return Received(
        routing_key=message.routing_key or "",
        message_id=message.message_id,
        content_type=message.content_type,
        headers=dict(message.headers),
        body=message.body,
        event=json_format.Parse(message.body, pb.Event()),
        properties={
            "content_encoding": message.content_encoding,
            "delivery_mode": int(message.delivery_mode),
            "timestamp": message.timestamp,
            "type": message.type,
            "app_id": message.app_id,
        },
    )


@pytest.fixture
async def broker() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=BROKER_CONNECT_TIMEOUT_S)
    except CONNECTION_EXCEPTIONS as error:
        pytest.skip(f"no RabbitMQ at {redact(AMQP_URL)} (set LEDGER_TEST_AMQP_URL): {error!r}")
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def topology(broker: aio_pika.abc.AbstractConnection) -> AsyncIterator[Topology]:
    channel = await broker.channel()
    topology = Topology(broker, channel)
    try:
        yield topology
    finally:
        await topology.delete()
        await channel.close()


@dataclass
class Publisher:
    """`ledger events publish` as a child process."""

    service: Service
    topology: Topology
    log_path: Path
    consumer: str
    queue: bool = True
    amqp_url: str = AMQP_URL
    # The shard config it reads (default: the service's).
    config_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        command = [
            sys.executable, "-m", "ledger.cli", "events", "publish",
            "--amqp", self.amqp_url,
            "--config", str(self.config_path or self.service.config_path),
            "--exchange", self.topology.exchange,
            "--consumer", self.consumer,
        ]  # fmt: skip
        if self.queue:
            command += ["--queue", self.topology.queue]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **extra_env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def wait_exit(self, deadline_s: float = PUBLISHER_STOP_DEADLINE_S) -> int:
        assert self.process is not None
        end = time.monotonic() + deadline_s
        while self.process.poll() is None:
            if time.monotonic() > end:
                self.process.kill()
                raise AssertionError(f"publisher did not exit in time:\n{self.log()}")
            await asyncio.sleep(0.02)
        return self.process.returncode

    async def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        await self.wait_exit()

    async def stop(self) -> int:
        """SIGTERM; the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait_exit()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def assert_running(self) -> None:
        assert self.process is not None and self.process.poll() is None, (
            f"the publisher exited:\n{self.log()}"
        )


async def lease_holders(
    service: Service, consumer: str, shards: Sequence[str] = SHARDS
) -> dict[str, int | None]:
    """Per shard, the pid of the publisher holding consumer's lease (None: nobody)."""
    holders: dict[str, int | None] = {}
    for name in shards:
        holder = await ShardLease.holder(service.cluster.shards[name], consumer)
        holders[name] = int(holder.split()[2]) if holder else None
    return holders


async def wait_holding(publisher: Publisher, shards: Sequence[str] = SHARDS) -> None:
    """Waits until the publisher (running throughout) holds the shards' leases."""

    async def holding() -> bool:
        publisher.assert_running()
        holders = await lease_holders(publisher.service, publisher.consumer, shards)
        return set(holders.values()) == {publisher.pid}

    await wait_until(
        holding, deadline_s=PUBLISHER_DEADLINE_S, what=f"the publisher holding {shards}"
    )


async def acknowledged(service: Service, consumer: str) -> dict[str, int]:
    positions: dict[str, int] = {}
    for name in SHARDS:
        for c in await EventStore(service.cluster.shards[name]).consumers():
            if c.consumer == consumer:
                positions[name] = c.position
    return positions


async def last_positions(service: Service) -> dict[str, int]:
    """Where each shard's stream stands once a fresh marker event on it is sequenced:
    every event written before this call is at or before it."""
    # Read only what comes after now: the module's streams grow long.
    after = {name: (await EventStore(service.cluster.shards[name]).bounds())[1] for name in SHARDS}
    markers = {uid("marker"): service.merchant_on(name) for name in SHARDS}
    await create_accounts(
        service.stub,
        *(account(m, a) for a, m in markers.items()),
    )
    last: dict[str, int] = {}

    def all_seen(event: pb.Event) -> bool:
        if event.kind == pb.EVENT_KIND_ACCOUNT_CREATED and event.account.ref.account_id in markers:
            last[event.shard] = event.position
        return len(last) == len(SHARDS)

    await collect_until(
        service.stub,
        pb.SubscribeEventsRequest(after=pb.EventCursor(positions=after)),
        all_seen,
        deadline_s=PUBLISHER_DEADLINE_S,
    )
    return last


async def books_workload(service: Service) -> None:
    """Accounts on every shard, local transfers, a two-phase one and a cross-shard one."""
    stub = service.stub
    a, b, c = (service.merchant_on(name) for name in SHARDS)
    await create_accounts(
        stub, *(account(m, name) for m in (a, b, c) for name in ("cash", "sales"))
    )
    results = await transfers(
        stub,
        transfer(uid("local-"), ref(a, "cash"), ref(a, "sales"), 100),
        transfer(uid("local-"), ref(b, "cash"), ref(b, "sales"), 200),
        transfer(uid("local-"), ref(c, "cash"), ref(c, "sales"), 300),
        transfer(uid("hold-"), ref(c, "cash"), ref(c, "sales"), 40,
                 action=pb.TRANSFER_ACTION_PENDING),
        transfer(uid("cross-"), ref(a, "cash"), ref(b, "sales"), 250),
    )  # fmt: skip
    assert result_names(results) == ["TRANSFER_RESULT_OK"] * 5


async def wait_received(
    topology: Topology, last: dict[str, int], publishers: list[Publisher]
) -> None:
    async def arrived() -> bool:
        for p in publishers:
            if p.process is not None and p.process.poll() is not None:
                raise AssertionError(f"a publisher exited:\n{p.log()}")
        return topology.has_all(last)

    await wait_until(
        arrived, deadline_s=PUBLISHER_DEADLINE_S, what=f"every event up to {last} in the queue"
    )


def first_positions(topology: Topology) -> dict[str, list[int]]:
    """Per shard, the positions of the messages that were new, in arrival order."""
    seen: set[str] = set()
    order: dict[str, list[int]] = {name: [] for name in SHARDS}
    for r in topology.received:
        if r.message_id not in seen:
            seen.add(r.message_id)
            order[r.event.shard].append(r.event.position)
    return order


def assert_duplicates_are_true_copies(topology: Topology) -> None:
    """A message_id always carries the same event (shard, position, body)."""
    first = topology.unique()
    for r in topology.received:
        assert r.body == first[r.message_id].body
    by_position = {(r.event.shard, r.event.position) for r in first.values()}
    assert len(by_position) == len(first), "one message_id per (shard, position)"


def assert_resent_only_after_kills(topology: Topology, kills: list[dict[str, int]]) -> int:
    """The model of a publisher killed len(kills) times (kills: what it had acknowledged
    at each kill): per shard, positions arrive in runs 1, 2, ..., k, then a successor
    starts again right after an acknowledged position a (a + 1 <= k <= a + one batch);
    so every duplicate lies in (a, a + one batch] of some kill. Returns the duplicates."""
    batch = limits.event_publish_batch_max
    duplicates = 0
    for name in SHARDS:
        acked = [k.get(name, 0) for k in kills]
        got = [r.event.position for r in topology.received if r.event.shard == name]
        seen: set[int] = set()
        for before, position in zip([0, *got], got, strict=False):
            if position != before + 1:  # a restart: right after what some kill had acknowledged
                assert any(position == a + 1 and before <= a + batch for a in acked), (
                    f"{name}: {position} after {before}; acknowledged at the kills: {acked}"
                )
            if position in seen:
                duplicates += 1
                assert any(a < position <= a + batch for a in acked), (name, position, acked)
            seen.add(position)
        assert seen == set(range(1, len(seen) + 1)), f"{name} lost events"
    return duplicates


async def test_every_event_reaches_the_queue_once_in_order_as_subscribers_see_it(
    service: Service, topology: Topology, tmp_path: Path
) -> None:
    queue = await topology.declare()
    await topology.consume(queue)
    await books_workload(service)
    publisher = Publisher(service, topology, tmp_path / "publisher.log", consumer=uid("pub-"))
    publisher.start()
    try:
        last = await last_positions(service)
        await wait_received(topology, last, [publisher])
        # Every position 1..N of every shard, each once (no publisher died: no duplicate).
        received, unique = len(topology.received), len(topology.unique())
        assert received == unique, "no event was published twice"
        for name, positions in first_positions(topology).items():
            assert positions == sorted(positions), f"{name} out of order"
            assert positions[: last[name]] == list(range(1, last[name] + 1))
        # The body is the Event SubscribeEvents delivers, its cursor naming its own shard.
        subscribed = await collect_until(
            service.stub,
            pb.SubscribeEventsRequest(),
            lambda e: all(e.cursor.positions[n] >= last[n] for n in SHARDS),
            deadline_s=PUBLISHER_DEADLINE_S,
        )
        by_position = {(r.event.shard, r.event.position): r for r in topology.received}
        kinds_seen: set[str] = set()
        for expected in subscribed:
            got = by_position[(expected.shard, expected.position)]
            kind = pb.EventKind.Name(expected.kind).removeprefix("EVENT_KIND_").lower()
            kinds_seen.add(kind)
            assert got.routing_key == f"{kind}.{expected.shard}"
            assert got.message_id == expected.event_id
            assert got.content_type == "application/json"
            assert got.headers == {
                "shard": expected.shard, "position": expected.position, "kind": kind
            }  # fmt: skip
            assert got.properties == {
                "content_encoding": "utf-8",
                "delivery_mode": 2,
                # AMQP timestamps are whole seconds.
                "timestamp": datetime.fromtimestamp(
                    expected.committed_at.seconds,
                    tz=got.properties["timestamp"].tzinfo,  # type: ignore[union-attr]
                ),
                "type": kind,
                "app_id": "ledger",
            }
            assert dict(got.event.cursor.positions) == {expected.shard: expected.position}
            message, want = pb.Event(), pb.Event()
            message.CopyFrom(got.event)
            want.CopyFrom(expected)
            message.ClearField("cursor")
            want.ClearField("cursor")
            assert message == want
        assert {"account_created", "transfer_posted", "pending_created", "saga_step",
                "saga_completed"} <= kinds_seen  # fmt: skip
        assert await publisher.stop() == 0
        acked = await acknowledged(service, publisher.consumer)
        assert all(acked[name] >= last[name] for name in SHARDS), (acked, last)
    finally:
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()


async def test_a_publisher_that_caught_up_reads_the_stream_again_only_when_a_round_numbered_more(
    service: Service, topology: Topology
) -> None:
    """A read that returned less than a batch took everything numbered: the publisher
    then waits for the next sequencer round's notification. It used to read again at
    once and find nothing, so every burst of events cost the shard two reads."""
    bursts = 10
    await topology.declare()
    publisher = AmqpPublisher(
        service.cluster,
        PublisherSettings(
            amqp_url=AMQP_URL,
            exchange=topology.exchange,
            consumer=uid("pub-"),
            queue=topology.queue,
        ),
    )
    running = asyncio.create_task(publisher.run())
    merchant = service.merchant_on("shard-a")
    try:
        await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "sales"))
        last = await last_positions(service)

        async def caught_up(published: int) -> bool:
            if running.done():
                running.result()
                raise AssertionError("the publisher stopped")
            return publisher.published > published and set(SHARDS) <= publisher.leases

        async def through(last: dict[str, int]) -> bool:
            acked = await acknowledged(service, publisher.settings.consumer)
            return await caught_up(0) and all(acked.get(n, -1) >= last[n] for n in SHARDS)

        # Through every event so far, not just the first: a new publisher starts at the
        # oldest event kept, the module's whole stream, and a backlog still publishing
        # would count as a burst published (under load: 9 reads for 10 bursts).
        await wait_until(
            functools.partial(through, last), deadline_s=PUBLISHER_DEADLINE_S, what="a publisher"
        )
        started_s, reads_before = time.monotonic(), publisher.reads["shard-a"]
        for _ in range(bursts):
            published = publisher.published
            results = await transfers(
                service.stub, transfer(uid("t-"), ref(merchant, "cash"), ref(merchant, "sales"), 1)
            )
            assert result_names(results) == ["TRANSFER_RESULT_OK"]
            await wait_until(
                functools.partial(caught_up, published),
                deadline_s=PUBLISHER_DEADLINE_S,
                what="the burst published",
            )
        reads = publisher.reads["shard-a"] - reads_before
        # One read per burst, and the idle look each event_idle_poll_s (a lost
        # notification's fallback); reading again at once would be 2 per burst.
        idle_looks = 1 + (time.monotonic() - started_s) / limits.event_idle_poll_s
        assert bursts <= reads <= bursts + idle_looks, (reads, idle_looks)
    finally:
        publisher.stop()
        await asyncio.wait_for(running, PUBLISHER_STOP_DEADLINE_S)


def _kill_seeds() -> list[int]:
    spec = os.environ.get("LEDGER_PUBLISHER_KILL_SEEDS", "1")
    low, _, high = spec.partition("-")
    return list(range(int(low), int(high or low) + 1))


# Kills per seeded run: short in the suite, long on demand, for example
#   LEDGER_PUBLISHER_KILL_SEEDS=1-10 LEDGER_PUBLISHER_KILLS=8 python3 -m pytest \
#       tests/test_events_amqp.py -k killed_mid_stream
PUBLISHER_KILLS = int(os.environ.get("LEDGER_PUBLISHER_KILLS", "2"))
# Transfers per shard in one workload call: batches of events of varied sizes, so a
# kill lands before, during or after a batch's confirms.
WRITE_BATCH_MAX = 20
WRITE_ROUNDS_MAX = 20_000


@pytest.mark.parametrize("seed", _kill_seeds())
async def test_a_publisher_killed_mid_stream_loses_nothing_and_resends_only_its_unconfirmed_batch(
    service: Service, topology: Topology, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(f"publisher-kills/{seed}")
    queue = await topology.declare()
    await topology.consume(queue)
    consumer = uid("pub-")
    publisher = Publisher(service, topology, tmp_path / "publisher.log", consumer=consumer)
    stop_writing = asyncio.Event()
    merchants = {name: service.merchant_on(name) for name in SHARDS}
    await create_accounts(
        service.stub, *(account(m, n) for m in merchants.values() for n in ("cash", "sales"))
    )

    async def write() -> int:
        """Transfers on every shard until told to stop (a bounded number of rounds)."""
        for round_ in range(WRITE_ROUNDS_MAX):
            if stop_writing.is_set():
                return round_
            size = rng.randint(1, WRITE_BATCH_MAX)
            batch = [
                transfer(uid("w-"), ref(m, "cash"), ref(m, "sales"), 1)
                for m in merchants.values()
                for _ in range(size)
            ]
            results = await transfers(service.stub, *batch)
            assert result_names(results) == ["TRANSFER_RESULT_OK"] * len(batch)
        return WRITE_ROUNDS_MAX

    async def streaming(at_least: int) -> bool:
        publisher.assert_running()
        assert not writer.done(), "the workload ended before the publisher was killed"
        return len(topology.received) >= at_least

    kills: list[dict[str, int]] = []
    writer = asyncio.create_task(write())
    try:
        publisher.start()
        for _ in range(PUBLISHER_KILLS):
            # Kill it after a random number of messages more, while the workload runs.
            target = len(topology.received) + rng.randint(1, 200)
            await wait_until(
                functools.partial(streaming, target),
                deadline_s=PUBLISHER_DEADLINE_S,
                what="the publisher to publish while the workload runs",
            )
            await publisher.kill()
            kills.append(await acknowledged(service, consumer))
            publisher.start()
        target = len(topology.received) + 50
        await wait_until(
            functools.partial(streaming, target),
            deadline_s=PUBLISHER_DEADLINE_S,
            what="the last publisher to publish while the workload runs",
        )
        stop_writing.set()
        assert await writer > 0
        last = await last_positions(service)
        await wait_received(topology, last, [publisher])
    finally:
        stop_writing.set()
        await asyncio.gather(writer, return_exceptions=True)
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()

    assert_duplicates_are_true_copies(topology)
    for name, positions in first_positions(topology).items():
        assert positions[: last[name]] == list(range(1, last[name] + 1)), f"{name} lost events"
    # Duplicates only of what a killed publisher had not acknowledged (had no
    # confirm for): at most one batch per shard and kill.
    duplicates = assert_resent_only_after_kills(topology, kills)
    assert duplicates <= PUBLISHER_KILLS * len(SHARDS) * limits.event_publish_batch_max
    print(f"seed {seed}: {PUBLISHER_KILLS} kills, {len(topology.received)} messages, "
          f"{duplicates} duplicates")  # fmt: skip


async def test_a_publisher_killed_between_confirm_and_acknowledgement_sends_that_batch_again(
    service: Service, topology: Topology, tmp_path: Path
) -> None:
    queue = await topology.declare()
    await topology.consume(queue)
    await books_workload(service)
    last = await last_positions(service)
    consumer = uid("pub-")
    publisher = Publisher(service, topology, tmp_path / "publisher.log", consumer=consumer)
    try:
        # It dies (SIGKILL) once the broker confirmed its first batch of some shard,
        # before it acknowledged it.
        publisher.start(LEDGER_CRASH_POINT="publish.after_confirm")
        assert await publisher.wait_exit(PUBLISHER_DEADLINE_S) == -signal.SIGKILL
        acked = await acknowledged(service, consumer)
        publisher.start()
        await wait_received(topology, last, [publisher])

        async def caught_up() -> bool:
            publisher.assert_running()
            now = await acknowledged(service, consumer)
            return all(now.get(name, -1) >= last[name] for name in SHARDS)

        await wait_until(
            caught_up, deadline_s=PUBLISHER_DEADLINE_S, what="the restarted publisher to catch up"
        )
        assert await publisher.stop() == 0
    finally:
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()

    assert_duplicates_are_true_copies(topology)
    for name, positions in first_positions(topology).items():
        assert positions[: last[name]] == list(range(1, last[name] + 1)), f"{name} lost events"
    # The confirmed, unacknowledged batch went again, and nothing else.
    assert assert_resent_only_after_kills(topology, [acked]) > 0


async def test_two_publishers_share_the_shards_one_at_a_time_and_take_over_from_a_dead_one(
    service: Service, topology: Topology, tmp_path: Path
) -> None:
    queue = await topology.declare()
    await topology.consume(queue)
    consumer = uid("pub-")
    first = Publisher(service, topology, tmp_path / "first.log", consumer=consumer)
    second = Publisher(service, topology, tmp_path / "second.log", consumer=consumer)
    try:
        first.start()
        second.start()

        async def all_leased() -> bool:
            first.assert_running()
            second.assert_running()
            holders = await lease_holders(service, consumer)
            return all(h in (first.pid, second.pid) for h in holders.values())

        await wait_until(
            all_leased, deadline_s=PUBLISHER_DEADLINE_S, what="every shard to be leased"
        )
        await books_workload(service)
        last = await last_positions(service)
        await wait_received(topology, last, [first, second])
        # Both ran all along, and no event was published twice: one publisher a shard.
        received, unique = len(topology.received), len(topology.unique())
        assert received == unique, "no event was published twice"
        for name, positions in first_positions(topology).items():
            assert positions[: last[name]] == list(range(1, last[name] + 1)), name

        # Kill the holder of shard-a's lease: the other takes every shard over.
        holders = await lease_holders(service, consumer)
        victim, survivor = (first, second) if holders["shard-a"] == first.pid else (second, first)
        await victim.kill()

        async def taken_over() -> bool:
            survivor.assert_running()
            return set((await lease_holders(service, consumer)).values()) == {survivor.pid}

        await wait_until(
            taken_over,
            deadline_s=PUBLISHER_DEADLINE_S,
            what="the surviving publisher to take every shard over",
        )
        await books_workload(service)
        last = await last_positions(service)
        await wait_received(topology, last, [survivor])
        assert_duplicates_are_true_copies(topology)
        assert await survivor.stop() == 0
    finally:
        for p in (first, second):
            if p.process is not None and p.process.poll() is None:
                await p.kill()


async def test_a_message_a_consumer_rejects_lands_in_the_dead_letter_queue(
    service: Service, topology: Topology, tmp_path: Path
) -> None:
    # The publisher declares the queue (--queue) and the dead letters itself.
    publisher = Publisher(service, topology, tmp_path / "publisher.log", consumer=uid("pub-"))
    publisher.start()
    try:

        async def declared() -> bool:
            publisher.assert_running()
            channel = await topology.connection.channel()  # a failed check closes it
            try:
                await channel.declare_queue(topology.queue, passive=True)
                await channel.declare_queue(topology.dead_letter, passive=True)
                return True
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return False
            finally:
                if not channel.is_closed:
                    await channel.close()

        await wait_until(
            declared, deadline_s=PUBLISHER_DEADLINE_S, what="the publisher to declare its queues"
        )
        merchant = service.merchant_on("shard-b")
        await create_accounts(service.stub, account(merchant, "refused"))
        queue = await topology.channel.get_queue(topology.queue)
        rejected: list[Received] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got = _received(message)
            if got.event.account.ref.merchant_id == merchant:
                rejected.append(got)
                await message.reject(requeue=False)
            else:
                await message.ack()

        await queue.consume(on_message)

        async def delivered() -> bool:
            publisher.assert_running()
            return bool(rejected)

        await wait_until(
            delivered, deadline_s=PUBLISHER_DEADLINE_S, what="the account's event in the queue"
        )
        dead_queue = await topology.channel.get_queue(topology.dead_letter)

        async def dead_lettered() -> aio_pika.abc.AbstractIncomingMessage | None:
            return await dead_queue.get(no_ack=True, fail=False)

        dead: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def arrived_dead() -> bool:
            message = await dead_lettered()
            if message is not None:
                dead.append(message)
            return any(m.message_id == rejected[0].message_id for m in dead)

        await wait_until(arrived_dead, what="the rejected message in the dead-letter queue")
        message = next(m for m in dead if m.message_id == rejected[0].message_id)
        assert message.body == rejected[0].body
        deaths = message.headers["x-death"]
        assert isinstance(deaths, list) and deaths[0]["reason"] == "rejected"  # type: ignore[index]
        assert deaths[0]["queue"] == topology.queue  # type: ignore[index]
        assert await publisher.stop() == 0
    finally:
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()


class BrokerProxy:
    """A TCP proxy to the broker that a test can cut (every connection dropped, new ones
    closed at once) and restore: a broker outage without stopping the shared broker."""

    def __init__(self) -> None:
        parts = urlsplit(AMQP_URL)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self.cut = False
        self.refused = 0
        self._transports: set[asyncio.BaseTransport] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Starts listening; the AMQP URL through the proxy."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(AMQP_URL)
        credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            self.refused += 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._transports |= {writer.transport, up_writer.transport}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._transports.discard(writer.transport)

    def sever(self) -> None:
        self.cut = True
        for transport in list(self._transports):
            transport.abort()

    def restore(self) -> None:
        self.cut = False

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# The refusing queue of the nack test holds this many messages and refuses the rest.
REFUSING_QUEUE_LENGTH = 3


async def test_messages_the_broker_refuses_are_never_acknowledged_and_go_again(
    service: Service, topology: Topology, tmp_path: Path
) -> None:
    # Account events also go to a queue that holds REFUSING_QUEUE_LENGTH messages and
    # refuses the rest (x-overflow reject-publish): the broker nacks each message it
    # refuses. Each shard's stream ends with a transfer, which the broker takes: so a
    # batch's nacks are in its middle, and its last message is confirmed.
    queue = await topology.declare()
    await topology.consume(queue)
    refusing = await topology.channel.declare_queue(
        f"{topology.queue}.refusing",
        durable=True,
        arguments={"x-max-length": REFUSING_QUEUE_LENGTH, "x-overflow": "reject-publish"},
    )
    publisher = Publisher(service, topology, tmp_path / "publisher.log", consumer=uid("pub-"))
    try:
        await refusing.bind(topology.exchange, routing_key="account_created.#")
        tails = [service.merchant_on(name) for name in SHARDS]
        await create_accounts(
            service.stub, *(account(m, name) for m in tails for name in ("cash", "sales"))
        )
        await books_workload(service)
        last = await last_positions(service)  # after 3 more account events
        results = await transfers(
            service.stub,
            *(transfer(uid("tail-"), ref(m, "cash"), ref(m, "sales"), 1) for m in tails),
        )
        assert result_names(results) == ["TRANSFER_RESULT_OK"] * len(SHARDS)
        publisher.start()

        async def nacked() -> bool:
            publisher.assert_running()
            return "not confirmed (DeliveryError" in publisher.log()

        await wait_until(nacked, deadline_s=PUBLISHER_DEADLINE_S, what="the broker to nack")
        # A shard whose batch had a refused message stays where it was: here, at least
        # one, as more account events than the queue holds were published.
        acked = await acknowledged(service, publisher.consumer)
        assert any(acked.get(name, 0) < last[name] for name in SHARDS), (acked, last)
        # With the refusing queue gone, the batch goes again and everything arrives.
        await refusing.delete(if_unused=False, if_empty=False)
        await wait_received(topology, last, [publisher])
        assert await publisher.stop() == 0
    finally:
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()
        await topology.channel.queue_delete(f"{topology.queue}.refusing")
    assert_duplicates_are_true_copies(topology)


async def test_a_broker_outage_loses_nothing_and_the_publisher_reconnects_by_itself(
    service: Service, topology: Topology, tmp_path: Path
) -> None:
    queue = await topology.declare()
    await topology.consume(queue)
    proxy = BrokerProxy()
    publisher = Publisher(
        service, topology, tmp_path / "publisher.log", consumer=uid("pub-"),
        amqp_url=await proxy.start(),
    )  # fmt: skip
    try:
        publisher.start()
        await wait_received(topology, await last_positions(service), [publisher])
        proxy.sever()
        await books_workload(service)  # published into the outage: not confirmed

        async def retrying() -> bool:
            publisher.assert_running()
            return proxy.refused >= 1

        await wait_until(
            retrying, deadline_s=PUBLISHER_DEADLINE_S, what="the publisher to try reconnecting"
        )
        proxy.restore()
        await wait_received(topology, await last_positions(service), [publisher])
        assert "retrying in" in publisher.log()
        assert await publisher.stop() == 0
    finally:
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()
        await proxy.close()
    assert_duplicates_are_true_copies(topology)
    for name, positions in first_positions(topology).items():
        assert positions == sorted(positions), f"{name} out of order"


async def test_a_publisher_the_broker_refuses_exits_1_and_never_shows_the_password(
    service: Service, topology: Topology, tmp_path: Path
) -> None:
    secret = uid("not-the-password-")
    scheme, rest = AMQP_URL.split("://", 1)
    host = rest.rsplit("@", 1)[-1]
    wrong = f"{scheme}://guest:{secret}@{host}"
    publisher = Publisher(
        service, topology, tmp_path / "publisher.log", consumer=uid("pub-"), amqp_url=wrong
    )
    publisher.start()
    assert await publisher.wait_exit(PUBLISHER_DEADLINE_S) == 1
    output = publisher.log()
    assert "refused" in output, output
    assert secret not in output, output


async def test_a_running_publisher_publishes_a_shard_added_to_the_config(
    ledger4: Ledger4, topology: Topology, tmp_path: Path
) -> None:
    """The publisher follows the config file as replicas do: a shard an admin adds
    (and the merchants a rebalance moves onto it) is published without a restart."""
    env, stub = ledger4, ledger4.service.stub
    queue = await topology.declare()
    await topology.consume(queue)
    grown = env.config(2, ALL_SHARDS)
    mover = merchant_on(grown, "shard-d")
    await create_accounts(stub, account(mover, "cash"), account(mover, "sales"))
    publisher = Publisher(env.service, topology, tmp_path / "publisher.log", consumer=uid("pub-"))
    publisher.start()
    try:
        await wait_holding(publisher)
        await rebalance_to(env, grown, mover)
        paid_there = uid("there")
        results = await transfers(
            stub, transfer(paid_there, ref(mover, "cash"), ref(mover, "sales"), 5)
        )
        assert result_names(results) == ["TRANSFER_RESULT_OK"]

        async def arrived() -> bool:
            publisher.assert_running()
            return any(r.event.transfer.id == paid_there for r in topology.received)

        await wait_until(
            arrived, deadline_s=PUBLISHER_DEADLINE_S, what="the new shard's transfer published"
        )
        from_new = [r for r in topology.received if r.event.shard == "shard-d"]
        assert [r.routing_key for r in from_new][-2:] == [
            "merchant_moved_in.shard-d",
            "transfer_posted.shard-d",
        ]
        assert [r.event.position for r in from_new] == list(range(1, len(from_new) + 1))
        assert await publisher.stop() == 0
        states = await EventStore(env.service.cluster.shards["shard-d"]).consumers()
        assert publisher.consumer in {c.consumer for c in states}
    finally:
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()


async def test_a_publisher_waits_for_a_shard_its_config_names_before_it_is_set_up(
    ledger4: Ledger4, topology: Topology, tmp_path: Path
) -> None:
    """An admin's new config may reach the publisher before any replica or rebalance
    has set the new shard up: the publisher used to exit 1 (no `events` table there).
    It publishes the other shards meanwhile and takes the new one once it is set up."""
    env = ledger4
    await topology.declare()
    grown = env.config(2, ALL_SHARDS)
    publisher = Publisher(
        env.service,
        topology,
        tmp_path / "publisher.log",
        consumer=uid("pub-"),
        config_path=env.copy_of(grown, "grown.toml"),
    )
    publisher.start()
    try:

        async def not_set_up_said() -> bool:
            publisher.assert_running()
            return "shard shard-d is not set up yet" in publisher.log()

        await wait_until(
            not_set_up_said, deadline_s=PUBLISHER_DEADLINE_S, what="the publisher to wait"
        )
        await wait_holding(publisher)
        await env.switch_to(grown)  # the service sets shard-d up
        await wait_holding(publisher, ("shard-d",))
        assert await publisher.stop() == 0
    finally:
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()


async def test_a_running_publisher_gives_up_a_shard_deleted_from_the_config(
    ledger4: Ledger4, topology: Topology, tmp_path: Path
) -> None:
    """A publisher holding a shard's lease went on holding it, and reading the shard,
    after the config no longer named it (it looked the shard up only between leases):
    a server the admin let go stayed in use, and a shard pointed at a new server would
    never have been published from there. It gives the lease up within a poll now."""
    env = ledger4
    await topology.declare()
    await grow_to_four(env)
    publisher = Publisher(env.service, topology, tmp_path / "publisher.log", consumer=uid("pub-"))
    publisher.start()
    shard_d = Shard(name="shard-d", dsn=env.specs["shard-d"].dsn)
    await shard_d.open()
    try:
        await wait_holding(publisher, ALL_SHARDS)
        # shard-d holds nothing (no merchant was placed there), so its entry may go.
        await env.switch_to(env.config(3, SHARDS))

        async def given_up() -> bool:
            publisher.assert_running()
            return await ShardLease.holder(shard_d, publisher.consumer) is None

        await wait_until(
            given_up, deadline_s=PUBLISHER_DEADLINE_S, what="the publisher to give up shard-d"
        )
        assert "shard shard-d left the config" in publisher.log()
        await wait_holding(publisher, SHARDS)
        assert await publisher.stop() == 0
    finally:
        await shard_d.close()
        if publisher.process is not None and publisher.process.poll() is None:
            await publisher.kill()

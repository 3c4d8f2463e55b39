"""Forwards every shard's event stream to a RabbitMQ exchange: `ledger events publish`.

An outbound interface beside the gRPC API, sending the same pb.Event (the
encoder of ledger/api/events.py) as proto3 JSON. Per shard, one publisher at a
time (a lease: ledger/storage/event_lease.py) reads the sequenced events after
its acknowledged position (it is a registered consumer, so retention keeps what
it has not published), publishes a batch on a channel with publisher confirms,
awaits every confirm, and only then acknowledges the batch's last position. A
nack, a timeout or a lost connection acknowledges nothing: after a jittered
back-off the shard publishes again from its acknowledged position. So a publisher
killed at any moment loses nothing and sends again at most the batch that was in
flight (consumers drop duplicates by message_id, the event's id).

Design and guarantees: docs/events.md, "Publishing to RabbitMQ".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
import orjson
import pamqp.frame
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp import encode
from pamqp.header import ContentHeader

from ledger import faults, limits
from ledger.api import event_json
from ledger.routing.cluster import Cluster
from ledger.routing.config_watch import CONFIG_POLL_INTERVAL_S, ConfigWatcher
from ledger.storage.errors import NOT_SET_UP_ERRORS, ShardUnavailable
from ledger.storage.event_lease import ShardLease
from ledger.storage.events import ConsumerLapsed, EventRow, EventStore
from ledger.telemetry.redaction import redact
from ledger.v1 import ledger_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "ledger.events"
DEFAULT_CONSUMER = "amqp-publisher"
# The dead-letter exchange and queue of an exchange: `<exchange>.dead`.
DEAD_LETTER_SUFFIX = ".dead"


@dataclass(frozen=True, slots=True)
class PublisherSettings:
    amqp_url: str
    exchange: str = DEFAULT_EXCHANGE
    # The registered consumer whose acknowledged positions say what was published.
    consumer: str = DEFAULT_CONSUMER
    # A durable queue to declare and bind to every event ('#'), dead-lettering
    # what its consumers reject.
    queue: str | None = None

    @property
    def dead_letter(self) -> str:
        return self.exchange + DEAD_LETTER_SUFFIX


class PublisherRefused(Exception):
    """The broker or the shards refuse this publisher for good: retrying will not help."""


class _Stopping(Exception):
    """The publisher was asked to stop while it waited."""


def redacted_url(url: str) -> str:
    """The AMQP URL fit for logs and messages (its password masked)."""
    return redact(url)


@functools.cache  # one per kind: pb.EventKind.Name and the string work cost ~1 us per event
def event_kind_key(kind: int) -> str:
    """`transfer_posted` for EVENT_KIND_TRANSFER_POSTED: the routing key's first word."""
    return pb.EventKind.Name(kind).removeprefix("EVENT_KIND_").lower()  # type: ignore[arg-type]


def routing_key(row: EventRow) -> str:
    """`<kind>.<shard>`, e.g. `transfer_posted.shard-a` (shard names hold no dots)."""
    return f"{event_kind_key(row.kind)}.{row.shard}"


def amqp_body(row: EventRow) -> bytes:
    """The body of the event's AMQP message: the proto3 JSON of pb.Event with proto
    field names, as SubscribeEvents would deliver it, except that its cursor names
    only the event's own shard (a queue mixes shards; each shard's position is its
    own). Rendered from the row by event_json (what MessageToDict of
    ledger.api.events.event gives, without building the message: the publisher's
    CPU per event fell from about 136 to 73 us, docs/performance.md "Event stream").

    The JSON is compact and UTF-8 as is: orjson gives the bytes of json.dumps with
    separators=(",", ":") and ensure_ascii=False (checked in tests/test_event_json.py)
    in a fifth of its time, which was a fifth of the publisher's CPU per event."""
    return orjson.dumps(event_json.to_dict(row))


def amqp_properties(row: EventRow) -> spec.Basic.Properties:
    """The properties of the event's AMQP message (docs/events.md, "Messages")."""
    kind = event_kind_key(row.kind)
    return spec.Basic.Properties(
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT),
        message_id=row.event_id,
        timestamp=row.committed_at,
        message_type=kind,
        app_id="ledger",
        headers={"shard": row.shard, "position": row.position, "kind": kind},
    )


# Basic.Properties' flags of the properties amqp_properties sets (AMQP 0-9-1, 4.2.6.1):
# content_type, content_encoding, headers, delivery_mode, message_id, timestamp, type
# and app_id.
_PROPERTY_FLAGS = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0080 | 0x0040 | 0x0020 | 0x0008
_HEADER_START = struct.Struct(">HxxQH")  # class id, weight (0), body size, property flags
_PROPERTIES_BEFORE_HEADERS = encode.short_string("application/json") + encode.short_string("utf-8")
_PERSISTENT = encode.octet(int(aio_pika.DeliveryMode.PERSISTENT))
_APP_ID = encode.short_string("ledger")


class _EventHeader(ContentHeader):
    """The content header of an event's message, marshalled as
    ContentHeader(properties=amqp_properties(row)) marshals it, byte for byte
    (tests/test_amqp_header.py checks), at a third of the cost: pamqp encodes each
    property through a generic dispatch, about 20 us per event. An event without an
    event_id (none is) goes through pamqp, which leaves an empty property out."""

    def __init__(self, row: EventRow, body_size: int) -> None:
        super().__init__(body_size=body_size, properties=_NO_PROPERTIES)
        self.row = row

    def marshal(self) -> bytes:
        row = self.row
        if not row.event_id:
            return ContentHeader(
                properties=amqp_properties(row), body_size=self.body_size
            ).marshal()
        kind = event_kind_key(row.kind)
        kind_value = b"S" + encode.long_string(kind)
        # The table's keys in sorted order, as pamqp's field_table writes them.
        headers = b"".join(
            (
                _KIND_KEY,
                kind_value,
                _POSITION_KEY,
                encode.table_integer(row.position),
                _SHARD_KEY,
                b"S",
                encode.long_string(row.shard),
            )
        )
        return b"".join(
            (
                _HEADER_START.pack(spec.Basic.frame_id, self.body_size, _PROPERTY_FLAGS),
                _PROPERTIES_BEFORE_HEADERS,
                encode.long_uint(len(headers)),
                headers,
                _PERSISTENT,
                encode.short_string(row.event_id),
                encode.timestamp(row.committed_at),
                encode.short_string(kind),
                _APP_ID,
            )
        )


_NO_PROPERTIES = spec.Basic.Properties()
_KIND_KEY = encode.short_string("kind")
_POSITION_KEY = encode.short_string("position")
_SHARD_KEY = encode.short_string("shard")


def amqp_header(row: EventRow, body_size: int) -> ContentHeader:
    """The content header frame of the event's message (its properties: amqp_properties)."""
    return _EventHeader(row, body_size)


# A frame: type, channel, payload size, payload, frame end (AMQP 0-9-1, 2.3.5).
_FRAME_START = struct.Struct(">BHI")
_FRAME_HEADER = 2
_FRAME_BODY = 3
_FRAME_END = b"\xce"


def amqp_frames(
    row: EventRow, body: bytes, publish_frame: bytes, channel_number: int, content_max: int
) -> list[bytes]:
    """The frames of the event's message, marshalled as pamqp.frame.marshal marshals
    publish_frame's method, amqp_header(row, len(body)) and body in pieces of at most
    content_max bytes (tests/test_amqp_header.py checks, byte for byte): pamqp's
    dispatch by frame type, three times per event, was a tenth of the publisher's CPU."""
    header = amqp_header(row, len(body)).marshal()
    frames = [
        publish_frame,
        _FRAME_START.pack(_FRAME_HEADER, channel_number, len(header)),
        header,
        _FRAME_END,
    ]
    for at in range(0, len(body), content_max):
        piece = body[at : at + content_max]
        frames += (_FRAME_START.pack(_FRAME_BODY, channel_number, len(piece)), piece, _FRAME_END)
    return frames


def amqp_message(row: EventRow) -> aio_pika.Message:
    """The event as an aio_pika message: what the publisher sends (it writes the
    frames itself, _publish, but the message is the same)."""
    properties = amqp_properties(row)
    return aio_pika.Message(
        amqp_body(row),
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        type=properties.message_type,
        app_id=properties.app_id,
        headers=properties.headers,
    )


def _is_refusal(error: BaseException) -> bool:
    """Errors that say the broker will refuse every retry: wrong credentials or vhost,
    or an exchange or queue already declared with other settings. (aiormq raises
    ProbableAuthenticationError when the broker answers the handshake with 403
    ACCESS_REFUSED; a connection merely dropped then is a ConnectionError.)"""
    return isinstance(
        error,
        aiormq.exceptions.AuthenticationError
        | aiormq.exceptions.ProbableAuthenticationError
        | aiormq.exceptions.ChannelPreconditionFailed
        | aiormq.exceptions.ChannelAccessRefused
        | aiormq.exceptions.ConnectionNotAllowed,
    )


class _Broker:
    """The AMQP connection the shards share, with a confirming channel per shard;
    reconnected after a jittered, doubling back-off, for a bounded number of failures."""

    def __init__(self, settings: PublisherSettings, stopping: asyncio.Event) -> None:
        self.settings = settings
        self._stopping = stopping
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channels: dict[str, aio_pika.abc.AbstractChannel] = {}
        self._lock = asyncio.Lock()
        # Failures in a row (connects and publishes); reset by a confirmed batch.
        self._failures = 0

    async def open(self) -> None:
        """Connects and declares the exchanges and queues; raises what the broker said."""
        connection = await aio_pika.connect(
            self.settings.amqp_url,
            timeout=limits.event_publish_connect_timeout_s,
            client_properties={"connection_name": f"ledger publisher {self.settings.consumer}"},
        )
        try:
            channel = await connection.channel(publisher_confirms=False)
            await self._declare(channel)
            await channel.close()
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._channels.clear()

    async def _declare(self, channel: aio_pika.abc.AbstractChannel) -> None:
        settings = self.settings
        await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        dead = await channel.declare_exchange(
            settings.dead_letter, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(settings.dead_letter, durable=True)
        await dead_queue.bind(dead, routing_key="")
        if settings.queue is not None:
            queue = await channel.declare_queue(
                settings.queue,
                durable=True,
                arguments={"x-dead-letter-exchange": settings.dead_letter},
            )
            await queue.bind(settings.exchange, routing_key="#")

    async def connect(self) -> None:
        """Connects (with back-off) and declares, before anything is published."""
        async with self._lock:
            await self._connected()

    async def _connected(self) -> aio_pika.abc.AbstractConnection:
        """The connection, with the exchanges and queues declared; (re)connects after a
        back-off if need be. Raises PublisherRefused when the broker refuses us."""
        while not self._usable():
            if self._connection is not None:
                # Lost (the broker went away): aio-pika marks it disconnected but
                # not closed, and a channel opened on it would fail.
                await self.close()
            if self._stopping.is_set():
                raise _Stopping
            try:
                await self.open()
                log.info("connected to %s", redacted_url(self.settings.amqp_url))
            except CONNECTION_EXCEPTIONS as error:
                if _is_refusal(error):
                    raise PublisherRefused(
                        f"the broker refused the publisher: {redact(str(error))}"
                    ) from error
                await self._back_off(f"cannot connect to the broker: {redact(str(error))}")
        assert self._connection is not None
        return self._connection

    def _usable(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def channel(self, shard: str) -> aiormq.abc.AbstractChannel:
        """Shard's confirming channel (aiormq's, under aio-pika's), (re)connecting
        first if need be."""
        async with self._lock:
            connection = await self._connected()
            channel = self._channels.get(shard)
            if channel is None or channel.is_closed:
                channel = await connection.channel(publisher_confirms=True)
                self._channels[shard] = channel
        return await channel.get_underlay_channel()

    async def failed(self, shard: str, error: BaseException) -> None:
        """A batch of shard's was not confirmed: drop its channel, wait, let it retry."""
        channel = self._channels.pop(shard, None)
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await channel.close()
        await self._back_off(
            f"events of shard {shard} not confirmed ({type(error).__name__}: "
            f"{redact(str(error))}); publishing them again from its acknowledged position"
        )

    def succeeded(self) -> None:
        self._failures = 0

    async def _back_off(self, why: str) -> None:
        self._failures += 1
        if self._failures > limits.event_publish_reconnect_attempts_max:
            raise PublisherRefused(
                f"gave up after {limits.event_publish_reconnect_attempts_max} failures in a "
                f"row: {why}"
            )
        delay_s = min(
            limits.event_publish_reconnect_delay_s_max,
            limits.event_publish_reconnect_delay_s_min * 2 ** (self._failures - 1),
        ) * random.uniform(0.5, 1.0)
        log.warning("%s; retrying in %.1f s (failure %d in a row)", why, delay_s, self._failures)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._stopping.wait()
        if self._stopping.is_set():
            raise _Stopping

    async def close(self) -> None:
        self._channels.clear()
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                async with asyncio.timeout(limits.event_publish_connect_timeout_s):
                    await connection.close()


class AmqpPublisher:
    """Publishes every shard of a cluster whose lease it can take, until stopped."""

    def __init__(self, cluster: Cluster, settings: PublisherSettings) -> None:
        self.cluster = cluster
        self.settings = settings
        self._stopping = asyncio.Event()
        self._broker = _Broker(settings, self._stopping)
        # Shards whose lease this publisher holds now.
        self.leases: set[str] = set()
        self.published = 0
        # Reads of each shard's stream (what a caught-up publisher costs the shards).
        self.reads: Counter[str] = Counter()
        self._fatal: BaseException | None = None
        # The lease connections' application_name (PostgreSQL keeps 63 bytes of it).
        self.holder = f"ledger-publisher pid {os.getpid()} {settings.consumer}"[:63]
        # Basic.Publish's frame per routing key and channel, marshalled once: at most a
        # kind per shard of the config read at start, times the channels reopened.
        self._publish_frames: dict[tuple[str, int], bytes] = {}

    def stop(self) -> None:
        """Finish each shard's batch in flight (its confirms and acknowledgement), then end."""
        self._stopping.set()

    async def run(self) -> None:
        """Publishes until stop(); raises PublisherRefused or ConsumerLapsed on a fatal error."""
        log.info(
            "publishing the event stream of shards %s to exchange %r at %s as consumer %r",
            ", ".join(self.cluster.shards),
            self.settings.exchange,
            redacted_url(self.settings.amqp_url),
            self.settings.consumer,
        )
        tasks: dict[str, asyncio.Task[None]] = {}
        # The config as replicas follow it: a shard an admin adds is published from
        # the next look on, without a restart (its events wait for this consumer:
        # the rebalance that fills it registers it there, see ledger/moves/rebalance.py).
        watcher = ConfigWatcher(self.cluster)
        try:
            # Queues (--queue) exist before the first event is published: the broker
            # drops what no queue is bound for.
            await self._broker.connect()
            watcher.start()
            while True:
                for name in self.cluster.shards:
                    if name not in tasks or tasks[name].done():
                        tasks[name] = asyncio.create_task(self._serve(name), name=f"publish-{name}")
                try:
                    await self._pause(CONFIG_POLL_INTERVAL_S)
                except _Stopping:
                    break
            # Each shard's task finishes its batch in flight, then ends.
            await asyncio.gather(*tasks.values())
        except _Stopping:
            pass
        finally:
            self._stopping.set()
            await watcher.stop()
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await self._broker.close()
        if self._fatal is not None:
            raise self._fatal

    async def _serve(self, name: str) -> None:
        try:
            await self._serve_shard(name)
        except _Stopping:
            pass
        except (PublisherRefused, ConsumerLapsed, _EventsMissing) as error:
            self._fatal = self._fatal or error
            self._stopping.set()
        except Exception as error:
            log.exception("publishing shard %s failed", name)
            self._fatal = self._fatal or error
            self._stopping.set()

    async def _pause(self, delay_s: float, wake: asyncio.Event | None = None) -> None:
        """Waits delay_s, or until stopped (raising _Stopping) or woken."""
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waits, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if self._stopping.is_set():
            raise _Stopping

    async def _serve_shard(self, name: str) -> None:
        """Takes the shard's lease when free and publishes while it holds it."""
        sequenced = asyncio.Event()
        said_taken = said_unavailable = said_not_set_up = False
        while not self._stopping.is_set():
            # Looked up each time: a config reload replaces a shard whose DSN
            # changed, and ends one the config no longer names.
            shard = self.cluster.shards.get(name)
            if shard is None:
                log.info("shard %s left the config; no longer publishing it", name)
                return
            try:
                lease = await ShardLease.try_take(
                    shard,
                    consumer=self.settings.consumer,
                    holder=self.holder,
                    on_sequenced=sequenced.set,
                )
            except ShardUnavailable as error:
                if not said_unavailable:
                    log.warning("shard %s cannot be published now: %s", name, error)
                    said_unavailable = True
                await self._pause(limits.event_publish_shard_retry_s)
                continue
            said_unavailable = False
            if lease is None:
                if not said_taken:
                    log.info(
                        "shard %s is published by another publisher; asking for it every %.0f s",
                        name,
                        limits.event_publish_lease_retry_s,
                    )
                    said_taken = True
                await self._pause(limits.event_publish_lease_retry_s)
                continue
            said_taken = False
            self.leases.add(name)
            try:
                await self._publish_held(lease, sequenced)
                continue
            except ShardUnavailable as error:
                log.warning("shard %s stopped answering: %s; taking its lease again", name, error)
            except NOT_SET_UP_ERRORS as error:
                # A shard the config names before any replica or rebalance set it up.
                if not said_not_set_up:
                    log.warning("shard %s is not set up yet (%s); asking again", name, error)
                    said_not_set_up = True
            finally:
                self.leases.discard(name)
                await lease.release()
            await self._pause(limits.event_publish_shard_retry_s)

    async def _publish_held(self, lease: ShardLease, sequenced: asyncio.Event) -> None:
        """Publishes the shard's events in batches for as long as the lease is held."""
        store = EventStore(lease.shard)
        name = lease.shard.name
        oldest, _ = await store.bounds()
        # A new publisher starts at the oldest event kept; a known one where it was.
        position = await store.register(self.settings.consumer, position=oldest - 1)
        log.info("publishing shard %s after position %d", name, position)
        while not self._stopping.is_set():
            if self.cluster.shards.get(name) is not lease.shard:
                # A reload let the shard go (its entry deleted) or points it at another
                # server: publishing on here would hold a lease on, and read, a server
                # the config no longer names, for ever (the new one never published).
                log.info("shard %s left the config or moved; giving up its lease", name)
                return
            sequenced.clear()  # before reading: a round numbered after this read wakes us
            # On the lease's session: that it answers is the check that the lease is held.
            rows = await lease.read(after=position, limit=limits.event_publish_batch_max)
            self.reads[name] += 1
            if rows is None:
                log.warning("lost the lease on shard %s; asking for it again", name)
                return
            if not rows:
                await self._pause(limits.event_idle_poll_s, sequenced)
                continue
            if rows[0].position != position + 1:
                raise _EventsMissing(name, position, rows[0].position)
            try:
                channel = await self._broker.channel(name)
                await self._publish(channel, rows)
            except CONNECTION_EXCEPTIONS as error:
                if _is_refusal(error):
                    raise PublisherRefused(
                        f"the broker refused events of shard {name}: {redact(str(error))}"
                    ) from error
                # Nothing of this batch is acknowledged: it goes again after a back-off.
                await self._broker.failed(name, error)
                continue
            self._broker.succeeded()
            faults.crash_point("publish.after_confirm")
            acked = await lease.acknowledge(rows[-1].position)
            if acked is None:
                log.warning("lost the lease on shard %s; asking for it again", name)
                return
            position = acked
            self.published += len(rows)
            log.debug("shard %s: published up to position %d", name, position)
            if len(rows) < limits.event_publish_batch_max:
                # Caught up as of the read: the next events come with a later
                # sequencer round, which wakes us (or the idle poll does). Reading
                # again at once found nothing under load: a third of the stream's reads.
                await self._pause(limits.event_idle_poll_s, sequenced)

    async def _publish(self, channel: aiormq.abc.AbstractChannel, rows: Sequence[EventRow]) -> None:
        """Publishes rows in order and returns once the broker confirmed every one.

        One write for the whole batch: the Basic.Publish, header and body frames of
        every event, in order, marshalled together (amqp_frames) and queued on the
        connection under the channel's lock, each with its delivery tag's
        confirmation registered in the channel's confirmations. Publishing them one
        by one through aio-pika (a task, a lock, a socket write and a drain each) cost
        about 300 us of CPU per message on the development machine, this about 65;
        the publisher's CPU per event fell from about 370 to 200 us (bench.event_cost,
        docs/performance.md "Event stream"; later 136 to 73 us with the body rendered
        from the row, the header encoded by hand and the method marshalled once per
        routing key, then about 61 to 50 with the frames marshalled by hand and plain
        futures for confirmations). Not mandatory: an event no queue is bound for is
        dropped by the broker, as with any topic exchange (declare queues before
        publishing; --queue does).
        """
        content_max = channel.max_content_size  # type: ignore[attr-defined]
        number = channel.number
        frames: list[bytes] = []
        confirmations: list[asyncio.Future[Any]] = []
        for row in rows:
            key = routing_key(row)
            publish_frame = self._publish_frames.get((key, number))
            if publish_frame is None:
                publish_frame = self._publish_frames[key, number] = pamqp.frame.marshal(
                    spec.Basic.Publish(exchange=self.settings.exchange, routing_key=key), number
                )
            frames += amqp_frames(row, amqp_body(row), publish_frame, number, content_max)
        raw: Any = channel  # aiormq.Channel: its confirmations and write queue
        loop = asyncio.get_running_loop()
        async with raw.lock:
            if channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            for _ in rows[:-1]:
                raw.delivery_tag += 1
                confirmation = loop.create_future()
                raw.confirmations[raw.delivery_tag] = confirmation
                confirmations.append(confirmation)
            # Only the last tag's future is in aiormq's store, which fails it when the
            # channel or connection closes; the others are plain futures (a store's
            # future costs two sets, three callbacks and their removal: about a sixth
            # of the publisher's CPU per event). A closed channel ends the wait below
            # through that one; an earlier tag the broker has still not answered by
            # then waits out the timeout, and the batch goes again either way.
            raw.delivery_tag += 1
            last = raw.create_future()
            raw.confirmations[raw.delivery_tag] = last
            confirmations.append(last)
            await raw.write_queue.put(ChannelFrame(payload=b"".join(frames), should_close=False))
        try:
            async with asyncio.timeout(limits.event_publish_confirm_timeout_s):
                # The broker confirms in order as a rule: once the last tag is
                # answered the rest are too, and each await below finds it done.
                await asyncio.wait((last,))
                if not last.cancelled() and last.exception() is None:
                    for confirmation in confirmations:
                        if not confirmation.done():
                            await asyncio.wait((confirmation,))
        finally:
            for confirmation in confirmations:
                if not confirmation.done():
                    confirmation.cancel()
        # Every error read, so that none is logged as never retrieved.
        errors = [c.exception() for c in confirmations if not c.cancelled()]
        if (error := next((e for e in errors if e is not None), None)) is not None:
            raise error
        if len(errors) < len(confirmations):
            raise aiormq.exceptions.ChannelInvalidStateError(
                "a confirmation was cancelled: the channel closed"
            )


class _EventsMissing(Exception):
    """Events after the publisher's acknowledged position are gone: a broken invariant
    (retention keeps every event a live consumer has not acknowledged)."""

    def __init__(self, shard: str, position: int, first: int) -> None:
        super().__init__(
            f"shard {shard}: the publisher acknowledged position {position} but the next "
            f"event kept is {first}; events were pruned under a live consumer"
        )

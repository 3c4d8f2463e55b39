"""The event stream's API: requests decoded, events encoded, streams served.

SubscribeEvents and AckEvents of LedgerService; the core is ledger/core/event_feed.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import grpc
from google.rpc import error_details_pb2

from ledger import limits
from ledger.api import encode
from ledger.api.auth import require_merchants, require_unrestricted
from ledger.api.decode import Violations, account_ref
from ledger.api.status import AbortError, unavailable, with_reason
from ledger.core.event_feed import EventFeed, EventsPruned, Subscription, UnknownShard
from ledger.storage.errors import ShardUnavailable
from ledger.storage.events import ConsumerLapsed, EventRow, EventStore
from ledger.telemetry import metrics
from ledger.v1 import ledger_pb2 as pb

log = logging.getLogger(__name__)


def _consumer(v: Violations, field: str, value: str, *, required: bool) -> str | None:
    if not value:
        if required:
            v.add(field, "is required")
        return None
    if len(value.encode("utf-8", "surrogatepass")) > limits.event_consumer_name_bytes_max:
        v.add(field, f"must be at most {limits.event_consumer_name_bytes_max} bytes")
    v.id(field, value)
    return value


def _cursor(v: Violations, field: str, cursor: pb.EventCursor) -> dict[str, int]:
    positions = dict(cursor.positions)
    if len(positions) > limits.event_cursor_shards_max:
        v.add(f"{field}.positions", f"must name at most {limits.event_cursor_shards_max} shards")
        return {}
    for name, position in positions.items():
        if position < 0:
            v.add(f"{field}.positions[{name[:64]!r}]", "must be 0 or more")
    return positions


def subscription(request: pb.SubscribeEventsRequest) -> Subscription:
    v = Violations()
    after = _cursor(v, "after", request.after)
    merchant_id = request.merchant_id or None
    if merchant_id is not None:
        v.merchant_id("merchant_id", merchant_id)
    account = account_ref(v, "account", request.account, required=False)
    if account is not None and merchant_id is not None and account.merchant_id != merchant_id:
        v.add("account.merchant_id", "must equal merchant_id when both are given")
    consumer = _consumer(v, "consumer", request.consumer, required=False)
    v.raise_if_any()
    if account is not None and merchant_id is None:
        merchant_id = account.merchant_id  # read only that merchant's events
    return Subscription(after, request.from_now, merchant_id, account, consumer)


def _timestamp(value: Any) -> Any:
    return encode.timestamp(datetime.fromisoformat(value)) if value else None


def _ref(merchant_id: str, account_id: str) -> dict[str, str] | None:
    if not merchant_id and not account_id:
        return None
    return {"merchant_id": merchant_id, "account_id": account_id}


def event(
    row: EventRow,
    cursor: Mapping[str, int] | None,
    new: Callable[..., pb.Event] = pb.Event,
) -> pb.Event:
    """The stored event as the proto Event (the AMQP publisher sends the same); with
    no cursor, its cursor is not set (an EventBatch's events). `new` makes the
    message from its fields: pb.Event, or a batch's `events.add`, which builds it in
    place instead of copying it in.

    Every part is given to `new` as plain values and dicts, so the message is built
    once, in one call: a message per part copied in cost a quarter more per event,
    which every subscriber pays.
    """
    body = row.body
    fields: dict[str, Any] = {
        "shard": row.shard,
        "position": row.position,
        "event_id": row.event_id,
        "kind": int(row.kind),
        "merchant_id": row.merchant_id,
        "merchant_ids": row.merchant_ids,
        "transfer_id": row.transfer_id,
        "trace_id": row.trace_id,
        "committed_at": encode.timestamp(row.committed_at),
    }
    if cursor is not None:
        fields["cursor"] = {"positions": cursor}
    t = body.get("transfer")
    if t:
        fields["transfer"] = {
            "id": t["transfer_id"],
            "debit_account": _ref(t["debit_merchant_id"], t["debit_account_id"]),
            "credit_account": _ref(t["credit_merchant_id"], t["credit_account_id"]),
            "amount_minor": t["amount_minor"],
            "currency": t["currency"],
            "action": t["action"],
            "pending_id": t["pending_id"],
            "timeout_ms": t["timeout_ms"],
            "linked": t["linked"],
            "reversal_of": t["reversal_of"],
            "metadata": t["metadata"] or {},
            "created_at": _timestamp(t["created_at"]),
            "trace_id": t["trace_id"],
        }
        fields["amount_effective_minor"] = t["amount_effective_minor"]
        fields["transfer_result"] = t["result"]
        postings = t.get("postings")
        if postings:
            fields["postings"] = [
                {
                    "account": _ref(p["merchant_id"], p["account_id"]),
                    "amount_minor": p["amount_minor"],
                    "currency": p["currency"],
                    "direction": p["direction"],
                }
                for p in postings
            ]
    entries = body.get("entries")
    if entries:
        fields["entries"] = [
            {
                "account": _ref(e["merchant_id"], e["account_id"]),
                "sequence": e["sequence"],
                "direction": e["direction"],
                "kind": e["kind"],
                "amount_minor": e["amount_minor"],
                "debits_posted": e["debits_posted"],
                "credits_posted": e["credits_posted"],
                "debits_pending": e["debits_pending"],
                "credits_pending": e["credits_pending"],
            }
            for e in entries
        ]
    a = body.get("account")
    if a:
        fields["account"] = {
            "ref": _ref(a["merchant_id"], a["account_id"]),
            "currency": a["currency"],
            "debits_must_not_exceed_credits": a["debits_must_not_exceed_credits"],
            "credits_must_not_exceed_debits": a["credits_must_not_exceed_debits"],
            "closed": a["closed"],
            "metadata": a["metadata"] or {},
            "debits_posted": a["debits_posted"],
            "credits_posted": a["credits_posted"],
            "debits_pending": a["debits_pending"],
            "credits_pending": a["credits_pending"],
            "created_at": _timestamp(a["created_at"]),
        }
    s = body.get("saga")
    if s:
        fields["saga"] = {
            "kind": s["kind"],
            "state": s["state"],
            "result": s["result"] or 0,
            "peer_shard": s["peer_shard"],
            "debit_account": _ref(s["merchant_id"], s["debit_account_id"]),
            "credit_account": _ref(s["credit_merchant_id"], s["credit_account_id"]),
            "currency": s["currency"],
            "amount_minor": s["amount_minor"],
            "pending_minor": s["pending_minor"],
            "pending_id": s["pending_id"],
            "attempts": s["attempts"],
            "last_error": s["last_error"],
        }
    c = body.get("crossing")
    if c:
        fields["monitor_crossing"] = {
            "monitor_id": c["monitor_id"],
            "account": _ref(c["merchant_id"], c["account_id"]),
            "direction": c["direction"],
            "balance_after_minor": int(c["balance_after_minor"]),
            "threshold_minor": c["threshold_minor"],
            "transfer": {
                "merchant_id": c["transfer_merchant_id"],
                "transfer_id": c["transfer_id"],
            },
            "crossed_at": _timestamp(c["crossed_at"]),
        }
    d = body.get("detail")
    if d and "epoch" in d:
        fields["move"] = {
            "merchant_id": d["merchant_id"],
            "epoch": d["epoch"],
            "from_shard": d["from_shard"],
            "to_shard": d["to_shard"],
        }
    return new(**fields)


def _refusal(error: Exception) -> AbortError:
    if isinstance(error, EventsPruned):
        return with_reason(
            grpc.StatusCode.OUT_OF_RANGE,
            "EVENTS_PRUNED",
            str(error),
            shard=error.shard,
            position=str(error.position),
            oldest=str(error.oldest),
        )
    if isinstance(error, ConsumerLapsed):
        return with_reason(
            grpc.StatusCode.FAILED_PRECONDITION,
            "CONSUMER_LAPSED",
            str(error),
            shard=error.shard,
            consumer=error.consumer,
            position=str(error.position),
        )
    if isinstance(error, UnknownShard):
        # The name as given may be long: echoed whole, it broke gRPC's metadata limit.
        shard = error.shard[:64]
        refusal = with_reason(
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_SHARD",
            f"the cursor names no shard of this cluster: {shard!r}",
            shard=shard,
        )
        # Bad input names its field, as every INVALID_ARGUMENT does.
        refusal.details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=f"after.positions[{shard!r}]",
                        description="names no shard of this cluster",
                    )
                ]
            )
        )
        return refusal
    assert isinstance(error, ShardUnavailable)
    return unavailable(str(error))


class EventStreams:
    def __init__(self, feed: EventFeed) -> None:
        self.feed = feed

    async def subscribe(self, request: pb.SubscribeEventsRequest) -> AsyncIterator[pb.Event]:
        """SubscribeEvents: one message per event, each with the cursor after it."""
        async for rows, cursor in self._batches(request):
            for row in rows:
                yield event(row, {**cursor, row.shard: row.position})

    async def subscribe_batches(
        self, request: pb.SubscribeEventsRequest
    ) -> AsyncIterator[pb.EventBatch]:
        """SubscribeEventBatches: a message per read of a shard (split to stay under
        limits.event_batch_bytes_max), with the cursor after its last event."""
        async for rows, cursor in self._batches(request):
            batch = pb.EventBatch()
            size_bytes = 0
            for row in rows:
                message = event(row, None, batch.events.add)
                size_bytes += message.ByteSize()
                if size_bytes > limits.event_batch_bytes_max and len(batch.events) > 1:
                    # Too big with this event: send the rest, and start anew with it.
                    del batch.events[-1]
                    batch.cursor.positions.update({**cursor, row.shard: row.position - 1})
                    yield batch
                    batch = pb.EventBatch()
                    message = event(row, None, batch.events.add)
                    size_bytes = message.ByteSize()
            batch.cursor.positions.update(cursor)
            yield batch

    async def _batches(
        self, request: pb.SubscribeEventsRequest
    ) -> AsyncIterator[tuple[list[EventRow], dict[str, int]]]:
        wanted = subscription(request)
        if wanted.merchant_id is None:
            require_unrestricted()  # every merchant's events
        else:
            require_merchants([("merchant_id", wanted.merchant_id)])
        if self.feed.subscriptions >= limits.event_subscriptions_max:
            raise AbortError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this replica serves {limits.event_subscriptions_max} event subscriptions, "
                "its most; retry shortly or on another replica",
            )
        try:
            positions = await self.feed.start_positions(wanted)
        except (EventsPruned, ConsumerLapsed, UnknownShard, ShardUnavailable) as error:
            raise _refusal(error) from error
        try:
            async for rows, cursor in self.feed.follow_batches(wanted, positions):
                now = time.time()
                for row in rows:
                    metrics.event_delivery_delay.record(
                        max(0.0, now - row.committed_at.timestamp()), {}
                    )
                yield rows, cursor
        except EventsPruned as error:
            raise _refusal(error) from error

    async def acknowledge(self, request: pb.AckEventsRequest) -> pb.AckEventsResponse:
        v = Violations()
        consumer = _consumer(v, "consumer", request.consumer, required=True)
        positions = _cursor(v, "cursor", request.cursor)
        try:
            await self.feed.know_shards(positions)
        except ShardUnavailable as error:  # a shard the new config adds, not up yet
            raise _refusal(error) from error
        shards, retired = self.feed.cluster.shards, self.feed.cluster.retired
        for name in positions:
            if name not in shards and name not in retired:
                v.add(f"cursor.positions[{name[:64]!r}]", "names no shard of this cluster")
        v.raise_if_any()
        assert consumer is not None
        acknowledged: dict[str, int] = {}
        unavailable: ShardUnavailable | None = None
        for name, position in sorted(positions.items()):
            if name in retired:
                continue  # its stream ended, acknowledged to its end before it did
            try:
                acknowledged[name] = await EventStore(shards[name]).acknowledge(consumer, position)
            except ConsumerLapsed as error:
                raise _refusal(error) from error
            except ShardUnavailable as error:
                # The others still take theirs: a shard down must not hold back what
                # the consumer processed elsewhere (retention, retiring).
                unavailable = unavailable or error
        if unavailable is not None:
            # Acknowledgements are idempotent: the caller sends the cursor again.
            raise _refusal(unavailable) from unavailable
        return pb.AckEventsResponse(acknowledged=pb.EventCursor(positions=acknowledged))

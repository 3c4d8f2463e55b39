"""Helpers of the event stream tests: subscribing with deadlines, rebuilding balances."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.support import WAIT_DEADLINE_S, create_accounts, uid

Stub = ledger_pb2_grpc.LedgerServiceStub


def kinds(events: Sequence[pb.Event]) -> list[str]:
    return [pb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_") for e in events]


async def collect_until(
    stub: Stub,
    request: pb.SubscribeEventsRequest,
    done: object,
    *,
    deadline_s: float = WAIT_DEADLINE_S,
) -> list[pb.Event]:
    """Events of one subscription up to and including the first for which done(event)
    holds (a callable), or the first `done` events (an int); fails at the deadline."""
    got: list[pb.Event] = []
    call = stub.SubscribeEvents(request)
    try:
        async with asyncio.timeout(deadline_s):
            async for event in call:
                got.append(event)
                if (len(got) >= done) if isinstance(done, int) else done(event):  # type: ignore[operator]
                    return got
    except TimeoutError:
        raise AssertionError(
            f"timed out after {deadline_s}s with {len(got)} events: {kinds(got)}"
        ) from None
    finally:
        call.cancel()
    raise AssertionError(f"the stream ended after {len(got)} events: {kinds(got)}")


async def marked(
    stub: Stub, merchant_ids: Sequence[str], request: pb.SubscribeEventsRequest
) -> list[pb.Event]:
    """Every event of the subscription before fresh marker accounts, one per merchant
    (created now, so on each merchant's shard its marker's event is the last): what
    the stream holds on those shards, exactly. Each marker must pass the filter."""
    markers = {uid("marker"): m for m in merchant_ids}
    await create_accounts(
        stub,
        *(
            pb.Account(ref=pb.AccountRef(merchant_id=m, account_id=a), currency="USD")
            for a, m in markers.items()
        ),
    )
    seen: set[str] = set()

    def all_seen(event: pb.Event) -> bool:
        if event.kind == pb.EVENT_KIND_ACCOUNT_CREATED:
            seen.add(event.account.ref.account_id)
        return set(markers) <= seen

    events = await collect_until(stub, request, all_seen)
    return [
        e
        for e in events
        if not (e.kind == pb.EVENT_KIND_ACCOUNT_CREATED and e.account.ref.account_id in markers)
    ]


def balances_from(events: Sequence[pb.Event]) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """Each account's balances after its newest entry in the events (by entry sequence)."""
    newest: dict[tuple[str, str], tuple[int, tuple[int, int, int, int]]] = {}
    for event in events:
        for e in event.entries:
            key = (e.account.merchant_id, e.account.account_id)
            if key not in newest or newest[key][0] < e.sequence:
                newest[key] = (
                    e.sequence,
                    (e.debits_posted, e.credits_posted, e.debits_pending, e.credits_pending),
                )
    return {key: value for key, (_, value) in newest.items()}


def error_code(error: BaseException) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.aio.AioRpcError) else None


async def collect_batches_until(
    stub: Stub,
    request: pb.SubscribeEventsRequest,
    events_min: int,
    *,
    deadline_s: float = WAIT_DEADLINE_S,
) -> list[pb.EventBatch]:
    """SubscribeEventBatches' batches until they hold at least events_min events;
    fails at the deadline."""
    got: list[pb.EventBatch] = []
    call = stub.SubscribeEventBatches(request)
    try:
        async with asyncio.timeout(deadline_s):
            async for batch in call:
                got.append(batch)
                if sum(len(b.events) for b in got) >= events_min:
                    return got
    except TimeoutError:
        events = [e for b in got for e in b.events]
        raise AssertionError(
            f"timed out after {deadline_s}s with {len(events)} events: {kinds(events)}"
        ) from None
    finally:
        call.cancel()
    raise AssertionError(f"the stream ended after {len(got)} batches")


def without_cursor(event: pb.Event) -> pb.Event:
    """The event as an EventBatch holds it: its own cursor not set."""
    copy = pb.Event()
    copy.CopyFrom(event)
    copy.ClearField("cursor")
    return copy

"""Group commit: concurrent transfer calls for one shard share one transaction.

While a shard has max_in_flight batches running, new calls queue; the next
free runner takes every queued call (up to transfers_per_batch_max items) and
applies them in one transaction, in arrival order. Under light load a call
runs at once and alone, so this adds no latency; under heavy load it turns
many one-transfer transactions into a few large ones, as TigerBeetle's client
batching does. Each call still gets its own outcomes: the rules treat every
call's items as if it ran alone (a duplicate id replays, chains stay inside
their call).

Tracing: each batch's transaction runs under a "group commit" span in the trace
of its first call; every other call of the batch gets a span of the same
duration in its own trace, linked to that one, so each journey's trace shows
the shard transaction it waited for.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry.util.types import AttributeValue

from ledger import limits
from ledger.domain.engine import ItemOutcome
from ledger.domain.transfers import TransferKey, TransferRequest
from ledger.storage.shard import Fence, Shard
from ledger.telemetry.tracing import (
    joined_spans,
    start_as_current_span,
    trace_id_in,
    tracing_active,
)


@dataclass
class _Call:
    group: list[TransferRequest]
    fence: Fence
    done: asyncio.Future[list[ItemOutcome]]
    # The caller's trace context: the runner task that applies the call belongs
    # to whichever call started it, not necessarily this one.
    trace_context: otel_context.Context = field(default_factory=otel_context.get_current)


@dataclass
class _ShardQueue:
    calls: deque[_Call] = field(default_factory=deque)
    in_flight: int = 0


class TransferBatcher:
    def __init__(
        self,
        *,
        transfers_per_batch_max: int = limits.group_commit_transfers_max,
        batches_in_flight_max: int = limits.group_commit_batches_in_flight_max,
    ) -> None:
        self.transfers_per_batch_max = transfers_per_batch_max
        self.batches_in_flight_max = batches_in_flight_max
        # One queue per (shard, epoch): calls routed under different configs never mix.
        self._queues: dict[tuple[str, int], _ShardQueue] = {}
        self._runners: set[asyncio.Task[None]] = set()

    def queued_calls(self) -> int:
        """Calls waiting for a transaction, over every shard."""
        return sum(len(q.calls) for q in self._queues.values())

    async def submit(
        self, shard: Shard, group: list[TransferRequest], fence: Fence
    ) -> list[ItemOutcome]:
        if group and group[-1].linked:
            # An open chain must fail as open; joined to the next call it would not.
            return await shard.create_transfers(group, fence)
        queue = self._queues.setdefault((shard.name, fence.epoch), _ShardQueue())
        call = _Call(group, fence, asyncio.get_running_loop().create_future())
        queue.calls.append(call)
        if queue.in_flight < self.batches_in_flight_max:
            queue.in_flight += 1
            runner = asyncio.create_task(self._drain(shard, queue))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        return await call.done

    async def _drain(self, shard: Shard, queue: _ShardQueue) -> None:
        try:
            while queue.calls:
                batch = [queue.calls.popleft()]
                size = len(batch[0].group)
                while (
                    queue.calls and size + len(queue.calls[0].group) <= self.transfers_per_batch_max
                ):
                    call = queue.calls.popleft()
                    size += len(call.group)
                    batch.append(call)
                await self._run(shard, batch)
        finally:
            queue.in_flight -= 1

    async def _run(self, shard: Shard, batch: list[_Call]) -> None:
        requests = [r for call in batch for r in call.group]
        fence = Fence(
            epoch=batch[0].fence.epoch,
            claimable=frozenset().union(*(call.fence.claimable for call in batch)),
        )
        attributes: dict[str, AttributeValue] = {
            "ledger.shard": shard.name,
            "ledger.calls": len(batch),
            "ledger.transfers": len(requests),
        }
        started_ns = time.time_ns()
        failure: Exception | None = None
        with start_as_current_span(
            "group commit", context=batch[0].trace_context, attributes=attributes
        ) as span:
            try:
                outcomes = await shard.create_transfers(
                    requests, fence, trace_ids=_joined_trace_ids(batch)
                )
            except Exception as error:
                failure = error
        joined_spans(
            "group commit (joined)",
            (call.trace_context for call in batch[1:]),
            span,
            started_ns,
            attributes,
        )
        if failure is not None:
            for call in batch:
                if not call.done.done():
                    call.done.set_exception(failure)
            return
        offset = 0
        for call in batch:
            mine = outcomes[offset : offset + len(call.group)]
            if offset:
                # Indexes are positions in the call, not in the shared batch (a
                # negative one is a marker, RUN_AS_SAGA, and stays).
                mine = [
                    ItemOutcome(
                        i if o.index >= 0 else o.index,
                        o.id,
                        o.result,
                        o.replayed,
                        o.differing_field,
                        o.created_at,
                        o.refused_by_rule,
                    )
                    for i, o in enumerate(mine)
                ]
            offset += len(call.group)
            if not call.done.done():
                call.done.set_result(mine)


def _joined_trace_ids(batch: list[_Call]) -> dict[TransferKey, str] | None:
    """The trace of each joined call's transfers (the batch runs in the first call's).
    An id sent by two calls is recorded by the first (the other replays it)."""
    if len(batch) == 1 or not tracing_active():
        return None
    leader = {r.key for r in batch[0].group}
    found: dict[TransferKey, str] = {}
    for call in batch[1:]:
        trace_id = trace_id_in(call.trace_context)
        for r in call.group:
            if r.key not in leader:
                found.setdefault(r.key, trace_id)
    return found

"""Group commit for saga steps: concurrent sagas' steps on one shard share one
transaction.

While a shard runs a group, new steps queue (step 1 of one saga, step 2 of
another, step 3 of a third: one queue per shard); the next group takes every
queued step (up to a limit, and never the same step of a saga twice), and
SagaStore.run_steps applies them in one transaction. Under light load a step
runs at once and alone, as before; under load a cross-shard transfer pays a
share of each transaction's round trips instead of all of them. One queue for
all three steps, not one per step: with a fixed number of sagas in flight,
groups are three times as large.

A group is all or nothing in PostgreSQL, so one saga's failure must not fail
the others: a group that raises is rolled back and run again one saga per
transaction, and each saga gets its own answer or error (the routing errors of
a fence, a race, a refusal). Only an unreachable shard fails the whole group
at once, since every saga in it would meet the same.

Tracing: a saga alone runs in its own trace, under its step's span, as
without batching. A shared transaction runs under a "saga group commit" span
in the trace of its first saga; every other saga of the group gets a joined
span of the same duration in its own trace, linked to that one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.util.types import AttributeValue

from ledger import limits
from ledger.invariant import invariant
from ledger.storage.errors import ShardUnavailable
from ledger.storage.shard import Fence, Shard
from ledger.telemetry.tracing import joined_spans, start_as_current_span

Item = TypeVar("Item")
Answer = TypeVar("Answer")
# The set-based step: one answer (or the error of that saga alone) per item, in order.
ApplyGroup = Callable[[Shard, list[Item], Fence], Awaitable[Sequence[Answer | Exception]]]


@dataclass
class _Entry(Generic[Item, Answer]):
    item: Item
    fence: Fence
    done: asyncio.Future[Answer]
    trace_context: otel_context.Context = field(default_factory=otel_context.get_current)


@dataclass
class _Queue(Generic[Item, Answer]):
    entries: deque[_Entry[Item, Answer]] = field(default_factory=deque)
    running: bool = False


class StepBatcher(Generic[Item, Answer]):
    """One queue and one runner per (shard, config epoch); apply runs a group."""

    def __init__(
        self,
        apply: ApplyGroup[Item, Answer],
        *,
        key_of: Callable[[Item], Hashable],
        sagas_per_group_max: int = limits.saga_step_group_sagas_max,
    ) -> None:
        invariant(sagas_per_group_max >= 1, "a group holds at least one saga")
        self._apply = apply
        self._key_of = key_of
        self.sagas_per_group_max = sagas_per_group_max
        # Sagas routed under different configs never share a transaction.
        self._queues: dict[tuple[str, int], _Queue[Item, Answer]] = {}
        self._runners: set[asyncio.Task[None]] = set()

    def queued(self) -> int:
        """Saga steps waiting for their shard's next transaction, over every shard."""
        return sum(len(q.entries) for q in self._queues.values())

    async def submit(self, shard: Shard, fence: Fence, item: Item) -> Answer:
        queue = self._queues.setdefault((shard.name, fence.epoch), _Queue())
        entry: _Entry[Item, Answer] = _Entry(
            item, fence, asyncio.get_running_loop().create_future()
        )
        queue.entries.append(entry)
        if not queue.running:
            queue.running = True
            runner = asyncio.create_task(self._drain(shard, queue))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        return await entry.done

    async def _drain(self, shard: Shard, queue: _Queue[Item, Answer]) -> None:
        try:
            while queue.entries:
                group = [queue.entries.popleft()]
                keys = {self._key_of(group[0].item)}
                # A step queued twice (a retry racing its original) waits for the next
                # group: within one transaction the second would not see the first.
                while (
                    queue.entries
                    and len(group) < self.sagas_per_group_max
                    and self._key_of(queue.entries[0].item) not in keys
                ):
                    entry = queue.entries.popleft()
                    keys.add(self._key_of(entry.item))
                    group.append(entry)
                try:
                    await self._run(shard, group)
                except BaseException as error:
                    # No saga may wait forever on a runner that is gone.
                    for entry in [*group, *queue.entries]:
                        if entry.done.done():
                            continue
                        if isinstance(error, Exception):
                            entry.done.set_exception(error)
                        else:
                            entry.done.cancel()
                    queue.entries.clear()
                    raise
        finally:
            queue.running = False

    async def _run(self, shard: Shard, group: list[_Entry[Item, Answer]]) -> None:
        if len(group) == 1:
            answers = await self._alone(shard, group[0])
            _settle(group, answers)
            return
        fence = Fence(
            epoch=group[0].fence.epoch,
            claimable=frozenset().union(*(e.fence.claimable for e in group)),
            # Allowed for all only if allowed for each (the step may allow it per saga).
            allow_moving=all(e.fence.allow_moving for e in group),
        )
        attributes: dict[str, AttributeValue] = {
            "ledger.shard": shard.name,
            "ledger.sagas": len(group),
        }
        started_ns = time.time_ns()
        shared: Sequence[Answer | Exception] | None
        with start_as_current_span(
            "saga group commit", context=group[0].trace_context, attributes=attributes
        ) as span:
            try:
                shared = await self._apply(shard, [e.item for e in group], fence)
            except ShardUnavailable as error:
                shared = [error] * len(group)
            except Exception:
                # Rolled back: nothing of it was written. Each saga runs alone next.
                shared = None
        joined_spans(
            "saga group commit (joined)",
            (e.trace_context for e in group[1:]),
            span,
            started_ns,
            attributes,
        )
        if shared is None:
            alone = await asyncio.gather(*(self._alone(shard, e) for e in group))
            shared = [a[0] for a in alone]
        _settle(group, shared)

    async def _alone(
        self, shard: Shard, entry: _Entry[Item, Answer]
    ) -> Sequence[Answer | Exception]:
        """One saga's step in its own transaction, in its own trace."""
        token = otel_context.attach(entry.trace_context)
        try:
            return await self._apply(shard, [entry.item], entry.fence)
        except Exception as error:
            return [error]
        finally:
            otel_context.detach(token)


def _settle(group: list[_Entry[Item, Answer]], answers: Sequence[Answer | Exception]) -> None:
    invariant(len(answers) == len(group), "a group answers every saga in it")
    for entry, answer in zip(group, answers, strict=True):
        if entry.done.done():
            continue  # The caller gave up waiting (cancelled).
        if isinstance(answer, Exception):
            entry.done.set_exception(answer)
        else:
            entry.done.set_result(answer)

"""Drives cross-shard sagas: step 1 on the debit shard, 2 on the credit shard, 3 back.

Every step resolves its shard from the live ring at the moment of use and is
fenced there, so a merchant that moved is followed, never written behind.
A step that cannot run now is recorded with back-off: a shard down as a failed
attempt, a move in progress as a wait; the recovery worker of any replica picks
the saga up again when it is due. Nothing here ever gives up on money: a saga
that runs out of attempts goes to the dead-letter list with its funds still
visibly reserved.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from ledger import limits
from ledger.domain.engine import ItemOutcome
from ledger.domain.sagas import (
    CreditOutcome,
    CreditRecord,
    Saga,
    SagaKey,
    SagaKind,
    SagaState,
    SagaStep,
)
from ledger.domain.transfers import TransferRequest, TransferResult
from ledger.routing.cluster import Cluster, FenceWait
from ledger.routing.errors import ClusterUnavailable, RoutingUnsettled
from ledger.sagas.step_batcher import StepBatcher
from ledger.storage.errors import (
    MerchantsMoving,
    MerchantsNotOwned,
    PartiesShareShard,
    ShardUnavailable,
    StaleEpoch,
)
from ledger.storage.sagas import (
    SagaBegin,
    SagaCredit,
    SagaFinish,
    SagaRaced,
    SagaStart,
    SagaStore,
    StepAnswer,
    StepRequest,
    step_key,
)
from ledger.storage.shard import Fence, Shard
from ledger.telemetry import metrics
from ledger.telemetry.pseudonym import pseudonymise
from ledger.telemetry.tracing import current_traceparent, tracer

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which a later attempt may succeed.
RETRYABLE = (ShardUnavailable, MerchantsMoving, MerchantsNotOwned, StaleEpoch, ClusterUnavailable)
# Of those, the ones that say a merchant's placement is changing (a move in
# progress, a replica behind on the config): the saga waits for it, with back-off,
# and the wait does not count towards the dead-letter list. A move left
# unfinished by a killed rebalance lasts until an admin reruns it; its sagas
# dead-lettered meanwhile (chaos seed 300: an expiry, 30 attempts in 40 s with a
# 1 s back-off cap) kept their merchant from ever moving again, so the drain
# that needed it could not finish. A wait that lasts is shown by
# LedgerSagasUnfinished and reconcile's move markers instead.
PLACEMENT_WAITS = (MerchantsMoving, MerchantsNotOwned, StaleEpoch, RoutingUnsettled)
# A wait's back-off is this share of how long the saga has existed (between the
# min and max retry delays): it grows about 1.5 times per wait, as attempts
# would, without an attempt count to grow from.
WAIT_DELAY_SHARE_OF_AGE = 0.5


class SagaResolutionRefused(Exception):
    """An admin asked for an outcome the credit shard does not confirm as safe."""


@dataclass(frozen=True)
class SagaSettings:
    attempts_max: int = limits.saga_attempts_max
    lease_s: float = limits.saga_lease_s
    retry_delay_s_min: float = limits.saga_retry_delay_s_min
    retry_delay_s_max: float = limits.saga_retry_delay_s_max


class SagaRunner:
    def __init__(
        self, cluster: Cluster, *, owner: str, settings: SagaSettings | None = None
    ) -> None:
        self.cluster = cluster
        self.owner = owner
        self.settings = settings or SagaSettings()
        self._tasks: set[asyncio.Task[Saga]] = set()
        # Told the delay of every retry this runner schedules, so that the recovery
        # worker (which sets it) wakes for it instead of polling.
        self.on_retry_scheduled: Callable[[float], None] | None = None
        # Group commit of saga steps per shard (see step_batcher.py).
        self._steps: StepBatcher[StepRequest, StepAnswer] = StepBatcher(
            self._run_steps, key_of=step_key
        )

    def queued_steps(self) -> int:
        """Saga steps waiting for a shared transaction (group commit), over every shard."""
        return self._steps.queued()

    # Starting.

    async def begin(self, request: TransferRequest) -> SagaStart:
        """Step 1 on the debit shard (or the replay of an earlier step 1).

        Raises SettleIsLocal or PartiesShareShard (both RunsLocally) for an item that
        needs no saga after all."""
        trace_context = current_traceparent()

        peer_shard = ""
        if request.credit is not None and not request.settles_pending:
            peer_shard = await self._credit_owner(request.credit.merchant_id)

        async def begin(shard: Shard, fence: Fence) -> SagaStart:
            if request.settles_pending:
                return await SagaStore(shard).begin_settle(
                    request,
                    fence=fence,
                    trace_context=trace_context,
                    lease_owner=self.owner,
                    lease_s=self.settings.lease_s,
                )
            start = await self._step(shard, fence, SagaBegin(request, peer_shard, trace_context))
            assert isinstance(start, SagaStart)
            return start

        with tracer.start_as_current_span(
            "saga step 1 reserve" if not request.settles_pending else "saga step 1 settle",
            attributes={
                "ledger.transfer_id": request.id,
                "ledger.merchant": pseudonymise(request.debit.merchant_id),
            },
        ):
            return await self._on_home(request.debit.merchant_id, begin)

    async def _run_steps(
        self, shard: Shard, steps: list[StepRequest], fence: Fence
    ) -> list[StepAnswer]:
        return await SagaStore(shard).run_steps(
            steps, fence=fence, lease_owner=self.owner, lease_s=self.settings.lease_s
        )

    async def _step(self, shard: Shard, fence: Fence, step: StepRequest) -> StepAnswer:
        answer = await self._steps.submit(shard, fence, step)
        if isinstance(answer, (SagaRaced, PartiesShareShard)):
            raise answer
        return answer

    async def _credit_owner(self, merchant_id: str) -> str:
        """The credit merchant's owner now (a move may have it elsewhere than the ring
        says): step 2 runs there, and its settlement account mirrors the debit shard's.
        A merchant being handed over is waited for, briefly. Where no shard asked
        knows it, the ring's shard (which claims a merchant it does not know yet)."""

        async def owner(shard: Shard, fence: Fence) -> str | None:
            return await shard.owner_of(merchant_id)

        ring_shard = shard = self.cluster.shard_for(merchant_id)
        fenced = FenceWait()
        redirects = 0
        while redirects < limits.redirect_attempts_max:
            try:
                name = await owner(shard, self.cluster.fence(shard, {merchant_id}))
            except MerchantsMoving:
                if not await fenced.wait():
                    break
                continue
            except ShardUnavailable:
                # Under a config change, a merchant whose new shard is down may still
                # be on its old one (asked once, from the ring's shard only).
                previous = self.cluster.previous_owner_if_down(merchant_id, shard.name)
                if previous is None or redirects:
                    # The credit shard is down: reserve now anyway (step 1 needs only
                    # the debit shard); step 2 waits on that shard until it is back.
                    return shard.name
                shard = self.cluster.shards[previous]
                redirects += 1
                continue
            if name is None:
                return ring_shard.name
            named = self.cluster.shard_named(name)
            if named is None or named is shard:
                return name
            shard = named
            redirects += 1
        raise ClusterUnavailable("the credit merchant is being moved; retry shortly")

    async def outcome_by(self, start: SagaStart, *, deadline: float) -> ItemOutcome:
        """Drives a fresh saga in the background and waits for it until deadline
        (event loop time); the item's final outcome, or IN_PROGRESS."""
        saga = start.saga
        if saga is None or saga.state is not SagaState.RUNNING:
            return start.outcome
        loop = asyncio.get_running_loop()
        if start.outcome.replayed:
            final = await self.wait(saga, wait_s=max(0.0, deadline - loop.time()))
        else:
            # Started even with no time left to wait: the saga moves on at once.
            task = asyncio.create_task(self.drive(saga))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            try:
                final = await asyncio.wait_for(
                    asyncio.shield(task), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                final = saga
        if start.outcome.result is TransferResult.IN_PROGRESS and final.finished:
            assert final.result is not None
            return replace(start.outcome, result=final.result)
        return start.outcome

    async def wait(self, saga: Saga, *, wait_s: float) -> Saga:
        """Polls a saga until it finishes or wait_s passes; returns what it last saw.

        Not found is polled again too: the saga was seen, so it exists, and a read
        can still miss it while a rebalance hands its merchant between shards."""
        loop = asyncio.get_running_loop()
        end = loop.time() + wait_s
        delay_s = 0.01
        while True:
            found = await self.get(saga.key)
            if found is not None:
                saga = found[0]
            if saga.state is not SagaState.RUNNING or loop.time() + delay_s > end:
                return saga
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.25)

    # Driving.

    async def drive(self, saga: Saga) -> Saga:
        """One pass over the remaining steps; a failure is recorded for a later retry."""
        try:
            with tracer.start_as_current_span(
                "saga step 2 credit", attributes=saga_attributes(saga)
            ):
                credit = await self._credit(saga)
            with tracer.start_as_current_span(
                "saga step 3 finish",
                attributes=saga_attributes(saga)
                | {
                    "ledger.saga.credit_outcome": credit.outcome.name,
                    "ledger.saga.credited_on": credit.credited_on,
                },
            ):
                finished = await self._finish(saga, credit)
            if finished.finished:
                metrics.sagas_finished.add(
                    1, {"kind": finished.key.kind.name, "state": finished.state.name}
                )
            return finished
        except SagaRaced:
            found = await self.get(saga.key)
            return found[0] if found else saga
        except RETRYABLE as error:
            return await self._retry_later(
                saga,
                f"{type(error).__name__}: {error}",
                counted=not isinstance(error, PLACEMENT_WAITS),
            )
        except Exception as error:
            log.exception(
                "saga for transfer %s (%s) failed unexpectedly",
                saga.key.transfer_id,
                saga.key.kind.name,
            )
            return await self._retry_later(saga, f"unexpected {type(error).__name__}")

    async def _credit(self, saga: Saga, *, abort: bool = False) -> CreditRecord:
        async def credit(shard: Shard, fence: Fence) -> CreditRecord:
            record = await self._step(shard, fence, SagaCredit(saga, saga.home_shard, abort))
            assert isinstance(record, CreditRecord)
            return record

        if saga.key.kind is SagaKind.TRANSFER:
            # A new credit follows its merchant to wherever it is now (step 3 then
            # moves the hold to the settlement account that mirrors that shard). It
            # never passes a move's fence: it waits and lands on the new shard, so
            # nothing is written behind a copy. Its recorded outcome moves with the
            # merchant, so a repeated step 2 finds it wherever it asks.
            return await self.cluster.run_on_owner(
                saga.credit.merchant_id, credit, shard_name=saga.peer_shard
            )
        # Settling a hold runs where its credit side is held: on the saga's peer
        # shard, or passed on from there, hop by hop, to where its credit merchant
        # moved (each hop a relay; see ledger/domain/moves.py). Never through a
        # move's fence: a fenced merchant makes it wait.
        home = saga.home_shard
        name = saga.peer_shard
        # Where on the hold's path the settle is (migration 0020): a path may pass
        # a shard more than once, each time by a relay of its own number.
        position = saga.path_position
        for _ in range(limits.hold_relay_hops_max):
            peer = self.cluster.shard_named(name)
            if peer is None:
                await self.cluster.reload()
                peer = self.cluster.shard_named(name)
            if peer is None:
                raise ClusterUnavailable("a saga's credit shard is not in the shard config")
            try:
                record = await self._step(
                    peer,
                    self.cluster.fence(peer, {saga.credit.merchant_id}),
                    SagaCredit(saga, home, abort, after_position=position),
                )
            except MerchantsNotOwned:
                # No relay here, and the credit merchant gone: the hold was settled
                # here before it left (one open when it left would have left a relay),
                # and the outcome recorded then moved with it.
                recorded = await self._credit_recorded(saga)
                if recorded is None:
                    raise
                return recorded
            assert isinstance(record, CreditRecord)
            if not record.relayed_to:
                return record
            home, name, position = peer.name, record.relayed_to, record.relayed_position
        raise ClusterUnavailable("a held credit was relayed more often than the limit")

    async def _finish(self, saga: Saga, credit: CreditRecord, *, allow_dead: bool = False) -> Saga:
        async def finish(shard: Shard, fence: Fence) -> Saga:
            finished = await self._step(
                shard, fence, SagaFinish(saga.key, saga.version, credit, allow_dead)
            )
            assert isinstance(finished, Saga)
            return finished

        return await self.cluster.run_on_owner(saga.key.merchant_id, finish, allow_moving=True)

    async def _retry_later(self, saga: Saga, error: str, *, counted: bool = True) -> Saga:
        settings = self.settings
        if counted:
            delay_s = settings.retry_delay_s_min * 2 ** min(saga.attempts, 30)
        else:
            # updated_at is when this pass claimed the saga (or began it).
            age_s = (saga.updated_at - saga.created_at).total_seconds()
            delay_s = max(settings.retry_delay_s_min, age_s * WAIT_DELAY_SHARE_OF_AGE)
        delay_s = min(settings.retry_delay_s_max, delay_s)
        delay_s = random.uniform(delay_s / 2, delay_s)

        async def record(shard: Shard, fence: Fence) -> Saga | None:
            return await SagaStore(shard).retry_later(
                saga,
                error=error,
                attempts_max=settings.attempts_max,
                delay_s=delay_s,
                counted=counted,
            )

        try:
            updated = await self._on_home(saga.key.merchant_id, record)
        except RETRYABLE:
            # The debit shard is down too: the lease runs out and a worker retries.
            return saga
        metrics.saga_attempts_failed.add(1, {"kind": saga.key.kind.name})
        if self.on_retry_scheduled is not None:
            self.on_retry_scheduled(delay_s)
        if updated is not None and updated.state is SagaState.DEAD:
            log.error(
                "saga for transfer %s (%s) moved to the dead-letter list: %s",
                saga.key.transfer_id,
                saga.key.kind.name,
                error,
            )
        return updated or saga

    # Admin.

    async def get(self, key: SagaKey) -> tuple[Saga, list[SagaStep]] | None:
        async def read(shard: Shard, fence: Fence) -> tuple[Saga, list[SagaStep]] | None:
            return await SagaStore(shard).get(key)

        return await self.cluster.run_on_owner(key.merchant_id, read, unknown=lambda: None)

    async def list(self, states: list[SagaState], *, limit: int) -> tuple[list[Saga], list[str]]:
        """Sagas in these states on every reachable shard, oldest first, and the shards
        that could not be read (the dead-letter list must be readable in an outage)."""
        found: list[Saga] = []
        unreachable: list[str] = []
        for name, shard in list(self.cluster.shards.items()):
            try:
                found += await SagaStore(shard).list(states, limit=limit)
            except ShardUnavailable:
                unreachable.append(name)
        return sorted(found, key=lambda s: s.created_at)[:limit], unreachable

    async def retry(self, key: SagaKey) -> Saga | None:
        async def reset(shard: Shard, fence: Fence) -> Saga | None:
            return await SagaStore(shard).reset_for_retry(
                key, lease_owner=self.owner, lease_s=self.settings.lease_s
            )

        saga = await self._on_home(key.merchant_id, reset)
        if saga is None:
            return None
        return await self.drive(saga)

    async def resolve(self, key: SagaKey, *, outcome: SagaState) -> Saga:
        """Finishes a stuck saga, only to an outcome the credit shard confirms is safe."""
        found = await self.get(key)
        if found is None:
            raise KeyError(key)
        saga = found[0]
        if saga.finished:
            if saga.state is not outcome:
                raise SagaResolutionRefused(f"the saga already finished as {saga.state.name}")
            return saga
        if outcome is SagaState.COMPENSATED:
            # Make the credit shard record the abort first, so step 2 can never land later.
            credit = await self._credit(saga, abort=True)
            if credit.outcome is CreditOutcome.APPLIED:
                raise SagaResolutionRefused(
                    "the credit shard applied the credit: resolve to COMPLETED instead"
                )
        elif outcome is SagaState.COMPLETED:
            recorded = await self._credit_recorded(saga)
            if recorded is None or recorded.outcome is not CreditOutcome.APPLIED:
                raise SagaResolutionRefused(
                    "the credit shard has not applied the credit: retry the saga instead"
                )
            credit = recorded
        else:
            raise SagaResolutionRefused("a saga resolves to COMPLETED or COMPENSATED")
        return await self._finish(saga, credit, allow_dead=True)

    async def _credit_recorded(self, saga: Saga) -> CreditRecord | None:
        """What step 2 recorded, read where the credit merchant is now: step 2 is
        decided where the merchant is, and its outcome moves with it (a relay hop
        records none)."""
        name = await self._credit_owner(saga.credit.merchant_id)
        shard = self.cluster.shard_named(name)
        if shard is None:
            raise ClusterUnavailable("the saga's credit shard is not in the shard config")
        return await SagaStore(shard).credit_outcome(saga.key)

    async def close(self) -> None:
        """Waits for sagas this replica is driving; their leases protect the rest."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=limits.shutdown_grace_s)

    # Routing.

    async def _on_home(self, merchant_id: str, step: Callable[[Shard, Fence], Awaitable[T]]) -> T:
        return await self.cluster.run_on_owner(merchant_id, step)


def saga_attributes(saga: Saga) -> dict[str, str | int]:
    """Span attributes of a saga; the merchant only as a pseudonym."""
    return {
        "ledger.transfer_id": saga.key.transfer_id,
        "ledger.merchant": pseudonymise(saga.key.merchant_id),
        "ledger.saga.kind": saga.key.kind.name,
        "ledger.saga.debit_shard": saga.home_shard,
        "ledger.saga.credit_shard": saga.peer_shard,
        "ledger.amount_minor": saga.amount_minor or saga.pending_minor,
    }

"""`ledger shards plan|rebalance|status|cleanup`: merchant moves, as Vitess and Citus do them.

The protocol, per rebalance:
1. Raise every shard's epoch to the new config's, with claims of unknown
   merchants paused (writes from replicas on the old config are refused from
   here on and reload their config; writes for new merchants wait briefly).
2. Plan: every active merchant whose owner under the new ring is another shard
   moves there; mark it `incoming` on its destination (which then redirects
   its writes and reads to the source). Resume moves a crash left half done.
3. Resume claims.
4. Per merchant: copy its rows while writes go on; fence it on the source
   (`moving`: writes wait, in-flight ones finish first); copy what changed;
   verify counts, digests and every account's balance against its entries;
   activate it on the destination, then mark it `moved` on the source (in that
   order, so it can only roll forward). Its holds move with it: between its
   own accounts as they are, local ones with other merchants as cross-shard
   pending transfers, cross-shard ones through a relay on the shard it
   leaves, folded away where it comes back (see ledger/domain/moves.py);
   sagas crediting it follow it to its new shard. A merchant with sagas of
   its own in flight past a short drain is deferred and retried; a failed
   verification unfences it.

A shard lost under a run (stopped, restarted, cut off) is waited for (bounded),
the run's admin lock there taken again if its session went with it, and the
step under way resumed (a move from the merchant's states), as a rerun would.

Draining (a shard's `state = "draining"`): the shard is off the ring, so all its
merchants move, while it stays routable for what it still holds (it may relay
holds). The summary says what still pins it, or that it is DRAINED; only then
may the config retire it (`state = "retired"`) or delete it, which every
command here and every replica's reload refuse before (ShardPinned).

Every step is idempotent and decided by the merchant's states on the two
shards, so rerunning the command after a crash at any point finishes the job,
and running it twice moves nothing the second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ledger import faults, limits
from ledger.domain.moves import CrossHold
from ledger.invariant import InvariantViolation
from ledger.routing.config import ShardConfig, ShardSpec
from ledger.routing.ring import ShardRing
from ledger.storage.audit import CLAIMS_PAUSED_WARNING, ShardAudit
from ledger.storage.errors import ShardUnavailable, cannot_connect_now
from ledger.storage.events import EventStore
from ledger.storage.moves import AdminBusy, MoveDeferred, MoveStore, ShardPins
from ledger.storage.shard import Shard
from ledger.telemetry.pseudonym import pseudonymise
from ledger.telemetry.tracing import tracer

# Deferred merchants (money pending with others, sagas in flight) are retried this many
# rounds, this long apart, before the run reports them for a later rerun.
DEFER_ROUNDS_MAX = 5
DEFER_ROUND_PAUSE_S = 1.0
# `status` lists replicas that reported within this long (they do every ~2 s).
REPLICA_SEEN_WITHIN_S = 60.0
# Copy-and-verify rounds under the fence before a move gives up (a saga step
# under way at the fence may land between a copy and its check).
VERIFY_ATTEMPTS_MAX = 3
# A move waiting for holds whose paths it would make too long (or repeat a step) names at
# most this many of them.
HOLDS_NAMED_MAX = 10
# Fenced, a merchant's sagas in flight get this long to settle before the
# move gives up for this round (new writes for it wait meanwhile).
DRAIN_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class Move:
    merchant_id: str
    source: str
    destination: str
    accounts: int = 0
    entries: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    epoch: int
    moves: list[Move]
    merchants_total: int

    @property
    def share_moved(self) -> float:
        return len(self.moves) / self.merchants_total if self.merchants_total else 0.0

    def by_pair(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        pairs: dict[tuple[str, str], tuple[int, int, int]] = {}
        for move in self.moves:
            merchants, accounts, entries = pairs.get((move.source, move.destination), (0, 0, 0))
            pairs[(move.source, move.destination)] = (
                merchants + 1,
                accounts + move.accounts,
                entries + move.entries,
            )
        return pairs

    def render(self) -> str:
        lines = [
            f"plan to epoch {self.epoch}: {len(self.moves)} of {self.merchants_total} "
            f"merchants move ({100 * self.share_moved:.1f}%)"
        ]
        for (source, destination), (merchants, accounts, entries) in sorted(self.by_pair().items()):
            lines.append(
                f"  {source} -> {destination}: {merchants} merchants, "
                f"{accounts} accounts, {entries} entries"
            )
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class MoveResult:
    move: Move
    outcome: str  # "moved", "already moved", "deferred: ...", "failed: ..."
    rows_copied: int = 0
    pause_ms: float | None = None

    @property
    def done(self) -> bool:
        return self.outcome in ("moved", "already moved")


class ShardPinned(Exception):
    """The new config stops routing a shard that something still pins; nothing ran."""


@dataclass
class Summary:
    results: list[MoveResult] = field(default_factory=list)
    # Moves an earlier run left unfinished that the new config no longer asks for.
    abandoned: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    # Each draining shard, and what still pins it there after this run.
    draining: dict[str, ShardPins] = field(default_factory=dict)
    # (shard, consumer): event consumers registered on a shard that lacked them.
    consumers_carried: list[tuple[str, str]] = field(default_factory=list)
    # Shards this config retires, or no longer lists, that were let go (nothing pins
    # them): said whatever else the run leaves to do, since a rerun for a deferred
    # merchant elsewhere exits 1 with the shard gone all the same (chaos seed 294).
    retired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not self.pending and not any(p.routable_needed for p in self.draining.values())

    @property
    def moved(self) -> list[MoveResult]:
        return [r for r in self.results if r.done]

    @property
    def pending(self) -> list[MoveResult]:
        return [r for r in self.results if not r.done]

    def render(self) -> str:
        pauses = sorted(r.pause_ms for r in self.moved if r.pause_ms is not None)
        rows = sum(r.rows_copied for r in self.results)
        rate = len(self.moved) / self.duration_s if self.duration_s else 0.0
        lines = [
            f"moved {len(self.moved)} merchants, {rows} rows copied, in {self.duration_s:.1f} s "
            f"({rate:.1f} merchants/s)",
        ]
        if pauses:
            lines.append(
                f"write pause per merchant: p50 {_percentile(pauses, 50):.1f} ms, "
                f"p99 {_percentile(pauses, 99):.1f} ms, max {pauses[-1]:.1f} ms"
            )
        for result in self.pending:
            lines.append(
                f"NOT MOVED {result.move.merchant_id} {result.move.source} -> "
                f"{result.move.destination}: {result.outcome} (rerun to finish)"
            )
        for name, consumer in self.consumers_carried:
            lines.append(
                f"registered event consumer {consumer!r} on shard {name}, as on the others"
            )
        for move in self.abandoned:
            lines.append(
                f"ABANDONED {move}: an earlier run's move the config no longer asks for; "
                "what it copied is an old copy (`ledger shards cleanup` deletes it)"
            )
        for name in self.retired:
            lines.append(
                f"RETIRED {name}: holds nothing and every event consumer has its stream; "
                "the service routes nothing to it"
            )
        for name in self.removed:
            lines.append(f"REMOVED {name}: holds nothing; it is no longer part of the cluster")
        for name, pins in sorted(self.draining.items()):
            if pins.routable_needed:
                lines.append(
                    f"DRAINING {name}: still holds {pins.render()}; rerun once they settle"
                )
            else:
                lines.append(
                    f'DRAINED {name}: holds nothing; set its `state = "retired"` in the '
                    "config (then `ledger shards cleanup` deletes the old copies)"
                )
        return "\n".join(lines)


Progress = Callable[[int, int, MoveResult, float], None]
T = TypeVar("T")


class Rebalancer:
    """Moves merchants from the shards of old (and new) to their owners under new."""

    def __init__(
        self,
        new: ShardConfig,
        *,
        old: ShardConfig | None = None,
        on_starting: Callable[[str], None] | None = None,
        on_lost: Callable[[ShardUnavailable], None] | None = None,
    ) -> None:
        self.new = new
        # Told the name of a shard found starting up, once, before waiting for it.
        self.on_starting = on_starting
        # Told each time a shard is lost under a run, before waiting for it.
        self.on_lost = on_lost
        self.ring = ShardRing(new)
        names = {s.name for s in new.shards}
        extra = [s for s in (old.shards if old else ()) if s.name not in names]
        self.specs: tuple[ShardSpec, ...] = (*new.shards, *extra)
        # Shards the new config deletes or retires: allowed only once nothing pins
        # them (checked before anything runs); draining ones are emptied.
        self.deleted = frozenset(s.name for s in extra)
        self.retired = frozenset(s.name for s in new.shards if not s.routable)
        self.draining = frozenset(s.name for s in new.shards if s.state == "draining")
        self.shards: dict[str, Shard] = {}
        # Merchants deferred in this run for holds only their settling releases,
        # and the holds named: a later round looks again before copying them once more.
        self._waiting_for_hold: dict[str, WaitedFor] = {}
        # While exclusive: the admin locks held, and each one's backend pid per shard.
        self._locks: contextlib.AsyncExitStack | None = None
        self._lock_pids: dict[str, int] = {}

    async def open(self, *, riding_out_losses: bool = False) -> None:
        """Opens and sets up every shard. riding_out_losses (for a run that changes
        things): a shard that cannot be reached is waited for as under a run."""
        lost_wait_s = limits.rebalance_shard_lost_wait_s if riding_out_losses else 0.0
        for spec in self.specs:
            shard = Shard(name=spec.name, dsn=spec.dsn)
            await shard.open()
            self.shards[spec.name] = shard
            await self._migrate_once_started(shard, lost_wait_s=lost_wait_s)

    async def _migrate_once_started(self, shard: Shard, *, lost_wait_s: float) -> None:
        """Sets the shard up, first waiting (bounded) while it starts up: an admin
        rerunning a rebalance just after restarting a shard should not have to
        rerun it again for the seconds the shard replays its WAL. A shard that
        cannot be reached is waited for lost_wait_s."""
        started = time.monotonic()
        told: set[bool] = set()
        while True:
            try:
                # A shard set up here is being added: claims stay paused until the
                # rebalance has marked the merchants that move in (plan alone leaves
                # them paused; writes for new merchants there wait for the rebalance).
                await shard.migrate(epoch=self.new.epoch, claims_paused_if_new=True)
                return
            except ShardUnavailable as error:
                starting = cannot_connect_now(error)
                wait_s = limits.shard_starting_wait_s if starting else lost_wait_s
                if time.monotonic() - started >= wait_s:
                    raise
                if starting not in told:
                    if starting and self.on_starting is not None:
                        self.on_starting(shard.name)
                    if not starting and self.on_lost is not None:
                        self.on_lost(error)
                told.add(starting)
            await asyncio.sleep(limits.shard_starting_poll_s)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards.values()))
        self.shards = {}

    def _store(self, name: str) -> MoveStore:
        return MoveStore(self.shards[name])

    async def check_leaving(self) -> None:
        """Raises ShardPinned if the new config stops routing a shard that is not empty."""
        for name in sorted(self.deleted | self.retired):
            refused = await self._store(name).leave_refused(deleted=name in self.deleted)
            if refused is not None:
                raise ShardPinned(refused)

    async def plan(self) -> Plan:
        """What moves where, from the merchants' states on the shards now; changes nothing."""
        await self.check_leaving()
        moves: list[Move] = []
        total = 0
        for name in self.shards:
            store = self._store(name)
            active = await store.active_merchants()
            moving = [m for m, _ in await store.merchants_in("moving")]
            total += len(active) + len(moving)
            leaving = [m for m in active + moving if self.ring.shard_for(m) != name]
            sizes = await store.sizes(leaving) if leaving else {}
            for merchant_id in leaving:
                accounts, entries = sizes.get(merchant_id, (0, 0))
                moves.append(
                    Move(merchant_id, name, self.ring.shard_for(merchant_id), accounts, entries)
                )
        return Plan(self.new.epoch, sorted(moves, key=lambda m: m.merchant_id), total)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Every shard's admin lock, in name order: one rebalance or cleanup at a time.
        Raises AdminBusy (naming a shard) when another run holds one."""
        async with contextlib.AsyncExitStack() as stack:
            for name in sorted(self.shards):
                lock = functools.partial(self._take_admin_lock, stack, name)
                self._lock_pids[name] = await self._riding_out_losses(lock, locked=False)
            self._locks = stack
            try:
                yield
            finally:
                self._locks = None
                self._lock_pids.clear()

    async def _take_admin_lock(self, stack: contextlib.AsyncExitStack, name: str) -> int:
        return await stack.enter_async_context(self._store(name).admin_lock())

    async def rebalance(self, *, progress: Progress | None = None) -> Summary:
        async with self.exclusive():
            return await self._rebalance(progress)

    async def _rebalance(self, progress: Progress | None) -> Summary:
        started = time.monotonic()
        with tracer.start_as_current_span("rebalance", attributes={"ledger.epoch": self.new.epoch}):
            summary = Summary(retired=sorted(self.retired), removed=sorted(self.deleted))
            plan = await self._riding_out_losses(functools.partial(self._prepare, summary))
            todo = list(plan.moves)
            done = 0
            for round_number in range(1, DEFER_ROUNDS_MAX + 1):
                deferred: list[Move] = []
                for move in todo:
                    result = await self._riding_out_losses(functools.partial(self.move, move))
                    if result.outcome.startswith("deferred") and round_number < DEFER_ROUNDS_MAX:
                        deferred.append(move)
                        continue
                    summary.results.append(result)
                    done += 1
                    if progress is not None:
                        progress(done, len(plan.moves), result, time.monotonic() - started)
                if not deferred:
                    break
                todo = deferred
                await asyncio.sleep(DEFER_ROUND_PAUSE_S)
            for name in sorted(self.draining):
                summary.draining[name] = await self._riding_out_losses(self._store(name).pins)
        summary.duration_s = time.monotonic() - started
        return summary

    async def _prepare(self, summary: Summary) -> Plan:
        """Raises every shard's epoch, plans and marks the moves, and resumes claims;
        notes on summary the consumers carried and the moves abandoned."""
        await self.check_leaving()
        for name in self.shards:
            await self._store(name).set_epoch_and_claims(epoch=self.new.epoch, claims_paused=True)
        summary.consumers_carried += await self._carry_consumers()
        plan = await self.plan()
        for move in plan.moves:
            await self._store(move.destination).mark_incoming(
                move.merchant_id, source=move.source, epoch=self.new.epoch
            )
        faults.crash_point("rebalance.after_plan")
        # Claims resume only once every move is marked. A run that fails before
        # (a shard cut off while it plans) leaves them paused, as a killed run
        # does, until a rerun marks its moves: resumed, a shard at the new epoch
        # would take a mover that a replica on the new config writes there as a
        # new merchant, while it is still active where it was (chaos seed 298).
        for name in self.shards:
            await self._store(name).set_epoch_and_claims(epoch=self.new.epoch, claims_paused=False)
        summary.abandoned += await self._abandon_stale_moves()
        return plan

    async def _riding_out_losses(
        self, work: Callable[[], Awaitable[T]], *, locked: bool = True
    ) -> T:
        """work(), again after each shard lost under it is back (a bounded number of
        times): every step of a run is idempotent and every step of a move is
        decided by the states on its shards, so work cut short anywhere resumes
        where it stopped. locked: work runs under the run's admin locks (kept)."""
        # Counted per shard: under faults every few seconds a long step meets
        # several shards' (chaos seed 308: four losses of three shards in one move).
        losses: Counter[str] = Counter()
        while True:
            try:
                return await work()
            except ShardUnavailable as lost:
                losses[lost.shard_name] += 1
                if losses[lost.shard_name] > limits.rebalance_shard_losses_per_step_max:
                    raise
                if self.on_lost is not None:
                    self.on_lost(lost)
                await self._regain(lost, locked=locked)

    async def _regain(self, lost: ShardUnavailable, *, locked: bool) -> None:
        """Waits (bounded) for a lost shard to answer and, if locked, makes sure this
        run still holds its admin lock: taken again when the outage ended the session
        that held it. Raises AdminBusy when another run took it meanwhile (that run went
        no further: it takes every shard's lock first, and this run kept the others),
        and the loss itself once the wait is over."""
        name = lost.shard_name
        store = self._store(name)
        deadline = time.monotonic() + limits.rebalance_shard_lost_wait_s
        while True:
            try:
                holder = await store.admin_lock_holder()
                if not locked:
                    return
                if holder is not None and holder == self._lock_pids.get(name):
                    return
                if holder is not None:
                    raise AdminBusy(name)
                assert self._locks is not None, "a run's steps run under exclusive()"
                self._lock_pids[name] = await self._locks.enter_async_context(store.admin_lock())
                return
            except ShardUnavailable:
                if time.monotonic() >= deadline:
                    raise lost from None
            await asyncio.sleep(limits.shard_starting_poll_s)

    async def _carry_consumers(self) -> list[tuple[str, str]]:
        """Registers every live event consumer on each routed shard that lacks it (a
        shard this config adds), from the shard's oldest event, while claims are paused
        and before any merchant moves in: events are pruned only up to what every
        consumer registered on their shard acknowledged, so without this a consumer
        offline while the shard filled could find its first events pruned (a cursor
        that does not name a shard starts at its oldest kept event). Returns
        (shard, consumer) for each registration made."""
        stores = {name: EventStore(shard) for name, shard in self.shards.items()}
        registered = {name: await store.consumers() for name, store in stores.items()}
        live = {c.consumer for states in registered.values() for c in states if not c.lapsed}
        carried: list[tuple[str, str]] = []
        for name, store in stores.items():
            if name in self.deleted or name in self.retired:
                continue
            missing = live - {c.consumer for c in registered[name]}
            if not missing:
                continue
            oldest, _ = await store.bounds()
            for consumer in sorted(missing):
                await store.register(consumer, position=oldest - 1)
                carried.append((name, consumer))
        if not carried:
            return carried
        # A consumer dropped (`ledger events consumers --drop`, on every shard of the
        # config) after the read above would otherwise come back here, holding this
        # shard's events and refusing its retirement until it lapsed. A drop after
        # this second read reaches the new shard too: the config names it.
        targets = {name for name, _ in carried}
        still_live = {
            c.consumer
            for name, store in stores.items()
            if name not in targets
            for c in await store.consumers()
            if not c.lapsed
        }
        kept: list[tuple[str, str]] = []
        for name, consumer in carried:
            if consumer in still_live:
                kept.append((name, consumer))
            else:
                await stores[name].drop(consumer)
        return kept

    async def _abandon_stale_moves(self) -> list[str]:
        """Moves that an earlier run deferred or left cut short, to a shard the new
        config no longer sends the merchant to: its `incoming` marker there becomes
        `moved` to its source (the partial copy an old copy for cleanup), and a
        fence still on a source that owns it again is lifted. Otherwise the marker
        would stay for good: the plan only moves merchants whose owner changes."""
        abandoned = []
        for name in self.shards:
            store = self._store(name)
            for merchant_id, source in await store.merchants_in("incoming"):
                owner = self.ring.shard_for(merchant_id)
                if owner == name or source is None or source not in self.shards:
                    continue
                source_store = self._store(source)
                source_state = await source_store.state_of(merchant_id)
                # Active or fenced on its source: it lives there (never activated here).
                if source_state is None or source_state[0] not in ("active", "moving"):
                    continue
                if not await store.abandon_incoming(
                    merchant_id, source=source, epoch=self.new.epoch
                ):
                    continue
                if source_state[0] == "moving" and owner == source:
                    await source_store.unfence(merchant_id, epoch=self.new.epoch)
                abandoned.append(f"{merchant_id} {source} -> {name}")
        return abandoned

    async def move(self, move: Move) -> MoveResult:
        """Moves one merchant, from wherever a previous run left it."""
        try:
            return await self._traced_move(move)
        except InvariantViolation as error:
            return MoveResult(move, f"failed: {error}")

    async def _traced_move(self, move: Move) -> MoveResult:
        with tracer.start_as_current_span(
            "rebalance move",
            attributes={
                "ledger.merchant": pseudonymise(move.merchant_id),
                "ledger.move.source": move.source,
                "ledger.move.destination": move.destination,
            },
        ):
            return await self._move(move)

    async def _move(self, move: Move) -> MoveResult:
        m, epoch = move.merchant_id, self.new.epoch
        source, destination = self._store(move.source), self._store(move.destination)
        source_state = await source.state_of(m)
        if source_state is not None and source_state[0] == "moved":
            return MoveResult(move, "already moved")
        await destination.mark_incoming(m, source=move.source, epoch=epoch)
        destination_state = await destination.state_of(m)
        assert destination_state is not None
        if (
            destination_state[0] == "active"
            and source_state is not None
            and (source_state[0] == "active")
        ):
            # Never expected (new shards start with claims paused): say so loudly.
            return MoveResult(move, "failed: active on both shards; resolve by hand")
        rows_copied = 0
        # What the last copy saw (see MerchantRows.horizon_xid); None: copy all.
        horizon_xid: str | None = None
        fenced_at = time.monotonic()
        if source_state is not None and source_state[0] == "active":
            if m in self._waiting_for_hold:
                refused = await self._still_waiting(source, m, destination=move.destination)
                if refused is not None:
                    return MoveResult(move, f"deferred: {refused}", rows_copied)
            with tracer.start_as_current_span("move copy"):
                first = await source.read_rows(m, since_xid=None)
                rows_copied += await destination.write_rows(m, first)
                # Catch up once more while writes go on, so that what is left to copy
                # under the fence is only what changed in the last moments.
                caught_up = await source.read_rows(m, since_xid=first.horizon_xid)
                rows_copied += await destination.write_rows(m, caught_up)
                horizon_xid = caught_up.horizon_xid
            faults.crash_point("move.after_first_copy")
            with tracer.start_as_current_span("move fence"):
                refused = await source.fence(m, epoch=epoch)
                # The merchant's writes wait from here until it is handed over.
                fenced_at = time.monotonic()
                if refused is None:
                    await source.localise_holds(m, epoch=epoch, destination=move.destination)
                    refused = await self._drain(source, m, destination=move.destination)
                    if refused is not None:
                        await source.unfence(m, epoch=epoch)
            if refused is not None:
                return MoveResult(move, f"deferred: {refused}", rows_copied)
            faults.crash_point("move.after_fence")
        elif source_state is not None and destination_state[0] == "incoming":
            # Resumed under a fence a crashed run left: check what the fence checks.
            refused = await self._drain(source, m, destination=move.destination)
            if refused is not None:
                await source.unfence(m, epoch=epoch)
                return MoveResult(move, f"deferred: {refused}", rows_copied)
        if destination_state[0] == "incoming":
            problem = None
            for _ in range(VERIFY_ATTEMPTS_MAX):
                with tracer.start_as_current_span("move copy changes"):
                    changes = await source.read_rows(m, since_xid=horizon_xid)
                    rows_copied += await destination.write_rows(m, changes)
                with tracer.start_as_current_span("move verify"):
                    problem = await self._verify(source, destination, m)
                if problem is None:
                    break
                # A saga step that was under way at the fence may have landed since
                # the copy: let it settle and copy again, all of it.
                horizon_xid = None
                await self._drain(source, m, destination=move.destination)
            if problem is not None:
                await source.unfence(m, epoch=epoch)
                return MoveResult(move, f"failed: {problem}", rows_copied)
            faults.crash_point("move.after_verify")
            with tracer.start_as_current_span("move activate"):
                holds = await source.holds(m)
                try:
                    await destination.activate(m, source=move.source, epoch=epoch, holds=holds)
                except MoveDeferred as deferred:
                    await source.unfence(m, epoch=epoch)
                    return MoveResult(move, f"deferred: {deferred}", rows_copied)
            faults.crash_point("move.after_activate")
        with tracer.start_as_current_span("move hand over"):
            folded = await destination.folds(m, epoch=epoch)
            await source.mark_moved(m, destination=move.destination, epoch=epoch, folded=folded)
        pause_ms = (time.monotonic() - fenced_at) * 1000
        faults.crash_point("move.after_hand_over")
        return MoveResult(move, "moved", rows_copied, pause_ms)

    async def _drain(self, source: MoveStore, merchant_id: str, *, destination: str) -> str | None:
        """Waits, fenced, for the merchant's money in flight to settle; why not, or None."""
        loop = asyncio.get_running_loop()
        end = loop.time() + DRAIN_WAIT_S
        delay_s = 0.01
        while True:
            reason = await source.blockers(merchant_id)
            if reason is None:
                # Not waited for under the fence: such holds settle when their callers
                # settle them, and the walk is slow (every shard of every path).
                return await self._holds_refused(source, merchant_id, destination=destination)
            if loop.time() + delay_s > end:
                return reason
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.2)

    async def _holds_refused(
        self, source: MoveStore, merchant_id: str, *, destination: str
    ) -> str | None:
        """Why the merchant's holds with others cannot move with it now, or None.

        A cross-shard hold's path (debit party's shard, relays, credit party's
        shard) may not grow longer than a settle may go: a move that would make it
        so waits for the hold to settle. A path made before relays were numbered
        (migration 0020) passes each relay from a given shard at most once (that
        is how its relays and each pass through them are found), and a move that
        would break this waits too. A move back to the shard the path passes next
        folds that step away (MoveStore.activate): the path gets shorter.
        """
        holds = await source.holds(merchant_id)
        waited_for: list[CrossHold] = []
        for hold in sorted(holds.cross, key=_named_order):
            path = await self._hold_path(hold, source.shard.name)
            if path is None:
                return "a cross-shard hold's path could not be read"
            numbered = hold.path_position is not None
            longer = moved_path(
                path, destination=destination, debit_party=hold.debit_party, numbered=numbered
            )
            # Every shard after the first looks its relay up by where the hold came
            # from (by number, on a numbered path), the last one too (to find none).
            hops = [(longer[i], longer[i - 1]) for i in range(1, len(longer))]
            repeats = not numbered and len(set(hops)) != len(hops)
            if repeats or len(hops) > limits.hold_relay_hops_max:
                waited_for.append(hold)
                if len(waited_for) == HOLDS_NAMED_MAX:
                    break
        if not waited_for:
            self._waiting_for_hold.pop(merchant_id, None)
            return None
        waiting = WaitedFor(waited_for, capped=len(waited_for) == HOLDS_NAMED_MAX)
        self._waiting_for_hold[merchant_id] = waiting
        return waiting.reason()

    async def _still_waiting(
        self, source: MoveStore, merchant_id: str, *, destination: str
    ) -> str | None:
        """Why a merchant deferred for holds earlier in this run still waits, or None.
        While a hold named then is open, the move still waits for it: that is read
        on the source alone, without walking the paths again (only the hold's other
        party moving could have shortened its path since: the next run looks
        again). Once they have all settled, every path is looked at again."""
        waiting = self._waiting_for_hold[merchant_id]
        named = {h.key for h in waiting.holds}
        open_now = [h for h in (await source.holds(merchant_id)).cross if h.key in named]
        if open_now:
            return WaitedFor(sorted(open_now, key=_named_order), waiting.capped).reason()
        return await self._holds_refused(source, merchant_id, destination=destination)

    async def _hold_path(self, hold: CrossHold, here: str) -> list[str] | None:
        """The shards a cross-shard hold passes, from its debit party's to its credit
        party's (a shard may appear more than once); None if it cannot be followed
        (a shard not known to this run, or longer than a settle may go).

        Walked forward, as a settle goes: each relay is found by the number of
        the stop the hold arrives from, or by that stop's shard on a path made
        before numbers (looked up backwards, two relays on one shard may lead to
        the same next one)."""
        if hold.debit_party:
            return await self._walk(hold, start=here, first=hold.beyond, at=hold.path_position)
        home = await self._owner(hold.key.merchant_id)
        saga = await self._store(home).saga_peer(hold.key) if home is not None else None
        if home is None or saga is None:
            return None
        peer, position = saga
        path = await self._walk(hold, start=home, first=peer, at=position)
        return path if path is not None and path[-1] == here else None

    async def _walk(
        self, hold: CrossHold, *, start: str, first: str, at: int | None
    ) -> list[str] | None:
        path = [start]
        previous, current = start, first
        for _ in range(limits.hold_relay_hops_max + 1):
            if current not in self.shards:
                return None
            path.append(current)
            onward = await self._store(current).relay_next(hold.key, came_from=previous, after=at)
            if onward is None:
                return path
            previous, (current, at) = current, onward
        return None

    async def _owner(self, merchant_id: str) -> str | None:
        """The shard that owns the merchant now (active, or fenced by a move)."""
        for name in self.shards:
            state = await self._store(name).state_of(merchant_id)
            if state is not None and state[0] in ("active", "moving"):
                return name
        return None

    async def _verify(self, source: MoveStore, destination: MoveStore, m: str) -> str | None:
        before, after = await source.digest(m), await destination.digest(m)
        if before != after:
            return f"copies differ: source {before}, destination {after}"
        off = await destination.balance_mismatches(m)
        if off:
            return f"balances differ from entries on the destination: {off}"
        return None

    async def status(self) -> list[str]:
        lines = []
        for name, shard in self.shards.items():
            store = MoveStore(shard)
            epoch, paused = await store.meta()
            counts = await store.merchant_counts()
            in_flight = (await store.merchants_in("moving")) + (
                await store.merchants_in("incoming")
            )
            lines.append(
                f"{name}: epoch {epoch}{' (claims paused)' if paused else ''}, merchants "
                + ", ".join(f"{state} {count}" for state, count in sorted(counts.items()))
                + (f", {len(in_flight)} move(s) in progress" if in_flight else "")
            )
            if paused and await ShardAudit(shard).claims_paused_without_a_run():
                lines.append(f"  WARNING: {CLAIMS_PAUSED_WARNING}")
            for replica_id, replica_epoch in await shard.recent_replicas(
                within_s=REPLICA_SEEN_WITHIN_S
            ):
                lines.append(f"  replica {replica_id}: config epoch {replica_epoch}")
        return lines

    async def cleanup(self) -> tuple[int, int]:
        """Deletes old copies of merchants that moved and are active where they went."""
        async with self.exclusive():
            return await self._cleanup()

    async def _cleanup(self) -> tuple[int, int]:
        await self.check_leaving()
        merchants = rows = 0
        for name in self.shards:
            store = self._store(name)
            for merchant_id, owner in await store.merchants_in("moved"):
                if owner is None or owner not in self.shards:
                    continue
                state = await self._store(owner).state_of(merchant_id)
                if state is None or state[0] != "active":
                    continue
                # Verified again before deleting: the new owner has at least every row
                # the old copy has (it may have more: writes went on there).
                old_copy = await store.digest(merchant_id)
                new_copy = await self._store(owner).digest(merchant_id)
                if (
                    new_copy.accounts < old_copy.accounts
                    or new_copy.transfers < old_copy.transfers
                    or new_copy.entries < old_copy.entries
                    or new_copy.resolutions < old_copy.resolutions
                ):
                    continue
                deleted = await store.cleanup(merchant_id)
                if deleted:
                    rows += deleted
                    merchants += 1
        return merchants, rows


@dataclass(frozen=True, slots=True)
class WaitedFor:
    """Cross-shard holds a move waits for: their paths would pass more relays than a
    settle may, or (made before relays were numbered) repeat a relay step."""

    holds: list[CrossHold]
    # HOLDS_NAMED_MAX were found: there may be others.
    capped: bool

    def reason(self) -> str:
        """Names them all, so that the admin can have them settled (posted or voided
        by their callers) in one go when the move cannot wait for their timeouts:
        naming one per run took a drain a round per hold (chaos seed 305)."""
        named = ", ".join(f"{h.key.transfer_id} of {h.key.merchant_id}" for h in self.holds)
        bound = f"pass {limits.hold_relay_hops_max} relays"
        if len(self.holds) == 1:
            return (
                f"cross-shard hold {named}: its path would repeat a relay step or {bound}; "
                "it moves once that hold settles"
            )
        others = " (and maybe others)" if self.capped else ""
        return (
            f"cross-shard holds {named}{others}: their paths would repeat a relay step or "
            f"{bound}; it moves once those holds settle"
        )


def _named_order(hold: CrossHold) -> tuple[str, str]:
    return (hold.key.merchant_id, hold.key.transfer_id)


def moved_path(
    path: list[str], *, destination: str, debit_party: bool, numbered: bool = True
) -> list[str]:
    """A hold's path (debit party's shard first, credit party's last) once one of
    its parties moves to destination: folded where destination is the shard the
    path passes next from that party's end and relays there, or holds the other
    end (the hold becomes local: one shard); MoveStore.activate folds exactly
    then, unless the other party is busy (then one step longer, as here
    otherwise). On a path made before relays were numbered (numbered False), a
    credit party's fold needs the one relay there that ends at its shard."""
    if len(path) == 2 and destination == (path[1] if debit_party else path[0]):
        return [destination]
    if debit_party:
        if len(path) >= 3 and path[1] == destination:
            return path[1:]
        return [destination, *path]
    if len(path) >= 3 and path[-2] == destination and (numbered or path.count(destination) == 1):
        return path[:-1]
    return [*path, destination]


def _percentile(sorted_values: list[float], percent: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[
        min(98, max(0, int(percent) - 1))
    ]

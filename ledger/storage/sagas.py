"""The saga steps each shard runs, every one a single local transaction.

Debit shard (S): begin (step 1), finish (step 3), the saga row's retries and
claims. Credit shard (T): credit (step 2), which records exactly one outcome
per saga in saga_credits, so a repeated or late step 2 can never apply twice
or after an abort. Steps 1-3 of many sagas can share one transaction
(run_steps: group commit), each decided as if it ran alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from ledger import faults, limits
from ledger.domain.accounts import Account, AccountKey
from ledger.domain.engine import (
    AccountState,
    FarReversal,
    ItemOutcome,
    PendingView,
    TransferBatchState,
    VelocityAdd,
    advanced,
    apply_transfers,
    expire_pending,
    with_velocity,
)
from ledger.domain.events import EventKind
from ledger.domain.sagas import (
    SETTLEMENT_MERCHANT_ID,
    CreditAction,
    CreditOutcome,
    CreditRecord,
    Saga,
    SagaKey,
    SagaKind,
    SagaState,
    SagaStep,
    credit_plan,
    hold_moved_plan,
    local_view,
    relay_plan,
    reservation_settle_plan,
)
from ledger.domain.transfers import (
    Entry,
    JournalRecord,
    PendingState,
    Resolution,
    TransferAction,
    TransferKey,
    TransferRecord,
    TransferRequest,
    TransferResult,
)
from ledger.domain.value import value
from ledger.invariant import invariant
from ledger.storage import saga_statements as sql
from ledger.storage import statements as ledger_sql
from ledger.storage.errors import (
    HoldInFlight,
    MerchantsMoving,
    PartiesShareShard,
    RetryTransaction,
    SettleIsLocal,
)
from ledger.storage.saga_rows import saga_from_row
from ledger.storage.settlement_legs import Leg, NewLeg, candidates, open_legs, resolved
from ledger.storage.shard import (
    Fence,
    Shard,
    active_merchants,
    parse_records,
    with_saga_results,
    with_velocity_usage,
    write_plan,
)
from ledger.telemetry.tracing import trace_id_of

if TYPE_CHECKING:
    from ledger.storage.shard import Connection


class SagaRaced(Exception):
    """Another worker moved the saga on (its version changed); this one must stop."""


@dataclass(frozen=True, slots=True)
class SagaStart:
    """Step 1's answer: the item's outcome, and the saga if one runs (or ran)."""

    outcome: ItemOutcome
    saga: Saga | None


class RunAlone(Exception):
    """This saga's step cannot share a transaction (a relay hop): run it alone."""


@value
class SagaBegin:
    """Step 1 of a cross-shard transfer: the request, the shard its credit merchant
    is on now, and the caller's trace (the saga carries it to every step)."""

    request: TransferRequest
    peer_shard: str
    trace_context: str

    @property
    def leg(self) -> Leg:
        """The transfer's money on this (debit) shard towards the credit merchant's."""
        return Leg(self.peer_shard, self.request.currency, self.request.key)


@value
class SagaCredit:
    """Step 2 of a saga, as the shard before this one in its path asks for it."""

    saga: Saga
    home_shard: str
    abort: bool = False
    # Settling a hold: the number of the stop it arrives from on the hold's path
    # (the saga's end, then each relay passed; None on an unnumbered path).
    after_position: int | None = None

    @property
    def held(self) -> TransferKey:
        """The transfer whose money this saga moves (a settle's: the pending one)."""
        key = self.saga.key
        return TransferKey(key.merchant_id, self.saga.pending_id or key.transfer_id)

    @property
    def leg(self) -> Leg:
        """The held money on this shard, mirroring the shard the money comes from."""
        return Leg(self.home_shard, self.saga.currency, self.held)

    @property
    def opens_leg(self) -> bool:
        """A transfer saga's credit books its leg here for the first time (a settle's
        or an expiry's finds the leg its transfer's credit booked)."""
        return self.saga.key.kind is SagaKind.TRANSFER


@value
class SagaFinish:
    """Step 3 of a saga, with step 2's outcome; version fences out a stale worker."""

    key: SagaKey
    version: int
    credit: CreditRecord
    allow_dead: bool = False


def parties_share_shard(begin: SagaBegin, shard_name: str) -> bool:
    """Step 1 of a transfer whose credit party is on the debit shard too (a move put
    them together since the ring was read): a new one runs as a local transfer, with
    nothing written here; a saga made so before replays as it is."""
    return begin.peer_shard == shard_name


# One saga step for run_steps, and its answer (an exception answer is raised by the
# step's caller: PartiesShareShard hands a transfer back to the local path).
StepRequest: TypeAlias = SagaBegin | SagaCredit | SagaFinish
StepAnswer: TypeAlias = SagaStart | CreditRecord | Saga | SagaRaced | PartiesShareShard


class SagaStore:
    """The saga operations of one shard."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    # Step 1 (debit shard).

    async def begin_transfer(
        self,
        request: TransferRequest,
        *,
        peer_shard: str,
        fence: Fence,
        trace_context: str,
        lease_owner: str,
        lease_s: float,
    ) -> SagaStart:
        """Records the transfer and its saga, and reserves the funds, in one transaction.

        Limits are checked here, so an overdraft is refused before anything else.
        """
        begin = SagaBegin(request, peer_shard, trace_context)
        starts = await self.begin_transfers(
            [begin], fence=fence, lease_owner=lease_owner, lease_s=lease_s
        )
        return starts[0]

    async def begin_transfers(
        self, begins: Sequence[SagaBegin], *, fence: Fence, lease_owner: str, lease_s: float
    ) -> list[SagaStart]:
        """begin_transfer for many cross-shard transfers (distinct ids) in one transaction."""
        answers = await self.run_steps(
            begins, fence=fence, lease_owner=lease_owner, lease_s=lease_s
        )
        starts = [a for a in answers if isinstance(a, SagaStart)]
        invariant(len(starts) == len(begins), "step 1 answers each transfer with its start")
        return starts

    async def run_steps(
        self, steps: Sequence[StepRequest], *, fence: Fence, lease_owner: str, lease_s: float
    ) -> list[StepAnswer]:
        """Runs many sagas' steps on this shard in one transaction: step 1 of some
        (SagaBegin), step 2 of others (SagaCredit), step 3 of others (SagaFinish),
        each answered as if it ran alone (a SagaRaced answers a stale step 3).

        One fence, one lock of every account any of them writes (in one order, so no
        two such transactions wait on each other in a cycle), one read of ids and
        recorded outcomes and the clock after the locks, one write: a step costs a
        share of a transaction's round trips instead of all of them. Within the
        transaction steps apply in order (all step 1s, then 2s, then 3s), each on the
        balances the ones before it left, as a batch of local transfers does.

        A step 2 that must pass a hold on (a relay hop) runs only alone: in a group it
        raises RunAlone. lease_owner and lease_s are for the sagas step 1 starts."""
        begins = [(i, s) for i, s in enumerate(steps) if isinstance(s, SagaBegin)]
        credits = [(i, s) for i, s in enumerate(steps) if isinstance(s, SagaCredit)]
        finishes = [(i, s) for i, s in enumerate(steps) if isinstance(s, SagaFinish)]
        invariant(
            all(b.request.credit is not None and not b.request.settles_pending for _, b in begins),
            "a cross-shard transfer names its credit account",
        )
        keys = [step_key(s) for s in steps]
        invariant(len(set(keys)) == len(keys), "each saga's step once")
        kinds = [n for n, present in ((1, begins), (2, credits), (3, finishes)) if present]

        async def run(conn: Connection) -> list[StepAnswer]:
            relayed = await self._relay_hop(conn, fence, [c for _, c in credits], len(steps))
            if relayed is not None:
                return [relayed]
            writers = {b.request.debit.merchant_id for _, b in begins} | {
                c.saga.credit.merchant_id for _, c in credits
            }
            # Step 3 continues work under way: its merchant may be being moved.
            movable = {f.key.merchant_id for _, f in finishes} - writers
            await self.shard._fence(
                conn,
                fence,
                writers | {f.key.merchant_id for _, f in finishes} | {SETTLEMENT_MERCHANT_ID},
                movable=movable,
            )
            answers: dict[int, StepAnswer] = {}
            credit_keys = [c.saga.key for _, c in credits]
            finishing: list[_Finishing] = []
            if credits or finishes:
                locked = await conn.fetch(
                    sql.LOCK_STEPS,
                    *_key_columns(credit_keys),
                    *_key_columns([f.key for _, f in finishes]),
                )
                finishing = self._finishing(finishes, locked, answers)
            settling = [t for t in finishing if t.settles]
            wanted: set[AccountKey] = set()
            # The stripes (made on first use) of every leg a step books, and each
            # leg's own account, locked if it exists (settlement_legs.py).
            legs: list[Leg] = []
            for _, b in begins:
                wanted.add(b.request.debit)
                if not parties_share_shard(b, self.shard.name):
                    legs.append(b.leg)
            for _, c in credits:
                if not c.abort:
                    wanted.add(c.saga.credit)
                    legs.append(c.leg)
            for t in settling:
                wanted.add(t.saga.debit)
                legs += {t.leg(t.saga.peer_shard), t.leg(t.peer_shard)}
            wanted |= candidates(legs)
            settlements = {leg.stripe: leg.currency for leg in legs}
            # Locks first (a replayed step takes them needlessly, and rarely): ids,
            # recorded outcomes and the clock are then read after them.
            accounts = await self._lock_with_settlements(conn, wanted, settlements)
            # Steps 1 and 3 read their own transfers; a reversal's step 2, its original.
            transfer_keys = (
                [b.request.key for _, b in begins]
                + [t.saga.key.transfer for t in settling]
                + [
                    TransferKey(c.saga.credit.merchant_id, c.saga.reversal_of)
                    for _, c in credits
                    if c.saga.reversal_of and not c.abort
                ]
            )
            read = await conn.fetch(
                sql.READ_STEPS,
                [k.merchant_id for k in transfer_keys],
                [k.transfer_id for k in transfer_keys],
                *_key_columns(credit_keys),
            )
            records, journals = _records_with_saga_results(read)
            now: datetime = read[0]["now"]
            with_velocity_usage(accounts, now)
            books = _Books(dict(accounts), now)
            reserved = await self._plan_begins(conn, begins, records, journals, books, answers)
            decided = await self._plan_credits(
                conn, credits, read[0]["credits"], records, books, answers
            )
            await self._plan_finishes(conn, settling, records, books)
            if books.records or books.entries or books.resolutions:
                await write_plan(
                    conn,
                    records=books.records,
                    entries=books.entries,
                    accounts=books.changed,
                    resolutions=books.resolutions,
                    expiring=[r for r in books.records if r.expires_at],
                    change=EventKind.SAGA_STEP,
                    velocity=books.velocity,
                    locked=accounts,
                )
            if reserved or decided or finishing:
                await self._record_steps(
                    conn, reserved, decided, finishing, answers, now, lease_owner, lease_s
                )
            await self._record_holds(conn, decided)
            for kind in kinds:
                faults.crash_point(f"saga.step{kind}.before_commit")
            return [answers[i] for i in range(len(steps))]

        answers = await self.shard._in_transaction(run)
        for kind in kinds:
            faults.crash_point(f"saga.step{kind}.after_commit")
        return answers

    async def _relay_hop(
        self, conn: Connection, fence: Fence, credits: Sequence[SagaCredit], steps: int
    ) -> CreditRecord | None:
        """Settling a hold whose credit party moved on from here: passes it on (alone)."""
        settles = [c for c in credits if c.saga.key.kind is not SagaKind.TRANSFER]
        if not settles:
            return None
        await self.shard._fence(conn, fence, {SETTLEMENT_MERCHANT_ID})
        await conn.execute(sql.HOLD_PARTIES_LOCK, sorted({c.held.merchant_id for c in settles}))
        for c in settles:
            route = await conn.fetchrow(
                sql.HOLD_ROUTE,
                c.held.merchant_id,
                c.held.transfer_id,
                c.home_shard,
                c.after_position,
            )
            assert route is not None  # one row always (the relay joined to it, or NULLs)
            if route["debit_party_state"] == "moving":
                # Its hand-over decides whether this shard relays the hold: wait for it.
                # (Arriving here, `incoming`, it may fold this shard's relay away; the
                # lock orders the two, and a fold is refused once a settle has passed.
                # Waiting on it would wait on its move, which waits on its own sagas.)
                raise MerchantsMoving(self.shard.name, [c.held.merchant_id])
            relay_to = route["relay_to"]
            if relay_to is None:
                continue
            invariant(
                route["from_shard"] == c.home_shard,
                "a settle arrives at a relay from the stop before it on the hold's path",
            )
            if steps > 1:
                raise RunAlone()
            return await self._relay(
                conn, c.saga, c.leg, c.home_shard, relay_to, route["path_position"]
            )
        return None

    def _finishing(
        self,
        finishes: Sequence[tuple[int, SagaFinish]],
        locked: Sequence[asyncpg.Record],
        answers: dict[int, StepAnswer],
    ) -> list[_Finishing]:
        """Step 3 on the locked saga rows: answers sagas finished or moved on already;
        returns the rest, decided."""
        sagas = {
            saga.key: saga
            for saga in (saga_from_row(r, self.shard.name) for r in locked if r["merchant_id"])
        }
        finishing: list[_Finishing] = []
        for i, f in finishes:
            saga = sagas.get(f.key)
            invariant(saga is not None, "a saga being finished exists")
            assert saga is not None
            if saga.finished:
                answers[i] = saga
            elif saga.version != f.version or (saga.state is SagaState.DEAD and not f.allow_dead):
                answers[i] = SagaRaced(f"saga {f.key} moved on (version {saga.version})")
            else:
                finishing.append(_finishing(i, saga, f.credit))
        return finishing

    async def _plan_begins(
        self,
        conn: Connection,
        begins: Sequence[tuple[int, SagaBegin]],
        records: Mapping[TransferKey, TransferRecord],
        journals: Collection[TransferKey],
        books: _Books,
        answers: dict[int, StepAnswer],
    ) -> list[tuple[int, SagaBegin]]:
        """Step 1: answers replays; hands back new transfers whose parties share this
        shard; reserves (or refuses) the rest and records each transfer. Returns the
        reserved ones, whose sagas are still to insert."""
        found = await self._replays(conn, [b.request for _, b in begins], records, journals)
        fresh: list[tuple[int, SagaBegin]] = []
        for (i, b), known in zip(begins, found, strict=True):
            if known is not None:
                answers[i] = known
            elif parties_share_shard(b, self.shard.name):
                answers[i] = PartiesShareShard()
            else:
                fresh.append((i, b))
        # An item marked linked ends an open chain here (chains never hold a saga):
        # refused as such, without joining the next item's chain.
        applying = [(i, b) for i, b in fresh if not b.request.linked]
        far_reversals, reversed_minor = await self._reversal_rooms(
            conn, [b.request for _, b in applying if b.request.reversal_of]
        )
        # Each reserves on the credit side of its leg, for the first time.
        legs = await open_legs(
            conn,
            self.shard,
            books.accounts,
            [NewLeg(b.leg, debit=False, amount_minor=b.request.amount_minor) for _, b in applying],
        )
        plan = apply_transfers(
            [
                replace(
                    b.request,
                    credit=legs[b.leg],
                    action=TransferAction.PENDING,
                    timeout_ms=0,
                )
                for _, b in applying
            ],
            TransferBatchState(
                books.accounts,
                {},
                frozenset(),
                {},
                {},
                reversed_minor,
                books.now,
                far_reversals=far_reversals,
            ),
        )
        books.book(plan.entries, plan.accounts, velocity=plan.velocity)
        results = dict.fromkeys((i for i, _ in fresh), TransferResult.LINKED_EVENT_CHAIN_OPEN)
        results.update(
            zip((i for i, _ in applying), (o.result for o in plan.outcomes), strict=True)
        )
        reserved: list[tuple[int, SagaBegin]] = []
        now = books.now
        for i, b in fresh:
            request, result = b.request, results[i]
            trace_id = trace_id_of(b.trace_context)
            if result is not TransferResult.OK:
                # Refused: the failure is recorded (a failed id stays failed).
                books.records.append(TransferRecord(request, result, 0, now, trace_id=trace_id))
                answers[i] = SagaStart(ItemOutcome(0, request.id, result, created_at=now), None)
                continue
            reserved.append((i, b))
            books.records.append(
                TransferRecord(
                    request=request,
                    result=TransferResult.IN_PROGRESS,
                    amount_effective_minor=request.amount_minor,
                    created_at=now,
                    expires_at=(
                        now + timedelta(milliseconds=request.timeout_ms)
                        if request.action is TransferAction.PENDING and request.timeout_ms
                        else None
                    ),
                    trace_id=trace_id,
                )
            )
        return reserved

    async def _reversal_rooms(
        self, conn: Connection, reversals: Sequence[TransferRequest]
    ) -> tuple[dict[TransferKey, FarReversal], dict[TransferKey, int]]:
        """Step 1 of reversals between shards, read under their debit accounts' locks:
        what each original posted to the account its reversals debit, and what they
        have reversed of it so far (docs/sagas.md, "Reversals across shards")."""
        if not reversals:
            return {}, {}
        credits = [_credit_of(r) for r in reversals]
        targets = [
            TransferKey(c.merchant_id, r.reversal_of)
            for r, c in zip(reversals, credits, strict=True)
        ]
        rows = await conn.fetch(
            sql.CREDITED_BY_ORIGINALS,
            [r.debit.merchant_id for r in reversals],
            [r.debit.account_id for r in reversals],
            [t.merchant_id for t in targets],
            [t.transfer_id for t in targets],
        )
        credited = {
            (
                AccountKey(r["account_merchant_id"], r["account_id"]),
                TransferKey(r["merchant_id"], r["transfer_id"]),
            ): int(r["credited_minor"])
            for r in rows
        }
        far = {
            r.key: FarReversal(r.debit, c, credited[(r.debit, t)])
            for r, c, t in zip(reversals, credits, targets, strict=True)
        }
        return far, await self.shard._reversed(conn, targets)

    async def _plan_credits(
        self,
        conn: Connection,
        credits: Sequence[tuple[int, SagaCredit]],
        recorded_outcomes: Sequence[Mapping[str, Any]],
        records: Mapping[TransferKey, TransferRecord],
        books: _Books,
        answers: dict[int, StepAnswer],
    ) -> list[tuple[int, SagaCredit, CreditOutcome, TransferResult]]:
        """Step 2: answers sagas with a recorded outcome; aborts, applies or refuses
        the rest. Returns those, whose outcomes are still to record."""
        recorded = {
            SagaKey(r["merchant_id"], r["transfer_id"], SagaKind(r["kind"])): r
            for r in recorded_outcomes
        }
        decided: list[tuple[int, SagaCredit, CreditOutcome, TransferResult]] = []
        applying: list[tuple[int, SagaCredit]] = []
        for i, c in credits:
            if c.saga.key in recorded:
                answers[i] = self._credit_record(recorded[c.saga.key])
            elif c.abort:
                decided.append((i, c, CreditOutcome.ABORTED, TransferResult.ABORTED))
            else:
                applying.append((i, c))
        # A transfer's credit debits its leg here for the first time.
        legs = await open_legs(
            conn,
            self.shard,
            books.accounts,
            [
                NewLeg(c.leg, debit=True, amount_minor=c.saga.amount_minor)
                for _, c in applying
                if c.opens_leg
            ],
        )
        for i, c in applying:
            saga = c.saga
            plan = credit_plan(
                key=saga.key.transfer,
                action=saga.credit_action,
                settlement=legs[c.leg] if c.opens_leg else resolved(c.leg, books.accounts),
                destination=saga.credit,
                currency=saga.currency,
                amount_minor=saga.amount_minor,
                pending_minor=saga.pending_minor,
                pending_id=saga.pending_id,
                accounts=books.accounts,
                now=books.now,
                reversal_of=saga.reversal_of,
                debit=saga.debit,
                originals=records,
            )
            result = plan.outcomes[0].result
            if result is TransferResult.OK:
                books.book(plan.entries, plan.accounts, velocity=plan.velocity)
                decided.append((i, c, CreditOutcome.APPLIED, result))
            else:
                decided.append((i, c, CreditOutcome.REFUSED, result))
        return sorted(decided, key=lambda d: d[0])

    async def _plan_finishes(
        self,
        conn: Connection,
        settling: Sequence[_Finishing],
        records: Mapping[TransferKey, TransferRecord],
        books: _Books,
    ) -> None:
        """Step 3's entries for transfer sagas: each moves its hold first if the credit
        landed on another shard than step 1 reserved towards, then posts or releases
        its reservation (a cross-shard pending transfer keeps its hold)."""
        # A hold moving to the shard that credited opens its leg for that shard.
        moved_to = await open_legs(
            conn,
            self.shard,
            books.accounts,
            [
                NewLeg(
                    t.leg(t.peer_shard),
                    debit=False,
                    amount_minor=records[t.saga.key.transfer].amount_effective_minor,
                )
                for t in settling
                if t.moves_hold
            ],
        )
        for t in settling:
            held_by = resolved(t.leg(t.saga.peer_shard), books.accounts)
            held_on = moved_to[t.leg(t.peer_shard)] if t.moves_hold else held_by
            view = local_view(records[t.saga.key.transfer], held_on)
            invariant(
                view.request.debit == t.saga.debit,
                "a saga's reservation is booked on the accounts its saga names",
            )
            if t.moves_hold:
                entries, states = hold_moved_plan(
                    key=t.saga.key.transfer,
                    held_by=books.accounts[held_by],
                    moved_to=books.accounts[held_on],
                    amount_minor=view.amount_effective_minor,
                    now=books.now,
                )
                books.book(entries, states)
            if not t.keeps_hold:
                plan = reservation_settle_plan(
                    reservation=view, post=t.post, accounts=books.accounts, now=books.now
                )
                books.book(plan.entries, plan.accounts, plan.resolutions)

    async def _record_steps(
        self,
        conn: Connection,
        reserved: Sequence[tuple[int, SagaBegin]],
        decided: Sequence[tuple[int, SagaCredit, CreditOutcome, TransferResult]],
        finishing: Sequence[_Finishing],
        answers: dict[int, StepAnswer],
        now: datetime,
        lease_owner: str,
        lease_s: float,
    ) -> None:
        """The sagas step 1 starts, the outcomes step 2 decided (exactly once each) and
        the sagas step 3 finishes, with their log, in one round trip."""
        requests = [b.request for _, b in reserved]
        credited = [r.credit for r in requests]
        new_keys = [SagaKey(r.debit.merchant_id, r.id, SagaKind.TRANSFER) for r in requests]
        log = [(t.saga.key, *step) for t in finishing for step in t.log]
        rows = await conn.fetch(
            sql.RECORD_STEPS,
            *_key_columns(new_keys),
            [b.peer_shard for _, b in reserved],
            [r.debit.account_id for r in requests],
            [c.merchant_id for c in credited if c is not None],
            [c.account_id for c in credited if c is not None],
            [r.currency for r in requests],
            [
                CreditAction.POST if r.action is TransferAction.POST else CreditAction.PENDING
                for r in requests
            ],
            [r.amount_minor for r in requests],
            [0] * len(requests),
            [""] * len(requests),
            [b.trace_context for _, b in reserved],
            ["reserved"] * len(requests),
            now,
            lease_owner,
            lease_s,
            *_key_columns([c.saga.key for _, c, _, _ in decided]),
            [c.saga.credit.merchant_id for _, c, _, _ in decided],
            [o for _, _, o, _ in decided],
            [r for _, _, _, r in decided],
            [c.home_shard for _, c, _, _ in decided],
            self.shard.name,
            *_key_columns([t.saga.key for t in finishing]),
            [t.saga.version for t in finishing],
            [t.state for t in finishing],
            [t.result for t in finishing],
            [t.credit.outcome for t in finishing],
            [t.peer_shard for t in finishing],
            *_key_columns([k for k, *_ in log]),
            [n for _, n, _, _ in log],
            [o for _, _, o, _ in log],
            [d for _, _, _, d in log],
            [r.reversal_of for r in requests],
        )
        if rows[0]["credits_recorded"] != len(decided):
            # Another step 2 recorded first (the locks make this rare); its outcome
            # stands, and the retry rolls back what this one wrote and reads it.
            raise RetryTransaction()
        started: dict[SagaKey, Saga] = {}
        finished: dict[SagaKey, Saga] = {}
        for row in rows:
            if row["is_new"] is not None:
                saga = saga_from_row(row, self.shard.name)
                (started if row["is_new"] else finished)[saga.key] = saga
        invariant(len(started) == len(reserved), "every saga was inserted")
        invariant(len(finished) == len(finishing), "every locked saga row is updated")
        for (i, b), key in zip(reserved, new_keys, strict=True):
            started_as = ItemOutcome(0, b.request.id, TransferResult.IN_PROGRESS, created_at=now)
            answers[i] = SagaStart(started_as, started[key])
        for i, _, outcome, result in decided:
            answers[i] = CreditRecord(outcome, result, self.shard.name)
        for t in finishing:
            answers[t.index] = finished[t.saga.key]

    async def _record_holds(
        self,
        conn: Connection,
        decided: Sequence[tuple[int, SagaCredit, CreditOutcome, TransferResult]],
    ) -> None:
        """Open cross-shard holds credited here are tracked, so a move of their credit
        merchant can carry them; a settled one stops being tracked."""
        for _, c, outcome, _ in decided:
            if outcome is not CreditOutcome.APPLIED:
                continue
            saga = c.saga
            if saga.credit_action is CreditAction.PENDING:
                await conn.execute(
                    sql.INSERT_CREDIT_HOLD,
                    c.held.merchant_id,
                    c.held.transfer_id,
                    saga.credit.merchant_id,
                    saga.currency,
                    saga.amount_minor,
                    c.home_shard,
                    # The credit party's end, after the saga's (both unnumbered before 0020).
                    None if saga.path_position is None else saga.path_position + 1,
                )
            elif saga.key.kind is not SagaKind.TRANSFER:
                await conn.execute(sql.DELETE_CREDIT_HOLD, c.held.merchant_id, c.held.transfer_id)

    async def begin_settle(
        self,
        request: TransferRequest,
        *,
        fence: Fence,
        trace_context: str,
        lease_owner: str,
        lease_s: float,
    ) -> SagaStart:
        """Posts or voids a cross-shard pending transfer's debit side, and starts the saga
        that does the same on the credit side. The decision is made here, once."""
        invariant(request.settles_pending, "a settle saga settles a pending transfer")
        pending_key = TransferKey(request.debit.merchant_id, request.pending_id)

        async def run(conn: Connection) -> SagaStart:
            await self.shard._fence(
                conn, fence, {request.debit.merchant_id, SETTLEMENT_MERCHANT_ID}
            )
            existing = await self._existing(conn, request)
            if existing is not None:
                return existing
            pending = (await self.shard._select_transfers(conn, {pending_key})).get(pending_key)
            origin = await self._saga(
                conn, SagaKey(pending_key.merchant_id, pending_key.transfer_id, SagaKind.TRANSFER)
            )
            if pending is not None and origin is None:
                # A local hold (the ring placed its parties apart, or its settle
                # named a credit account elsewhere): settled locally, nothing written.
                raise SettleIsLocal()
            if pending is None or origin is None:
                return await _refused(
                    conn,
                    request,
                    TransferResult.PENDING_TRANSFER_NOT_FOUND,
                    await conn.fetchval(ledger_sql.NOW),
                )
            if origin.state is SagaState.RUNNING:
                # Its saga may still make it: a transient state, never a stored result.
                raise HoldInFlight()
            leg = Leg(origin.peer_shard, origin.currency, pending_key)
            accounts = await self.shard._lock_accounts(
                conn, {pending.request.debit, *candidates([leg])}
            )
            view = local_view(pending, resolved(leg, accounts))
            if origin.result is not TransferResult.OK:
                # Refused: there is nothing to settle.
                view = replace(view, result=TransferResult.PENDING_TRANSFER_NOT_FOUND)
            if await self.shard._keys_found(conn, sql.SETTLING_LOCALLY, {pending_key}):
                # A move folded it into a local hold after it was read above.
                raise SettleIsLocal()
            states = await self.shard._pending_states(conn, {pending_key})
            now: datetime = await conn.fetchval(ledger_sql.NOW)
            given_credit = request.credit
            local_request = replace(
                request,
                credit=view.request.credit
                if given_credit == pending.request.credit
                else given_credit,
            )
            state = TransferBatchState(
                accounts,
                {},
                frozenset(),
                {pending_key: PendingView(view, states.get(pending_key, PendingState.PENDING))},
                {},
                {},
                now,
            )
            plan = apply_transfers([local_request], state)
            result = plan.outcomes[0].result
            if result is not TransferResult.OK:
                return await _refused(conn, request, result, now)
            settled = plan.records[0]
            record = replace(
                settled, request=replace(settled.request, credit=pending.request.credit)
            )
            await write_plan(
                conn,
                records=[record],
                entries=plan.entries,
                accounts=plan.accounts,
                resolutions=plan.resolutions,
                expiring=[],
            )
            posted_minor = record.amount_effective_minor
            saga = await self._insert_saga(
                conn,
                key=SagaKey(request.debit.merchant_id, request.id, SagaKind.SETTLE),
                peer_shard=origin.peer_shard,
                path_position=origin.path_position,
                debit=origin.debit,
                credit=origin.credit,
                currency=origin.currency,
                action=CreditAction.POST_PENDING if posted_minor else CreditAction.RELEASE,
                amount_minor=posted_minor,
                pending_minor=pending.amount_effective_minor,
                pending_id=pending_key.transfer_id,
                now=now,
                lease_owner=lease_owner,
                lease_s=lease_s,
                trace_context=trace_context,
                outcome="settled on debit shard",
            )
            return SagaStart(ItemOutcome(0, request.id, TransferResult.OK, created_at=now), saga)

        return await self.shard._in_transaction(run)

    async def expire_due(self, *, limit: int) -> int:
        """Expires due cross-shard pending transfers on this (debit) shard: releases the
        debit side now and starts an EXPIRE saga that releases the credit side."""

        async def run(conn: Connection) -> int:
            due = await conn.fetch(sql.DUE_CROSS_SHARD_EXPIRIES, limit)
            if not due:
                return 0
            # The same shared locks as every write (as the local sweeper takes), so a
            # merchant move waits for this transaction.
            active = active_merchants(
                await conn.fetch(ledger_sql.FENCE, sorted({r["merchant_id"] for r in due}))
            )
            keys = {
                TransferKey(r["merchant_id"], r["transfer_id"])
                for r in due
                if r["merchant_id"] in active
            }
            records = await self.shard._select_transfers(conn, keys)
            origin_rows = await conn.fetch(
                sql.SELECT_SAGAS_OF_TRANSFERS,
                [k.merchant_id for k in keys],
                [k.transfer_id for k in keys],
            )
            origins = {
                s.key.transfer: s
                for s in (saga_from_row(r, self.shard.name) for r in origin_rows)
                if s.key.kind is SagaKind.TRANSFER
            }
            legs = {
                k: Leg(origins[k].peer_shard, origins[k].currency, k)
                for k in keys
                if k in origins and origins[k].result is TransferResult.OK
            }
            accounts = dict(
                await self.shard._lock_accounts(
                    conn, {records[k].request.debit for k in legs} | candidates(legs.values())
                )
            )
            views = {k: local_view(records[k], resolved(leg, accounts)) for k, leg in legs.items()}
            # Folded into local holds by a move after they were read: the local
            # sweeper expires them.
            for key in await self.shard._keys_found(conn, sql.SETTLING_LOCALLY, set(views)):
                del views[key]
            states = await self.shard._pending_states(conn, set(views))
            now: datetime = await conn.fetchval(ledger_sql.NOW)
            expired = 0
            for key in sorted(views):
                view = views[key]
                if key in states or view.expires_at is None or view.expires_at > now:
                    continue
                plan = expire_pending(view, accounts, now)
                await write_plan(
                    conn,
                    records=[],
                    entries=plan.entries,
                    accounts=plan.accounts,
                    resolutions=[plan.resolution],
                    expiring=[],
                )
                for account_key, account_state in plan.accounts.items():
                    accounts[account_key] = advanced(accounts[account_key], account_state)
                origin = origins[key]
                await self._insert_saga(
                    conn,
                    key=SagaKey(key.merchant_id, key.transfer_id, SagaKind.EXPIRE),
                    peer_shard=origin.peer_shard,
                    path_position=origin.path_position,
                    debit=origin.debit,
                    credit=origin.credit,
                    currency=origin.currency,
                    action=CreditAction.RELEASE,
                    amount_minor=0,
                    pending_minor=view.amount_effective_minor,
                    pending_id=key.transfer_id,
                    now=now,
                    lease_owner="",
                    lease_s=0.0,
                    trace_context=origin.trace_context,
                    outcome="expired on debit shard",
                )
                expired += 1
            return expired

        return await self.shard._in_transaction(run)

    # Step 2 (credit shard).

    async def credit(
        self, saga: Saga, *, home_shard: str, fence: Fence, abort: bool = False
    ) -> CreditRecord:
        """Applies or refuses the credit side, or records an abort, exactly once; or,
        settling a hold whose credit party moved on, passes it on (relayed_to). The
        first stop after the saga's own shard (home_shard): a settle arrives from
        the saga's end of the hold's path."""
        invariant(home_shard == saga.home_shard, "step 2 arrives from the saga's shard")
        step = SagaCredit(saga, home_shard, abort, after_position=saga.path_position)
        (record,) = await self.run_steps([step], fence=fence, lease_owner="", lease_s=0.0)
        invariant(isinstance(record, CreditRecord), "step 2 answers with the saga's outcome")
        assert isinstance(record, CreditRecord)
        return record

    async def _relay(
        self,
        conn: Connection,
        saga: Saga,
        leg: Leg,
        home_shard: str,
        relay_to: str,
        position: int | None,
    ) -> CreditRecord:
        """One relay hop of a settle: this shard's settlement accounts for the shard
        before and the shard after settle the hold between them, once (the relay
        numbered position on the hold's path, or the one from home_shard)."""
        key = saga.key
        await conn.execute(sql.LOCK_CREDIT, key.merchant_id, key.transfer_id, int(key.kind))
        passed = await conn.fetchval(
            sql.SELECT_RELAY_PASS, key.merchant_id, key.transfer_id, key.kind, home_shard, position
        )
        if passed is None:
            onward = replace(leg, peer_shard=relay_to)
            accounts = await self.shard._lock_accounts(conn, candidates((leg, onward)))
            now: datetime = await conn.fetchval(ledger_sql.NOW)
            posting = saga.credit_action is CreditAction.POST_PENDING
            entries, states = relay_plan(
                key=key.transfer,
                incoming=accounts[resolved(leg, accounts)],
                outgoing=accounts[resolved(onward, accounts)],
                pending_minor=saga.pending_minor,
                posted_minor=saga.amount_minor if posting else 0,
                now=now,
            )
            await write_plan(
                conn,
                records=[],
                entries=entries,
                accounts=states,
                resolutions=[],
                expiring=[],
                change=EventKind.SAGA_STEP,
            )
            await conn.execute(
                sql.INSERT_RELAY_PASS,
                key.merchant_id,
                key.transfer_id,
                key.kind,
                home_shard,
                relay_to,
                saga.pending_id,
                position,
            )
        return CreditRecord(
            CreditOutcome.APPLIED,
            TransferResult.OK,
            self.shard.name,
            relayed_to=relay_to,
            relayed_position=position,
        )

    async def credit_outcome(self, key: SagaKey) -> CreditRecord | None:
        """What step 2 recorded on this (credit) shard, if anything. Reads only."""

        async def run(conn: Connection) -> CreditRecord | None:
            row = await conn.fetchrow(sql.SELECT_CREDIT, key.merchant_id, key.transfer_id, key.kind)
            return self._credit_record(row) if row is not None else None

        return await self.shard._with_connection(run)

    def _credit_record(self, row: Mapping[str, Any] | asyncpg.Record) -> CreditRecord:
        # '' predates migration 0005: such a row was written on the shard holding it,
        # or copied here by a move with its saga already finished.
        return CreditRecord(
            CreditOutcome(row["outcome"]),
            TransferResult(row["result"]),
            row["credited_on"] or self.shard.name,
        )

    # Step 3 (debit shard).

    async def finish(
        self,
        key: SagaKey,
        *,
        version: int,
        credit: CreditRecord,
        fence: Fence,
        allow_dead: bool = False,
    ) -> Saga:
        """Posts the reservation (completed) or releases it (compensated); moves the
        hold first to the settlement account for the shard that credited, if the
        credit merchant had moved there since step 1."""
        step = SagaFinish(key, version, credit, allow_dead)
        (answer,) = await self.run_steps([step], fence=fence, lease_owner="", lease_s=0.0)
        if isinstance(answer, SagaRaced):
            raise answer
        invariant(isinstance(answer, Saga), "step 3 answers with the saga's row")
        assert isinstance(answer, Saga)
        return answer

    async def retry_later(
        self, saga: Saga, *, error: str, attempts_max: int, delay_s: float, counted: bool = True
    ) -> Saga | None:
        """Records a failed attempt (counted towards attempts_max), or a wait that is
        not one; None if another worker moved the saga on."""

        async def run(conn: Connection) -> Saga | None:
            key = saga.key
            await self.shard._check_readable(conn, {key.merchant_id}, unknown_raises=False)
            row = await conn.fetchrow(
                sql.RETRY_LATER,
                key.merchant_id,
                key.transfer_id,
                key.kind,
                saga.version,
                attempts_max,
                delay_s,
                error[:500],
                counted,
            )
            if row is None:
                return None
            updated = saga_from_row(row, self.shard.name)
            if updated.state is SagaState.DEAD:
                outcome = "dead"
            else:
                outcome = "retry" if counted else "wait"
            await self._step(conn, key, saga.next_step, outcome, error[:500])
            return updated

        return await self.shard._in_transaction(run)

    async def reset_for_retry(
        self, key: SagaKey, *, lease_owner: str, lease_s: float
    ) -> Saga | None:
        """Back to RUNNING with attempts reset, leased to the caller who drives it now."""

        async def run(conn: Connection) -> Saga | None:
            await self.shard._check_readable(conn, {key.merchant_id}, unknown_raises=False)
            row = await conn.fetchrow(
                sql.RESET_FOR_RETRY,
                key.merchant_id,
                key.transfer_id,
                key.kind,
                lease_owner,
                lease_s,
            )
            if row is None:
                return None
            await self._step(conn, key, 0, "retry requested", "by an admin")
            return saga_from_row(row, self.shard.name)

        return await self.shard._in_transaction(run)

    async def claim_due(self, *, owner: str, limit: int, lease_s: float) -> list[Saga]:
        async def run(conn: Connection) -> list[Saga]:
            rows = await conn.fetch(sql.CLAIM_DUE, owner, limit, lease_s)
            return [saga_from_row(r, self.shard.name) for r in rows]

        return await self.shard._in_transaction(run)

    # Reads.

    async def get(self, key: SagaKey) -> tuple[Saga, list[SagaStep]] | None:
        async def run(conn: Connection) -> tuple[Saga, list[SagaStep]] | None:
            await self.shard._check_readable(conn, {key.merchant_id})
            saga = await self._saga(conn, key)
            if saga is None:
                return None
            rows = await conn.fetch(sql.SELECT_STEPS, key.merchant_id, key.transfer_id, key.kind)
            return saga, [SagaStep(r["step"], r["outcome"], r["detail"], r["at"]) for r in rows]

        return await self.shard._with_connection(run)

    async def list(self, states: list[SagaState], *, limit: int) -> list[Saga]:
        async def run(conn: Connection) -> list[Saga]:
            rows = await conn.fetch(sql.LIST_SAGAS, [int(s) for s in states], limit)
            return [saga_from_row(r, self.shard.name) for r in rows]

        return await self.shard._with_connection(run)

    # Plumbing.

    async def _existing(self, conn: Connection, request: TransferRequest) -> SagaStart | None:
        records, journals = await self.shard._select_records(conn, {request.key})
        return (await self._replays(conn, [request], records, journals))[0]

    async def _replays(
        self,
        conn: Connection,
        requests: Sequence[TransferRequest],
        records: Mapping[TransferKey, TransferRecord],
        journals: Collection[TransferKey],
    ) -> Sequence[SagaStart | None]:
        """Replays: each request's original outcome (its saga's, once it finished), or
        None for a request seen for the first time."""
        found: list[SagaStart | None] = []
        for request in requests:
            record = records.get(request.key)
            if request.key in journals:
                found.append(_exists_with_different(request, "kind", None))
            elif record is None:
                found.append(None)
            elif (differing := record.differing_field(request)) is not None:
                found.append(_exists_with_different(request, differing, record.created_at))
            else:
                kind = SagaKind.SETTLE if request.settles_pending else SagaKind.TRANSFER
                saga = await self._saga(conn, SagaKey(request.debit.merchant_id, request.id, kind))
                outcome = ItemOutcome(
                    0, request.id, record.result, replayed=True, created_at=record.created_at
                )
                found.append(SagaStart(outcome, saga))
        return found

    async def _lock_with_settlements(
        self,
        conn: Connection,
        accounts: Collection[AccountKey],
        settlements: Mapping[AccountKey, str],
    ) -> dict[AccountKey, Account]:
        """Creates settlement accounts (with their currencies) on first use and locks
        them with the other accounts. The caller reads the clock after this (entries'
        times must rise with their sequence on every account) and then gives the
        limited accounts their velocity usage at it (with_velocity_usage).

        The shard remembers settlement accounts it has seen (there are few: one per
        peer, currency and stripe), so an INSERT runs only the first time; if one
        it remembers is not visible (its maker has not committed yet, or rolled
        back), its INSERT runs (waiting for that maker) and the lock again."""
        known = self.shard.settlement_accounts
        wanted = {*accounts, *settlements}
        ensured = sorted(s for s in settlements if s not in known)
        for settlement in ensured:
            await self._ensure_settlement(conn, settlement, settlements[settlement])
        locked = await self.shard._lock_accounts(conn, wanted, velocity_read_later=True)
        unseen = sorted(s for s in settlements if s not in locked)
        if unseen:
            # Remembered, but not visible: made by a transaction that has not
            # committed yet (the INSERT waits for it) or that rolled back.
            for settlement in unseen:
                known.discard(settlement)
                await self._ensure_settlement(conn, settlement, settlements[settlement])
            locked = await self.shard._lock_accounts(conn, wanted, velocity_read_later=True)
        for settlement in settlements:
            if settlement in locked:
                if len(known) >= limits.settlement_accounts_remembered_max:
                    known.clear()
                known.add(settlement)
        return locked

    async def _ensure_settlement(
        self, conn: Connection, settlement: AccountKey, currency: str
    ) -> None:
        await conn.execute(
            sql.ENSURE_SETTLEMENT_ACCOUNT, settlement.merchant_id, settlement.account_id, currency
        )

    async def _saga(self, conn: Connection, key: SagaKey) -> Saga | None:
        row = await conn.fetchrow(sql.SELECT_SAGA, key.merchant_id, key.transfer_id, key.kind)
        return saga_from_row(row, self.shard.name) if row is not None else None

    async def _insert_saga(
        self,
        conn: Connection,
        *,
        key: SagaKey,
        peer_shard: str,
        path_position: int | None,
        debit: AccountKey,
        credit: AccountKey,
        currency: str,
        action: CreditAction,
        amount_minor: int,
        pending_minor: int,
        pending_id: str,
        now: datetime,
        lease_owner: str,
        lease_s: float,
        trace_context: str,
        outcome: str,
    ) -> Saga:
        row = await conn.fetchrow(
            sql.INSERT_SAGA,
            key.merchant_id,
            key.transfer_id,
            key.kind,
            peer_shard,
            debit.account_id,
            credit.merchant_id,
            credit.account_id,
            currency,
            action,
            amount_minor,
            pending_minor,
            pending_id,
            now,
            lease_owner,
            lease_s,
            trace_context,
            outcome,
            path_position,
        )
        assert row is not None
        return saga_from_row(row, self.shard.name)

    async def _step(
        self, conn: Connection, key: SagaKey, step: int, outcome: str, detail: str
    ) -> None:
        await conn.execute(
            sql.INSERT_STEP, key.merchant_id, key.transfer_id, key.kind, step, outcome, detail
        )


async def _refused(
    conn: Connection, request: TransferRequest, result: TransferResult, now: datetime
) -> SagaStart:
    """Step 1 refused the transfer: the failure is recorded (a failed id stays failed)."""
    failed = TransferRecord(request, result, 0, now)
    await write_plan(conn, records=[failed], entries=[], accounts={}, resolutions=[], expiring=[])
    return SagaStart(ItemOutcome(0, request.id, result, created_at=now), None)


@value
class _Finishing:
    """What step 3 decided for one saga, before writing it."""

    index: int
    saga: Saga
    credit: CreditRecord
    post: bool
    # The shard the hold ends up mirroring: the one that credited, if it applied.
    peer_shard: str
    state: SagaState
    result: TransferResult
    # Steps 2 and 3 for the saga's log: (step, outcome, detail) each.
    log: tuple[tuple[int, str, str], tuple[int, str, str]]

    def leg(self, peer_shard: str) -> Leg:
        """The saga's money on this (debit) shard towards peer_shard."""
        return Leg(peer_shard, self.saga.currency, self.saga.key.transfer)

    @property
    def moves_hold(self) -> bool:
        return self.peer_shard != self.saga.peer_shard

    @property
    def keeps_hold(self) -> bool:
        """A cross-shard pending transfer: the hold stays until it is settled."""
        return self.post and self.saga.credit_action is CreditAction.PENDING

    @property
    def settles(self) -> bool:
        """Step 3 writes entries: a transfer saga's, unless its hold just stays."""
        return self.saga.key.kind is SagaKind.TRANSFER and (self.moves_hold or not self.keeps_hold)


def _finishing(index: int, saga: Saga, credit: CreditRecord) -> _Finishing:
    outcome, result = credit.outcome, credit.result
    post = False
    peer_shard = saga.peer_shard
    debit_posted = False
    if saga.key.kind is SagaKind.TRANSFER:
        post = outcome is CreditOutcome.APPLIED
        if post:
            peer_shard = credit.credited_on
        debit_posted = post and saga.credit_action is CreditAction.POST
        final = TransferResult.OK if post else result
    else:
        invariant(outcome is CreditOutcome.APPLIED, "settling a held credit never fails")
        final = TransferResult.OK
    state = SagaState.COMPLETED if final is TransferResult.OK else SagaState.COMPENSATED
    detail = final.name + (" (debit posted)" if debit_posted else "")
    credited = result.name
    if outcome is CreditOutcome.APPLIED and credit.credited_on != saga.peer_shard:
        credited += f" on {credit.credited_on} (the credit merchant moved there)"
    return _Finishing(
        index,
        saga,
        credit,
        post,
        peer_shard,
        state,
        final,
        ((2, outcome.name.lower(), credited), (3, state.name.lower(), detail)),
    )


def _credit_of(request: TransferRequest) -> AccountKey:
    invariant(request.credit is not None, "a cross-shard transfer names its credit account")
    assert request.credit is not None
    return request.credit


def _key_columns(keys: Sequence[SagaKey]) -> tuple[list[str], list[str], list[int]]:
    """Saga keys as the three array parameters of a set-based statement."""
    return (
        [k.merchant_id for k in keys],
        [k.transfer_id for k in keys],
        [int(k.kind) for k in keys],
    )


def _exists_with_different(
    request: TransferRequest, differing_field: str, created_at: datetime | None
) -> SagaStart:
    return SagaStart(
        ItemOutcome(
            0,
            request.id,
            TransferResult.EXISTS_WITH_DIFFERENT_FIELDS,
            differing_field=differing_field,
            created_at=created_at,
        ),
        None,
    )


@dataclass(slots=True)
class _Books:
    """What one transaction of saga steps writes, built up step by step on the
    accounts it locked (each step sees the balances the ones before it left)."""

    accounts: dict[AccountKey, Account]
    now: datetime
    records: list[TransferRecord] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    changed: dict[AccountKey, AccountState] = field(default_factory=dict)
    resolutions: list[Resolution] = field(default_factory=list)
    velocity: list[VelocityAdd] = field(default_factory=list)

    def book(
        self,
        entries: Sequence[Entry],
        states: Mapping[AccountKey, AccountState],
        resolutions: Sequence[Resolution] = (),
        velocity: Sequence[VelocityAdd] = (),
    ) -> None:
        self.entries += entries
        by_account: dict[AccountKey, list[VelocityAdd]] = {}
        for v in velocity:
            by_account.setdefault(v.account, []).append(v)
        for key, state in states.items():
            self.accounts[key] = with_velocity(
                advanced(self.accounts[key], state), by_account.get(key, [])
            )
            self.changed[key] = state
        self.resolutions += resolutions
        self.velocity += velocity


def step_key(step: StepRequest) -> tuple[int, object]:
    """Which step of which saga: a group holds each at most once."""
    if isinstance(step, SagaBegin):
        return 1, step.request.key
    if isinstance(step, SagaCredit):
        return 2, step.saga.key
    return 3, step.key


def _records_with_saga_results(
    rows: Sequence[asyncpg.Record],
) -> tuple[dict[TransferKey, TransferRecord], dict[TransferKey, JournalRecord]]:
    """READ_STEPS' transfers and journals; a cross-shard transfer whose saga finished
    reads its saga's result."""
    found = [r for r in rows if r["transfer_id"] is not None]
    records, journals = parse_records(found)
    with_saga_results(
        records,
        (
            (TransferKey(r["merchant_id"], r["transfer_id"]), r["saga_result"])
            for r in found
            if r["saga_result"] is not None
        ),
    )
    return records, journals

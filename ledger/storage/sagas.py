"""The saga steps each shard runs, every one a single local transaction.

Debit shard (S): begin (step 1), finish (step 3), the saga row's retries and
claims. Credit shard (T): credit (step 2), which records exactly one outcome
per saga in saga_credits, so a repeated or late step 2 can never apply twice
or after an abort.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from ledger import faults, limits
from ledger.domain.accounts import Account, AccountKey
from ledger.domain.engine import (
    AccountState,
    ItemOutcome,
    PendingView,
    TransferBatchState,
    advanced,
    apply_transfers,
    expire_pending,
)
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
    settlement_account,
)
from ledger.domain.transfers import (
    Entry,
    PendingState,
    Resolution,
    TransferAction,
    TransferKey,
    TransferRecord,
    TransferRequest,
    TransferResult,
)
from ledger.invariant import invariant
from ledger.storage import saga_statements as sql
from ledger.storage import statements as ledger_sql
from ledger.storage.errors import RetryTransaction
from ledger.storage.saga_rows import saga_from_row
from ledger.storage.shard import Fence, Shard, active_merchants, write_plan
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


@dataclass(frozen=True, slots=True)
class SagaBegin:
    """Step 1 of a cross-shard transfer: the request, the shard its credit merchant
    is on now, and the caller's trace (the saga carries it to every step)."""

    request: TransferRequest
    peer_shard: str
    trace_context: str


@dataclass(frozen=True, slots=True)
class SagaCredit:
    """Step 2 of a saga, as the shard before this one in its path asks for it."""

    saga: Saga
    home_shard: str
    abort: bool = False

    @property
    def held(self) -> TransferKey:
        """The transfer whose money this saga moves (a settle's: the pending one)."""
        key = self.saga.key
        return TransferKey(key.merchant_id, self.saga.pending_id or key.transfer_id)

    @property
    def settlement(self) -> AccountKey:
        """This shard's settlement account mirroring the shard the money comes from."""
        return settlement_account(self.home_shard, self.saga.currency, self.held.transfer_id)


@dataclass(frozen=True, slots=True)
class SagaFinish:
    """Step 3 of a saga, with step 2's outcome; version fences out a stale worker."""

    key: SagaKey
    version: int
    credit: CreditRecord
    allow_dead: bool = False


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
        """begin_transfer for many cross-shard transfers (distinct ids) in one transaction,
        in order: each sees the reservations of those before it, as local transfers of
        one batch do."""
        requests = [b.request for b in begins]
        invariant(
            all(r.credit is not None and not r.settles_pending for r in requests),
            "a cross-shard transfer names its credit account",
        )
        invariant(len({r.key for r in requests}) == len(requests), "each transfer once")

        settlements = [
            settlement_account(b.peer_shard, b.request.currency, b.request.id) for b in begins
        ]

        async def run(conn: Connection) -> list[SagaStart]:
            await self.shard._fence(
                conn, fence, {r.debit.merchant_id for r in requests} | {SETTLEMENT_MERCHANT_ID}
            )
            # Locks first (a replay takes them needlessly, and rarely): the ids and the
            # clock are then read in one round trip after them, as local transfers do.
            accounts = await self._lock_with_settlements(
                conn,
                {r.debit for r in requests},
                {s: r.currency for s, r in zip(settlements, requests, strict=True)},
            )
            records, journals, now = await self.shard._select_records_and_now(
                conn, [r.key for r in requests]
            )
            found = await self._replays(conn, requests, records, journals)
            fresh = [i for i, known in enumerate(found) if known is None]
            starts = {i: known for i, known in enumerate(found) if known is not None}
            if fresh:
                starts |= await self._reserve(
                    conn,
                    [(i, begins[i], settlements[i]) for i in fresh],
                    accounts,
                    now,
                    lease_owner,
                    lease_s,
                )
            faults.crash_point("saga.step1.before_commit")
            return [starts[i] for i in range(len(begins))]

        starts = await self.shard._in_transaction(run)
        faults.crash_point("saga.step1.after_commit")
        return starts

    async def _reserve(
        self,
        conn: Connection,
        fresh: Sequence[tuple[int, SagaBegin, AccountKey]],
        accounts: Mapping[AccountKey, Account],
        now: datetime,
        lease_owner: str,
        lease_s: float,
    ) -> dict[int, SagaStart]:
        """Step 1 proper for new transfers (position, begin, settlement account each):
        reserve, record, start the saga (or refuse)."""
        positions = [i for i, _, _ in fresh]
        begins = [b for _, b, _ in fresh]
        settlements = [s for _, _, s in fresh]
        # An item marked linked ends an open chain here (chains never hold a saga):
        # refused as such, without joining the next item's chain.
        applying = [i for i, b in enumerate(begins) if not b.request.linked]
        plan = apply_transfers(
            [
                replace(
                    begins[i].request,
                    credit=settlements[i],
                    action=TransferAction.PENDING,
                    timeout_ms=0,
                    reversal_of="",
                )
                for i in applying
            ],
            TransferBatchState(accounts, {}, frozenset(), {}, {}, {}, now),
        )
        results = dict.fromkeys(range(len(begins)), TransferResult.LINKED_EVENT_CHAIN_OPEN)
        results.update(zip(applying, (o.result for o in plan.outcomes), strict=True))
        records: list[TransferRecord] = []
        starts: dict[int, SagaStart] = {}
        reserved: list[SagaBegin] = []
        for i, begin in enumerate(begins):
            request = begin.request
            result = results[i]
            if result is TransferResult.OK:
                reserved.append(begin)
                records.append(
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
                        trace_id=trace_id_of(begin.trace_context),
                    )
                )
            else:
                # Refused: the failure is recorded (a failed id stays failed).
                records.append(
                    TransferRecord(
                        request, result, 0, now, trace_id=trace_id_of(begin.trace_context)
                    )
                )
                starts[positions[i]] = SagaStart(
                    ItemOutcome(0, request.id, result, created_at=now), None
                )
        await write_plan(
            conn,
            records=records,
            entries=plan.entries,
            accounts=plan.accounts,
            resolutions=[],
            expiring=[r for r in records if r.expires_at],
        )
        if reserved:
            sagas = await self._insert_sagas(conn, reserved, now, lease_owner, lease_s)
            for i, begin in enumerate(begins):
                saga = sagas.get(begin.request.key)
                if saga is not None:
                    starts[positions[i]] = SagaStart(
                        ItemOutcome(
                            0, begin.request.id, TransferResult.IN_PROGRESS, created_at=now
                        ),
                        saga,
                    )
        return starts

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
            if pending is None or origin is None:
                return await _refused(
                    conn,
                    request,
                    TransferResult.PENDING_TRANSFER_NOT_FOUND,
                    await conn.fetchval(ledger_sql.NOW),
                )
            view = local_view(pending, origin.peer_shard)
            if origin.result is not TransferResult.OK:
                # Still in flight, or refused: there is nothing to settle yet.
                view = replace(view, result=TransferResult.PENDING_TRANSFER_NOT_FOUND)
            assert view.request.credit is not None
            accounts = await self.shard._lock_accounts(
                conn, {view.request.debit, view.request.credit}
            )
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
            views = {
                k: local_view(records[k], origins[k].peer_shard)
                for k in keys
                if k in origins and origins[k].result is TransferResult.OK
            }
            locked: set[AccountKey] = set()
            for view in views.values():
                assert view.request.credit is not None
                locked |= {view.request.debit, view.request.credit}
            accounts = dict(await self.shard._lock_accounts(conn, locked))
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
        settling a hold whose credit party moved on, passes it on (relayed_to)."""
        records = await self.credit_sagas([SagaCredit(saga, home_shard, abort)], fence=fence)
        return records[0]

    async def credit_sagas(
        self, credits: Sequence[SagaCredit], *, fence: Fence
    ) -> list[CreditRecord]:
        """credit for many sagas (distinct keys) in one transaction, in order.

        A relay hop runs only alone: a group that meets one raises RunAlone."""
        keys = [c.saga.key for c in credits]
        invariant(len(set(keys)) == len(keys), "each saga once")

        async def run(conn: Connection) -> list[CreditRecord]:
            settles = [c for c in credits if c.saga.key.kind is not SagaKind.TRANSFER]
            if settles:
                await self.shard._fence(conn, fence, {SETTLEMENT_MERCHANT_ID})
                for c in settles:
                    relay_to = await conn.fetchval(
                        sql.SELECT_RELAY, c.held.merchant_id, c.held.transfer_id, c.home_shard
                    )
                    if relay_to is None:
                        continue
                    if len(credits) > 1:
                        raise RunAlone()
                    return [await self._relay(conn, c.saga, c.settlement, c.home_shard, relay_to)]
            await self.shard._fence(
                conn, fence, {c.saga.credit.merchant_id for c in credits} | {SETTLEMENT_MERCHANT_ID}
            )
            columns = _key_columns(keys)
            await conn.execute(sql.LOCK_CREDITS, *columns)
            # Locks first (a repeated step 2 takes them needlessly, and rarely): the
            # recorded outcomes and the clock are then read in one round trip.
            applying = [c for c in credits if not c.abort]
            accounts = await self._lock_with_settlements(
                conn,
                {c.saga.credit for c in applying},
                {c.settlement: c.saga.currency for c in applying},
            )
            rows = await conn.fetch(sql.SELECT_CREDITS_AND_NOW, *columns)
            now: datetime = rows[0]["now"]
            recorded = {
                SagaKey(r["merchant_id"], r["transfer_id"], SagaKind(r["kind"])): r
                for r in rows
                if r["transfer_id"] is not None
            }
            answers = {
                i: self._credit_record(recorded[k]) for i, k in enumerate(keys) if k in recorded
            }
            todo = [i for i in range(len(credits)) if i not in answers]
            if todo:
                outcomes = await self._apply_credits(
                    conn, [credits[i] for i in todo], accounts, now
                )
                status = await conn.execute(
                    sql.INSERT_CREDITS,
                    *_key_columns([keys[i] for i in todo]),
                    [credits[i].saga.credit.merchant_id for i in todo],
                    [o for o, _ in outcomes],
                    [r for _, r in outcomes],
                    [credits[i].home_shard for i in todo],
                    self.shard.name,
                )
                if status != f"INSERT 0 {len(todo)}":
                    # Another step 2 recorded first (the locks make this rare); its
                    # outcome stands, and the retry rolls back what this one wrote and
                    # reads it.
                    raise RetryTransaction()
                for i, (outcome, result) in zip(todo, outcomes, strict=True):
                    answers[i] = CreditRecord(outcome, result, self.shard.name)
            faults.crash_point("saga.step2.before_commit")
            return [answers[i] for i in range(len(credits))]

        answer = await self.shard._in_transaction(run)
        faults.crash_point("saga.step2.after_commit")
        return answer

    async def _apply_credits(
        self,
        conn: Connection,
        credits: Sequence[SagaCredit],
        locked: Mapping[AccountKey, Account],
        now: datetime,
    ) -> list[tuple[CreditOutcome, TransferResult]]:
        """Step 2 proper for sagas with no recorded outcome: abort, apply or refuse each,
        in order, on the locked accounts."""
        accounts = dict(locked)
        entries: list[Entry] = []
        changed: dict[AccountKey, AccountState] = {}
        outcomes: list[tuple[CreditOutcome, TransferResult]] = []
        holds: list[SagaCredit] = []
        for c in credits:
            if c.abort:
                outcomes.append((CreditOutcome.ABORTED, TransferResult.ABORTED))
                continue
            saga = c.saga
            plan = credit_plan(
                key=saga.key.transfer,
                action=saga.credit_action,
                settlement=c.settlement,
                destination=saga.credit,
                currency=saga.currency,
                amount_minor=saga.amount_minor,
                pending_minor=saga.pending_minor,
                pending_id=saga.pending_id,
                accounts=accounts,
                now=now,
            )
            result = plan.outcomes[0].result
            if result is not TransferResult.OK:
                outcomes.append((CreditOutcome.REFUSED, result))
                continue
            outcomes.append((CreditOutcome.APPLIED, TransferResult.OK))
            entries += plan.entries
            for key, state in plan.accounts.items():
                accounts[key] = advanced(accounts[key], state)
                changed[key] = state
            holds.append(c)
        if entries:
            await write_plan(
                conn, records=[], entries=entries, accounts=changed, resolutions=[], expiring=[]
            )
        for c in holds:
            # Open cross-shard holds credited here are tracked, so a move of their
            # credit merchant can carry them.
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
                )
            elif saga.key.kind is not SagaKind.TRANSFER:
                await conn.execute(sql.DELETE_CREDIT_HOLD, c.held.merchant_id, c.held.transfer_id)
        return outcomes

    async def _relay(
        self,
        conn: Connection,
        saga: Saga,
        settlement: AccountKey,
        home_shard: str,
        relay_to: str,
    ) -> CreditRecord:
        """One relay hop of a settle: this shard's settlement accounts for the shard
        before and the shard after settle the hold between them, once."""
        key = saga.key
        await conn.execute(sql.LOCK_CREDIT, key.merchant_id, key.transfer_id, int(key.kind))
        passed = await conn.fetchval(
            sql.SELECT_RELAY_PASS, key.merchant_id, key.transfer_id, key.kind, home_shard
        )
        if passed is None:
            onward = settlement_account(relay_to, saga.currency, saga.pending_id)
            accounts = await self.shard._lock_accounts(conn, {settlement, onward})
            now: datetime = await conn.fetchval(ledger_sql.NOW)
            posting = saga.credit_action is CreditAction.POST_PENDING
            entries, states = relay_plan(
                key=key.transfer,
                incoming=accounts[settlement],
                outgoing=accounts[onward],
                pending_minor=saga.pending_minor,
                posted_minor=saga.amount_minor if posting else 0,
                now=now,
            )
            await write_plan(
                conn, records=[], entries=entries, accounts=states, resolutions=[], expiring=[]
            )
            await conn.execute(
                sql.INSERT_RELAY_PASS,
                key.merchant_id,
                key.transfer_id,
                key.kind,
                home_shard,
                relay_to,
            )
        return CreditRecord(
            CreditOutcome.APPLIED, TransferResult.OK, self.shard.name, relayed_to=relay_to
        )

    async def credit_outcome(self, key: SagaKey) -> CreditRecord | None:
        """What step 2 recorded on this (credit) shard, if anything. Reads only."""

        async def run(conn: Connection) -> CreditRecord | None:
            row = await conn.fetchrow(sql.SELECT_CREDIT, key.merchant_id, key.transfer_id, key.kind)
            return self._credit_record(row) if row is not None else None

        return await self.shard._with_connection(run)

    def _credit_record(self, row: asyncpg.Record) -> CreditRecord:
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
        answer = (
            await self.finish_sagas([SagaFinish(key, version, credit, allow_dead)], fence=fence)
        )[0]
        if isinstance(answer, SagaRaced):
            raise answer
        return answer

    async def finish_sagas(
        self, finishes: Sequence[SagaFinish], *, fence: Fence
    ) -> list[Saga | SagaRaced]:
        """finish for many sagas (distinct keys) in one transaction, in order; a saga
        another worker moved on is answered SagaRaced, the others finish."""
        keys = [f.key for f in finishes]
        invariant(len(set(keys)) == len(keys), "each saga once")

        async def run(conn: Connection) -> list[Saga | SagaRaced]:
            await self.shard._fence(
                conn, fence, {k.merchant_id for k in keys} | {SETTLEMENT_MERCHANT_ID}
            )
            rows = await conn.fetch(sql.LOCK_SAGAS, *_key_columns(keys))
            locked = {saga.key: saga for saga in (saga_from_row(r, self.shard.name) for r in rows)}
            answers: dict[int, Saga | SagaRaced] = {}
            todo: list[_Finishing] = []
            for i, f in enumerate(finishes):
                saga = locked.get(f.key)
                invariant(saga is not None, "a saga being finished exists")
                assert saga is not None
                if saga.finished:
                    answers[i] = saga
                elif saga.version != f.version or (
                    saga.state is SagaState.DEAD and not f.allow_dead
                ):
                    answers[i] = SagaRaced(f"saga {f.key} moved on (version {saga.version})")
                else:
                    todo.append(_finishing(i, saga, f.credit))
            if todo:
                await self._settle_reservations(conn, todo)
                # Step 2 ran on the credit shard; its outcome joins each saga's history here.
                steps = [(t.saga.key, *step) for t in todo for step in t.log]
                rows = await conn.fetch(
                    sql.FINISH_SAGAS,
                    *_key_columns([t.saga.key for t in todo]),
                    [t.saga.version for t in todo],
                    [t.state for t in todo],
                    [t.result for t in todo],
                    [t.credit.outcome for t in todo],
                    [t.peer_shard for t in todo],
                    *_key_columns([k for k, *_ in steps]),
                    [n for _, n, _, _ in steps],
                    [o for _, _, o, _ in steps],
                    [d for _, _, _, d in steps],
                )
                finished = {
                    saga.key: saga for saga in (saga_from_row(r, self.shard.name) for r in rows)
                }
                invariant(len(finished) == len(todo), "every locked saga row is updated")
                for t in todo:
                    answers[t.index] = finished[t.saga.key]
            faults.crash_point("saga.step3.before_commit")
            return [answers[i] for i in range(len(finishes))]

        answers = await self.shard._in_transaction(run)
        faults.crash_point("saga.step3.after_commit")
        return answers

    async def _settle_reservations(self, conn: Connection, todo: Sequence[_Finishing]) -> None:
        """Step 3's entries for transfer sagas, in order: each moves its hold first if
        the credit landed on another shard than step 1 reserved towards, then posts
        or releases its reservation (a cross-shard pending transfer keeps its hold)."""
        settling = [t for t in todo if t.settles]
        if not settling:
            return
        held_by = {t.index: t.settlement(t.saga.peer_shard) for t in settling}
        moved_to = {t.settlement(t.peer_shard): t.saga.currency for t in settling if t.moves_hold}
        for account in sorted(moved_to):
            await self._ensure_settlement(conn, account, moved_to[account])
        wanted: set[AccountKey] = set()
        for t in settling:
            wanted |= {t.saga.debit, held_by[t.index], t.settlement(t.peer_shard)}
        accounts = dict(await self.shard._lock_accounts(conn, wanted))
        # The reservations and the clock, read after the locks.
        records, _, now = await self.shard._select_records_and_now(
            conn, [t.saga.key.transfer for t in settling]
        )
        views: dict[int, TransferRecord] = {}
        for t in settling:
            view = local_view(records[t.saga.key.transfer], t.peer_shard)
            invariant(
                view.request.debit == t.saga.debit
                and view.request.credit == t.settlement(t.peer_shard),
                "a saga's reservation is booked on the accounts its saga names",
            )
            views[t.index] = view
        entries: list[Entry] = []
        changed: dict[AccountKey, AccountState] = {}
        resolutions: list[Resolution] = []

        def book(states: Mapping[AccountKey, AccountState]) -> None:
            for account_key, state in states.items():
                accounts[account_key] = advanced(accounts[account_key], state)
                changed[account_key] = state

        for t in settling:
            view = views[t.index]
            assert view.request.credit is not None
            if t.moves_hold:
                moved, states = hold_moved_plan(
                    key=t.saga.key.transfer,
                    held_by=accounts[held_by[t.index]],
                    moved_to=accounts[view.request.credit],
                    amount_minor=view.amount_effective_minor,
                    now=now,
                )
                entries += moved
                book(states)
            if not t.keeps_hold:
                plan = reservation_settle_plan(
                    reservation=view, post=t.post, accounts=accounts, now=now
                )
                entries += plan.entries
                book(plan.accounts)
                resolutions += plan.resolutions
        await write_plan(
            conn,
            records=[],
            entries=entries,
            accounts=changed,
            resolutions=resolutions,
            expiring=[],
        )

    async def retry_later(
        self, saga: Saga, *, error: str, attempts_max: int, delay_s: float
    ) -> Saga | None:
        """Records a failed attempt; None if another worker moved the saga on."""

        async def run(conn: Connection) -> Saga | None:
            key = saga.key
            await self.shard._check_readable(conn, {key.merchant_id})
            row = await conn.fetchrow(
                sql.RETRY_LATER,
                key.merchant_id,
                key.transfer_id,
                key.kind,
                saga.version,
                attempts_max,
                delay_s,
                error[:500],
            )
            if row is None:
                return None
            updated = saga_from_row(row, self.shard.name)
            outcome = "dead" if updated.state is SagaState.DEAD else "retry"
            await self._step(conn, key, saga.next_step, outcome, error[:500])
            return updated

        return await self.shard._in_transaction(run)

    async def reset_for_retry(
        self, key: SagaKey, *, lease_owner: str, lease_s: float
    ) -> Saga | None:
        """Back to RUNNING with attempts reset, leased to the caller who drives it now."""

        async def run(conn: Connection) -> Saga | None:
            await self.shard._check_readable(conn, {key.merchant_id})
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
        times must rise with their sequence on every account).

        The shard remembers settlement accounts it has seen (there are few: one per
        peer, currency and stripe), so an INSERT runs only the first time; if one
        it remembers is not visible (its maker has not committed yet, or rolled
        back), its INSERT runs (waiting for that maker) and the lock again."""
        known = self.shard.settlement_accounts
        wanted = {*accounts, *settlements}
        ensured = sorted(s for s in settlements if s not in known)
        for settlement in ensured:
            await self._ensure_settlement(conn, settlement, settlements[settlement])
        locked = await self.shard._lock_accounts(conn, wanted)
        unseen = sorted(s for s in settlements if s not in locked)
        if unseen:
            # Remembered, but not visible: made by a transaction that has not
            # committed yet (the INSERT waits for it) or that rolled back.
            for settlement in unseen:
                known.discard(settlement)
                await self._ensure_settlement(conn, settlement, settlements[settlement])
            locked = await self.shard._lock_accounts(conn, wanted)
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
        )
        assert row is not None
        return saga_from_row(row, self.shard.name)

    async def _insert_sagas(
        self,
        conn: Connection,
        begins: Sequence[SagaBegin],
        now: datetime,
        lease_owner: str,
        lease_s: float,
    ) -> dict[TransferKey, Saga]:
        """The TRANSFER sagas of reserved cross-shard transfers, with step 1 in their log."""
        requests = [b.request for b in begins]
        credits = [r.credit for r in requests]
        assert all(c is not None for c in credits)
        rows = await conn.fetch(
            sql.INSERT_SAGAS,
            [r.debit.merchant_id for r in requests],
            [r.id for r in requests],
            [int(SagaKind.TRANSFER)] * len(requests),
            [b.peer_shard for b in begins],
            [r.debit.account_id for r in requests],
            [c.merchant_id for c in credits if c is not None],
            [c.account_id for c in credits if c is not None],
            [r.currency for r in requests],
            [
                CreditAction.POST if r.action is TransferAction.POST else CreditAction.PENDING
                for r in requests
            ],
            [r.amount_minor for r in requests],
            [0] * len(requests),
            [""] * len(requests),
            [b.trace_context for b in begins],
            ["reserved"] * len(requests),
            now,
            lease_owner,
            lease_s,
        )
        invariant(len(rows) == len(begins), "every saga was inserted")
        return {
            saga.key.transfer: saga for saga in (saga_from_row(r, self.shard.name) for r in rows)
        }

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


@dataclass(frozen=True, slots=True)
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

    def settlement(self, peer_shard: str) -> AccountKey:
        """This (debit) shard's settlement account for the saga towards peer_shard."""
        return settlement_account(peer_shard, self.saga.currency, self.saga.key.transfer_id)

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

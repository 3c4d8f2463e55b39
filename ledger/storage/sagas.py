"""The saga steps each shard runs, every one a single local transaction.

Debit shard (S): begin (step 1), finish (step 3), the saga row's retries and
claims. Credit shard (T): credit (step 2), which records exactly one outcome
per saga in saga_credits, so a repeated or late step 2 can never apply twice
or after an abort.
"""

from __future__ import annotations

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

if TYPE_CHECKING:
    from ledger.storage.shard import Connection


class SagaRaced(Exception):
    """Another worker moved the saga on (its version changed); this one must stop."""


@dataclass(frozen=True, slots=True)
class SagaStart:
    """Step 1's answer: the item's outcome, and the saga if one runs (or ran)."""

    outcome: ItemOutcome
    saga: Saga | None


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
        invariant(request.credit is not None, "a cross-shard transfer names its credit account")
        credit = request.credit
        assert credit is not None
        settlement = settlement_account(peer_shard, request.currency, request.id)

        async def run(conn: Connection) -> SagaStart:
            await self.shard._fence(
                conn, fence, {request.debit.merchant_id, SETTLEMENT_MERCHANT_ID}
            )
            existing = await self._existing(conn, request)
            if existing is not None:
                return existing
            accounts, now = await self._lock_with_settlement(
                conn, request.debit, settlement, request.currency
            )
            reservation = replace(
                request,
                credit=settlement,
                action=TransferAction.PENDING,
                timeout_ms=0,
                reversal_of="",
            )
            state = TransferBatchState(accounts, {}, frozenset(), {}, {}, {}, now)
            plan = apply_transfers([reservation], state)
            result = plan.outcomes[0].result
            if result is not TransferResult.OK:
                return await _refused(conn, request, result, now)
            record = TransferRecord(
                request=request,
                result=TransferResult.IN_PROGRESS,
                amount_effective_minor=request.amount_minor,
                created_at=now,
                expires_at=(
                    now + timedelta(milliseconds=request.timeout_ms)
                    if request.action is TransferAction.PENDING and request.timeout_ms
                    else None
                ),
            )
            await write_plan(
                conn,
                records=[record],
                entries=plan.entries,
                accounts=plan.accounts,
                resolutions=[],
                expiring=[record] if record.expires_at else [],
            )
            action = (
                CreditAction.POST if request.action is TransferAction.POST else CreditAction.PENDING
            )
            saga = await self._insert_saga(
                conn,
                key=SagaKey(request.debit.merchant_id, request.id, SagaKind.TRANSFER),
                peer_shard=peer_shard,
                debit=request.debit,
                credit=credit,
                currency=request.currency,
                action=action,
                amount_minor=request.amount_minor,
                pending_minor=0,
                pending_id="",
                now=now,
                lease_owner=lease_owner,
                lease_s=lease_s,
                trace_context=trace_context,
                outcome="reserved",
            )
            faults.crash_point("saga.step1.before_commit")
            return SagaStart(
                ItemOutcome(0, request.id, TransferResult.IN_PROGRESS, created_at=now), saga
            )

        start = await self.shard._in_transaction(run)
        faults.crash_point("saga.step1.after_commit")
        return start

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
        key = saga.key
        held = TransferKey(key.merchant_id, saga.pending_id or key.transfer_id)
        settlement = settlement_account(home_shard, saga.currency, held.transfer_id)

        async def run(conn: Connection) -> CreditRecord:
            relay_to: str | None = None
            if key.kind is not SagaKind.TRANSFER:
                await self.shard._fence(conn, fence, {SETTLEMENT_MERCHANT_ID})
                relay_to = await conn.fetchval(
                    sql.SELECT_RELAY, held.merchant_id, held.transfer_id, home_shard
                )
            if relay_to is not None:
                return await self._relay(conn, saga, settlement, home_shard, relay_to)
            await self.shard._fence(conn, fence, {saga.credit.merchant_id, SETTLEMENT_MERCHANT_ID})
            await conn.execute(sql.LOCK_CREDIT, key.merchant_id, key.transfer_id, int(key.kind))
            row = await conn.fetchrow(sql.SELECT_CREDIT, key.merchant_id, key.transfer_id, key.kind)
            if row is not None:
                return self._credit_record(row)
            if abort:
                outcome, result = CreditOutcome.ABORTED, TransferResult.ABORTED
            else:
                accounts, now = await self._lock_with_settlement(
                    conn, saga.credit, settlement, saga.currency
                )
                plan = credit_plan(
                    key=key.transfer,
                    action=saga.credit_action,
                    settlement=settlement,
                    destination=saga.credit,
                    currency=saga.currency,
                    amount_minor=saga.amount_minor,
                    pending_minor=saga.pending_minor,
                    pending_id=saga.pending_id,
                    accounts=accounts,
                    now=now,
                )
                result = plan.outcomes[0].result
                if result is TransferResult.OK:
                    outcome = CreditOutcome.APPLIED
                    await write_plan(
                        conn,
                        records=[],
                        entries=plan.entries,
                        accounts=plan.accounts,
                        resolutions=[],
                        expiring=[],
                    )
                    # Open cross-shard holds credited here are tracked, so a move of
                    # their credit merchant can carry them.
                    if saga.credit_action is CreditAction.PENDING:
                        await conn.execute(
                            sql.INSERT_CREDIT_HOLD,
                            held.merchant_id,
                            held.transfer_id,
                            saga.credit.merchant_id,
                            saga.currency,
                            saga.amount_minor,
                            home_shard,
                        )
                    elif key.kind is not SagaKind.TRANSFER:
                        await conn.execute(
                            sql.DELETE_CREDIT_HOLD, held.merchant_id, held.transfer_id
                        )
                else:
                    outcome = CreditOutcome.REFUSED
            status = await conn.execute(
                sql.INSERT_CREDIT,
                key.merchant_id,
                key.transfer_id,
                key.kind,
                saga.credit.merchant_id,
                outcome,
                result,
                home_shard,
                self.shard.name,
            )
            if status == "INSERT 0 0":
                # Another step 2 recorded first (the lock makes this rare); its outcome
                # stands, and the retry rolls back what this one wrote and reads it.
                raise RetryTransaction()
            faults.crash_point("saga.step2.before_commit")
            return CreditRecord(outcome, result, self.shard.name)

        answer = await self.shard._in_transaction(run)
        faults.crash_point("saga.step2.after_commit")
        return answer

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
        outcome, result = credit.outcome, credit.result

        async def run(conn: Connection) -> Saga:
            await self.shard._fence(conn, fence, {key.merchant_id, SETTLEMENT_MERCHANT_ID})
            saga = await self._saga(conn, key, lock=True)
            invariant(saga is not None, "a saga being finished exists")
            assert saga is not None
            if saga.finished:
                return saga
            if saga.version != version or (saga.state is SagaState.DEAD and not allow_dead):
                raise SagaRaced(f"saga {key} moved on (version {saga.version})")
            debit_posted = False
            peer_shard = saga.peer_shard
            if key.kind is SagaKind.TRANSFER:
                post = outcome is CreditOutcome.APPLIED
                if post:
                    peer_shard = credit.credited_on
                await self._settle_reservation(conn, saga, post=post, peer_shard=peer_shard)
                debit_posted = post and saga.credit_action is CreditAction.POST
                final = TransferResult.OK if post else result
            else:
                invariant(outcome is CreditOutcome.APPLIED, "settling a held credit never fails")
                final = TransferResult.OK
            state = SagaState.COMPLETED if final is TransferResult.OK else SagaState.COMPENSATED
            row = await conn.fetchrow(
                sql.FINISH_SAGA,
                key.merchant_id,
                key.transfer_id,
                key.kind,
                saga.version,
                state,
                final,
                outcome,
                peer_shard,
            )
            invariant(row is not None, "the locked saga row is updated")
            assert row is not None
            detail = final.name + (" (debit posted)" if debit_posted else "")
            credited = result.name
            if outcome is CreditOutcome.APPLIED and credit.credited_on != saga.peer_shard:
                credited += f" on {credit.credited_on} (the credit merchant moved there)"
            # Step 2 ran on the credit shard; its outcome joins this saga's history here.
            await conn.execute(
                sql.INSERT_TWO_STEPS,
                key.merchant_id,
                key.transfer_id,
                key.kind,
                2,
                outcome.name.lower(),
                credited,
                3,
                state.name.lower(),
                detail,
            )
            faults.crash_point("saga.step3.before_commit")
            return saga_from_row(row, self.shard.name)

        finished = await self.shard._in_transaction(run)
        faults.crash_point("saga.step3.after_commit")
        return finished

    async def _settle_reservation(
        self, conn: Connection, saga: Saga, *, post: bool, peer_shard: str
    ) -> None:
        """Step 3's entries for a transfer saga."""
        moves_hold = peer_shard != saga.peer_shard
        keeps_hold = post and saga.credit_action is CreditAction.PENDING
        if keeps_hold and not moves_hold:
            return  # A cross-shard pending transfer: the hold stays until settled.
        key = saga.key.transfer
        record = (await self.shard._select_transfers(conn, {key}))[key]
        held_by = local_view(record, saga.peer_shard).request.credit
        view = local_view(record, peer_shard)
        assert held_by is not None and view.request.credit is not None
        if moves_hold:
            await self._ensure_settlement(conn, view.request.credit, saga.currency)
        accounts = dict(
            await self.shard._lock_accounts(
                conn, {view.request.debit, view.request.credit, held_by}
            )
        )
        now: datetime = await conn.fetchval(ledger_sql.NOW)
        entries: list[Entry] = []
        changed: dict[AccountKey, AccountState] = {}
        if moves_hold:
            entries, changed = hold_moved_plan(
                key=key,
                held_by=accounts[held_by],
                moved_to=accounts[view.request.credit],
                amount_minor=record.amount_effective_minor,
                now=now,
            )
            for account_key, state in changed.items():
                accounts[account_key] = advanced(accounts[account_key], state)
        resolutions = []
        if not keeps_hold:
            plan = reservation_settle_plan(reservation=view, post=post, accounts=accounts, now=now)
            entries += plan.entries
            changed.update(plan.accounts)
            resolutions = plan.resolutions
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
        """A replay: the original outcome (the saga's, once it finished)."""
        records, journals = await self.shard._select_records(conn, {request.key})
        if request.key in journals:
            return SagaStart(
                ItemOutcome(
                    0,
                    request.id,
                    TransferResult.EXISTS_WITH_DIFFERENT_FIELDS,
                    differing_field="kind",
                ),
                None,
            )
        record = records.get(request.key)
        if record is None:
            return None
        differing = record.differing_field(request)
        if differing is not None:
            return SagaStart(
                ItemOutcome(
                    0,
                    request.id,
                    TransferResult.EXISTS_WITH_DIFFERENT_FIELDS,
                    differing_field=differing,
                    created_at=record.created_at,
                ),
                None,
            )
        kind = SagaKind.SETTLE if request.settles_pending else SagaKind.TRANSFER
        saga = await self._saga(conn, SagaKey(request.debit.merchant_id, request.id, kind))
        return SagaStart(
            ItemOutcome(0, request.id, record.result, replayed=True, created_at=record.created_at),
            saga,
        )

    async def _lock_with_settlement(
        self, conn: Connection, account: AccountKey, settlement: AccountKey, currency: str
    ) -> tuple[dict[AccountKey, Account], datetime]:
        """Creates the settlement account on first use, locks both accounts, reads the time.

        The shard remembers settlement accounts it has seen (there are few: one per
        peer, currency and stripe), so the INSERT runs only the first time; if one
        it remembers is not visible (its maker has not committed yet, or rolled
        back), the INSERT runs (waiting for that maker) and the lock again."""
        known = self.shard.settlement_accounts
        ensured = settlement not in known
        if ensured:
            await self._ensure_settlement(conn, settlement, currency)
        accounts = await self.shard._lock_accounts(conn, {account, settlement})
        if settlement not in accounts and not ensured:
            # Remembered, but not visible: made by a transaction that has not
            # committed yet (the INSERT waits for it) or that rolled back.
            known.discard(settlement)
            await self._ensure_settlement(conn, settlement, currency)
            accounts = await self.shard._lock_accounts(conn, {account, settlement})
        if settlement in accounts:
            if len(known) >= limits.settlement_accounts_remembered_max:
                known.clear()
            known.add(settlement)
        now: datetime = await conn.fetchval(ledger_sql.NOW)
        return accounts, now

    async def _ensure_settlement(
        self, conn: Connection, settlement: AccountKey, currency: str
    ) -> None:
        await conn.execute(
            sql.ENSURE_SETTLEMENT_ACCOUNT, settlement.merchant_id, settlement.account_id, currency
        )

    async def _saga(self, conn: Connection, key: SagaKey, *, lock: bool = False) -> Saga | None:
        row = await conn.fetchrow(
            sql.LOCK_SAGA if lock else sql.SELECT_SAGA, key.merchant_id, key.transfer_id, key.kind
        )
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

"""The rules that apply transfers and journals to locked account state.

Storage calls these inside one transaction, after locking every account the
batch touches; the functions are pure, so hypothesis can test them directly.
Each check happens before any change, so a refused item changes nothing; a
failed linked chain is undone with an undo log of the changes its members made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from ledger.domain import velocity_counters
from ledger.domain.accounts import Account, AccountKey, Balances
from ledger.domain.chain import chained_entry
from ledger.domain.transfers import (
    Direction,
    Entry,
    EntryKind,
    JournalRequest,
    PendingState,
    Resolution,
    TransferAction,
    TransferKey,
    TransferRecord,
    TransferRequest,
    TransferResult,
)
from ledger.domain.value import value
from ledger.domain.velocity import (
    DirectionRules,
    UsageKey,
    VelocityUsage,
    by_direction,
)
from ledger.invariant import invariant
from ledger.limits import AMOUNT_MINOR_MAX


@value
class AccountState:
    """An account's mutable part while a batch is applied."""

    balances: Balances
    entry_count: int
    head_hash: bytes


def advanced(account: Account, state: AccountState) -> Account:
    """The account after a plan's writes, for applying a further plan to it."""
    return replace(
        account,
        balances=state.balances,
        entry_count=state.entry_count,
        head_hash=state.head_hash,
    )


def with_velocity(account: Account, mine: Sequence[VelocityAdd]) -> Account:
    """The account after a plan's velocity adds to it, for applying a further plan to
    it in the same transaction (its loaded usage then includes them)."""
    invariant(all(v.account == account.key for v in mine), "the account's own adds")
    if not mine or account.velocity_used is None:
        return account
    used = dict(account.velocity_used)
    for v in mine:
        key = (v.direction, v.window_s)
        used[key] = used.get(key, VelocityUsage()).plus(v.amount_minor, v.count)
    return replace(account, velocity_used=used)


def state_of(account: Account) -> AccountState:
    return AccountState(account.balances, account.entry_count, account.head_hash)


def booked(
    state: AccountState,
    *,
    account: AccountKey,
    transfer: TransferKey,
    direction: Direction,
    kind: EntryKind,
    amount_minor: int,
    now: datetime,
) -> tuple[Entry, AccountState]:
    """One entry on an account outside a transfer's rules (settlement bookings of
    moves and relays), chained to its head, and the account's state after it."""
    b = state.balances
    change = -amount_minor if kind is EntryKind.PENDING_RELEASED else amount_minor
    if kind is EntryKind.POSTED:
        column = "debits_posted" if direction is Direction.DEBIT else "credits_posted"
    else:
        column = "debits_pending" if direction is Direction.DEBIT else "credits_pending"
    after = replace(b, **{column: getattr(b, column) + change})
    invariant(
        after.debits_pending >= 0 and after.credits_pending >= 0,
        "a booking releases only what an account holds",
    )
    return _chained(state, account, transfer, direction, kind, amount_minor, after, now)


def _chained(
    state: AccountState,
    account: AccountKey,
    transfer: TransferKey,
    direction: Direction,
    kind: EntryKind,
    amount_minor: int,
    balances_after: Balances,
    now: datetime,
) -> tuple[Entry, AccountState]:
    """The entry chained to the account's head, and the account's state after it."""
    entry = chained_entry(
        state.head_hash,
        account=account,
        sequence=state.entry_count + 1,
        transfer=transfer,
        direction=direction,
        kind=kind,
        amount_minor=amount_minor,
        balances_after=balances_after,
        created_at=now,
    )
    return entry, AccountState(balances_after, entry.sequence, entry.hash)


@value
class PendingView:
    record: TransferRecord
    state: PendingState


@value
class FarReversal:
    """One side of a reversal whose parties are on two shards (docs/sagas.md), as
    that side's shard knows it; a settlement account stands in the request for the
    other party's account.

    On the debit shard (step 1), where every reversal of the original is, what the
    original posted to the reversal's debit account bounds them (credited_minor);
    on the credit shard (step 2, credited_minor None), where the original's record
    is, the original must be a posted transfer between these two accounts.
    """

    debit: AccountKey
    credit: AccountKey
    credited_minor: int | None = None


@value
class TransferBatchState:
    """Everything the rules read, loaded under the batch's locks."""

    accounts: Mapping[AccountKey, Account]
    existing: Mapping[TransferKey, TransferRecord]
    taken_by_journal: frozenset[TransferKey]
    pendings: Mapping[TransferKey, PendingView]
    reversal_targets: Mapping[TransferKey, TransferRecord]
    reversed_minor: Mapping[TransferKey, int]
    now: datetime
    # By the key of the request that carries it (a saga step's).
    far_reversals: Mapping[TransferKey, FarReversal] = field(default_factory=dict)


@value
class ItemOutcome:
    index: int
    id: str
    result: TransferResult
    replayed: bool = False
    differing_field: str = ""
    created_at: datetime | None = None
    # For EXCEEDS_VELOCITY_LIMIT: the rule that refused the item (a fresh outcome only).
    refused_by_rule: str = ""


@value
class VelocityAdd:
    """What a plan adds to one bucket of an account's velocity counters."""

    account: AccountKey
    direction: Direction
    window_s: int
    bucket_index: int
    amount_minor: int
    count: int


@dataclass(slots=True)
class TransferBatchPlan:
    """What to write: new records, entries, resolutions and final account states."""

    outcomes: list[ItemOutcome] = field(default_factory=list)
    records: list[TransferRecord] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    resolutions: list[Resolution] = field(default_factory=list)
    accounts: dict[AccountKey, AccountState] = field(default_factory=dict)
    velocity: list[VelocityAdd] = field(default_factory=list)

    @property
    def expiring_pendings(self) -> list[TransferRecord]:
        return [r for r in self.records if r.expires_at is not None]


class _Refused(Exception):
    def __init__(self, result: TransferResult, rule_id: str = "") -> None:
        super().__init__(result.name)
        self.result = result
        self.rule_id = rule_id


_MISSING: Any = object()


class _BatchRun:
    """Working state for one batch, with an undo log for linked chains."""

    def __init__(self, state: TransferBatchState) -> None:
        self.state = state
        self.plan = TransferBatchPlan()
        self.work: dict[AccountKey, AccountState] = {
            key: AccountState(a.balances, a.entry_count, a.head_hash)
            for key, a in state.accounts.items()
        }
        self.new_records: dict[TransferKey, TransferRecord] = {}
        self.pending_states: dict[TransferKey, PendingState] = {}
        self.reversed_extra: dict[TransferKey, int] = {}
        # Per account and direction: its rules and loaded usage, and what earlier
        # items of this batch added (undone with a failed chain).
        self.velocity_counted: dict[tuple[AccountKey, Direction], _Counted] = {}
        self.undo: list[tuple[dict[Any, Any], Any, Any]] = []

    def set(self, target: dict[Any, Any], key: Any, value: Any) -> None:
        self.undo.append((target, key, target.get(key, _MISSING)))
        target[key] = value

    def checkpoint(self) -> tuple[int, int, int, int]:
        p = self.plan
        return (len(self.undo), len(p.entries), len(p.resolutions), len(p.records))

    def rollback(self, mark: tuple[int, int, int, int]) -> None:
        undo_len, entries_len, resolutions_len, records_len = mark
        while len(self.undo) > undo_len:
            target, key, old = self.undo.pop()
            if old is _MISSING:
                del target[key]
            else:
                target[key] = old
        del self.plan.entries[entries_len:]
        del self.plan.resolutions[resolutions_len:]
        del self.plan.records[records_len:]

    # Lookups that see earlier items of the same batch.

    def record(self, key: TransferKey) -> TransferRecord | None:
        return self.new_records.get(key) or self.state.reversal_targets.get(key)

    def pending(self, key: TransferKey) -> PendingView | None:
        new = self.new_records.get(key)
        if new is not None:
            return PendingView(new, self.pending_states.get(key, PendingState.PENDING))
        view = self.state.pendings.get(key)
        if view is None:
            return None
        return PendingView(view.record, self.pending_states.get(key, view.state))

    def post_entry(
        self,
        key: AccountKey,
        transfer: TransferKey,
        direction: Direction,
        kind: EntryKind,
        amount_minor: int,
        balances_after: Balances,
    ) -> None:
        entry, after = _chained(
            self.work[key],
            key,
            transfer,
            direction,
            kind,
            amount_minor,
            balances_after,
            self.state.now,
        )
        self.set(self.work, key, after)
        self.plan.entries.append(entry)


def apply_transfers(
    requests: Sequence[TransferRequest], state: TransferBatchState
) -> TransferBatchPlan:
    """Applies requests in order; linked runs succeed or fail together."""
    run = _BatchRun(state)
    outcomes: list[ItemOutcome | None] = [None] * len(requests)
    start = 0
    while start < len(requests):
        end = start
        while end < len(requests) and requests[end].linked:
            end += 1
        if end == len(requests):
            _refuse_open_chain(run, requests, start, outcomes)
            break
        _apply_chain(run, requests, start, end, outcomes)
        start = end + 1
    run.plan.outcomes = [o for o in outcomes if o is not None]
    invariant(len(run.plan.outcomes) == len(requests), "every request has one outcome")
    run.plan.accounts = {
        key: s for key, s in run.work.items() if s.entry_count != state.accounts[key].entry_count
    }
    run.plan.velocity = _velocity_adds(run)
    return run.plan


def _velocity_adds(run: _BatchRun) -> list[VelocityAdd]:
    adds = []
    # bucket_index() for each window, with the clock read once.
    now_s = int(run.state.now.timestamp())
    for (account, direction), (view, batch_minor, batch_count) in run.velocity_counted.items():
        # Every movement counts once at least: no count, nothing counted here.
        if view is None or not batch_count:
            continue
        for window_s, width_s in zip(view.rules.windows_s, view.rules.widths_s, strict=True):
            adds.append(
                VelocityAdd(
                    account, direction, window_s, now_s // width_s, batch_minor, batch_count
                )
            )
    return adds


def _refuse_open_chain(
    run: _BatchRun,
    requests: Sequence[TransferRequest],
    start: int,
    outcomes: list[ItemOutcome | None],
) -> None:
    last = len(requests) - 1
    for index in range(start, len(requests)):
        result = (
            TransferResult.LINKED_EVENT_CHAIN_OPEN
            if index == last
            else TransferResult.LINKED_EVENT_FAILED
        )
        outcomes[index] = _replay_or_fail(run, index, requests[index], result)


def _replay_or_fail(
    run: _BatchRun, index: int, request: TransferRequest, result: TransferResult
) -> ItemOutcome:
    replay = _replay(run, index, request)
    if replay is not None:
        return replay
    return _record_failure(run, index, request, result)


def _apply_chain(
    run: _BatchRun,
    requests: Sequence[TransferRequest],
    start: int,
    end: int,
    outcomes: list[ItemOutcome | None],
) -> None:
    mark = run.checkpoint()
    chain_outcomes: list[ItemOutcome] = []
    failed_at = -1
    for index in range(start, end + 1):
        request = requests[index]
        outcome = _replay(run, index, request)
        if outcome is None:
            try:
                outcome = _apply_one(run, index, request)
            except _Refused as refused:
                outcome = ItemOutcome(
                    index, request.id, refused.result, refused_by_rule=refused.rule_id
                )
        chain_outcomes.append(outcome)
        if outcome.result is not TransferResult.OK:
            failed_at = index
            break
    if failed_at < 0:
        for outcome in chain_outcomes:
            outcomes[outcome.index] = outcome
        return
    run.rollback(mark)
    for index in range(start, end + 1):
        request = requests[index]
        failure = chain_outcomes[-1]
        if index == failed_at:
            if failure.replayed or failure.differing_field:
                outcomes[index] = failure
            else:
                outcomes[index] = replace(
                    _record_failure(run, index, request, failure.result),
                    refused_by_rule=failure.refused_by_rule,
                )
        else:
            outcomes[index] = _replay_or_fail(
                run, index, request, TransferResult.LINKED_EVENT_FAILED
            )


def _replay(run: _BatchRun, index: int, request: TransferRequest) -> ItemOutcome | None:
    key = request.key
    if key in run.state.taken_by_journal:
        return ItemOutcome(
            index, request.id, TransferResult.EXISTS_WITH_DIFFERENT_FIELDS, differing_field="kind"
        )
    # An id seen earlier in this same batch (concurrent duplicates batched
    # together) replays that item's outcome, exactly as a stored one would.
    existing = run.state.existing.get(key) or run.new_records.get(key)
    if existing is None:
        return None
    differing = existing.differing_field(request)
    if differing is not None:
        return ItemOutcome(
            index,
            request.id,
            TransferResult.EXISTS_WITH_DIFFERENT_FIELDS,
            differing_field=differing,
            created_at=existing.created_at,
        )
    return ItemOutcome(
        index, request.id, existing.result, replayed=True, created_at=existing.created_at
    )


def _record_failure(
    run: _BatchRun, index: int, request: TransferRequest, result: TransferResult
) -> ItemOutcome:
    """A failed id stays failed: the failure is stored like a success, without money."""
    invariant(result is not TransferResult.OK, "a failure has a failure code")
    record = TransferRecord(
        request=request, result=result, amount_effective_minor=0, created_at=run.state.now
    )
    run.plan.records.append(record)
    run.set(run.new_records, record.key, record)
    return ItemOutcome(index, request.id, result, created_at=run.state.now)


def _apply_one(run: _BatchRun, index: int, request: TransferRequest) -> ItemOutcome:
    if request.settles_pending:
        record = _settle_pending(run, request)
    else:
        record = _post_or_reserve(run, request)
    run.plan.records.append(record)
    run.set(run.new_records, record.key, record)
    return ItemOutcome(index, request.id, TransferResult.OK, created_at=record.created_at)


def _check_accounts(run: _BatchRun, request: TransferRequest) -> tuple[Account, Account]:
    credit_key = request.credit
    invariant(credit_key is not None, "validated: post and pending name a credit account")
    assert credit_key is not None
    if request.debit == credit_key:
        raise _Refused(TransferResult.ACCOUNTS_MUST_BE_DIFFERENT)
    debit = run.state.accounts.get(request.debit)
    if debit is None:
        raise _Refused(TransferResult.DEBIT_ACCOUNT_NOT_FOUND)
    credit = run.state.accounts.get(credit_key)
    if credit is None:
        raise _Refused(TransferResult.CREDIT_ACCOUNT_NOT_FOUND)
    if request.currency != debit.spec.currency or request.currency != credit.spec.currency:
        raise _Refused(TransferResult.CURRENCY_MISMATCH)
    if debit.closed:
        raise _Refused(TransferResult.DEBIT_ACCOUNT_CLOSED)
    if credit.closed:
        raise _Refused(TransferResult.CREDIT_ACCOUNT_CLOSED)
    return debit, credit


def _check_reversal(run: _BatchRun, request: TransferRequest) -> TransferKey | None:
    """The original this reversal reverses, if the rules allow it; None if it is none
    (or, on a reversal's credit shard, if the amount is its debit shard's to check)."""
    if not request.reversal_of:
        return None
    far = run.state.far_reversals.get(request.key)
    debit, credit = (far.debit, far.credit) if far else (request.debit, request.credit)
    assert credit is not None
    # The original debited this reversal's credit merchant: that is its home.
    target_key = TransferKey(credit.merchant_id, request.reversal_of)
    if far is not None and far.credited_minor is not None:
        # The original's record is on the credit shard (step 2 checks it there).
        if far.credited_minor == 0:
            raise _Refused(TransferResult.REVERSAL_TARGET_NOT_FOUND)
        posted_minor = far.credited_minor
    else:
        target = run.record(target_key)
        if target is None or target.result is not TransferResult.OK:
            raise _Refused(TransferResult.REVERSAL_TARGET_NOT_FOUND)
        posted_minor = target.amount_effective_minor
        t = target.request
        if (
            t.action not in (TransferAction.POST, TransferAction.POST_PENDING)
            or posted_minor == 0
            or debit != t.credit
            or credit != t.debit
            or request.currency != t.currency
        ):
            raise _Refused(TransferResult.REVERSAL_ACCOUNTS_MISMATCH)
        if far is not None:
            return None
    reversed_minor = run.state.reversed_minor.get(target_key, 0) + run.reversed_extra.get(
        target_key, 0
    )
    if reversed_minor + request.amount_minor > posted_minor:
        raise _Refused(TransferResult.REVERSAL_EXCEEDS_ORIGINAL)
    return target_key


def _check_fits(*balances: Balances) -> None:
    for b in balances:
        # Each balance, and posted plus pending per side, must fit a bigint.
        if not b.fits() or not (
            b.debits_posted + b.debits_pending <= AMOUNT_MINOR_MAX
            and b.credits_posted + b.credits_pending <= AMOUNT_MINOR_MAX
        ):
            raise _Refused(TransferResult.OVERFLOW)


def _check_limits(
    debit: Account, debit_after: Balances, credit: Account, credit_after: Balances
) -> None:
    if debit.spec.debits_must_not_exceed_credits and (
        debit_after.debits_posted + debit_after.debits_pending > debit_after.credits_posted
    ):
        raise _Refused(TransferResult.EXCEEDS_CREDITS)
    if credit.spec.credits_must_not_exceed_debits and (
        credit_after.credits_posted + credit_after.credits_pending > credit_after.debits_posted
    ):
        raise _Refused(TransferResult.EXCEEDS_DEBITS)


@dataclass(frozen=True, slots=True)
class _VelocityView:
    """An account's rules of one direction with its usage as loaded under its lock,
    by window (the rules' DirectionRules order), for the per-item check. Not exact:
    the bases are upper bounds of the usage (velocity_counters.Usage.bounds), and an
    item they would refuse is checked again against the exact usage.

    Every movement adds the same amount and count to each window of its direction,
    so what the batch may add before some rule refuses is one amount and one count:
    the least limit - base over the amount rules (over the count rules)."""

    rules: DirectionRules
    base_amounts: tuple[int, ...]
    base_counts: tuple[int, ...]
    exact: bool
    amount_room: int
    count_room: int


# Room where no rule of the metric bounds it: above any sum of int64 amounts.
_UNBOUNDED = 2**127


def _view(
    rules: DirectionRules, amounts: tuple[int, ...], counts: tuple[int, ...], *, exact: bool
) -> _VelocityView:
    amount_room = count_room = _UNBOUNDED
    for i, is_amount, limit, _ in rules.checks:
        if is_amount:
            amount_room = min(amount_room, limit - amounts[i])
        else:
            count_room = min(count_room, limit - counts[i])
    return _VelocityView(rules, amounts, counts, exact, amount_room, count_room)


# Per (account, direction): the view, and what earlier items of the batch added to
# each of its windows (amount, count); no view: the direction has no rules.
_Counted = tuple[_VelocityView | None, int, int]
_NO_RULES: _Counted = (None, 0, 0)


def _velocity_view(run: _BatchRun, account: Account, direction: Direction) -> _Counted:
    """What a batch starts from, per (account, direction): built on its first item."""
    rules = by_direction(account.velocity_rules).get(direction)
    if rules is None:
        return _NO_RULES
    loaded = account.velocity_used
    invariant(loaded is not None, "an account with velocity rules has its usage loaded")
    assert loaded is not None and account.velocity_read_at is not None
    # Loaded windows end at velocity_read_at; one ending later would miss events.
    invariant(
        account.velocity_read_at <= run.state.now, "velocity usage is read before the check's time"
    )
    if isinstance(loaded, velocity_counters.Usage):
        # Storage's usage: bounds first. Most movements pass far below their limits,
        # and a whole ring's sum costs a fraction of the window's exact one.
        amounts, counts = loaded.bounds(direction, rules.windows_s)
        return _view(rules, amounts, counts, exact=False), 0, 0
    return _exact_view(rules, loaded, direction), 0, 0


def _exact_view(
    rules: DirectionRules, loaded: Mapping[UsageKey, VelocityUsage], direction: Direction
) -> _VelocityView:
    if isinstance(loaded, velocity_counters.Usage):
        amounts, counts = loaded.totals(direction, rules.windows_s)
        return _view(rules, amounts, counts, exact=True)
    usage = [loaded.get((direction, w)) for w in rules.windows_s]
    invariant(None not in usage, "every rule's window was loaded")
    return _view(
        rules,
        tuple(u.amount_minor for u in usage),  # type: ignore[union-attr]
        tuple(u.count for u in usage),  # type: ignore[union-attr]
        exact=True,
    )


def _count_velocity(
    run: _BatchRun, account: Account, direction: Direction, amount_minor: int, count: int
) -> None:
    """Checks one more movement against the account's rules of its direction
    (refusing_rule in ledger/domain/velocity.py, over the usage loaded under the lock
    plus this batch's), then counts it. A refusal raises; the caller's rollback undoes
    what the item counted before it (its debit side, when its credit side refuses)."""
    key = (account.key, direction)
    counted = run.velocity_counted.get(key)
    if counted is None:
        # The starting point, not a change: a rollback keeps it.
        counted = run.velocity_counted[key] = _velocity_view(run, account, direction)
    view, batch_minor, batch_count = counted
    if view is None:
        return
    if batch_minor + amount_minor > view.amount_room or batch_count + count > view.count_room:
        if not view.exact:
            # Over a bound only: the exact usage decides. A refinement, not a change,
            # so not in the undo log (a rollback to the bounds is only slower).
            assert account.velocity_used is not None
            exact = _exact_view(view.rules, account.velocity_used, direction)
            run.velocity_counted[key] = (exact, batch_minor, batch_count)
            _count_velocity(run, account, direction, amount_minor, count)
            return
        # Some rule refuses: the first in refusing_rule's order.
        for i, is_amount, limit, rule_id in view.rules.checks:
            if is_amount:
                over = view.base_amounts[i] + batch_minor + amount_minor > limit
            else:
                over = view.base_counts[i] + batch_count + count > limit
            if over:
                raise _Refused(TransferResult.EXCEEDS_VELOCITY_LIMIT, rule_id)
        invariant(False, "past a view's room, one of its rules refuses")
    run.set(run.velocity_counted, key, (view, batch_minor + amount_minor, batch_count + count))


def _post_or_reserve(run: _BatchRun, request: TransferRequest) -> TransferRecord:
    debit, credit = _check_accounts(run, request)
    reversal_target = _check_reversal(run, request)
    amount = request.amount_minor
    db = run.work[debit.key].balances
    cb = run.work[credit.key].balances
    # Balances built directly, not with dataclasses.replace: this is the per-item hot path.
    if request.action is TransferAction.POST:
        kind = EntryKind.POSTED
        db_after = Balances(
            db.debits_posted + amount, db.credits_posted, db.debits_pending, db.credits_pending
        )
        cb_after = Balances(
            cb.debits_posted, cb.credits_posted + amount, cb.debits_pending, cb.credits_pending
        )
    else:
        invariant(request.action is TransferAction.PENDING, "only post and pending here")
        kind = EntryKind.PENDING
        db_after = Balances(
            db.debits_posted, db.credits_posted, db.debits_pending + amount, db.credits_pending
        )
        cb_after = Balances(
            cb.debits_posted, cb.credits_posted, cb.debits_pending, cb.credits_pending + amount
        )
    _check_fits(db_after, cb_after)
    _check_limits(debit, db_after, credit, cb_after)
    # Posted and pending alike count at creation (see ledger/domain/velocity.py).
    if debit.velocity_rules:
        _count_velocity(run, debit, Direction.DEBIT, amount, 1)
    if credit.velocity_rules:
        _count_velocity(run, credit, Direction.CREDIT, amount, 1)
    key = request.key
    run.post_entry(debit.key, key, Direction.DEBIT, kind, amount, db_after)
    run.post_entry(credit.key, key, Direction.CREDIT, kind, amount, cb_after)
    if reversal_target is not None:
        run.set(
            run.reversed_extra,
            reversal_target,
            run.reversed_extra.get(reversal_target, 0) + amount,
        )
    expires_at = None
    if request.action is TransferAction.PENDING and request.timeout_ms > 0:
        expires_at = run.state.now + timedelta(milliseconds=request.timeout_ms)
    return TransferRecord(
        request=request,
        result=TransferResult.OK,
        amount_effective_minor=amount,
        created_at=run.state.now,
        expires_at=expires_at,
    )


def _settle_pending(run: _BatchRun, request: TransferRequest) -> TransferRecord:
    pending_key = TransferKey(request.debit.merchant_id, request.pending_id)
    view = run.pending(pending_key)
    if view is None or view.record.result is not TransferResult.OK:
        raise _Refused(TransferResult.PENDING_TRANSFER_NOT_FOUND)
    pending = view.record
    p = pending.request
    if p.action is not TransferAction.PENDING:
        raise _Refused(TransferResult.PENDING_TRANSFER_NOT_PENDING)
    if (
        request.debit != p.debit
        or (request.credit is not None and request.credit != p.credit)
        or (request.currency != "" and request.currency != p.currency)
    ):
        raise _Refused(TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_ACCOUNTS)
    if view.state is PendingState.POSTED:
        raise _Refused(TransferResult.PENDING_TRANSFER_ALREADY_POSTED)
    if view.state is PendingState.VOIDED:
        raise _Refused(TransferResult.PENDING_TRANSFER_ALREADY_VOIDED)
    if view.state is PendingState.EXPIRED or is_expired(pending, run.state.now):
        raise _Refused(TransferResult.PENDING_TRANSFER_EXPIRED)
    pending_minor = pending.amount_effective_minor
    posting = request.action is TransferAction.POST_PENDING
    if posting:
        amount = request.amount_minor or pending_minor
        if amount > pending_minor:
            raise _Refused(TransferResult.EXCEEDS_PENDING_AMOUNT)
    else:
        if request.amount_minor not in (0, pending_minor):
            raise _Refused(TransferResult.EXCEEDS_PENDING_AMOUNT)
        amount = 0
    invariant(p.credit is not None, "a pending transfer has a credit account")
    assert p.credit is not None
    invariant(
        p.debit in run.work and p.credit in run.work, "a pending transfer's accounts are locked"
    )
    key = request.key
    db = run.work[p.debit].balances
    cb = run.work[p.credit].balances
    db_released = replace(db, debits_pending=db.debits_pending - pending_minor)
    cb_released = replace(cb, credits_pending=cb.credits_pending - pending_minor)
    db_after = replace(db_released, debits_posted=db_released.debits_posted + amount)
    cb_after = replace(cb_released, credits_posted=cb_released.credits_posted + amount)
    invariant(db_released.debits_pending >= 0 and cb_released.credits_pending >= 0, "pending >= 0")
    _check_fits(db_after, cb_after)
    run.post_entry(
        p.debit, key, Direction.DEBIT, EntryKind.PENDING_RELEASED, pending_minor, db_released
    )
    run.post_entry(
        p.credit, key, Direction.CREDIT, EntryKind.PENDING_RELEASED, pending_minor, cb_released
    )
    if amount > 0:
        run.post_entry(p.debit, key, Direction.DEBIT, EntryKind.POSTED, amount, db_after)
        run.post_entry(p.credit, key, Direction.CREDIT, EntryKind.POSTED, amount, cb_after)
    state = PendingState.POSTED if posting else PendingState.VOIDED
    run.set(run.pending_states, pending_key, state)
    run.plan.resolutions.append(Resolution(pending_key, state, request.id, run.state.now))
    filled = replace(request, credit=p.credit, currency=p.currency)
    return TransferRecord(
        request=filled,
        result=TransferResult.OK,
        amount_effective_minor=amount,
        created_at=run.state.now,
    )


def is_expired(pending: TransferRecord, now: datetime) -> bool:
    return pending.expires_at is not None and pending.expires_at <= now


def pending_state_at(view: PendingView, now: datetime) -> PendingState:
    """The state a caller sees: a due timeout counts as expired before the sweep runs."""
    if view.state is PendingState.PENDING and is_expired(view.record, now):
        return PendingState.EXPIRED
    return view.state


@dataclass(slots=True)
class ExpiryPlan:
    entries: list[Entry]
    resolution: Resolution
    accounts: dict[AccountKey, AccountState]


def expire_pending(
    pending: TransferRecord, accounts: Mapping[AccountKey, Account], now: datetime
) -> ExpiryPlan:
    """Releases a due pending transfer's reservation on both accounts."""
    p = pending.request
    invariant(p.action is TransferAction.PENDING and pending.result is TransferResult.OK, "pending")
    invariant(is_expired(pending, now), "only due pending transfers expire")
    assert p.credit is not None
    run = _BatchRun(TransferBatchState(accounts, {}, frozenset(), {}, {}, {}, now))
    amount = pending.amount_effective_minor
    db = run.work[p.debit].balances
    cb = run.work[p.credit].balances
    run.post_entry(
        p.debit,
        pending.key,
        Direction.DEBIT,
        EntryKind.PENDING_RELEASED,
        amount,
        replace(db, debits_pending=db.debits_pending - amount),
    )
    run.post_entry(
        p.credit,
        pending.key,
        Direction.CREDIT,
        EntryKind.PENDING_RELEASED,
        amount,
        replace(cb, credits_pending=cb.credits_pending - amount),
    )
    return ExpiryPlan(
        entries=run.plan.entries,
        resolution=Resolution(pending.key, PendingState.EXPIRED, "", now),
        accounts={k: run.work[k] for k in (p.debit, p.credit)},
    )


@dataclass(slots=True)
class JournalPlan:
    result: TransferResult
    failed_posting_index: int = -1
    entries: list[Entry] = field(default_factory=list)
    accounts: dict[AccountKey, AccountState] = field(default_factory=dict)
    velocity: list[VelocityAdd] = field(default_factory=list)
    refused_by_rule: str = ""


def apply_journal(
    request: JournalRequest, accounts: Mapping[AccountKey, Account], now: datetime
) -> JournalPlan:
    """Applies all postings or none; limits are checked on the final balances."""
    totals: dict[str, int] = {}
    for posting in request.postings:
        sign = 1 if posting.direction is Direction.DEBIT else -1
        totals[posting.currency] = totals.get(posting.currency, 0) + sign * posting.amount_minor
    invariant(all(v == 0 for v in totals.values()), "validated: journal postings balance")
    run = _BatchRun(TransferBatchState(accounts, {}, frozenset(), {}, {}, {}, now))
    key = request.key
    for index, posting in enumerate(request.postings):
        account = accounts.get(posting.account)
        debit = posting.direction is Direction.DEBIT
        if account is None:
            return JournalPlan(
                TransferResult.DEBIT_ACCOUNT_NOT_FOUND
                if debit
                else TransferResult.CREDIT_ACCOUNT_NOT_FOUND,
                index,
            )
        if account.spec.currency != posting.currency:
            return JournalPlan(TransferResult.CURRENCY_MISMATCH, index)
        if account.closed:
            return JournalPlan(
                TransferResult.DEBIT_ACCOUNT_CLOSED
                if debit
                else TransferResult.CREDIT_ACCOUNT_CLOSED,
                index,
            )
        b = run.work[posting.account].balances
        after = (
            replace(b, debits_posted=b.debits_posted + posting.amount_minor)
            if debit
            else replace(b, credits_posted=b.credits_posted + posting.amount_minor)
        )
        try:
            _check_fits(after)
        except _Refused as refused:
            return JournalPlan(refused.result, index)
        run.post_entry(
            posting.account, key, posting.direction, EntryKind.POSTED, posting.amount_minor, after
        )
    for index, posting in enumerate(request.postings):
        account = accounts[posting.account]
        final = run.work[posting.account].balances
        try:
            _check_limits(account, final, account, final)
        except _Refused as refused:
            return JournalPlan(refused.result, index)
    # Velocity: each posting counts as one movement of its account, checked in
    # order against the usage before the journal plus the earlier postings.
    for index, posting in enumerate(request.postings):
        account = accounts[posting.account]
        if not account.velocity_rules:
            continue
        try:
            _count_velocity(run, account, posting.direction, posting.amount_minor, 1)
        except _Refused as refused:
            return JournalPlan(refused.result, index, refused_by_rule=refused.rule_id)
    return JournalPlan(
        TransferResult.OK,
        entries=run.plan.entries,
        accounts={k: s for k, s in run.work.items() if s.entry_count != accounts[k].entry_count},
        velocity=_velocity_adds(run),
    )

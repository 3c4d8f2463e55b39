"""Cross-shard sagas: their vocabulary, and the pure rules of each side's step.

A transfer from merchant A on shard S to merchant B on shard T is carried by
settlement accounts, so each shard stays balanced on its own at every moment:

    step 1, on S: A's account  --(pending)-->  S's settlement account for T
    step 2, on T: T's settlement account for S  -->  B's account (or a refusal)
    step 3, on S: the reservation is posted (completed) or released (compensated)

Settling a cross-shard pending transfer (post, void, timeout) applies S's side
first, where the decision is made once, then T's side, which cannot refuse.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from enum import IntEnum

from ledger.domain.accounts import Account, AccountKey
from ledger.domain.chain import chained_entry
from ledger.domain.engine import (
    AccountState,
    FarReversal,
    PendingView,
    TransferBatchPlan,
    TransferBatchState,
    apply_transfers,
    booked,
    state_of,
)
from ledger.domain.transfers import (
    Direction,
    Entry,
    EntryKind,
    PendingState,
    TransferAction,
    TransferKey,
    TransferRecord,
    TransferRequest,
    TransferResult,
)
from ledger.domain.value import value
from ledger.invariant import invariant

# The reserved merchant that owns every shard's settlement accounts. Caller
# ids may not start with '$', so callers can never address these accounts.
SETTLEMENT_MERCHANT_ID = "$settlement"
RESERVED_ID_PREFIX = "$"


class SagaKind(IntEnum):
    TRANSFER = 1
    SETTLE = 2
    EXPIRE = 3


class SagaState(IntEnum):
    RUNNING = 1
    COMPLETED = 2
    COMPENSATED = 3
    DEAD = 4


class CreditAction(IntEnum):
    """What step 2 does on the credit shard."""

    POST = 1
    PENDING = 2
    POST_PENDING = 3
    RELEASE = 4


class CreditOutcome(IntEnum):
    APPLIED = 1
    REFUSED = 2
    ABORTED = 3


@value
class CreditRecord:
    """What step 2 recorded for a saga, and the shard that applied the credit.

    credited_on differs from the saga's peer shard when the credit merchant
    moved between step 1 and step 2: the credit follows the merchant, and step
    3 moves the reservation to the settlement account that mirrors it.
    """

    outcome: CreditOutcome
    result: TransferResult
    credited_on: str
    # Set when this shard only relayed a settle of a hold whose party moved on:
    # the shard that continues it (see ledger/domain/moves.py), and the number
    # of the relay passed on the hold's path (None on an unnumbered path).
    relayed_to: str = ""
    relayed_position: int | None = None


# Each (peer shard, currency) has this many settlement accounts, so concurrent
# sagas between two shards do not all queue on one row lock.
SETTLEMENT_STRIPES = 16


# Hex digits of a transfer key's digest in its own settlement account's id (128 bits).
OWN_DIGEST_HEX = 32


def settlement_stripe(transfer_id: str) -> int:
    """The stripe a transfer's money goes through; stable, so every step agrees."""
    return zlib.crc32(transfer_id.encode()) % SETTLEMENT_STRIPES


def settlement_account(peer_shard: str, currency: str, transfer_id: str) -> AccountKey:
    """This shard's settlement account for a transfer to or from peer_shard.

    transfer_id is the transfer that reserved the money (for a settle or an
    expiry: the pending transfer), so all steps of all its sagas use one stripe.
    """
    stripe = settlement_stripe(transfer_id)
    return AccountKey(SETTLEMENT_MERCHANT_ID, f"{peer_shard}/{currency}/{stripe}")


def own_settlement_account(peer_shard: str, currency: str, key: TransferKey) -> AccountKey:
    """This shard's settlement account for peer_shard that holds one transfer's
    money alone: made only when the transfer's stripe has no room for it
    (ledger/storage/settlement_legs.py). Named by a digest of the transfer's key,
    so any merchant and transfer id fit an account id."""
    digest = hashlib.sha256(f"{key.merchant_id}\0{key.transfer_id}".encode()).hexdigest()
    return AccountKey(
        SETTLEMENT_MERCHANT_ID, f"{peer_shard}/{currency}/t-{digest[:OWN_DIGEST_HEX]}"
    )


@value(order=True)
class SagaKey:
    merchant_id: str
    transfer_id: str
    kind: SagaKind

    @property
    def transfer(self) -> TransferKey:
        return TransferKey(self.merchant_id, self.transfer_id)


@value
class Saga:
    key: SagaKey
    state: SagaState
    next_step: int
    # The debit shard (where the saga row lives) and the credit shard at step 1;
    # each one's settlement account for the other carries the money.
    home_shard: str
    peer_shard: str
    debit: AccountKey
    credit: AccountKey
    currency: str
    credit_action: CreditAction
    amount_minor: int
    pending_minor: int
    pending_id: str
    result: TransferResult | None
    credit_outcome: CreditOutcome | None
    attempts: int
    next_attempt_at: datetime
    last_error: str
    version: int
    trace_context: str
    created_at: datetime
    updated_at: datetime
    # The number of the debit party's end on its hold's path (a settle's and an
    # expiry's: the hold's at their start); None on a path made before numbers
    # (migration 0020).
    path_position: int | None = 0
    # A reversal's original (its credit merchant's transfer); '' for any other saga.
    reversal_of: str = ""

    @property
    def finished(self) -> bool:
        return self.state in (SagaState.COMPLETED, SagaState.COMPENSATED)


@value
class SagaStep:
    step: int
    outcome: str
    detail: str
    at: datetime


def local_view(record: TransferRecord, settlement: AccountKey) -> TransferRecord:
    """A cross-shard transfer as its debit shard books it: credited to the
    settlement account that holds its leg (ledger/storage/settlement_legs.py)."""
    return replace(record, request=replace(record.request, credit=settlement))


def rekey(
    plan: TransferBatchPlan, key: TransferKey, accounts: Mapping[AccountKey, Account]
) -> TransferBatchPlan:
    """Entries made through a settlement account name the saga's transfer.

    The transfer is part of each entry's hash, so the chain is rebuilt from the
    accounts' heads before the plan.
    """
    heads = {k: accounts[k].head_hash for k in plan.accounts}
    rekeyed = []
    for e in plan.entries:
        entry = chained_entry(
            heads[e.account],
            account=e.account,
            sequence=e.sequence,
            transfer=key,
            direction=e.direction,
            kind=e.kind,
            amount_minor=e.amount_minor,
            balances_after=e.balances_after,
            created_at=e.created_at,
        )
        heads[e.account] = entry.hash
        rekeyed.append(entry)
    plan.entries = rekeyed
    plan.accounts = {k: replace(s, head_hash=heads[k]) for k, s in plan.accounts.items()}
    return plan


def credit_plan(
    *,
    key: TransferKey,
    action: CreditAction,
    settlement: AccountKey,
    destination: AccountKey,
    currency: str,
    amount_minor: int,
    pending_minor: int,
    pending_id: str,
    accounts: Mapping[AccountKey, Account],
    now: datetime,
    reversal_of: str = "",
    debit: AccountKey | None = None,
    originals: Mapping[TransferKey, TransferRecord] | None = None,
) -> TransferBatchPlan:
    """Step 2 on the credit shard: settlement account -> destination, by the usual rules.

    POST and PENDING can be refused (no account, closed, currency, a limit; a
    reversal whose original, found in originals, is not a posted transfer from
    destination to debit, the saga's debit account); settling a pending credit
    cannot, because the funds are already held.
    """
    empty = TransferBatchState(accounts, {}, frozenset(), {}, {}, {}, now)
    if action in (CreditAction.POST, CreditAction.PENDING):
        request = TransferRequest(
            id=key.transfer_id,
            debit=settlement,
            credit=destination,
            amount_minor=amount_minor,
            currency=currency,
            action=TransferAction.POST if action is CreditAction.POST else TransferAction.PENDING,
            reversal_of=reversal_of,
        )
        state = empty
        if reversal_of:
            invariant(debit is not None, "a reversal's step 2 knows the saga's debit account")
            assert debit is not None
            state = replace(
                empty,
                reversal_targets=originals or {},
                far_reversals={request.key: FarReversal(debit, destination)},
            )
        return rekey(apply_transfers([request], state), key, accounts)
    held = TransferRecord(
        request=TransferRequest(
            id=pending_id,
            debit=settlement,
            credit=destination,
            amount_minor=pending_minor,
            currency=currency,
            action=TransferAction.PENDING,
        ),
        result=TransferResult.OK,
        amount_effective_minor=pending_minor,
        created_at=now,
    )
    settle = TransferRequest(
        id=key.transfer_id,
        debit=settlement,
        credit=None,
        amount_minor=amount_minor if action is CreditAction.POST_PENDING else 0,
        currency="",
        action=(
            TransferAction.POST_PENDING
            if action is CreditAction.POST_PENDING
            else TransferAction.VOID_PENDING
        ),
        pending_id=pending_id,
    )
    state = replace(empty, pendings={held.key: PendingView(held, PendingState.PENDING)})
    plan = apply_transfers([settle], state)
    invariant(
        plan.outcomes[0].result is TransferResult.OK,
        f"settling a held cross-shard credit cannot be refused: {plan.outcomes[0].result.name}",
    )
    plan.resolutions = []
    return rekey(plan, key, accounts)


def reservation_settle_plan(
    *,
    reservation: TransferRecord,
    post: bool,
    accounts: Mapping[AccountKey, Account],
    now: datetime,
) -> TransferBatchPlan:
    """Step 3 on the debit shard: post or release the reservation step 1 made."""
    # A saga's own reservation ends by the saga, never by a timeout.
    # (Its record reads IN_PROGRESS until the saga finishes; the hold itself stands.)
    reservation = replace(
        reservation,
        expires_at=None,
        result=TransferResult.OK,
        request=replace(reservation.request, action=TransferAction.PENDING),
    )
    request = reservation.request
    settle = TransferRequest(
        id=request.id,
        debit=request.debit,
        credit=None,
        amount_minor=reservation.amount_effective_minor if post else 0,
        currency="",
        action=TransferAction.POST_PENDING if post else TransferAction.VOID_PENDING,
        pending_id=request.id,
    )
    state = TransferBatchState(
        accounts,
        {},
        frozenset(),
        {reservation.key: PendingView(reservation, PendingState.PENDING)},
        {},
        {},
        now,
    )
    plan = apply_transfers([settle], state)
    invariant(
        plan.outcomes[0].result is TransferResult.OK,
        f"a saga's own reservation settles: {plan.outcomes[0].result.name}",
    )
    return plan


def hold_moved_plan(
    *,
    key: TransferKey,
    held_by: Account,
    moved_to: Account,
    amount_minor: int,
    now: datetime,
) -> tuple[list[Entry], dict[AccountKey, AccountState]]:
    """Step 3 on the debit shard when the credit landed on another shard than
    step 1 reserved towards: the hold moves from the settlement account for
    the old peer to the one for the shard that credited, so each mirrors its
    peer again. Both are this shard's accounts: the shard stays balanced."""
    invariant(amount_minor > 0, "a saga's hold is positive")
    entries = []
    states: dict[AccountKey, AccountState] = {}
    for account, kind in (
        (held_by, EntryKind.PENDING_RELEASED),
        (moved_to, EntryKind.PENDING),
    ):
        entry, states[account.key] = booked(
            state_of(account),
            account=account.key,
            transfer=key,
            direction=Direction.CREDIT,
            kind=kind,
            amount_minor=amount_minor,
            now=now,
        )
        entries.append(entry)
    return entries, states


def relay_plan(
    *,
    key: TransferKey,
    incoming: Account,
    outgoing: Account,
    pending_minor: int,
    posted_minor: int,
    now: datetime,
) -> tuple[list[Entry], dict[AccountKey, AccountState]]:
    """A relay hop of a settle (see ledger/domain/moves.py): the settlement account
    for the shard before holds the debit side, the one for the shard after the
    credit side; both are released, and posted_minor posted. They are one account
    when the hold comes back the way it went: its entries then follow each other."""
    invariant(0 <= posted_minor <= pending_minor, "a settle posts at most what is held")
    states = {a.key: state_of(a) for a in (incoming, outgoing)}
    entries: list[Entry] = []
    steps = [
        (incoming.key, Direction.DEBIT, EntryKind.PENDING_RELEASED, pending_minor),
        (outgoing.key, Direction.CREDIT, EntryKind.PENDING_RELEASED, pending_minor),
    ]
    if posted_minor:
        steps += [
            (incoming.key, Direction.DEBIT, EntryKind.POSTED, posted_minor),
            (outgoing.key, Direction.CREDIT, EntryKind.POSTED, posted_minor),
        ]
    for account, direction, kind, amount in steps:
        entry, states[account] = booked(
            states[account],
            account=account,
            transfer=key,
            direction=direction,
            kind=kind,
            amount_minor=amount,
            now=now,
        )
        entries.append(entry)
    return entries, states

"""Merchant moves: the booking that keeps each shard balanced on its own.

A merchant's accounts carry a net position per currency (credits minus debits
posted). When they leave shard S for shard D, S would be left with the
opposite of that position and D with the position itself. Entries on each
side's settlement accounts for the other carry the difference, as a
cross-shard transfer would: S's position accounts for D take the merchant's
net position, D's for S its opposite, and the two mirror (position_account:
numbered, so a position always finds room).
Pending transfers between the merchant's own accounts move with it (their
holds cancel out). A local pending transfer between it and another merchant
that stays becomes a cross-shard one, as if a saga had made it: on the side
that keeps the debit party, the settlement account for the other shard holds
the credit side pending; on the other side, the settlement account for the
first holds the debit side. The two mirror, each shard stays balanced, and a
later post, void or timeout settles it by a saga like any cross-shard hold.

A cross-shard pending transfer it is a party of stays where its other side is
held: the shard it leaves keeps its settlement position for the shard beyond,
and its settlement account for the merchant's new shard takes the leaving
side (pairing with the new shard's account for it). That shard becomes a
relay: a later settle passes through it, settling the hold between its two
settlement accounts, once per settle, on the way to the merchant. The stops
of a hold's path are numbered in path order (CrossHold.path_position), so a
path may pass one shard more than once, each time by a relay of its own.

Unless the merchant moves back to the shard its hold's path passes next (away
and back while the hold stays open): then the move folds that step away. The
shard it arrives on relayed the hold between its settlement accounts for the
shard the merchant leaves and the shard beyond; it releases its leg for the
shard left and drops the relay, and the shard left releases its leg for it,
so the pair still mirrors and the path is one step shorter, not two longer.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from ledger.domain.accounts import Account, AccountKey, Balances
from ledger.domain.chain import chained_entry
from ledger.domain.engine import AccountState, booked, state_of
from ledger.domain.sagas import SETTLEMENT_MERCHANT_ID
from ledger.domain.transfers import Direction, Entry, EntryKind, TransferKey
from ledger.domain.value import value

MOVE_MERCHANT_ID = "$move"


@value
class LocalHold:
    """An open local pending transfer between a moving merchant and one that stays."""

    key: TransferKey
    debit: AccountKey
    credit: AccountKey
    currency: str
    amount_minor: int


@value
class CrossHold:
    """An open cross-shard pending transfer that a moving merchant is a party of.

    The shard it leaves becomes a relay: it keeps its settlement position for
    the shard beyond and takes the leaving side's on its settlement account
    for the merchant's new shard; settling it later passes through there.
    """

    key: TransferKey
    currency: str
    amount_minor: int
    # The moving merchant's side: the debit party, or the credit party.
    debit_party: bool
    # The shard whose settlement account for this one holds the other side: the
    # saga's peer (debit party) or the shard the credit came from (credit party).
    beyond: str
    # The number of the moving party's end on the hold's path (migration 0020:
    # growing from the debit party's end to the credit party's); None on a path
    # made before numbers.
    path_position: int | None


@value
class Holds:
    """What a moving merchant holds pending with others, all carried by its move."""

    local: list[LocalHold]
    cross: list[CrossHold]

    def net_pending_minor(self, merchant_id: str) -> dict[str, int]:
        """Per currency, credits minus debits pending that these leave on the
        merchant's accounts (its holds between its own accounts cancel out)."""
        net: dict[str, int] = {}
        for local in self.local:
            sign = 1 if local.credit.merchant_id == merchant_id else -1
            net[local.currency] = net.get(local.currency, 0) + sign * local.amount_minor
        for cross in self.cross:
            sign = -1 if cross.debit_party else 1
            net[cross.currency] = net.get(cross.currency, 0) + sign * cross.amount_minor
        return net


def carried_hold_booking(
    settlement: Account,
    *,
    amount_minor: int,
    debit: bool,
    key: TransferKey,
    now: datetime,
    folded: bool = False,
) -> tuple[Entry, AccountState]:
    """The pending entry on a settlement account that takes over one side of a hold
    whose other side leaves (debit: it holds the debit side, else the credit side).

    folded: the move folds the hold's path instead (the party moves back to the
    shard its path passes next): the settlement account releases the opposite side,
    which it held for the relay step that the fold removes."""
    return booked(
        state_of(settlement),
        account=settlement.key,
        transfer=key,
        direction=Direction.DEBIT if debit != folded else Direction.CREDIT,
        kind=EntryKind.PENDING_RELEASED if folded else EntryKind.PENDING,
        amount_minor=amount_minor,
        now=now,
    )


def move_key(merchant_id: str, epoch: int) -> TransferKey:
    """Names the entries of one merchant's move, so a rerun can recognise them."""
    return TransferKey(MOVE_MERCHANT_ID, f"{merchant_id}@{epoch}")


def position_account(peer_shard: str, currency: str, generation: int) -> AccountKey:
    """This shard's account for peer_shard that moves book merchants' positions on.

    Kept apart from the transfers' striped settlement accounts, and numbered: an
    account takes at most AMOUNT_MINOR_MAX a side, and a move books what one
    generation cannot take on the next. So neither a transfer that filled a
    stripe nor a position larger than one account can hold stops a merchant
    from moving (tests/test_settlement_capacity.py). Nothing settles against
    these later; reconcile sums every settlement account per peer and currency.
    """
    return AccountKey(SETTLEMENT_MERCHANT_ID, f"{peer_shard}/{currency}/moves-{generation}")


def position_minor(net_posted: int, *, leaving: bool) -> int:
    """What one side's settlement account for the other takes for a merchant with
    net_posted: credited when positive, debited when negative.

    leaving: this is the shard the merchant leaves (it takes the merchant's
    position); otherwise the shard it arrives on (it takes the opposite).
    """
    return net_posted if leaving else -net_posted


def position_booking(
    settlement: Account, *, position_minor: int, key: TransferKey, now: datetime
) -> tuple[tuple[Entry, AccountState] | None, int]:
    """The entry booking as much of position_minor as the settlement account has
    room for on its side (None if it has none), and what is left to book."""
    credit = position_minor > 0
    b = settlement.balances
    part = min(abs(position_minor), b.room_minor(debit=not credit))
    if part <= 0:
        return None, position_minor
    if credit:
        after: Balances = replace(b, credits_posted=b.credits_posted + part)
    else:
        after = replace(b, debits_posted=b.debits_posted + part)
    entry = chained_entry(
        settlement.head_hash,
        account=settlement.key,
        sequence=settlement.entry_count + 1,
        transfer=key,
        direction=Direction.CREDIT if credit else Direction.DEBIT,
        kind=EntryKind.POSTED,
        amount_minor=part,
        balances_after=after,
        created_at=now,
    )
    left = position_minor - part if credit else position_minor + part
    return (entry, AccountState(after, entry.sequence, entry.hash)), left

"""Merchant moves: the booking that keeps each shard balanced on its own.

A merchant's accounts carry a net position per currency (credits minus debits
posted). When they leave shard S for shard D, S would be left with the
opposite of that position and D with the position itself. One entry on each
side's settlement account for the other carries the difference, exactly as a
cross-shard transfer would: S's settlement account for D takes the merchant's
net position, D's settlement account for S its opposite, and the two mirror.
A merchant moves only with pending transfers between its own accounts, whose
holds cancel out, so its net pending position is zero.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from ledger.domain.accounts import Account, Balances
from ledger.domain.chain import chained_entry
from ledger.domain.engine import AccountState
from ledger.domain.transfers import Direction, Entry, EntryKind, TransferKey

MOVE_MERCHANT_ID = "$move"


def move_key(merchant_id: str, epoch: int) -> TransferKey:
    """Names the entries of one merchant's move, so a rerun can recognise them."""
    return TransferKey(MOVE_MERCHANT_ID, f"{merchant_id}@{epoch}")


def settlement_booking(
    settlement: Account, *, net_posted: int, leaving: bool, key: TransferKey, now: datetime
) -> tuple[Entry, AccountState] | None:
    """The entry on one side's settlement account for a merchant with net_posted.

    leaving: this is the shard the merchant leaves (it takes the merchant's
    position); otherwise the shard it arrives on (it takes the opposite).
    """
    amount = net_posted if leaving else -net_posted
    if amount == 0:
        return None
    b = settlement.balances
    if amount > 0:
        direction = Direction.CREDIT
        after: Balances = replace(b, credits_posted=b.credits_posted + amount)
    else:
        direction = Direction.DEBIT
        after = replace(b, debits_posted=b.debits_posted - amount)
    entry = chained_entry(
        settlement.head_hash,
        account=settlement.key,
        sequence=settlement.entry_count + 1,
        transfer=key,
        direction=direction,
        kind=EntryKind.POSTED,
        amount_minor=abs(amount),
        balances_after=after,
        created_at=now,
    )
    return entry, AccountState(after, entry.sequence, entry.hash)

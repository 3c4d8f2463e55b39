"""Accounts: identity, the fields a caller sets, and the balances the ledger keeps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field
from datetime import datetime
from typing import TYPE_CHECKING

from ledger.domain.value import value
from ledger.limits import AMOUNT_MINOR_MAX

if TYPE_CHECKING:
    from ledger.domain.velocity import UsageKey, VelocityRule, VelocityUsage


@value(order=True)
class AccountKey:
    merchant_id: str
    account_id: str


@value
class AccountSpec:
    """What a caller gives to create an account."""

    key: AccountKey
    currency: str
    debits_must_not_exceed_credits: bool = False
    credits_must_not_exceed_debits: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)

    def differing_field(self, other: AccountSpec) -> str | None:
        """Names the first caller-visible field where two specs for one key differ."""
        if self.currency != other.currency:
            return "currency"
        if self.debits_must_not_exceed_credits != other.debits_must_not_exceed_credits:
            return "debits_must_not_exceed_credits"
        if self.credits_must_not_exceed_debits != other.credits_must_not_exceed_debits:
            return "credits_must_not_exceed_debits"
        if dict(self.metadata) != dict(other.metadata):
            return "metadata"
        return None


@value
class Balances:
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    def room_minor(self, *, debit: bool) -> int:
        """How much more one side may take: posted and pending together may not pass
        AMOUNT_MINOR_MAX (a pending amount posts onto it)."""
        if debit:
            return AMOUNT_MINOR_MAX - self.debits_posted - self.debits_pending
        return AMOUNT_MINOR_MAX - self.credits_posted - self.credits_pending

    def fits(self) -> bool:
        # Each must fit a bigint; spelled out, not a loop: this runs twice per entry written.
        return (
            0 <= self.debits_posted <= AMOUNT_MINOR_MAX
            and 0 <= self.credits_posted <= AMOUNT_MINOR_MAX
            and 0 <= self.debits_pending <= AMOUNT_MINOR_MAX
            and 0 <= self.credits_pending <= AMOUNT_MINOR_MAX
        )


@value
class Account:
    """An account as stored: its spec, state and balances."""

    spec: AccountSpec
    closed: bool
    balances: Balances
    entry_count: int
    created_at: datetime
    # The hash of the last entry (the chain's head); GENESIS_HASH before any.
    head_hash: bytes
    # Spending controls in force (changed at run time, see ledger/domain/velocity.py).
    velocity_rules: tuple[VelocityRule, ...] = ()
    # What the account moved within each rule's window, loaded under its lock;
    # None when not loaded (an account with rules is never checked without it).
    velocity_used: Mapping[UsageKey, VelocityUsage] | None = None
    # The shard's clock when velocity_used was read: the check counts the window
    # before this instant, so it must not be later than the check's own time.
    velocity_read_at: datetime | None = None
    # The counters behind velocity_used, as the row keeps them (velocity_counters.py).
    velocity_counters: bytes = b""

    @property
    def key(self) -> AccountKey:
        return self.spec.key

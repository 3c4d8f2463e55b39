"""An account's limits as one value, and a recorded change of them.

Limits change at run time (ledger.v1 SetAccountLimits): the overdraft flags,
the velocity rules and the balance monitors are replaced together, under the
account's lock, and the change is appended to the account's limits history.
A change applies to every transfer that commits after it; money already moved
or held stays as it is (a pending transfer made under the old limits still
posts: posting never adds to debits_posted + debits_pending).
"""

from __future__ import annotations

from datetime import datetime

from ledger.domain.accounts import AccountKey, Balances
from ledger.domain.monitors import BalanceMonitor
from ledger.domain.transfers import TransferResult
from ledger.domain.value import value
from ledger.domain.velocity import VelocityRule


@value
class AccountLimits:
    debits_must_not_exceed_credits: bool = False
    credits_must_not_exceed_debits: bool = False
    velocity_rules: tuple[VelocityRule, ...] = ()
    monitors: tuple[BalanceMonitor, ...] = ()


@value
class LimitsChangeRequest:
    account: AccountKey
    change_id: str
    limits: AccountLimits
    reason: str
    changed_by: str


@value
class LimitsChange:
    """A change as recorded: sequence counts the account's changes from 1."""

    account: AccountKey
    sequence: int
    change_id: str
    limits: AccountLimits
    changed_by: str
    reason: str
    changed_at: datetime


def broken_now(limits: AccountLimits, balances: Balances) -> TransferResult | None:
    """An overdraft flag the balances already break: it cannot be set now (every
    account row is held to its flags, see migration 0001). Tighten it once the
    account is back within it; velocity rules and monitors never break money
    already moved, so they can always be set."""
    b = balances
    if limits.debits_must_not_exceed_credits and (
        b.debits_posted + b.debits_pending > b.credits_posted
    ):
        return TransferResult.EXCEEDS_CREDITS
    if limits.credits_must_not_exceed_debits and (
        b.credits_posted + b.credits_pending > b.debits_posted
    ):
        return TransferResult.EXCEEDS_DEBITS
    return None

"""Balance monitors: thresholds on an account's balance that raise an event when
the balance crosses them, in either direction, once per crossing.

A monitor watches one balance of one account (credits minus debits posted, or
that minus debits pending: what a no-overdraft account can still spend). A
change of the account by one transfer (all its entries on the account together,
so a settle's release-then-post is one change) crosses the threshold downwards
when the balance was at or above it before and is below it after, upwards the
other way round. The crossing is recorded in the same transaction as the change,
by the write itself (ledger/storage/statements.py, WRITE_BATCH), which computes
exactly crossing() below; tests hold the two to each other.
"""

from __future__ import annotations

from enum import IntEnum

from ledger.domain.accounts import Balances
from ledger.domain.value import value


class MonitoredBalance(IntEnum):
    """Which balance a monitor watches (values match ledger.v1 MonitoredBalance)."""

    # credits_posted - debits_posted
    NET_POSTED = 1
    # credits_posted - debits_posted - debits_pending
    AVAILABLE = 2


class Crossing(IntEnum):
    """Which way a balance crossed a threshold (values match ledger.v1)."""

    FELL_BELOW = 1
    ROSE_TO = 2


@value(order=True)
class BalanceMonitor:
    monitor_id: str
    balance: MonitoredBalance
    threshold_minor: int


def balance_value(balance: MonitoredBalance, b: Balances) -> int:
    net = b.credits_posted - b.debits_posted
    if balance is MonitoredBalance.NET_POSTED:
        return net
    return net - b.debits_pending


def crossing(*, before_minor: int, after_minor: int, threshold_minor: int) -> Crossing | None:
    if before_minor >= threshold_minor > after_minor:
        return Crossing.FELL_BELOW
    if before_minor < threshold_minor <= after_minor:
        return Crossing.ROSE_TO
    return None

"""What the event stream says happened: one kind per change to the books.

Numbers are stored in the shard's `events.kind` and are the proto's EventKind
values; the SQL of migration 0011 (the saga trigger) names 11 to 13 too.
"""

from __future__ import annotations

from enum import IntEnum

from ledger.domain.transfers import PendingState, TransferAction


class EventKind(IntEnum):
    ACCOUNT_CREATED = 1
    ACCOUNT_CLOSED = 2
    ACCOUNT_REOPENED = 3
    TRANSFER_POSTED = 4
    PENDING_CREATED = 5
    PENDING_POSTED = 6
    PENDING_VOIDED = 7
    PENDING_EXPIRED = 8
    TRANSFER_REVERSED = 9
    JOURNAL_POSTED = 10
    SAGA_COMPLETED = 11
    SAGA_COMPENSATED = 12
    SAGA_DEAD_LETTERED = 13
    # A cross-shard transfer's entries on one shard (its reservation, its
    # credit, its settle, a hold relayed): the saga's end is its own event.
    SAGA_STEP = 14
    # A merchant's settlement booking as it arrives on or leaves a shard.
    MOVE_BOOKED = 15
    MERCHANT_MOVED_IN = 16
    MERCHANT_MOVED_OUT = 17
    BALANCE_MONITOR_CROSSED = 18


def transfer_event_kind(action: TransferAction, reversal_of: str) -> EventKind:
    """The event of a transfer record that applied (result OK)."""
    if action is TransferAction.POST:
        return EventKind.TRANSFER_REVERSED if reversal_of else EventKind.TRANSFER_POSTED
    if action is TransferAction.PENDING:
        return EventKind.PENDING_CREATED
    if action is TransferAction.POST_PENDING:
        return EventKind.PENDING_POSTED
    return EventKind.PENDING_VOIDED


def resolution_event_kind(state: PendingState) -> EventKind | None:
    """The event of a pending transfer ending without a transfer record of its own."""
    return EventKind.PENDING_EXPIRED if state is PendingState.EXPIRED else None

"""Transfers, journals, entries and result codes (values match ledger.v1 enums)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import field
from datetime import datetime
from enum import IntEnum

from ledger.domain.accounts import AccountKey, Balances
from ledger.domain.value import value


class TransferAction(IntEnum):
    POST = 1
    PENDING = 2
    POST_PENDING = 3
    VOID_PENDING = 4


class TransferResult(IntEnum):
    OK = 1
    LINKED_EVENT_FAILED = 2
    LINKED_EVENT_CHAIN_OPEN = 3
    EXISTS_WITH_DIFFERENT_FIELDS = 4
    DEBIT_ACCOUNT_NOT_FOUND = 5
    CREDIT_ACCOUNT_NOT_FOUND = 6
    ACCOUNTS_MUST_BE_DIFFERENT = 7
    CURRENCY_MISMATCH = 8
    DEBIT_ACCOUNT_CLOSED = 9
    CREDIT_ACCOUNT_CLOSED = 10
    EXCEEDS_CREDITS = 11
    EXCEEDS_DEBITS = 12
    OVERFLOW = 13
    PENDING_TRANSFER_NOT_FOUND = 14
    PENDING_TRANSFER_NOT_PENDING = 15
    PENDING_TRANSFER_ALREADY_POSTED = 16
    PENDING_TRANSFER_ALREADY_VOIDED = 17
    PENDING_TRANSFER_EXPIRED = 18
    EXCEEDS_PENDING_AMOUNT = 19
    PENDING_TRANSFER_HAS_DIFFERENT_ACCOUNTS = 20
    REVERSAL_TARGET_NOT_FOUND = 21
    REVERSAL_ACCOUNTS_MISMATCH = 22
    REVERSAL_EXCEEDS_ORIGINAL = 23
    SHARD_UNAVAILABLE = 24
    POSTINGS_UNBALANCED = 25
    IN_PROGRESS = 26
    ABORTED = 27
    EXCEEDS_VELOCITY_LIMIT = 28


class PendingState(IntEnum):
    PENDING = 1
    POSTED = 2
    VOIDED = 3
    EXPIRED = 4


class Direction(IntEnum):
    DEBIT = 1
    CREDIT = 2


class EntryKind(IntEnum):
    POSTED = 1
    PENDING = 2
    PENDING_RELEASED = 3


class RecordKind(IntEnum):
    """Transfers and journals share one id namespace per merchant."""

    TRANSFER = 1
    JOURNAL = 2


@value(order=True)
class TransferKey:
    merchant_id: str
    transfer_id: str


@value
class TransferRequest:
    """A transfer as a caller asks for it."""

    id: str
    debit: AccountKey
    credit: AccountKey | None
    amount_minor: int
    currency: str
    action: TransferAction
    pending_id: str = ""
    timeout_ms: int = 0
    linked: bool = False
    reversal_of: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Derived once (replace() derives it again): the hot path asks for it several
    # times per item.
    key: TransferKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", TransferKey(self.debit.merchant_id, self.id))

    @property
    def settles_pending(self) -> bool:
        return self.action in (TransferAction.POST_PENDING, TransferAction.VOID_PENDING)


def linked_chains(requests: Sequence[TransferRequest]) -> list[range]:
    """The positions of each linked chain: consecutive linked items closed by an
    unlinked one, and the open chain at the end, even of one linked item (a chain
    all the same: refused whole, and bound by the rules of chains)."""
    chains: list[range] = []
    start = 0
    for i, r in enumerate(requests):
        if not r.linked:
            if i > start:
                chains.append(range(start, i + 1))
            start = i + 1
    if start < len(requests):
        chains.append(range(start, len(requests)))
    return chains


@value
class TransferRecord:
    """A transfer as stored: the request with gaps filled in, and its outcome.

    For settle transfers (post/void pending) the stored credit account and
    currency are the pending transfer's, and amount_effective_minor is the
    amount actually posted (zero for a void or any failure).
    """

    request: TransferRequest
    result: TransferResult
    amount_effective_minor: int
    created_at: datetime
    expires_at: datetime | None = None
    trace_id: str = ""

    @property
    def key(self) -> TransferKey:
        return self.request.key

    def differing_field(self, other: TransferRequest) -> str | None:
        """Names the first field where a replayed request differs from the stored one."""
        mine = self.request
        settle = other.settles_pending
        checks: list[tuple[str, bool]] = [
            ("action", mine.action != other.action),
            ("debit_account", mine.debit != other.debit),
            (
                "credit_account",
                not (settle and other.credit is None) and mine.credit != other.credit,
            ),
            ("amount_minor", mine.amount_minor != other.amount_minor),
            ("currency", not (settle and other.currency == "") and mine.currency != other.currency),
            ("pending_id", mine.pending_id != other.pending_id),
            ("timeout_ms", mine.timeout_ms != other.timeout_ms),
            ("linked", mine.linked != other.linked),
            ("reversal_of", mine.reversal_of != other.reversal_of),
            ("metadata", dict(mine.metadata) != dict(other.metadata)),
        ]
        for name, differs in checks:
            if differs:
                return name
        return None


@value
class Posting:
    account: AccountKey
    amount_minor: int
    currency: str
    direction: Direction


@value
class JournalRequest:
    id: str
    merchant_id: str
    postings: tuple[Posting, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> TransferKey:
        return TransferKey(self.merchant_id, self.id)


@value
class JournalRecord:
    request: JournalRequest
    result: TransferResult
    failed_posting_index: int
    created_at: datetime


@value
class Entry:
    """One line of an account's history, with the balances after it."""

    account: AccountKey
    sequence: int
    transfer: TransferKey
    direction: Direction
    kind: EntryKind
    amount_minor: int
    balances_after: Balances
    created_at: datetime
    # Chains the account's history (see ledger/domain/chain.py).
    hash: bytes


@value
class Resolution:
    """Records that a pending transfer was posted, voided or expired (at most once)."""

    pending: TransferKey
    state: PendingState
    by_transfer_id: str
    created_at: datetime

"""Tamper evidence: each account's entries form a hash chain.

An entry's hash covers the previous entry's hash of the same account and every
field of the entry, so changing, inserting or deleting an entry breaks the
chain from there on, and the account's head (the hash of its last entry)
commits to its whole history. The account's row lock already orders its
entries, so the chain needs no shard-wide lock.

The encoding is fixed and mirrored in SQL by ledger_entry_hash() (migration
0004), which verification uses: fields as decimal or UTF-8 text, joined by the
unit separator (0x1F, which ids may not contain), the time as microseconds
since the Unix epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from ledger.domain.accounts import AccountKey, Balances
from ledger.domain.transfers import Direction, Entry, EntryKind, TransferKey

# The "previous hash" of an account's first entry, and the head of an account without entries.
GENESIS_HASH = bytes(32)
HASH_BYTES = 32
_SEPARATOR = "\x1f"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def chained_entry(
    previous_hash: bytes,
    *,
    account: AccountKey,
    sequence: int,
    transfer: TransferKey,
    direction: Direction,
    kind: EntryKind,
    amount_minor: int,
    balances_after: Balances,
    created_at: datetime,
) -> Entry:
    """The entry with its hash, chained to the account's previous entry."""
    assert len(previous_hash) == HASH_BYTES, "a chain hash is 32 bytes"
    assert created_at.tzinfo is not None, "entry times are absolute"
    b = balances_after
    text = _SEPARATOR.join(
        (
            account.merchant_id,
            account.account_id,
            str(sequence),
            transfer.merchant_id,
            transfer.transfer_id,
            str(int(direction)),
            str(int(kind)),
            str(amount_minor),
            str(b.debits_posted),
            str(b.credits_posted),
            str(b.debits_pending),
            str(b.credits_pending),
            str((created_at - _EPOCH) // _MICROSECOND),
        )
    )
    return Entry(
        account=account,
        sequence=sequence,
        transfer=transfer,
        direction=direction,
        kind=kind,
        amount_minor=amount_minor,
        balances_after=balances_after,
        created_at=created_at,
        hash=hashlib.sha256(previous_hash + text.encode()).digest(),
    )


def checkpoint_digest(
    previous_digest: bytes, heads: Iterable[tuple[str, str, int, bytes]]
) -> bytes:
    """Chains a checkpoint to the previous one over its heads: merchant, account, sequence, hash."""
    digest = hashlib.sha256(previous_digest)
    for merchant_id, account_id, sequence, head in heads:
        digest.update(_SEPARATOR.join((merchant_id, account_id, str(sequence), "")).encode())
        digest.update(head)
    return digest.digest()

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

import functools
import hashlib
import hmac
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from ledger.domain.accounts import AccountKey, Balances
from ledger.domain.transfers import Direction, Entry, EntryKind, TransferKey

# The "previous hash" of an account's first entry, and the head of an account without entries.
GENESIS_HASH = bytes(32)
HASH_BYTES = 32
_SEPARATOR = "\x1f"  # also written out in chained_entry's f-string, for speed
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
    b = balances_after
    text = (
        f"{account.merchant_id}\x1f{account.account_id}\x1f{sequence}\x1f"
        f"{transfer.merchant_id}\x1f{transfer.transfer_id}\x1f{int(direction)}\x1f"
        f"{int(kind)}\x1f{amount_minor}\x1f{b.debits_posted}\x1f{b.credits_posted}\x1f"
        f"{b.debits_pending}\x1f{b.credits_pending}\x1f{epoch_micros(created_at)}"
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


@functools.lru_cache(maxsize=64)
def epoch_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch; a batch's entries share one moment, so cached."""
    assert moment.tzinfo is not None, "entry times are absolute"
    return (moment - _EPOCH) // _MICROSECOND


def checkpoint_digest(
    previous_digest: bytes, heads: Iterable[tuple[str, str, int, bytes]]
) -> bytes:
    """Chains a checkpoint to the previous one over its heads: merchant, account, sequence, hash."""
    digest = hashlib.sha256(previous_digest)
    for merchant_id, account_id, sequence, head in heads:
        digest.update(_SEPARATOR.join((merchant_id, account_id, str(sequence), "")).encode())
        digest.update(head)
    return digest.digest()


# Domain separation for checkpoint MACs: a MAC made for anything else never verifies as one.
_MAC_LABEL = b"ledger.v1 checkpoint\x1f"
# Shorter keys are refused: an HMAC is only as strong as its key.
CHECKPOINT_KEY_BYTES_MIN = 16


def checkpoint_mac(key: bytes, *, shard: str, checkpoint_id: int, digest: bytes) -> bytes:
    """HMAC-SHA256 of a checkpoint, keyed with a secret the shard database does not hold.

    The digest already commits to every head and every earlier checkpoint; the
    shard name and id bind it to its place, so a MAC cannot be moved elsewhere.
    """
    assert len(key) >= CHECKPOINT_KEY_BYTES_MIN, "checkpoint key too short"
    assert len(digest) == HASH_BYTES, "a checkpoint digest is 32 bytes"
    message = _MAC_LABEL + f"{shard}\x1f{checkpoint_id}\x1f".encode() + digest
    return hmac.new(key, message, hashlib.sha256).digest()


def mac_matches(
    key: bytes, mac: bytes | None, *, shard: str, checkpoint_id: int, digest: bytes
) -> bool:
    if mac is None:
        return False
    expected = checkpoint_mac(key, shard=shard, checkpoint_id=checkpoint_id, digest=digest)
    return hmac.compare_digest(expected, mac)

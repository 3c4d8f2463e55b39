"""The checkpoint keys: the one that signs new checkpoints, and retired ones that
still vouch for the checkpoints they signed, so the key can be rotated.

A retired key is one that may have leaked, so it must not vouch for a
checkpoint made after one signed by a newer key: along a shard's checkpoints
(and along its export) the signing key never goes back to an older one
(`KeyOrder`). Replicas keep that order during a rolling rotation because one
that meets a checkpoint under a key it does not hold (a newer one) makes no
checkpoint until it holds that key (`ChainStore.checkpoint_round`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger.domain.chain import CHECKPOINT_KEY_BYTES_MIN, checkpoint_mac, mac_matches

# Retired keys one configuration may list: a rotation a quarter for years.
RETIRED_KEYS_MAX = 16


@dataclass(frozen=True)
class CheckpointKeys:
    current: bytes
    # Most recently retired first: the order in which they signed, newest to oldest.
    retired: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        keys = (self.current, *self.retired)
        assert all(len(k) >= CHECKPOINT_KEY_BYTES_MIN for k in keys), "checkpoint key too short"
        assert len(set(keys)) == len(keys), "a checkpoint key listed twice"
        assert len(self.retired) <= RETIRED_KEYS_MAX, "too many retired checkpoint keys"

    def __repr__(self) -> str:
        return f"CheckpointKeys(current=<secret>, retired=<{len(self.retired)} secret(s)>)"

    def sign(self, *, shard: str, checkpoint_id: int, digest: bytes) -> bytes:
        return checkpoint_mac(self.current, shard=shard, checkpoint_id=checkpoint_id, digest=digest)

    def rank(
        self, mac: bytes | None, *, shard: str, checkpoint_id: int, digest: bytes
    ) -> int | None:
        """Which key made mac: 0 the current one, i the i-th most recently retired;
        None if none of them (no MAC, forged, altered, or a key not held here)."""
        if mac is None:
            return None
        for rank, key in enumerate((self.current, *self.retired)):
            if mac_matches(key, mac, shard=shard, checkpoint_id=checkpoint_id, digest=digest):
                return rank
        return None

    def unmatched(self, checkpoint_id: int, mac: bytes | None) -> str:
        """Why a checkpoint that no key held vouches for fails."""
        if mac is None:
            return f"checkpoint {checkpoint_id} has no MAC: made without a key, or forged"
        return (
            f"checkpoint {checkpoint_id} has a MAC that matches none of the keys held (the "
            f"current checkpoint key and {len(self.retired)} retired): forged, altered, or "
            "signed by a key not given to this check"
        )

    def describe(self, rank: int) -> str:
        return "the current key" if rank == 0 else f"retired key {rank}"


class KeyOrder:
    """Follows one shard's checkpoints in order, checking each one's MAC under the
    keys held, and that none is signed by an older key than a checkpoint before it
    (a retired key used after the rotation)."""

    def __init__(
        self,
        keys: CheckpointKeys,
        shard: str,
        *,
        newest_rank: int | None = None,
        newest_at: int | None = None,
    ) -> None:
        self.keys = keys
        self.shard = shard
        # The newest key seen so far (lowest rank), and the checkpoint it signed.
        self.newest_rank = newest_rank
        self.newest_at = newest_at

    def check(self, checkpoint_id: int, mac: bytes | None, digest: bytes) -> str | None:
        """What is wrong with this checkpoint's MAC, if anything."""
        rank = self.keys.rank(mac, shard=self.shard, checkpoint_id=checkpoint_id, digest=digest)
        if rank is None:
            return self.keys.unmatched(checkpoint_id, mac)
        return self.follow(checkpoint_id, rank)

    def follow(self, checkpoint_id: int, rank: int) -> str | None:
        """The next checkpoint (by id), signed by the key of this rank."""
        newest = self.newest_rank
        if newest is not None and rank > newest:
            return (
                f"checkpoint {checkpoint_id} is signed by {self.keys.describe(rank)} after "
                f"checkpoint {self.newest_at} signed by a newer one "
                f"({self.keys.describe(newest)}): a retired key signed it after the rotation "
                "(leaked?)"
            )
        if newest is None or rank < newest:
            self.newest_rank, self.newest_at = rank, checkpoint_id
        return None

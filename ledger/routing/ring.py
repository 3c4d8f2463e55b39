"""Consistent hashing of merchants onto shard names (uhashring, ketama-compatible)."""

from __future__ import annotations

from uhashring import HashRing

from ledger.routing.config import ShardConfig

# Ring points per unit of weight (uhashring's default for weight 1).
VNODES_PER_WEIGHT = 40
# Merchants whose owner a ring remembers; a ring is rebuilt on every config change.
OWNER_CACHE_ENTRIES_MAX = 100_000


class ShardRing:
    """Maps merchant IDs to shard names. Built from names, so a changed DSN moves nothing.

    uhashring's ketama ring hashes with md5, which does not depend on the process
    (unlike Python's hash()), so every replica computes the same owner.
    """

    def __init__(self, config: ShardConfig) -> None:
        self.epoch = config.epoch
        # A draining or retired shard places no merchant: it is left out of the
        # ring (so the others own exactly what they would own without it).
        placing = [spec for spec in config.shards if spec.placing]
        assert placing, "a config places merchants on at least one shard"
        self._ring = HashRing(
            # Points per shard in proportion to its own weight alone (ketama's
            # "weight" rescales every shard's points, so raising one shard's
            # weight would also move merchants between the others).
            nodes={
                spec.name: {"vnodes": VNODES_PER_WEIGHT * spec.weight, "weight": 1}
                for spec in placing
            },
            hash_fn="ketama",
        )
        self._names = frozenset(spec.name for spec in placing)
        self._owners: dict[str, str] = {}

    def shard_for(self, merchant_id: str) -> str:
        owner = self._owners.get(merchant_id)
        if owner is not None:
            return owner
        name = self._ring.get_node(merchant_id)
        assert isinstance(name, str) and name in self._names
        # The ring is immutable: remember answers (md5 per lookup shows in profiles),
        # boundedly, starting afresh when full.
        if len(self._owners) >= OWNER_CACHE_ENTRIES_MAX:
            self._owners.clear()
        self._owners[merchant_id] = name
        return name

"""Consistent hashing of merchants onto shard names (uhashring, ketama-compatible)."""

from __future__ import annotations

from uhashring import HashRing

from ledger.routing.config import ShardConfig


class ShardRing:
    """Maps merchant IDs to shard names. Built from names, so a changed DSN moves nothing.

    uhashring's ketama ring hashes with md5, which does not depend on the process
    (unlike Python's hash()), so every replica computes the same owner.
    """

    def __init__(self, config: ShardConfig) -> None:
        self.epoch = config.epoch
        self._ring = HashRing(
            nodes={spec.name: {"weight": spec.weight} for spec in config.shards},
            hash_fn="ketama",
        )
        self._names = frozenset(spec.name for spec in config.shards)

    def shard_for(self, merchant_id: str) -> str:
        name = self._ring.get_node(merchant_id)
        assert isinstance(name, str) and name in self._names
        return name

"""Errors the core raises for whole-call failures; the API layer maps them to statuses."""

from __future__ import annotations


class CrossShardTransfer(Exception):
    """Transfers whose two accounts live on different shards (sagas are not here yet)."""

    def __init__(self, indexes: list[int]) -> None:
        super().__init__(f"{len(indexes)} transfer(s) span two shards")
        self.indexes = indexes


class LinkedChainSpansShards(Exception):
    """A linked chain whose members live on different shards cannot be atomic."""

    def __init__(self, indexes: list[int]) -> None:
        super().__init__("a linked chain spans shards")
        self.indexes = indexes


class JournalSpansShards(Exception):
    """A journal's postings name accounts on more than one shard."""

    def __init__(self, posting_indexes: list[int]) -> None:
        super().__init__("journal postings span shards")
        self.posting_indexes = posting_indexes


class ClusterUnavailable(Exception):
    """Every shard a call needed was unreachable, or routing did not settle; retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

"""Errors the core raises for whole-call failures; the API layer maps them to statuses."""

from __future__ import annotations


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

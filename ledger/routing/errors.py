"""Routing failures that a retry later may fix."""

from __future__ import annotations


class ClusterUnavailable(Exception):
    """Every shard a call needed was unreachable, or routing did not settle; retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

"""Routing failures that a retry later may fix."""

from __future__ import annotations


class ClusterUnavailable(Exception):
    """Every shard a call needed was unreachable, or routing did not settle; retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class RoutingUnsettled(ClusterUnavailable):
    """A merchant stayed fenced by a move (or its owner kept changing) for longer than
    a call waits: its placement is changing, and a later attempt follows it."""

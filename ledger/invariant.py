"""Internal invariant checks that survive ``python -O``."""

from __future__ import annotations


class InvariantViolation(Exception):
    """A broken internal invariant: a bug, never retried, never caller's fault."""


def invariant(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)

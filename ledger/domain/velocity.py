"""Velocity rules: how much, or how often, an account may be debited or credited
in a rolling window.

The rule, stated once: a transfer (or journal posting) that debits account A is
allowed only if, for every debit rule of A, what A was debited within the
rule's window, plus this transfer, stays within the rule's limit; credits the
same with credit rules. "What was debited" is the amount (AMOUNT rules) or the
number of transfers and postings (COUNT rules), counted when money is posted or
reserved: a pending transfer counts at creation, its later post does not count
again, and a void or expiry does not give the window back (a refused or
released attempt still happened; a control against bursts must not be undone
by cancelling).

Windows are kept as fixed buckets (window_s / velocity_buckets_per_window
seconds wide, aligned to the Unix epoch). A check counts every bucket that the
window (now - window_s, now] touches, including the whole oldest one, so what it
counts covers the exact window and at most one bucket's width before it: a
limit is never exceeded over any window of window_s seconds, and the only error
is an early refusal, bounded by one bucket (5% of the window with 20 buckets).

Counters are kept only for the windows an account's rules use. A rule set at
run time counts what moved within its window before it was set: storage
recounts its buckets from the account's entries (a counted movement is an
entry of kind PENDING, or POSTED not right after a release by the same
transfer), under the same lock.

Everything here is pure: storage loads each account's rules and its windowed
totals under the account's lock; the engine (ledger/domain/engine.py) applies
refusing_rule() per item over them plus what earlier items of the batch added
(a flattened copy of it on its hot path, held to it by a property test).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import IntEnum

from ledger.domain.transfers import Direction
from ledger.domain.value import value
from ledger.limits import velocity_buckets_per_window


class VelocityMetric(IntEnum):
    """What a rule limits (values match ledger.v1 VelocityMetric)."""

    AMOUNT = 1
    COUNT = 2


@value(order=True)
class VelocityRule:
    """At most limit (minor units, or transfers) of direction within window_s."""

    rule_id: str
    direction: Direction
    metric: VelocityMetric
    window_s: int
    limit: int


@value
class VelocityUsage:
    """What an account moved in one direction within one window."""

    amount_minor: int = 0
    count: int = 0

    def plus(self, amount_minor: int, count: int = 1) -> VelocityUsage:
        return VelocityUsage(self.amount_minor + amount_minor, self.count + count)


# (direction, window_s): the counters one rule reads; rules that differ only in
# metric or limit share them, so changing a limit keeps the window's history.
UsageKey = tuple[Direction, int]


def bucket_width_s(window_s: int) -> int:
    """Seconds per bucket: a window is at most velocity_buckets_per_window buckets."""
    return max(1, -(-window_s // velocity_buckets_per_window))


def bucket_index(now: datetime, window_s: int) -> int:
    """The bucket that holds an event at `now` (epoch-aligned, so shards agree)."""
    return int(now.timestamp()) // bucket_width_s(window_s)


def first_counted_bucket(now: datetime, window_s: int) -> int:
    """The oldest bucket a check at `now` counts: the one holding now - window_s.

    Every event within (now - window_s, now] lies in this bucket or a later one;
    the events of this bucket before the window are the bounded over-count."""
    return (int(now.timestamp()) - window_s) // bucket_width_s(window_s)


def usage_keys(rules: Sequence[VelocityRule]) -> set[UsageKey]:
    return {(r.direction, r.window_s) for r in rules}


def refusing_rule(
    rules: Sequence[VelocityRule],
    used: Mapping[UsageKey, VelocityUsage],
    *,
    direction: Direction,
    amount_minor: int,
    count: int = 1,
) -> VelocityRule | None:
    """The first rule (in rule order) that one more movement would break, or None."""
    for rule in rules:
        if rule.direction is not direction:
            continue
        usage = used.get((direction, rule.window_s), VelocityUsage())
        if rule.metric is VelocityMetric.AMOUNT:
            if usage.amount_minor + amount_minor > rule.limit:
                return rule
        elif usage.count + count > rule.limit:
            return rule
    return None


@value
class DirectionRules:
    """An account's rules of one direction, ready for the per-item check: the
    windows it counts (and their bucket widths), and each rule as (position of
    its window, is an amount rule, limit, rule id), in refusing_rule's order."""

    windows_s: tuple[int, ...]
    widths_s: tuple[int, ...]
    checks: tuple[tuple[int, bool, int, str], ...]


# Distinct rule sets whose grouping is kept: accounts mostly share a few sets (a
# product's standard limits), and grouping is the costly part of a first check.
RULE_SETS_CACHED_MAX = 4096


# By the rule tuple's identity: storage hands every account of one rule set the
# same tuple (parsed once per text), and hashing the rules for the lru_cache cost
# more than the rest of a first check. The tuple is kept, so its id stays its own.
_BY_IDENTITY: dict[int, tuple[tuple[VelocityRule, ...], dict[Direction, DirectionRules]]] = {}


def by_direction(rules: tuple[VelocityRule, ...]) -> dict[Direction, DirectionRules]:
    """The rules grouped by direction (refusing_rule's order kept within a direction).
    Cached: callers must not change the dict."""
    hit = _BY_IDENTITY.get(id(rules))
    if hit is not None and hit[0] is rules:
        return hit[1]
    grouped = _by_direction(rules)
    if len(_BY_IDENTITY) >= RULE_SETS_CACHED_MAX:
        _BY_IDENTITY.clear()
    _BY_IDENTITY[id(rules)] = (rules, grouped)
    return grouped


@functools.lru_cache(maxsize=RULE_SETS_CACHED_MAX)
def _by_direction(rules: tuple[VelocityRule, ...]) -> dict[Direction, DirectionRules]:
    grouped: dict[Direction, DirectionRules] = {}
    for direction in Direction:
        mine = [r for r in rules if r.direction is direction]
        if not mine:
            continue
        windows_s = tuple(sorted({r.window_s for r in mine}))
        grouped[direction] = DirectionRules(
            windows_s=windows_s,
            widths_s=tuple(bucket_width_s(w) for w in windows_s),
            checks=tuple(
                (windows_s.index(r.window_s), r.metric is VelocityMetric.AMOUNT, r.limit, r.rule_id)
                for r in mine
            ),
        )
    return grouped


def total_within(
    events: Sequence[tuple[datetime, int]], *, now: datetime, window_s: int
) -> VelocityUsage:
    """The exact usage of (time, amount) events within (now - window_s, now]: the
    reference the bucketed count is held to (tests, the chaos checker)."""
    start_s = now.timestamp() - window_s
    inside = [a for t, a in events if start_s < t.timestamp() <= now.timestamp()]
    return VelocityUsage(sum(inside), len(inside))

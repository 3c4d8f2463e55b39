"""An account's velocity counters as its row keeps them: one ring of buckets per
(direction, window) its rules use, packed into accounts.velocity_counters.

ledger/domain/velocity.py states what is counted and how buckets are numbered;
this module is only where the counts are kept. Kept on the account's own row,
the counters are read with the account's lock (the locked row is always the
latest version, so no second read is needed) and written with its balances by
the same UPDATE: a limited account costs no rows, index entries or reads
beyond its own row (issue 21's cost target; bench/velocity_cost.py).

A ring holds the last RING_SLOTS buckets up to its head (the newest bucket
written): bucket b sits in slot b % RING_SLOTS. A check at time t counts the
buckets first_counted_bucket(t)..head, at most velocity_buckets_per_window + 1
of them (a window of window_s seconds touches that many buckets of width
ceil(window_s / buckets_per_window)), so the ring always holds them all.

Layout: big-endian signed 64-bit integers (what PostgreSQL's int8send writes,
so SQL can build and read them too), per ring in (direction, window_s) order:
direction, window_s, head, then RING_SLOTS amounts and RING_SLOTS counts.
Amounts and counts saturate at AMOUNT_MINOR_MAX: every limit is at most that,
so a saturated bucket refuses whatever an exact one would (and nothing else).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ledger.domain.transfers import Direction
from ledger.domain.velocity import UsageKey, VelocityUsage, bucket_width_s
from ledger.invariant import invariant
from ledger.limits import AMOUNT_MINOR_MAX, velocity_buckets_per_window

RING_SLOTS = velocity_buckets_per_window + 1
# direction, window_s, head
_HEADER = 3
RING_WIDTH = _HEADER + 2 * RING_SLOTS
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _unpacked(data: bytes) -> array[int]:
    values = array("q")
    values.frombytes(data)
    if not _BIG_ENDIAN_HOST:
        values.byteswap()
    invariant(len(values) % RING_WIDTH == 0, "velocity counters are whole rings")
    return values


def _packed(values: array[int]) -> bytes:
    if _BIG_ENDIAN_HOST:
        return values.tobytes()
    swapped = array("q", values)
    swapped.byteswap()
    return swapped.tobytes()


# Direction by its stored number.
_DIRECTIONS = {int(d): d for d in Direction}


def _ring(values: array[int], key: UsageKey) -> int:
    """Where the ring of key starts (an account has a few: a scan beats a dict)."""
    direction, window_s = key
    for i in range(0, len(values), RING_WIDTH):
        if values[i + 1] == window_s and values[i] == direction:
            return i
    invariant(False, "every counted window has its counters")
    raise AssertionError("unreachable")


def _sum_slots(values: array[int], start: int, first_slot: int, slots: int) -> int:
    """The sum of `slots` consecutive ring slots from first_slot (wrapping)."""
    end = first_slot + slots
    if end <= RING_SLOTS:
        return sum(values[start + first_slot : start + end])
    return sum(values[start + first_slot : start + RING_SLOTS]) + sum(
        values[start : start + end - RING_SLOTS]
    )


def _window_sums(values: array[int], key: UsageKey, now_s: int) -> tuple[int, int]:
    """(amount, count) a check at now_s counts in key's window: the buckets from the
    one holding now_s - window_s (velocity.first_counted_bucket) through the head."""
    i = _ring(values, key)
    window_s = key[1]
    head = values[i + 2]
    slots = min(head - (now_s - window_s) // bucket_width_s(window_s) + 1, RING_SLOTS)
    amounts = i + _HEADER
    counts = amounts + RING_SLOTS
    if slots <= 0:
        return 0, 0
    if slots == RING_SLOTS:
        return (
            sum(values[amounts : amounts + RING_SLOTS]),
            sum(values[counts : counts + RING_SLOTS]),
        )
    first_slot = (head - slots + 1) % RING_SLOTS
    return (
        _sum_slots(values, amounts, first_slot, slots),
        _sum_slots(values, counts, first_slot, slots),
    )


class Usage(Mapping[UsageKey, VelocityUsage]):
    """What each window of `keys` counts at now_s (Unix seconds): the buckets from
    the one holding now_s - window_s (velocity.first_counted_bucket) through the
    ring's head. Computed per window when first asked: a batch checks most
    accounts in one direction only."""

    __slots__ = ("_data", "_found", "_keys", "_now_s", "_values")

    def __init__(self, data: bytes, keys: Iterable[UsageKey], now_s: int) -> None:
        self._data = data
        self._keys = frozenset(keys)
        self._now_s = now_s
        self._values: array[int] | None = None
        self._found: dict[UsageKey, VelocityUsage] = {}

    def __getitem__(self, key: UsageKey) -> VelocityUsage:
        found: VelocityUsage | None = self.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def get(self, key: UsageKey, default: Any = None) -> Any:  # the engine's per-account path
        found = self._found.get(key)
        if found is not None:
            return found
        if key not in self._keys:
            return default
        found = VelocityUsage(*_window_sums(self._unpacked(), key, self._now_s))
        self._found[key] = found
        return found

    def totals(
        self, direction: Direction, windows_s: Sequence[int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The amounts and the counts of direction's windows_s, in that order: what
        the engine starts a batch from, per account and direction (get, without an
        object per window)."""
        values = self._unpacked()
        sums = [_window_sums(values, (direction, w), self._now_s) for w in windows_s]
        return tuple([a for a, _ in sums]), tuple([c for _, c in sums])

    def bounds(
        self, direction: Direction, windows_s: Sequence[int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Upper bounds of totals(): per window, the sums over its whole ring. A
        window counts some of its ring's buckets (never one outside it), and
        amounts and counts are never negative."""
        values = self._unpacked()
        amounts = []
        counts = []
        for window_s in windows_s:
            start = _ring(values, (direction, window_s)) + _HEADER
            amounts.append(sum(values[start : start + RING_SLOTS]))
            counts.append(sum(values[start + RING_SLOTS : start + 2 * RING_SLOTS]))
        return tuple(amounts), tuple(counts)

    def counters_after(self, adds: Iterable[tuple[UsageKey, int, int, int]]) -> bytes:
        """added() to the counters this usage was read from, parsed once for both."""
        return _packed(_added(array("q", self._unpacked()), adds))

    def _unpacked(self) -> array[int]:
        values = self._values
        if values is None:
            values = self._values = _unpacked(self._data)
        return values

    def __iter__(self) -> Iterator[UsageKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def usage(data: bytes, keys: Iterable[UsageKey], now_s: int) -> dict[UsageKey, VelocityUsage]:
    """Usage, every window at once."""
    return dict(Usage(data, keys, now_s))


def added(data: bytes, adds: Iterable[tuple[UsageKey, int, int, int]]) -> bytes:
    """The counters after adding (key, bucket_index, amount_minor, count) each.

    A bucket older than the ring's head (a clock that stepped back) is added to
    the head instead: counted later, it stays in windows longer, which can only
    refuse earlier, never let more through."""
    return _packed(_added(_unpacked(data), adds))


def _added(values: array[int], adds: Iterable[tuple[UsageKey, int, int, int]]) -> array[int]:
    for key, bucket, amount_minor, count in adds:
        i = _ring(values, key)
        head = values[i + 2]
        amounts = i + _HEADER
        counts = amounts + RING_SLOTS
        if bucket > head:
            # The buckets between the head and this one start empty.
            for b in range(max(head + 1, bucket - RING_SLOTS + 1), bucket + 1):
                values[amounts + b % RING_SLOTS] = 0
                values[counts + b % RING_SLOTS] = 0
            values[i + 2] = head = bucket
        slot = amounts + head % RING_SLOTS
        # Saturating sums, without min(): a call costs more than the compare.
        total = values[slot] + amount_minor
        values[slot] = total if total < AMOUNT_MINOR_MAX else AMOUNT_MINOR_MAX
        slot += RING_SLOTS
        total = values[slot] + count
        values[slot] = total if total < AMOUNT_MINOR_MAX else AMOUNT_MINOR_MAX
    return values


def rebuilt(
    keys: Sequence[UsageKey],
    recounted: Mapping[UsageKey, Mapping[int, tuple[int, int]]],
    now_s: int,
) -> bytes:
    """Counters for exactly `keys` (sorted), each ring from `recounted`: per key,
    (amount, count) per bucket index, the buckets a check at now_s counts."""
    values = array("q")
    for key in sorted(keys):
        direction, window_s = key
        head = now_s // bucket_width_s(window_s)
        ring = [0] * (2 * RING_SLOTS)
        for bucket, (amount_minor, count) in recounted.get(key, {}).items():
            invariant(head - RING_SLOTS < bucket <= head, "a recounted bucket is in the ring")
            ring[bucket % RING_SLOTS] = min(amount_minor, AMOUNT_MINOR_MAX)
            ring[RING_SLOTS + bucket % RING_SLOTS] = min(count, AMOUNT_MINOR_MAX)
        values.extend((int(direction), window_s, head, *ring))
    return _packed(values)


def keys_of(data: bytes) -> list[UsageKey]:
    """The (direction, window) rings the counters hold, in order."""
    values = _unpacked(data)
    return [(_DIRECTIONS[values[i]], values[i + 1]) for i in range(0, len(values), RING_WIDTH)]

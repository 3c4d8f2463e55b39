"""Property tests of the velocity rules (ledger.domain.velocity, ledger.domain.engine).

A small model of a shard keeps the bucketed counters between batches exactly as
storage does (read under the lock, added by each plan). Hypothesis throws random
interleavings of debits and credits, posted and pending, at random times, with
the rules changed between batches, and checks against the exact history:
- no accepted movement ever makes any rule in force exceed its limit over the
  exact window (now - window_s, now];
- a refusal is justified: the window stretched by one bucket would be exceeded
  (the stated error bound);
- a change of limits applies from the next batch on, never to what was accepted.

HYPOTHESIS_VELOCITY_EXAMPLES (default 200) runs it longer on demand.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.domain import velocity_counters
from ledger.domain.accounts import Account, AccountKey, AccountSpec, Balances
from ledger.domain.chain import GENESIS_HASH
from ledger.domain.engine import TransferBatchState, advanced, apply_transfers
from ledger.domain.transfers import Direction, TransferAction, TransferRequest, TransferResult
from ledger.domain.velocity import (
    VelocityMetric,
    VelocityRule,
    VelocityUsage,
    bucket_width_s,
    first_counted_bucket,
    refusing_rule,
    total_within,
    usage_keys,
)
from ledger.limits import AMOUNT_MINOR_MAX

EXAMPLES = int(os.environ.get("HYPOTHESIS_VELOCITY_EXAMPLES", "200"))
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIMITED = AccountKey("m", "limited")
OTHER = AccountKey("m", "other")
WINDOWS_S = (10, 60, 95, 600)

rules_strategy = st.lists(
    st.builds(
        VelocityRule,
        rule_id=st.sampled_from(["r1", "r2", "r3"]),
        direction=st.sampled_from(list(Direction)),
        metric=st.sampled_from(list(VelocityMetric)),
        window_s=st.sampled_from(WINDOWS_S),
        limit=st.integers(min_value=0, max_value=300),
    ),
    max_size=3,
    unique_by=lambda r: r.rule_id,
).map(tuple)

Movement = tuple[Direction, TransferAction, int]
movement = st.tuples(
    st.sampled_from(list(Direction)),  # the limited account's side
    st.sampled_from([TransferAction.POST, TransferAction.PENDING]),
    st.integers(min_value=1, max_value=120),
)
step = st.tuples(
    st.integers(min_value=0, max_value=200),  # seconds since the previous batch
    st.none() | rules_strategy,  # a change of limits committed before the batch
    st.lists(movement, min_size=1, max_size=6),
)


class Shard:
    """The counters and accounts a shard keeps, in memory: the limited account's
    counters packed as its row keeps them (ledger.domain.velocity_counters)."""

    def __init__(self) -> None:
        self.accounts = {
            k: Account(
                AccountSpec(k, "USD"),
                closed=False,
                balances=Balances(),
                entry_count=0,
                created_at=T0,
                head_hash=GENESIS_HASH,
            )
            for k in (LIMITED, OTHER)
        }
        self.counters = b""
        # The limited account's counted movements (its entries, as RECOUNT_VELOCITY reads them).
        self.movements: list[tuple[datetime, Direction, int]] = []

    def set_rules(self, rules: tuple[VelocityRule, ...], now: datetime) -> None:
        """A change of limits: the new rules' windows are recounted from the history
        (as SetAccountLimits does under the account's lock)."""
        self.accounts[LIMITED] = replace(self.accounts[LIMITED], velocity_rules=rules)
        recounted: dict[tuple[Direction, int], dict[int, tuple[int, int]]] = {}
        for direction, window_s in usage_keys(rules):
            width_s = bucket_width_s(window_s)
            first = first_counted_bucket(now, window_s)
            buckets = recounted.setdefault((direction, window_s), {})
            for t, d, amount in self.movements:
                bucket = int(t.timestamp()) // width_s
                if d is direction and bucket >= first:
                    amount_before, count_before = buckets.get(bucket, (0, 0))
                    buckets[bucket] = (amount_before + amount, count_before + 1)
        self.counters = velocity_counters.rebuilt(
            sorted(usage_keys(rules)), recounted, int(now.timestamp())
        )

    def locked(self, now: datetime) -> dict[AccountKey, Account]:
        """Accounts as the lock reads them, usage at `now` as storage computes it."""
        out = dict(self.accounts)
        limited = self.accounts[LIMITED]
        out[LIMITED] = replace(
            limited,
            # Usage, as storage hands it: the engine checks against its bounds first
            # and against the exact sums only when a bound would refuse.
            velocity_used=velocity_counters.Usage(
                self.counters, usage_keys(limited.velocity_rules), int(now.timestamp())
            ),
            velocity_read_at=now,
        )
        return out

    def apply(self, requests: list[TransferRequest], now: datetime) -> list[TransferResult]:
        locked = self.locked(now)
        plan = apply_transfers(
            requests, TransferBatchState(locked, {}, frozenset(), {}, {}, {}, now)
        )
        for key, state in plan.accounts.items():
            self.accounts[key] = advanced(self.accounts[key], state)
        self.counters = velocity_counters.added(
            self.counters,
            [
                ((v.direction, v.window_s), v.bucket_index, v.amount_minor, v.count)
                for v in plan.velocity
                if v.account == LIMITED
            ],
        )
        return [o.result for o in plan.outcomes]


def _usage(
    events: list[tuple[datetime, Direction, int]], direction: Direction, now: datetime, span_s: int
) -> VelocityUsage:
    return total_within([(t, a) for t, d, a in events if d is direction], now=now, window_s=span_s)


def _over(rule: VelocityRule, usage: VelocityUsage) -> bool:
    value = usage.amount_minor if rule.metric is VelocityMetric.AMOUNT else usage.count
    return value > rule.limit


@settings(max_examples=EXAMPLES, deadline=None)
@given(initial=rules_strategy, steps=st.lists(step, min_size=1, max_size=25))
def test_no_interleaving_ever_exceeds_a_rule_and_refusals_stay_within_one_bucket(
    initial: tuple[VelocityRule, ...],
    steps: list[
        tuple[int, tuple[VelocityRule, ...] | None, list[tuple[Direction, TransferAction, int]]]
    ],
) -> None:
    shard = Shard()
    shard.set_rules(initial, T0)
    rules = initial
    now = T0
    accepted: list[tuple[datetime, Direction, int]] = []
    serial = 0
    for dt_s, change, moves in steps:
        now += timedelta(seconds=dt_s, milliseconds=1)
        if change is not None:
            # Committed before this batch: it applies to the whole batch.
            shard.set_rules(change, now)
            rules = change
        requests = []
        for side, action, amount in moves:
            serial += 1
            debit, credit = (LIMITED, OTHER) if side is Direction.DEBIT else (OTHER, LIMITED)
            requests.append(TransferRequest(f"t{serial}", debit, credit, amount, "USD", action))
        results = shard.apply(requests, now)
        for (side, _, amount), result in zip(moves, results, strict=True):
            if result is TransferResult.OK:
                accepted.append((now, side, amount))
                shard.movements.append((now, side, amount))
                for rule in rules:
                    if rule.direction is side:
                        # Never exceeded over the exact window ending at this movement.
                        assert not _over(rule, _usage(accepted, side, now, rule.window_s)), rule
            else:
                assert result is TransferResult.EXCEEDS_VELOCITY_LIMIT
                # Refused only if one more would exceed the window widened by one bucket.
                attempt = [*accepted, (now, side, amount)]
                assert any(
                    rule.direction is side
                    and _over(
                        rule,
                        _usage(attempt, side, now, rule.window_s + bucket_width_s(rule.window_s)),
                    )
                    for rule in rules
                ), (rules, side, amount)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    before=rules_strategy,
    after=rules_strategy,
    amounts=st.lists(st.integers(min_value=1, max_value=80), min_size=1, max_size=8),
)
def test_a_change_of_limits_applies_from_its_commit_on(
    before: tuple[VelocityRule, ...], after: tuple[VelocityRule, ...], amounts: list[int]
) -> None:
    """What the engine decides for a batch depends only on the rules in force when the
    batch runs (and on what moved): the same history under the new rules decides the
    same, whatever the old rules were."""
    histories = []
    for first_rules in (before, after):
        shard = Shard()
        shard.set_rules((), T0)
        now = T0
        first = [TransferRequest("a", LIMITED, OTHER, 50, "USD", TransferAction.POST)]
        assert shard.apply(first, now) == [TransferResult.OK]
        shard.movements.append((now, Direction.DEBIT, 50))
        now += timedelta(seconds=1)
        shard.set_rules(first_rules, now)
        shard.set_rules(after, now)
        batch = [
            TransferRequest(f"b{i}", LIMITED, OTHER, a, "USD", TransferAction.POST)
            for i, a in enumerate(amounts)
        ]
        histories.append(shard.apply(batch, now))
    assert histories[0] == histories[1]


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    rules=rules_strategy,
    used=st.dictionaries(
        st.tuples(st.sampled_from(list(Direction)), st.sampled_from(WINDOWS_S)),
        st.builds(
            VelocityUsage,
            amount_minor=st.integers(min_value=0, max_value=400),
            count=st.integers(min_value=0, max_value=20),
        ),
    ),
    side=st.sampled_from(list(Direction)),
    amount=st.integers(min_value=1, max_value=300),
)
def test_the_engine_refuses_exactly_what_the_stated_rule_refuses(
    rules: tuple[VelocityRule, ...],
    used: dict[tuple[Direction, int], VelocityUsage],
    side: Direction,
    amount: int,
) -> None:
    """apply_transfers' fast check is refusing_rule (ledger/domain/velocity.py), the
    readable statement of the rule: same decision, same rule named."""
    shard = Shard()
    shard.set_rules(rules, T0)
    limited = replace(
        shard.accounts[LIMITED],
        velocity_used={k: used.get(k, VelocityUsage()) for k in usage_keys(rules)},
        velocity_read_at=T0,
    )
    accounts = {**shard.accounts, LIMITED: limited}
    debit, credit = (LIMITED, OTHER) if side is Direction.DEBIT else (OTHER, LIMITED)
    plan = apply_transfers(
        [TransferRequest("t", debit, credit, amount, "USD", TransferAction.POST)],
        TransferBatchState(accounts, {}, frozenset(), {}, {}, {}, T0),
    )
    stated = refusing_rule(rules, used, direction=side, amount_minor=amount)
    outcome = plan.outcomes[0]
    if stated is None:
        assert outcome.result is TransferResult.OK
    else:
        assert outcome.result is TransferResult.EXCEEDS_VELOCITY_LIMIT
        assert outcome.refused_by_rule == stated.rule_id


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    window_s=st.sampled_from(WINDOWS_S),
    adds=st.lists(
        st.tuples(
            # Seconds on (negative: the clock stepped back).
            st.integers(min_value=-30, max_value=120),
            st.integers(min_value=0, max_value=2**62),
            st.integers(min_value=0, max_value=3),
        ),
        max_size=40,
    ),
    later_s=st.integers(min_value=0, max_value=700),
)
def test_a_ring_counts_what_a_bucket_per_index_counts(
    window_s: int, adds: list[tuple[int, int, int]], later_s: int
) -> None:
    """The packed ring against buckets kept one per index (what the counters
    were before they moved onto the account row): for every check at or after
    the last add, the same usage; a bucket older than the ring's head (a clock
    that stepped back) is counted in the head."""
    key = (Direction.DEBIT, window_s)
    width_s = bucket_width_s(window_s)
    start_s = int(T0.timestamp())
    counters = velocity_counters.rebuilt([key], {}, start_s)
    buckets: dict[int, tuple[int, int]] = {}
    head = start_s // width_s
    now_s = start_s
    for step_s, amount_minor, count in adds:
        now_s = max(start_s, now_s + step_s)
        bucket = now_s // width_s
        counters = velocity_counters.added(counters, [(key, bucket, amount_minor, count)])
        head = max(head, bucket)
        amount_before, count_before = buckets.get(head, (0, 0))
        buckets[head] = (amount_before + amount_minor, count_before + count)
    check_s = max(now_s, head * width_s) + later_s
    first = (check_s - window_s) // width_s
    expected_minor = sum(a for b, (a, _) in buckets.items() if b >= first)
    expected_count = sum(c for b, (_, c) in buckets.items() if b >= first)
    used = velocity_counters.usage(counters, [key], check_s)[key]
    saturated = AMOUNT_MINOR_MAX
    assert used.count == expected_count
    # A bucket saturates at the largest amount: any limit refuses it as the exact sum would.
    assert used.amount_minor == expected_minor or (
        expected_minor > saturated and used.amount_minor >= saturated
    )
    # The bounds the engine checks first are never below what the window counts, and
    # the sums the engine reads are get's.
    reader = velocity_counters.Usage(counters, [key], check_s)
    assert reader.totals(Direction.DEBIT, [window_s]) == ((used.amount_minor,), (used.count,))
    (bound_minor,), (bound_count,) = reader.bounds(Direction.DEBIT, [window_s])
    assert bound_minor >= used.amount_minor and bound_count >= used.count

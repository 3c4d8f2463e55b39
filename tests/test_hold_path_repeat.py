"""A move that would make cross-shard holds' paths take the same relay step twice
waits for those holds, names them all, and goes once they settle.

A relay and each pass through it are found by the shard the hold arrives from,
so a path may take each step (shard, arriving from) once. A debit party moved
round three shards (a, b, c, a, b) while its hold to a fourth stays open would
need the step "b from a" twice. Chaos seed 272 drained a shard for 80 s while
two of its merchants waited so: the summary said only "a cross-shard hold's
path", and nobody could tell which hold to settle. Then it named only the first
such hold per run, so a drain settled one per merchant per rerun (chaos seed
305: five rounds, past the drain's deadline).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ledger.domain.moves import CrossHold
from ledger.moves.rebalance import Rebalancer
from ledger.routing.config import ShardConfig
from ledger.routing.ring import ShardRing
from ledger.v1 import ledger_pb2 as pb
from tests.ledger4 import ALL_SHARDS, Ledger4
from tests.support import ref, transfer, uid
from tests.test_moves_settle_routing import settle
from tests.test_rebalance import (
    DEFERRED_CALL_ATTEMPTS_MAX,
    all_balances,
    assert_reconciled,
    create_merchants,
    opened,
    send_retrying,
    settled,
    switch_and_rebalance,
    wait_for_balances,
)

# Where the debit party lives at each step: the last move would repeat "b from a".
ROUTE = ("shard-a", "shard-b", "shard-c", "shard-a", "shard-b")
PARTNER_SHARD = "shard-d"
CANDIDATES = 20_000
HOLD_MINOR = 250
# Open holds whose paths would repeat a step: every one is named.
HOLDS = 2


def heavy(env: Ledger4, epoch: int, shard: str) -> ShardConfig:
    return env.config(epoch, ALL_SHARDS, weights={shard: 6})


async def test_a_move_that_would_repeat_a_relay_step_waits_for_the_named_holds(
    ledger4: Ledger4, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = ledger4.service
    configs = [heavy(ledger4, 2 + i, shard) for i, shard in enumerate(ROUTE)]
    rings = [ShardRing(c) for c in configs]
    candidates = [uid("rp") for _ in range(CANDIDATES)]
    mover = next(m for m in candidates if [r.shard_for(m) for r in rings] == list(ROUTE))
    partner = next(m for m in candidates if {r.shard_for(m) for r in rings} == {PARTNER_SHARD})

    # Created on the first config's owners: nothing to move yet.
    assert (await switch_and_rebalance(ledger4, configs[0])).results == []
    await create_merchants(service, [mover, partner])
    holds = sorted(
        (
            transfer(
                uid("hp"),
                ref(mover, "cash"),
                ref(partner, "sales"),
                HOLD_MINOR,
                action=pb.TRANSFER_ACTION_PENDING,
            )
            for _ in range(HOLDS)
        ),
        key=lambda h: h.id,
    )
    for number, hold in enumerate(holds):
        rng = random.Random(number)
        await send_retrying(service, hold, rng, attempts_max=DEFERRED_CALL_ATTEMPTS_MAX)
    keys = [(mover, h.id) for h in holds]
    assert await settled(service, keys) == dict.fromkeys(keys, pb.TRANSFER_RESULT_OK)
    held = await all_balances(service, [mover, partner])

    # a -> b -> c -> a: each move adds a relay step (none folds), the hold open.
    for config in configs[1:4]:
        summary = await switch_and_rebalance(ledger4, config)
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(mover, "moved")]
        assert await all_balances(service, [mover, partner]) == held

    # a -> b again: the paths would take "b from a" twice; the holds are named.
    # Each path is walked once, under the fence of the first round: not again while
    # fenced, nor in later rounds while the holds named stay open (a walk reads
    # every shard of the path, seconds on slow shards: chaos seed 305).
    walks: Counter[str] = Counter()
    walk = Rebalancer._hold_path

    async def counted(self: Rebalancer, hold: CrossHold, here: str) -> list[str] | None:
        walks[hold.key.transfer_id] += 1
        return await walk(self, hold, here)

    monkeypatch.setattr(Rebalancer, "_hold_path", counted)
    summary = await switch_and_rebalance(ledger4, configs[4])
    assert walks == dict.fromkeys((h.id for h in holds), 1)
    assert not summary.finished
    [result] = summary.results
    named = ", ".join(f"{h.id} of {mover}" for h in holds)
    assert result.outcome.startswith(
        f"deferred: cross-shard holds {named}: their paths would repeat a relay step"
    ), result.outcome
    assert f"NOT MOVED {mover} shard-a -> shard-b: deferred: cross-shard holds {named}" in (
        summary.render()
    )
    # Copied in the run's first round only: later rounds looked at the hold first.
    assert result.rows_copied == 0

    # Their caller voids them (through the three relays); the rerun moves the merchant.
    for hold in holds:
        void = settle(mover, hold.id, action=pb.TRANSFER_ACTION_VOID_PENDING, credit=None)
        rng = random.Random(hold.id)
        await send_retrying(service, void, rng, attempts_max=DEFERRED_CALL_ATTEMPTS_MAX)
    released = dict.fromkeys(
        [(m, account) for m in (mover, partner) for account in ("cash", "sales")], (0, 0, 0, 0)
    )
    await wait_for_balances(service, released, what="the void to pass every relay")
    async with opened(configs[4]) as rebalancer:
        rerun = await rebalancer.rebalance()
    assert rerun.finished, rerun.render()
    assert [(r.move.merchant_id, r.outcome) for r in rerun.results] == [(mover, "moved")]
    assert await all_balances(service, [mover, partner]) == released
    await assert_reconciled(ledger4, configs[4], "reconcile.toml", every_mirror_checked=True)

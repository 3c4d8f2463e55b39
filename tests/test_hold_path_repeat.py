"""Holds whose paths pass a shard more than once, as their parties move round.

A party moved round three shards (a, b, c, a, b) while its hold to a fourth
stays open makes the hold's path take the step "b from a" twice. Relays were
found by the shard the hold arrives from, so such a move waited for the hold to
settle (chaos seeds 272, 305, 322, 325: drains and rebalances left unfinished).
Since migration 0020 every stop of a path has a number in path order, and a
relay is found by the number of the stop before it: the moves go, and a settle
passes every relay once, in order.

A path made before the numbers keeps the old rule: a move that would repeat a
step waits for those holds, names them all, and goes once they settle. Chaos
seed 272 drained a shard for 80 s while two of its merchants waited so: the
summary said only "a cross-shard hold's path", and nobody could tell which
hold to settle. Then it named only the first such hold per run, so a drain
settled one per merchant per rerun (chaos seed 305: five rounds, past the
drain's deadline).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from ledger.domain.moves import CrossHold
from ledger.moves.rebalance import Rebalancer, moved_path
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
    on_every_shard,
    opened,
    send_retrying,
    settled,
    switch_and_rebalance,
    wait_for_balances,
)

# Where the moving party lives at each step: the fifth move repeats "b from a",
# the sixth "c from b".
ROUTE = ("shard-a", "shard-b", "shard-c", "shard-a", "shard-b", "shard-c")
PARTNER_SHARD = "shard-d"
CANDIDATES = 20_000
HOLD_MINOR = 250
# Open holds whose paths would repeat a step: every one is named.
HOLDS = 2
UNTOUCHED = (0, 0, 0, 0)
RELAYS = "SELECT count(*) FROM hold_relays WHERE transfer_id = ANY($1::text[])"
NUMBERED_RELAYS = RELAYS + " AND path_position IS NOT NULL"


def heavy(env: Ledger4, epoch: int, shard: str) -> ShardConfig:
    return env.config(epoch, ALL_SHARDS, weights={shard: 6})


@dataclass
class Staged:
    configs: list[ShardConfig]
    mover: str
    partner: str
    debit: str
    holds: list[pb.Transfer]
    held: dict[tuple[str, str], tuple[int, int, int, int]]


async def staged_holds(
    env: Ledger4, *, debit_party_moves: bool, route: Sequence[str] = ROUTE
) -> Staged:
    """A merchant that will move along route and one that stays on shard-d, with
    HOLDS open holds between them (the mover pays, or is paid)."""
    configs = [heavy(env, 2 + i, shard) for i, shard in enumerate(route)]
    rings = [ShardRing(c) for c in configs]
    candidates = [uid("rp") for _ in range(CANDIDATES)]
    mover = next(m for m in candidates if [r.shard_for(m) for r in rings] == list(route))
    partner = next(m for m in candidates if {r.shard_for(m) for r in rings} == {PARTNER_SHARD})
    debit, credit = (mover, partner) if debit_party_moves else (partner, mover)

    # Created on the first config's owners: nothing to move yet.
    assert (await switch_and_rebalance(env, configs[0])).results == []
    await create_merchants(env.service, [mover, partner])
    holds = sorted(
        (
            transfer(
                uid("hp"),
                ref(debit, "cash"),
                ref(credit, "sales"),
                HOLD_MINOR,
                action=pb.TRANSFER_ACTION_PENDING,
            )
            for _ in range(HOLDS)
        ),
        key=lambda h: h.id,
    )
    for number, hold in enumerate(holds):
        rng = random.Random(number)
        await send_retrying(env.service, hold, rng, attempts_max=DEFERRED_CALL_ATTEMPTS_MAX)
    keys = [(debit, h.id) for h in holds]
    assert await settled(env.service, keys) == dict.fromkeys(keys, pb.TRANSFER_RESULT_OK)
    held = await all_balances(env.service, [mover, partner])
    return Staged(configs, mover, partner, debit, holds, held)


async def settle_holds(env: Ledger4, staged: Staged) -> None:
    """Posts the first hold and voids the rest, through every relay of their paths."""
    for number, hold in enumerate(staged.holds):
        action = pb.TRANSFER_ACTION_POST_PENDING if number == 0 else pb.TRANSFER_ACTION_VOID_PENDING
        item = settle(staged.debit, hold.id, action=action, credit=None)
        await send_retrying(
            env.service, item, random.Random(hold.id), attempts_max=DEFERRED_CALL_ATTEMPTS_MAX
        )
    credit = staged.partner if staged.debit == staged.mover else staged.mover
    await wait_for_balances(
        env.service,
        {
            (staged.debit, "cash"): (HOLD_MINOR, 0, 0, 0),
            (credit, "sales"): (0, HOLD_MINOR, 0, 0),
            (staged.debit, "sales"): UNTOUCHED,
            (credit, "cash"): UNTOUCHED,
        },
        what="the settles to pass every relay",
    )


@pytest.mark.parametrize("debit_party_moves", [True, False], ids=["debit-party", "credit-party"])
async def test_a_party_moved_round_three_shards_passes_shards_twice_and_its_holds_settle(
    ledger4: Ledger4, debit_party_moves: bool
) -> None:
    staged = await staged_holds(ledger4, debit_party_moves=debit_party_moves)
    ids = [h.id for h in staged.holds]

    # a -> b -> c -> a -> b -> c: no move folds (the party never comes back to the
    # shard its path passes next), every one goes, the holds open throughout.
    for config in staged.configs[1:]:
        summary = await switch_and_rebalance(ledger4, config)
        assert summary.finished, summary.render()
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [
            (staged.mover, "moved")
        ]
        assert await all_balances(ledger4.service, [staged.mover, staged.partner]) == staged.held
    # Each path: d and c, b, a, c, b, a (debit party) or a, b, c, a, b, c (credit
    # party): relays twice on a and on b, once on c (the moving party is on c).
    relays = await on_every_shard(ledger4, RELAYS, ids)
    assert relays == {"shard-a": 2 * HOLDS, "shard-b": 2 * HOLDS, "shard-c": HOLDS}
    numbered = await on_every_shard(
        ledger4,
        "SELECT count(DISTINCT (transfer_id, path_position)) FROM hold_relays"
        " WHERE transfer_id = ANY($1::text[])",
        ids,
    )
    assert numbered == relays

    await settle_holds(ledger4, staged)
    # Each settle passed each relay once: a pass per relay, on the relay's shard.
    passes = await on_every_shard(
        ledger4,
        "SELECT count(*) FROM relay_passes WHERE pending_transfer_id = ANY($1::text[])",
        ids,
    )
    assert passes == relays
    # Every settlement pair mirrors, nothing left pending on any of them.
    await assert_reconciled(
        ledger4, staged.configs[-1], "reconcile.toml", every_mirror_checked=True
    )
    pending = await on_every_shard(
        ledger4,
        "SELECT coalesce(sum(debits_pending + credits_pending), 0) FROM accounts"
        " WHERE merchant_id = '$settlement'",
    )
    assert pending == {}

    # Nothing holds the merchant now: it moves on.
    summary = await switch_and_rebalance(ledger4, heavy(ledger4, 2 + len(ROUTE), ROUTE[0]))
    assert summary.finished, summary.render()
    assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(staged.mover, "moved")]


async def made_before_numbers(env: Ledger4, staged: Staged) -> None:
    """Makes the staged holds look made before migration 0020: no numbers."""
    unnumbered = await on_every_shard(
        env,
        "WITH s AS (UPDATE sagas SET path_position = NULL"
        "           WHERE transfer_id = ANY($1::text[]) AND kind = 1 RETURNING 1),"
        " c AS (UPDATE credit_holds SET path_position = NULL"
        "       WHERE transfer_id = ANY($1::text[]) RETURNING 1)"
        " SELECT (SELECT count(*) FROM s) + (SELECT count(*) FROM c)",
        [h.id for h in staged.holds],
    )
    assert unnumbered == {"shard-a": HOLDS, PARTNER_SHARD: HOLDS}


async def test_a_move_that_would_repeat_a_step_of_an_unnumbered_path_waits_for_the_named_holds(
    ledger4: Ledger4, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = await staged_holds(ledger4, debit_party_moves=True)
    holds, mover, configs = staged.holds, staged.mover, staged.configs
    ids = [h.id for h in holds]
    await made_before_numbers(ledger4, staged)

    # a -> b -> c -> a: each move adds a relay step (none folds), the hold open.
    for config in configs[1:4]:
        summary = await switch_and_rebalance(ledger4, config)
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(mover, "moved")]
        assert await all_balances(ledger4.service, [mover, staged.partner]) == staged.held
    assert await on_every_shard(ledger4, NUMBERED_RELAYS, ids) == {}

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
    assert walks == dict.fromkeys(ids, 1)
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
        await send_retrying(ledger4.service, void, rng, attempts_max=DEFERRED_CALL_ATTEMPTS_MAX)
    released = dict.fromkeys(
        [(m, account) for m in (mover, staged.partner) for account in ("cash", "sales")],
        UNTOUCHED,
    )
    await wait_for_balances(ledger4.service, released, what="the void to pass every relay")
    async with opened(configs[4]) as rebalancer:
        rerun = await rebalancer.rebalance()
    assert rerun.finished, rerun.render()
    assert [(r.move.merchant_id, r.outcome) for r in rerun.results] == [(mover, "moved")]
    assert await all_balances(ledger4.service, [mover, staged.partner]) == released
    await assert_reconciled(ledger4, configs[4], "reconcile.toml", every_mirror_checked=True)


def test_the_planner_folds_a_credit_party_back_on_a_numbered_path_that_passes_its_shard_twice() -> (
    None
):
    path = ["d", "a", "b", "a", "c"]
    # The credit party on c moves back to a, the stop before it: folded.
    assert moved_path(path, destination="a", debit_party=False) == ["d", "a", "b", "a"]
    # Unnumbered, two relays on a would end at c's shard: not folded, one step more.
    assert moved_path(path, destination="a", debit_party=False, numbered=False) == [*path, "a"]


@pytest.mark.parametrize("debit_party_moves", [True, False], ids=["debit-party", "credit-party"])
async def test_an_unnumbered_path_still_relays_folds_and_settles_as_before(
    ledger4: Ledger4, debit_party_moves: bool
) -> None:
    """Holds made before migration 0020 keep the old lookups by arriving shard: a
    party moved a, b, c leaves two relays; back to b folds one away."""
    route = ("shard-a", "shard-b", "shard-c", "shard-b")
    staged = await staged_holds(ledger4, debit_party_moves=debit_party_moves, route=route)
    ids = [h.id for h in staged.holds]
    await made_before_numbers(ledger4, staged)
    for config in staged.configs[1:3]:
        summary = await switch_and_rebalance(ledger4, config)
        assert summary.finished, summary.render()
    assert await on_every_shard(ledger4, RELAYS, ids) == {
        "shard-a": HOLDS,
        "shard-b": HOLDS,
    }
    summary = await switch_and_rebalance(ledger4, staged.configs[3])
    assert summary.finished, summary.render()
    assert await on_every_shard(ledger4, RELAYS, ids) == {"shard-a": HOLDS}
    assert await on_every_shard(ledger4, NUMBERED_RELAYS, ids) == {}
    assert await all_balances(ledger4.service, [staged.mover, staged.partner]) == staged.held

    await settle_holds(ledger4, staged)
    await assert_reconciled(
        ledger4, staged.configs[-1], "reconcile.toml", every_mirror_checked=True
    )

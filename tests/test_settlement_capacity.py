"""A settlement stripe filled by one huge transfer blocks nothing (docs/sagas.md,
"Stripes that fill"; docs/moves.md, "The settlement booking").

A settlement account's totals, like any account's, may not pass 2^63-1. One
cross-shard transfer of that size fills the stripe it goes through. Before:
every later saga booked on that stripe was refused OVERFLOW, whatever its
merchants; a hold a move carried onto it could not be posted (OVERFLOW); a
move booked a merchant's position on the stripe of its merchant id, so every
later move of a merchant whose id shared it failed for good (a bigint out of
range) and the shard could not be drained; and a merchant whose accounts
together held more than one account can could not move at all. Now a leg that
finds its stripe full is booked on an account of its transfer's own, and moves
book positions on numbered accounts of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from ledger.domain.sagas import SETTLEMENT_MERCHANT_ID, SETTLEMENT_STRIPES, settlement_stripe
from ledger.limits import AMOUNT_MINOR_MAX
from ledger.routing.config import ShardConfig
from ledger.routing.ring import ShardRing
from ledger.v1 import ledger_pb2 as pb
from tests.ledger4 import ALL_SHARDS, FIRST_SHARDS, Ledger4, merchant_on
from tests.support import account, create_accounts, ref, result_names, transfer, transfers, uid
from tests.test_rebalance import (
    all_balances,
    assert_reconciled,
    create_merchants,
    switch_and_rebalance,
    wait_for_balances,
)

CANDIDATES = 50_000
POSITION_MINOR = 100
SETTLEMENT_ACCOUNTS = """
SELECT account_id, debits_posted, credits_posted FROM accounts
WHERE merchant_id = $1 AND account_id LIKE $2 ORDER BY account_id
"""


def configs(env: Ledger4) -> tuple[ShardConfig, ShardConfig]:
    """A config on three shards, and one that moves some of shard-a to shard-b."""
    return env.config(1, FIRST_SHARDS), env.config(2, ALL_SHARDS, weights={"shard-b": 6})


def fresh_id(prefix: str, wanted: Callable[[str], bool]) -> str:
    return next(i for i in (uid(prefix) for _ in range(CANDIDATES)) if wanted(i))


def mover_and_payer(
    first: ShardConfig, second: ShardConfig, *, stripe: int | None = None
) -> tuple[str, str]:
    """A merchant going shard-a -> shard-b (its id on the given stripe), and one
    staying on shard-a that gives it a position."""
    rings = [ShardRing(first), ShardRing(second)]

    def route(m: str) -> list[str]:
        return [r.shard_for(m) for r in rings]

    mover = fresh_id(
        "mv",
        lambda m: route(m) == ["shard-a", "shard-b"] and stripe in (None, settlement_stripe(m)),
    )
    return mover, fresh_id("py", lambda m: route(m) == ["shard-a", "shard-a"])


def first_placed(config: ShardConfig, shard: str, prefix: str) -> str:
    """The first id prefix0, prefix1, ... that the config's ring places on shard
    (a seed's runs find the same one)."""
    ring = ShardRing(config)
    return next(
        m for m in (f"{prefix}{i}" for i in range(CANDIDATES)) if ring.shard_for(m) == shard
    )


async def fill_every_stripe(env: Ledger4, config: ShardConfig, prefix: str) -> None:
    """Fills both sides of every USD stripe between every two shards of config: for
    each ordered pair and stripe, a merchant on the first sends 2^63-1 to one on
    the second, each from and to an account of its own. Every later leg between
    them then needs an account of its own (docs/sagas.md, "Stripes that fill").
    Ids come from prefix alone."""
    names = [s.name for s in config.shards]
    whales = {n: first_placed(config, n, f"{prefix}w{n}x") for n in names}
    pairs = [(x, y) for x in names for y in names if x != y]
    for x, y in pairs:
        await create_accounts(
            env.service.stub,
            *(
                account(whales[owner], f"{name}-{stripe}")
                for owner, name in ((x, f"o{y}"), (y, f"i{x}"))
                for stripe in range(SETTLEMENT_STRIPES)
            ),
        )
        items = []
        for stripe in range(SETTLEMENT_STRIPES):
            transfer_id = next(
                i
                for i in (f"{prefix}f{x}{y}{stripe}x{n}" for n in range(CANDIDATES))
                if settlement_stripe(i) == stripe
            )
            items.append(
                transfer(
                    transfer_id,
                    ref(whales[x], f"o{y}-{stripe}"),
                    ref(whales[y], f"i{x}-{stripe}"),
                    AMOUNT_MINOR_MAX,
                )
            )
        results = result_names(await transfers(env.service.stub, *items))
        assert results == ["TRANSFER_RESULT_OK"] * SETTLEMENT_STRIPES, (x, y, results)


def settle(debit_merchant: str, hold_id: str, action: int) -> pb.Transfer:
    return pb.Transfer(
        id=uid("s"), debit_account=ref(debit_merchant, "cash"), action=action, pending_id=hold_id
    )


async def own_accounts(env: Ledger4, shard: str, peer: str) -> dict[str, tuple[int, int]]:
    """shard's settlement accounts for peer in USD that hold one transfer each:
    (debits, credits) posted by account id."""
    conn = await asyncpg.connect(env.specs[shard].dsn)
    try:
        rows = await conn.fetch(SETTLEMENT_ACCOUNTS, SETTLEMENT_MERCHANT_ID, f"{peer}/USD/t-%")
    finally:
        await conn.close()
    return {r["account_id"]: (r["debits_posted"], r["credits_posted"]) for r in rows}


async def filled_stripe(env: Ledger4, first: ShardConfig, *others: str) -> int:
    """Creates the merchants in others and fills a stripe between shard-a and shard-b
    (one transfer of 2^63-1); returns the stripe."""
    whale, payee = merchant_on(first, "shard-a"), merchant_on(first, "shard-b")
    filler = uid("fill")
    await create_merchants(env.service, [whale, payee, *others])
    assert result_names(
        await transfers(
            env.service.stub,
            transfer(filler, ref(whale, "cash"), ref(payee, "sales"), AMOUNT_MINOR_MAX),
        )
    ) == ["TRANSFER_RESULT_OK"]
    return settlement_stripe(filler)


async def test_a_move_books_its_position_past_a_settlement_stripe_a_transfer_filled(
    ledger4: Ledger4,
) -> None:
    first, second = configs(ledger4)
    stripe = await filled_stripe(ledger4, first)
    mover, payer = mover_and_payer(first, second, stripe=stripe)
    await create_merchants(ledger4.service, [mover, payer])
    assert result_names(
        await transfers(
            ledger4.service.stub,
            transfer(uid("t"), ref(payer, "cash"), ref(mover, "sales"), POSITION_MINOR),
        )
    ) == ["TRANSFER_RESULT_OK"]

    summary = await switch_and_rebalance(ledger4, second)
    assert summary.finished, summary.render()
    assert mover in [r.move.merchant_id for r in summary.results]
    balances = await all_balances(ledger4.service, [mover, payer])
    assert balances[(mover, "sales")] == (0, POSITION_MINOR, 0, 0)
    assert balances[(payer, "cash")] == (POSITION_MINOR, 0, 0, 0)
    await assert_reconciled(ledger4, second, "reconcile.toml", every_mirror_checked=True)


async def test_a_position_larger_than_one_account_can_hold_moves_away_and_back(
    ledger4: Ledger4,
) -> None:
    """A merchant holding twice what one account's side may take moves to shard-b
    and back: each side books it on two numbered position accounts, and the
    settlement accounts of the two shards still mirror."""
    first, second = configs(ledger4)
    back = ledger4.config(3, FIRST_SHARDS)
    mover, payer = mover_and_payer(first, second)
    await create_merchants(ledger4.service, [mover, payer])
    assert result_names(
        await transfers(
            ledger4.service.stub,
            transfer(uid("t"), ref(payer, "cash"), ref(mover, "sales"), AMOUNT_MINOR_MAX),
            transfer(uid("t"), ref(payer, "sales"), ref(mover, "cash"), AMOUNT_MINOR_MAX),
        )
    ) == ["TRANSFER_RESULT_OK", "TRANSFER_RESULT_OK"]
    expected = {
        (mover, "cash"): (0, AMOUNT_MINOR_MAX, 0, 0),
        (mover, "sales"): (0, AMOUNT_MINOR_MAX, 0, 0),
        (payer, "cash"): (AMOUNT_MINOR_MAX, 0, 0, 0),
        (payer, "sales"): (AMOUNT_MINOR_MAX, 0, 0, 0),
    }
    for config in (second, back):
        summary = await switch_and_rebalance(ledger4, config)
        assert summary.finished, summary.render()
        assert [r.move.merchant_id for r in summary.results] == [mover]
        assert await all_balances(ledger4.service, [mover, payer]) == expected
        await assert_reconciled(ledger4, config, "reconcile.toml", every_mirror_checked=True)
    # Each shard booked the position four times (twice each way), on two accounts.
    for name, peer in (("shard-a", "shard-b"), ("shard-b", "shard-a")):
        conn = await asyncpg.connect(ledger4.specs[name].dsn)
        try:
            rows = await conn.fetch(SETTLEMENT_ACCOUNTS, SETTLEMENT_MERCHANT_ID, f"{peer}/USD/%")
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [
            (f"{peer}/USD/moves-0", AMOUNT_MINOR_MAX, AMOUNT_MINOR_MAX),
            (f"{peer}/USD/moves-1", AMOUNT_MINOR_MAX, AMOUNT_MINOR_MAX),
        ], name


async def test_sagas_and_holds_book_past_a_filled_stripe(ledger4: Ledger4) -> None:
    """Transfers and holds between shard-a and shard-b whose ids share the stripe
    one transfer filled (both ways, so each shard's side is full) are made, posted
    and voided on accounts of their own; before, each was refused OVERFLOW."""
    first, _ = configs(ledger4)
    payer, payee = merchant_on(first, "shard-a"), merchant_on(first, "shard-b")
    stripe = await filled_stripe(ledger4, first, payer, payee)

    def on_stripe(prefix: str) -> str:
        return fresh_id(prefix, lambda i: settlement_stripe(i) == stripe)

    post_id, hold_id, voided_id = on_stripe("t"), on_stripe("h"), on_stripe("h")
    assert (
        result_names(
            await transfers(
                ledger4.service.stub,
                transfer(post_id, ref(payer, "cash"), ref(payee, "sales"), POSITION_MINOR),
                *(
                    transfer(
                        i,
                        ref(payer, "cash"),
                        ref(payee, "sales"),
                        POSITION_MINOR,
                        action=pb.TRANSFER_ACTION_PENDING,
                    )
                    for i in (hold_id, voided_id)
                ),
            )
        )
        == ["TRANSFER_RESULT_OK"] * 3
    )
    assert (
        result_names(
            await transfers(
                ledger4.service.stub,
                settle(payer, hold_id, pb.TRANSFER_ACTION_POST_PENDING),
                settle(payer, voided_id, pb.TRANSFER_ACTION_VOID_PENDING),
            )
        )
        == ["TRANSFER_RESULT_OK"] * 2
    )
    await wait_for_balances(
        ledger4.service,
        {
            (payer, "cash"): (2 * POSITION_MINOR, 0, 0, 0),
            (payee, "sales"): (0, 2 * POSITION_MINOR, 0, 0),
        },
        what="the post and the void to reach shard-b",
    )
    # Each transfer on accounts of its own (the voided hold's hold nothing): credited
    # on shard-a's for shard-b, debited on shard-b's for shard-a.
    assert sorted((await own_accounts(ledger4, "shard-a", "shard-b")).values()) == [
        (0, 0),
        (0, POSITION_MINOR),
        (0, POSITION_MINOR),
    ]
    assert sorted((await own_accounts(ledger4, "shard-b", "shard-a")).values()) == [
        (0, 0),
        (POSITION_MINOR, 0),
        (POSITION_MINOR, 0),
    ]
    await assert_reconciled(ledger4, first, "reconcile.toml", every_mirror_checked=True)


async def test_a_hold_carried_onto_a_filled_stripe_still_settles(ledger4: Ledger4) -> None:
    first, second = configs(ledger4)
    mover, payer = mover_and_payer(first, second)
    stripe = await filled_stripe(ledger4, first, mover, payer)
    hold_id = fresh_id("h", lambda h: settlement_stripe(h) == stripe)
    assert result_names(
        await transfers(
            ledger4.service.stub,
            transfer(
                hold_id,
                ref(payer, "cash"),
                ref(mover, "sales"),
                POSITION_MINOR,
                action=pb.TRANSFER_ACTION_PENDING,
            ),
        )
    ) == ["TRANSFER_RESULT_OK"]
    summary = await switch_and_rebalance(ledger4, second)
    assert summary.finished, summary.render()
    post = settle(payer, hold_id, pb.TRANSFER_ACTION_POST_PENDING)
    # The move carried the hold to shard-a's account for shard-b of its own, not
    # onto the stripe the filler filled (where posting it would pass 2^63-1, and
    # was refused OVERFLOW).
    assert list((await own_accounts(ledger4, "shard-a", "shard-b")).values()) == [(0, 0)]
    assert result_names(await transfers(ledger4.service.stub, post)) == ["TRANSFER_RESULT_OK"]
    await wait_for_balances(
        ledger4.service,
        {(payer, "cash"): (POSITION_MINOR, 0, 0, 0), (mover, "sales"): (0, POSITION_MINOR, 0, 0)},
        what="the post to reach shard-b",
    )
    await assert_reconciled(ledger4, second, "reconcile.toml", every_mirror_checked=True)

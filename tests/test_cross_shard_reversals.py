"""Reversals of transfers whose parties are on two shards (docs/sagas.md,
"Reversals across shards").

A reversal debits the original's credit account and credits its debit account,
so between shards it is a saga like any transfer: step 1, where the original's
credit merchant is, bounds it by what the original posted to that account and
by every reversal of it (all of them debit that account, so all are there, under
its lock); step 2, where the original's record is, checks that the original is a
posted transfer between the reversal's two accounts, or refuses it and step 3
releases the reservation. A cross-shard post of a hold is recorded before its
credit lands: in between, step 1 finds nothing to bound a reversal by and
refuses it.

Before, reversing across shards was refused REVERSAL_TARGET_NOT_FOUND whatever
the original (and before that, found by tests/test_ledger_model.py, the saga
dropped reversal_of and posted a plain transfer).
"""

from __future__ import annotations

import asyncio

from ledger.domain.accounts import AccountKey
from ledger.domain.sagas import SagaState
from ledger.domain.transfers import TransferAction, TransferRequest, TransferResult
from ledger.routing.config import ShardConfig
from ledger.routing.ring import ShardRing
from ledger.sagas.runner import SagaRunner, SagaSettings
from ledger.v1 import ledger_pb2 as pb
from tests.event_support import collect_until
from tests.ledger4 import ALL_SHARDS, FIRST_SHARDS, Ledger4, merchant_on
from tests.support import (
    RPC_TIMEOUT_S,
    account_row_locked,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
)
from tests.test_rebalance import (
    all_balances,
    assert_reconciled,
    create_merchants,
    settled,
    switch_and_rebalance,
)

ORIGINAL_MINOR = 10
# Reversals of one unit each, sent at once against an original of CONCURRENT_MINOR.
CONCURRENT_MINOR = 5
CONCURRENT_REVERSALS = 12
# A call whose saga is held up at step 2 answers IN_PROGRESS within this deadline
# (the service waits for the saga until limits.saga_deadline_margin_s before it).
SHORT_RPC_TIMEOUT_S = 3.0
CANDIDATES = 20_000
# A saga this test starts is leased to it for longer than the test, so no recovery
# worker drives it on behind the test's back.
HELD_LEASE_S = 3_600.0


def first_config(env: Ledger4) -> ShardConfig:
    return env.config(1, FIRST_SHARDS)


async def parties_apart(env: Ledger4) -> tuple[ShardConfig, str, str]:
    """The first config, and a payer on shard-a and a payee on shard-b with accounts."""
    config = first_config(env)
    payer, payee = merchant_on(config, "shard-a"), merchant_on(config, "shard-b")
    await create_merchants(env.service, [payer, payee])
    return config, payer, payee


def reversal(
    original_id: str,
    payer: str,
    payee: str,
    amount_minor: int,
    *,
    debit: str = "sales",
    credit: str = "cash",
) -> pb.Transfer:
    """Moves amount_minor of payer cash -> payee sales (original_id) back."""
    return transfer(
        uid("rv"), ref(payee, debit), ref(payer, credit), amount_minor, reversal_of=original_id
    )


async def sent(env: Ledger4, *items: pb.Transfer) -> list[str]:
    return result_names(await transfers(env.service.stub, *items))


async def original_between(env: Ledger4, payer: str, payee: str, amount_minor: int) -> str:
    original = uid("t")
    assert await sent(
        env, transfer(original, ref(payer, "cash"), ref(payee, "sales"), amount_minor)
    ) == ["TRANSFER_RESULT_OK"]
    return original


async def assert_reversed(
    env: Ledger4,
    config: ShardConfig,
    payer: str,
    payee: str,
    posted_minor: int,
    reversed_minor: int,
) -> None:
    """The books once payer cash -> payee sales posted posted_minor in all and its
    reversals moved reversed_minor back, nothing pending; reconcile is clean."""
    # (debits posted, credits posted, debits pending, credits pending) per account.
    assert await all_balances(env.service, [payer, payee]) == {
        (payer, "cash"): (posted_minor, reversed_minor, 0, 0),
        (payer, "sales"): (0, 0, 0, 0),
        (payee, "cash"): (0, 0, 0, 0),
        (payee, "sales"): (reversed_minor, posted_minor, 0, 0),
    }
    await assert_reconciled(env, config, "reconcile.toml", every_mirror_checked=True)


async def test_a_transfer_between_shards_is_reversed_in_parts_up_to_its_amount(
    ledger4: Ledger4,
) -> None:
    config, payer, payee = await parties_apart(ledger4)
    original = await original_between(ledger4, payer, payee, ORIGINAL_MINOR)

    first = reversal(original, payer, payee, 4)
    assert await sent(ledger4, first) == ["TRANSFER_RESULT_OK"]
    # Its events say what it is: the reservation's carries the transfer with reversal_of.
    [*_, reserved] = await collect_until(
        ledger4.service.stub,
        pb.SubscribeEventsRequest(merchant_id=payee),
        lambda e: (
            e.transfer_id == first.id
            and e.kind == pb.EVENT_KIND_SAGA_STEP
            and e.HasField("transfer")
        ),
    )
    assert (reserved.shard, reserved.transfer.reversal_of) == ("shard-b", original)
    # A retry moves nothing twice.
    [replayed] = await transfers(ledger4.service.stub, first)
    assert (replayed.result, replayed.replayed) == (pb.TRANSFER_RESULT_OK, True)
    assert await sent(
        ledger4,
        reversal(original, payer, payee, 7),
        # Not the original's debit account: step 2 refuses, step 3 releases the 1.
        reversal(original, payer, payee, 1, credit="sales"),
        # Not the account the original credited: nothing there to reverse.
        reversal(original, payer, payee, 1, debit="cash"),
        reversal(uid("none"), payer, payee, 1),
    ) == [
        "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL",
        "TRANSFER_RESULT_REVERSAL_ACCOUNTS_MISMATCH",
        "TRANSFER_RESULT_REVERSAL_TARGET_NOT_FOUND",
        "TRANSFER_RESULT_REVERSAL_TARGET_NOT_FOUND",
    ]
    # The compensated one counts for nothing: 4 + 6 is the whole original.
    assert await sent(
        ledger4, reversal(original, payer, payee, 6), reversal(original, payer, payee, 1)
    ) == ["TRANSFER_RESULT_OK", "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL"]

    await assert_reversed(ledger4, config, payer, payee, ORIGINAL_MINOR, ORIGINAL_MINOR)


async def test_reversals_sent_at_once_never_reverse_more_than_the_original(
    ledger4: Ledger4,
) -> None:
    config, payer, payee = await parties_apart(ledger4)
    original = await original_between(ledger4, payer, payee, CONCURRENT_MINOR)

    answers = await asyncio.gather(
        *(sent(ledger4, reversal(original, payer, payee, 1)) for _ in range(CONCURRENT_REVERSALS))
    )
    names = sorted(name for [name] in answers)
    assert names == ["TRANSFER_RESULT_OK"] * CONCURRENT_MINOR + [
        "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL"
    ] * (CONCURRENT_REVERSALS - CONCURRENT_MINOR)

    # In one batch, in order: the first reversal of a fresh original takes its room.
    second = await original_between(ledger4, payer, payee, 3)
    assert await sent(
        ledger4, reversal(second, payer, payee, 3), reversal(second, payer, payee, 3)
    ) == ["TRANSFER_RESULT_OK", "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL"]
    await assert_reversed(ledger4, config, payer, payee, CONCURRENT_MINOR + 3, CONCURRENT_MINOR + 3)


async def test_a_reversal_still_in_flight_counts_until_its_saga_ends(ledger4: Ledger4) -> None:
    config, payer, payee = await parties_apart(ledger4)
    original = await original_between(ledger4, payer, payee, ORIGINAL_MINOR)

    held_up = reversal(original, payer, payee, 8)
    async with account_row_locked(ledger4.specs["shard-a"].dsn, payer, "cash"):
        response = await ledger4.service.stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=[held_up]), timeout=SHORT_RPC_TIMEOUT_S
        )
        assert result_names(response.results) == ["TRANSFER_RESULT_IN_PROGRESS"]
        # Its step 1 reserved 8 of the 10: 3 more would be too many.
        assert await sent(ledger4, reversal(original, payer, payee, 3)) == [
            "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL"
        ]
    assert await settled(ledger4.service, [(payee, held_up.id)]) == {
        (payee, held_up.id): pb.TRANSFER_RESULT_OK
    }
    assert await sent(
        ledger4, reversal(original, payer, payee, 3), reversal(original, payer, payee, 2)
    ) == ["TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL", "TRANSFER_RESULT_OK"]
    await assert_reversed(ledger4, config, payer, payee, ORIGINAL_MINOR, ORIGINAL_MINOR)


async def test_reversals_count_wherever_moves_have_put_the_two_parties(ledger4: Ledger4) -> None:
    """Together on shard-a, apart (the payee moved to shard-b), together on shard-c:
    each reversal counts every earlier one, local or between shards."""
    configs = [
        first_config(ledger4),
        ledger4.config(2, ALL_SHARDS, weights={"shard-b": 6}),
        ledger4.config(3, ALL_SHARDS, weights={"shard-c": 6}),
    ]
    rings = [ShardRing(c) for c in configs]
    candidates = [uid("rm") for _ in range(CANDIDATES)]

    def placed(route: list[str]) -> str:
        return next(m for m in candidates if [r.shard_for(m) for r in rings] == route)

    payer = placed(["shard-a", "shard-a", "shard-c"])
    payee = placed(["shard-a", "shard-b", "shard-c"])
    await create_merchants(ledger4.service, [payer, payee])
    original = await original_between(ledger4, payer, payee, 12)
    assert await sent(ledger4, reversal(original, payer, payee, 2)) == ["TRANSFER_RESULT_OK"]

    summary = await switch_and_rebalance(ledger4, configs[1])
    assert summary.finished, summary.render()
    assert [r.move.merchant_id for r in summary.results] == [payee]
    # Apart: the local reversal's row moved with the payee, and counts.
    assert await sent(
        ledger4,
        reversal(original, payer, payee, 11),
        reversal(original, payer, payee, 5),
        reversal(original, payer, payee, 6),
    ) == [
        "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL",
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL",
    ]
    # An original between shards, reversed in part between shards.
    apart = await original_between(ledger4, payer, payee, 7)
    assert await sent(ledger4, reversal(apart, payer, payee, 3)) == ["TRANSFER_RESULT_OK"]

    summary = await switch_and_rebalance(ledger4, configs[2])
    assert summary.finished, summary.render()
    assert sorted(r.move.merchant_id for r in summary.results) == sorted([payer, payee])
    # Together again: reversals between shards count on the local path too, and
    # an original made between shards is reversed on it.
    assert await sent(
        ledger4,
        reversal(original, payer, payee, 6),
        reversal(original, payer, payee, 5),
        reversal(apart, payer, payee, 5),
        reversal(apart, payer, payee, 4),
    ) == [
        "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL",
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL",
        "TRANSFER_RESULT_OK",
    ]
    await assert_reversed(ledger4, configs[2], payer, payee, 12 + 7, 12 + 7)


async def test_a_reversal_refused_at_step_two_releases_its_reservation_and_reads_as_refused(
    ledger4: Ledger4,
) -> None:
    config, payer, payee = await parties_apart(ledger4)
    original = await original_between(ledger4, payer, payee, ORIGINAL_MINOR)
    mismatched = reversal(original, payer, payee, ORIGINAL_MINOR, credit="sales")
    assert await sent(ledger4, mismatched) == ["TRANSFER_RESULT_REVERSAL_ACCOUNTS_MISMATCH"]
    found = await ledger4.service.stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=payee, transfer_id=mismatched.id)]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert [t.result for t in found.transfers] == [pb.TRANSFER_RESULT_REVERSAL_ACCOUNTS_MISMATCH]
    # A retry with the same id stays refused; a new one, right, reverses it all.
    [again] = await transfers(ledger4.service.stub, mismatched)
    assert again.result == pb.TRANSFER_RESULT_REVERSAL_ACCOUNTS_MISMATCH
    assert await sent(ledger4, reversal(original, payer, payee, ORIGINAL_MINOR)) == [
        "TRANSFER_RESULT_OK"
    ]
    await assert_reversed(ledger4, config, payer, payee, ORIGINAL_MINOR, ORIGINAL_MINOR)


async def test_a_hold_posted_across_shards_is_reversed_only_once_its_credit_landed(
    ledger4: Ledger4,
) -> None:
    """A cross-shard post of a hold is recorded on the payer's shard (step 1) before
    its credit lands on the payee's (step 2). In between, the original reads as a
    good post where the reversal's step 2 would look, so step 1 must refuse it: the
    payee's account holds nothing posted by it yet to bound the reversal by."""
    config, payer, payee = await parties_apart(ledger4)
    hold = transfer(
        uid("h"), ref(payer, "cash"), ref(payee, "sales"), 10, action=pb.TRANSFER_ACTION_PENDING
    )
    assert await sent(ledger4, hold) == ["TRANSFER_RESULT_OK"]
    # The post's step 1 alone, its saga leased to this test so nothing drives it on.
    runner = SagaRunner(
        ledger4.service.cluster, owner="test", settings=SagaSettings(lease_s=HELD_LEASE_S)
    )
    post = TransferRequest(
        id=uid("p"),
        debit=AccountKey(payer, "cash"),
        credit=None,
        amount_minor=6,
        currency="",
        action=TransferAction.POST_PENDING,
        pending_id=hold.id,
    )
    start = await runner.begin(post)
    assert start.saga is not None and start.saga.state is SagaState.RUNNING
    assert start.outcome.result is TransferResult.OK

    assert await sent(ledger4, reversal(post.id, payer, payee, 6)) == [
        "TRANSFER_RESULT_REVERSAL_TARGET_NOT_FOUND"
    ]
    assert (await runner.drive(start.saga)).state is SagaState.COMPLETED
    assert await sent(
        ledger4, reversal(post.id, payer, payee, 7), reversal(post.id, payer, payee, 6)
    ) == ["TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL", "TRANSFER_RESULT_OK"]
    await assert_reversed(ledger4, config, payer, payee, 6, 6)

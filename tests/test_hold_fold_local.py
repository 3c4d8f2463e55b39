"""A cross-shard hold whose two parties come to share a shard again becomes local.

A rebalance moves merchants one at a time, so a hold made between two merchants
that move together, in the window between their moves, is cross-shard. Before,
when the second one arrived, the shard it left relayed the hold back to the
shard it came from (a step to itself), every later move of the two together
added steps, and a move came to repeat one and waited for the hold to settle:
plain rebalances were left unfinished behind holds with no timeout (chaos seeds
311 and 313). Now the arrival folds the hold into a local one: both shards
release its settlement legs, and it settles, or expires, as a local pending
transfer, until a move makes it cross-shard again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import pytest

from ledger.core.ledger import Ledger
from ledger.domain.accounts import AccountKey
from ledger.domain.sagas import SagaState
from ledger.domain.transfers import TransferAction, TransferRequest
from ledger.moves.rebalance import moved_path
from ledger.routing.config import ShardConfig
from ledger.routing.ring import ShardRing
from ledger.sagas.runner import SagaRunner, SagaSettings
from ledger.storage.moves import MoveStore
from ledger.storage.sagas import SagaStore
from ledger.v1 import ledger_pb2 as pb
from tests.ledger4 import FIRST_SHARDS, Ledger4
from tests.support import ref, transfer, uid, wait_until
from tests.test_moves_settle_routing import saga_on_one_shard, settle
from tests.test_rebalance import (
    DEFERRED_CALL_ATTEMPTS_MAX,
    all_balances,
    assert_reconciled,
    create_merchants,
    send_retrying,
    settled,
    switch_and_rebalance,
    wait_for_balances,
)

# The shard whose weight each config raises: the merchants move there in turn,
# the debit party first (a, b, c, a, b), each pair ending on one shard.
RAISED = ("shard-b", "shard-b", "shard-c", "shard-c", "shard-a", "shard-a", "shard-b", "shard-b")
CANDIDATES_MAX = 100_000
OUT_MINOR = 300
IN_MINOR = 70
EXPIRING_TIMEOUT_MS = 1_000
# Settle and expire sagas of a pending transfer (none: it settled locally).
SETTLE_SAGAS = "SELECT count(*) FROM sagas WHERE kind IN (2, 3) AND pending_id = $1"
LOCKS_WAITED = "SELECT count(*) FROM pg_locks WHERE NOT granted"
SAGA_DRIVES_MAX = 5


def configs_raising(env: Ledger4) -> list[ShardConfig]:
    """The first config, then one per raised shard (weights only grow, so each
    config moves merchants only to the shard it raises)."""
    weights = {"shard-a": 2, "shard-b": 1, "shard-c": 1}
    configs = [env.config(2, FIRST_SHARDS, weights=dict(weights))]
    for step, shard in enumerate(RAISED):
        weights[shard] = weights[shard] * 2 + 1
        configs.append(env.config(3 + step, FIRST_SHARDS, weights=dict(weights)))
    return configs


def routes() -> tuple[list[str], list[str]]:
    """Where the debit party and the credit party live under each config."""
    debit, credit = ["shard-a"], ["shard-a"]
    for step, shard in enumerate(RAISED):
        debit.append(shard if step % 2 == 0 else debit[-1])
        credit.append(shard if step % 2 == 1 else credit[-1])
    return debit, credit


def merchant_routed(configs: Sequence[ShardConfig], route: list[str]) -> str:
    rings = [ShardRing(c) for c in configs]
    for _ in range(CANDIDATES_MAX):
        m = uid("fl")
        if [r.shard_for(m) for r in rings] == route:
            return m
    raise AssertionError(f"no merchant routed {route}")


async def per_shard(env: Ledger4, query: str, *args: object) -> dict[str, int]:
    """The query's number on each shard the service uses (shards with 0 left out)."""
    found: dict[str, int] = {}
    for name in FIRST_SHARDS:
        conn = await asyncpg.connect(env.specs[name].dsn)
        try:
            number = int(await conn.fetchval(query, *args))
        finally:
            await conn.close()
        if number:
            found[name] = number
    return found


async def settlement_pending(env: Ledger4) -> dict[str, int]:
    """Per shard, the money pending on its settlement accounts."""
    return await per_shard(
        env,
        "SELECT coalesce(sum(debits_pending + credits_pending), 0) FROM accounts"
        " WHERE merchant_id = '$settlement'",
    )


async def relays_of(env: Ledger4, transfer_ids: Sequence[str]) -> dict[str, int]:
    """Per shard, the relays it keeps for these holds."""
    return await per_shard(
        env,
        "SELECT count(*) FROM hold_relays WHERE transfer_id = ANY($1::text[])",
        list(transfer_ids),
    )


async def send_all(env: Ledger4, *items: pb.Transfer) -> None:
    for number, item in enumerate(items):
        await send_retrying(
            env.service, item, random.Random(number), attempts_max=DEFERRED_CALL_ATTEMPTS_MAX
        )


async def test_holds_between_merchants_that_move_together_fold_into_local_ones(
    ledger4: Ledger4,
) -> None:
    """Holds both ways between two merchants moved a, b, c, a, b one after the other:
    each pair of moves folds them into local holds (no relay anywhere, nothing pending
    on any settlement account), each first move makes them cross-shard again over
    two shards, and no move waits. Before, the seventh move waited ("would repeat a
    relay step"). Then one is posted and the other voided, as local holds."""
    service = ledger4.service
    configs, payer, payee = await placed(ledger4, len(RAISED) + 1)
    debit_route, credit_route = routes()
    summary = await switch_and_rebalance(ledger4, configs[1])
    assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(payer, "moved")]

    # Made between the two merchants' moves: cross-shard, payer on b, payee on a.
    pending = pb.TRANSFER_ACTION_PENDING
    out_hold = transfer(
        uid("fo"), ref(payer, "cash"), ref(payee, "sales"), OUT_MINOR, action=pending
    )
    in_hold = transfer(uid("fi"), ref(payee, "cash"), ref(payer, "sales"), IN_MINOR, action=pending)
    await send_all(ledger4, out_hold, in_hold)
    keys = [(h.debit_account.merchant_id, h.id) for h in (out_hold, in_hold)]
    assert set((await settled(service, keys)).values()) == {pb.TRANSFER_RESULT_OK}
    held = await all_balances(service, [payer, payee])
    assert await settlement_pending(ledger4) == {
        "shard-a": OUT_MINOR + IN_MINOR,
        "shard-b": OUT_MINOR + IN_MINOR,
    }

    ids = [out_hold.id, in_hold.id]
    for step, config in enumerate(configs[2:], start=2):
        mover = payee if step % 2 == 0 else payer
        summary = await switch_and_rebalance(ledger4, config)
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(mover, "moved")]
        assert summary.finished, summary.render()
        assert await all_balances(service, [payer, payee]) == held
        assert await relays_of(ledger4, ids) == {}
        if step % 2 == 0:
            # Together on one shard: both holds are local, nothing held for them.
            assert await settlement_pending(ledger4) == {}, f"after move {step}"
        else:
            apart = {debit_route[step], credit_route[step]}
            assert await settlement_pending(ledger4) == dict.fromkeys(
                apart, OUT_MINOR + IN_MINOR
            ), f"after move {step}"

    post = settle(payer, out_hold.id, action=pb.TRANSFER_ACTION_POST_PENDING, credit=None)
    void = settle(payee, in_hold.id, action=pb.TRANSFER_ACTION_VOID_PENDING, credit=None)
    await send_all(ledger4, post, void)
    done = {
        (payer, "cash"): (OUT_MINOR, 0, 0, 0),
        (payer, "sales"): (0, 0, 0, 0),
        (payee, "cash"): (0, 0, 0, 0),
        (payee, "sales"): (0, OUT_MINOR, 0, 0),
    }
    await wait_for_balances(service, done, what="the post and the void of the local holds")
    assert await settlement_pending(ledger4) == {}
    await assert_reconciled(ledger4, configs[-1], "reconcile.toml", every_mirror_checked=True)


async def placed(env: Ledger4, configs_count: int) -> tuple[list[ShardConfig], str, str]:
    """The first configs_count configs, and a payer and a payee routed by them, made
    on shard-a under the first (each later config moves one of them, payer first)."""
    configs = configs_raising(env)[:configs_count]
    debit_route, credit_route = (route[:configs_count] for route in routes())
    payer = merchant_routed(configs, debit_route)
    payee = merchant_routed(configs, credit_route)
    assert (await switch_and_rebalance(env, configs[0])).results == []
    await create_merchants(env.service, [payer, payee])
    return configs, payer, payee


async def apart(env: Ledger4) -> tuple[list[ShardConfig], str, str]:
    """The payer moved to shard-b, the payee still on shard-a; the third config
    moves the payee to shard-b too."""
    configs, payer, payee = await placed(env, 3)
    assert (await switch_and_rebalance(env, configs[1])).finished
    return configs, payer, payee


async def held(env: Ledger4, payer: str, payee: str, prefix: str) -> pb.Transfer:
    """A hold from payer to payee, made (its saga completed)."""
    hold = transfer(
        uid(prefix),
        ref(payer, "cash"),
        ref(payee, "sales"),
        OUT_MINOR,
        action=pb.TRANSFER_ACTION_PENDING,
    )
    await send_all(env, hold)
    assert await settled(env.service, [(payer, hold.id)]) == {
        (payer, hold.id): pb.TRANSFER_RESULT_OK
    }
    return hold


def fold_once_a_write_waits(
    env: Ledger4, monkeypatch: pytest.MonkeyPatch, *, begin: Callable[[], None]
) -> None:
    """Holds the payee's arrival on shard-b after it has locked the settlement
    accounts and before it folds, until a write there waits for one of those locks:
    a settle or an expiry that read the hold as cross-shard, as the fold commits.
    begin: starts that write."""
    fold = MoveStore._fold_arrivals

    async def lock_waited() -> bool:
        return bool((await per_shard(env, LOCKS_WAITED)).get("shard-b"))

    async def write_waiting_first(self: MoveStore, *args: Any, **kwargs: Any) -> Any:
        if self.shard.name == "shard-b":
            begin()
            await wait_until(lock_waited, what="a write to wait for the fold's locks")
        return await fold(self, *args, **kwargs)

    monkeypatch.setattr(MoveStore, "_fold_arrivals", write_waiting_first)


async def test_a_settle_that_read_the_hold_before_the_fold_goes_local(
    ledger4: Ledger4, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A post whose saga read the hold as cross-shard, then waited for the settlement
    lock while the fold committed, reads the mark again under the lock and posts it as
    a local hold (before, it would settle legs the fold had released)."""
    configs, payer, payee = await apart(ledger4)
    hold = await held(ledger4, payer, payee, "fs")
    post = settle(payer, hold.id, action=pb.TRANSFER_ACTION_POST_PENDING, credit=None)
    posting: list[asyncio.Task[None]] = []
    fold_once_a_write_waits(
        ledger4,
        monkeypatch,
        begin=lambda: posting.append(asyncio.create_task(send_all(ledger4, post))),
    )
    summary = await switch_and_rebalance(ledger4, configs[2])
    assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(payee, "moved")]
    [task] = posting
    await task
    done = {(payer, "cash"): (OUT_MINOR, 0, 0, 0), (payee, "sales"): (0, OUT_MINOR, 0, 0)}
    await wait_for_balances(ledger4.service, done, what="the post of the folded hold")
    # Posted locally: no settle saga anywhere, nothing held between the shards.
    assert await per_shard(ledger4, SETTLE_SAGAS, hold.id) == {}
    assert await settlement_pending(ledger4) == {}
    await assert_reconciled(ledger4, configs[-1], "reconcile.toml", every_mirror_checked=True)


async def test_a_hold_folded_while_its_expiry_waited_expires_as_a_local_one(
    ledger4: Ledger4, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The cross-shard sweeper read the due hold, then waited for the settlement lock
    while the fold committed: it leaves the hold, and the local sweeper expires it
    (before, its sweep failed on the released legs, "expiry sweep failed", until the
    next sweep found the hold local)."""
    configs, payer, payee = await apart(ledger4)
    # shard-b's cross-shard sweeper looks only once the arrival holds the locks.
    armed = asyncio.Event()
    expire_due = SagaStore.expire_due

    async def once_armed(self: SagaStore, *, limit: int) -> int:
        if self.shard.name == "shard-b" and not armed.is_set():
            return 0
        return await expire_due(self, limit=limit)

    monkeypatch.setattr(SagaStore, "expire_due", once_armed)
    fold_once_a_write_waits(ledger4, monkeypatch, begin=armed.set)
    hold = transfer(
        uid("fe"),
        ref(payer, "cash"),
        ref(payee, "sales"),
        OUT_MINOR,
        action=pb.TRANSFER_ACTION_PENDING,
        timeout_ms=EXPIRING_TIMEOUT_MS,
    )
    await send_all(ledger4, hold)
    assert await settled(ledger4.service, [(payer, hold.id)]) == {
        (payer, hold.id): pb.TRANSFER_RESULT_OK
    }
    summary = await switch_and_rebalance(ledger4, configs[2])
    assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(payee, "moved")]
    released = {(payer, "cash"): (0, 0, 0, 0), (payee, "sales"): (0, 0, 0, 0)}
    await wait_for_balances(ledger4.service, released, what="the folded hold to expire")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await per_shard(ledger4, SETTLE_SAGAS, hold.id) == {}
    assert await settlement_pending(ledger4) == {}
    await assert_reconciled(ledger4, configs[-1], "reconcile.toml", every_mirror_checked=True)


async def test_a_fold_that_cannot_take_the_other_party_leaves_the_hold_cross_shard(
    ledger4: Ledger4,
) -> None:
    """The fold never waits for the hold's other party (a fence, or another arrival
    waiting for the merchant arriving, may hold it): where it is held, the hold stays
    cross-shard, relayed by the shard left as before, and still settles."""
    service = ledger4.service
    configs, payer, payee = await apart(ledger4)
    hold = await held(ledger4, payer, payee, "fb")

    # The payer's merchant lock on its shard, held as a fence holds it.
    holder = await asyncpg.connect(ledger4.specs["shard-b"].dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock(7302, hashtext($1))", payer)
        summary = await switch_and_rebalance(ledger4, configs[2])
    finally:
        await holder.close()
    assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(payee, "moved")]
    # Not folded: the shard left relays it back (b to a to b).
    assert await relays_of(ledger4, [hold.id]) == {"shard-a": 1}
    assert await settlement_pending(ledger4) == {
        "shard-a": 2 * OUT_MINOR,
        "shard-b": 2 * OUT_MINOR,
    }

    post = settle(payer, hold.id, action=pb.TRANSFER_ACTION_POST_PENDING, credit=None)
    await send_all(ledger4, post)
    done = {(payer, "cash"): (OUT_MINOR, 0, 0, 0), (payee, "sales"): (0, OUT_MINOR, 0, 0)}
    await wait_for_balances(service, done, what="the post to pass the relay")
    assert await settlement_pending(ledger4) == {}
    await assert_reconciled(ledger4, configs[-1], "reconcile.toml", every_mirror_checked=True)


def routed_across_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every transfer starts on the saga path, as one does when the ring the call
    reads places its parties apart while a move has put them together."""

    async def all_cross(self: Ledger, requests: Sequence[TransferRequest]) -> set[int]:
        return {i for i, r in enumerate(requests) if not r.settles_pending}

    monkeypatch.setattr(Ledger, "_cross_shard", all_cross)


async def test_a_transfer_routed_across_shards_whose_parties_share_one_runs_locally(
    ledger4: Ledger4, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 1 finds the credit party's owner is its own shard: the transfer is handed
    back to the local path and moved in one local transaction, with no saga (before,
    a saga reserved and credited it through the shard's settlement account for
    itself, and its hold had to be made local before either party could move: 580
    such sagas in chaos seed 315's run). A resend replays it, still without one."""
    service = ledger4.service
    _configs, payer, payee = await placed(ledger4, 1)
    routed_across_shards(monkeypatch)
    hold = transfer(
        uid("pl"),
        ref(payer, "cash"),
        ref(payee, "sales"),
        OUT_MINOR,
        action=pb.TRANSFER_ACTION_PENDING,
    )
    post = transfer(uid("pl"), ref(payer, "cash"), ref(payee, "sales"), IN_MINOR)
    for _ in range(2):
        response = await service.stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=[hold, post])
        )
        assert [r.result for r in response.results] == [pb.TRANSFER_RESULT_OK] * 2, response
    assert response.results[0].replayed and response.results[1].replayed
    assert (
        await per_shard(
            ledger4,
            "SELECT count(*) FROM sagas WHERE transfer_id = ANY($1::text[])",
            [hold.id, post.id],
        )
        == {}
    )
    assert await settlement_pending(ledger4) == {}
    done = {
        (payer, "cash"): (IN_MINOR, 0, OUT_MINOR, 0),
        (payee, "sales"): (0, IN_MINOR, 0, OUT_MINOR),
    }
    assert {
        k: v for k, v in (await all_balances(service, [payer, payee])).items() if k in done
    } == done


async def test_a_saga_hold_with_both_ends_on_one_shard_moves_as_a_local_one(
    ledger4: Ledger4, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold a saga made though both parties are on one shard (before such transfers
    were handed back to the local path, above, chaos seed 315 made 580; a move racing
    step 1 still can): a resend replays the saga; moving either party first makes the
    hold local there, so it is carried as a local hold, not relayed by the shard to
    itself, and folds into a local hold again when the other follows (before, that
    path grew c, b, b, c and a later move waited for it)."""
    service = ledger4.service
    configs, payer, payee = await placed(ledger4, 3)
    # Both on shard-a: the saga's credit shard is its own.
    runner = SagaRunner(service.cluster, owner="test", settings=SagaSettings(lease_s=120.0))
    hold_id = uid("fs")
    request = TransferRequest(
        id=hold_id,
        debit=AccountKey(payer, "cash"),
        credit=AccountKey(payee, "sales"),
        amount_minor=OUT_MINOR,
        currency="USD",
        action=TransferAction.PENDING,
    )
    with saga_on_one_shard(monkeypatch):
        start = await runner.begin(request)
    assert start.saga is not None and start.saga.peer_shard == "shard-a"
    resent = await runner.begin(request)
    assert resent.outcome.replayed and resent.saga is not None
    assert resent.saga.key == start.saga.key
    saga = start.saga
    for _ in range(SAGA_DRIVES_MAX):
        saga = await runner.drive(saga)
        if saga.finished:
            break
    assert saga.state is SagaState.COMPLETED, saga
    assert await settlement_pending(ledger4) == {"shard-a": 2 * OUT_MINOR}

    summary = await switch_and_rebalance(ledger4, configs[1])
    assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(payer, "moved")]
    # Carried as a local hold: cross-shard over two shards, no relay.
    assert await relays_of(ledger4, [hold_id]) == {}
    assert await settlement_pending(ledger4) == {"shard-a": OUT_MINOR, "shard-b": OUT_MINOR}
    summary = await switch_and_rebalance(ledger4, configs[2])
    assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(payee, "moved")]
    assert await relays_of(ledger4, [hold_id]) == {}
    assert await settlement_pending(ledger4) == {}

    post = settle(payer, hold_id, action=pb.TRANSFER_ACTION_POST_PENDING, credit=None)
    await send_all(ledger4, post)
    done = {(payer, "cash"): (OUT_MINOR, 0, 0, 0), (payee, "sales"): (0, OUT_MINOR, 0, 0)}
    await wait_for_balances(service, done, what="the post of the local hold")
    assert await per_shard(ledger4, SETTLE_SAGAS, hold_id) == {}
    await assert_reconciled(ledger4, configs[-1], "reconcile.toml", every_mirror_checked=True)


def test_the_planner_expects_a_two_shard_hold_to_become_local() -> None:
    assert moved_path(["b", "a"], destination="a", debit_party=True) == ["a"]
    assert moved_path(["b", "a"], destination="b", debit_party=False) == ["b"]
    # Elsewhere, one step longer; a relay the party comes back to folds away.
    assert moved_path(["b", "a"], destination="c", debit_party=True) == ["c", "b", "a"]
    assert moved_path(["c", "b", "a"], destination="b", debit_party=True) == ["b", "a"]

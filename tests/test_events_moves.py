"""A merchant's events keep their order across moves (issue 20): the arrival on the new
shard is delivered only after the departure from the old one."""

from __future__ import annotations

from ledger.v1 import ledger_pb2 as pb
from tests.event_support import balances_from, kinds, marked
from tests.ledger4 import Ledger4
from tests.support import (
    account,
    balance,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
)
from tests.test_moves_settle_routing import away_and_back, rebalance_to


async def _pay(env: Ledger4, merchant_id: str, count: int) -> None:
    for _ in range(count):
        results = await transfers(
            env.service.stub,
            transfer(uid("p"), ref(merchant_id, "cash"), ref(merchant_id, "sales"), 7),
        )
        assert result_names(results) == ["TRANSFER_RESULT_OK"]


async def test_a_merchant_moved_away_and_back_has_its_events_in_order(ledger4: Ledger4) -> None:
    env, stub = ledger4, ledger4.service.stub
    mover, _, home, heavier, restored = away_and_back(env)
    await create_accounts(stub, account(mover, "cash"), account(mover, "sales"))
    await _pay(env, mover, 3)
    await rebalance_to(env, heavier, mover)
    away = env.service.cluster.ring.shard_for(mover)
    assert away != home
    await _pay(env, mover, 3)
    await rebalance_to(env, restored, mover)
    await _pay(env, mover, 3)

    # Read from the start of every shard: whichever shard the stream reads first,
    # each arrival waits for its departure, so the merchant's order holds.
    events = await marked(stub, [mover], pb.SubscribeEventsRequest(merchant_id=mover))
    moves = [(k, e.shard, e.move.epoch) for e, k in zip(events, kinds(events), strict=True)
             if k.startswith("MERCHANT_MOVED")]  # fmt: skip
    assert moves == [
        ("MERCHANT_MOVED_OUT", home, 2),
        ("MERCHANT_MOVED_IN", away, 2),
        ("MERCHANT_MOVED_OUT", away, 3),
        ("MERCHANT_MOVED_IN", home, 3),
    ]
    shards_of_payments = [e.shard for e in events if e.kind == pb.EVENT_KIND_TRANSFER_POSTED]
    assert shards_of_payments == [home] * 3 + [away] * 3 + [home] * 3
    for account_id in ("cash", "sales"):
        sequences = [
            e.sequence
            for event in events
            for e in event.entries
            if (e.account.merchant_id, e.account.account_id) == (mover, account_id)
        ]
        assert sequences == sorted(sequences) and len(sequences) == 9, account_id
        stored = await balance(stub, mover, account_id)
        assert balances_from(events)[(mover, account_id)] == (
            stored.debits_posted,
            stored.credits_posted,
            stored.debits_pending,
            stored.credits_pending,
        )

"""A linked chain stays whole when a config change is learned in the middle of a call.

A chain must live on one shard: the call is refused whole when the ring places its
merchants apart (LINKED_CHAIN_SPANS_SHARDS). But the ring is read when the call
starts. If a shard then answers that the config moved on (a newer epoch: the
replica reloads) and the new ring places the chain's merchants apart, routing
grouped the items again by merchant, so each part went to its own shard: the part
that ended the chain was applied there, the rest stored failed as an open chain.
And where the new ring parts an item's own two merchants, that item was handed to
the saga path (and, being chained, answered SHARD_UNAVAILABLE) while the rest of
its chain was applied without it. Now the chain's items are all answered
SHARD_UNAVAILABLE, nothing written, and the call sent again is refused whole.
"""

from __future__ import annotations

import pytest

from ledger.core.errors import LinkedChainSpansShards
from ledger.core.ledger import Ledger
from ledger.domain.accounts import AccountKey
from ledger.domain.transfers import TransferAction, TransferRequest, TransferResult
from ledger.routing.cluster import Cluster
from ledger.routing.config import load_config
from ledger.routing.ring import ShardRing
from ledger.sagas.runner import SagaRunner
from tests.ledger4 import ALL_SHARDS, Ledger4
from tests.support import uid, write_config
from tests.test_rebalance import (
    all_balances,
    create_merchants,
    merchants_moving,
    opened,
    staying_merchant,
)

AMOUNT_MINOR = 40


@pytest.mark.parametrize(
    "parts",
    [
        # Each item within one merchant; the new ring parts the two items.
        (("mover", "mover", True), ("stayer", "stayer", False)),
        # Both items from the stayer; the new ring parts the first item's own two
        # merchants, so that item alone would need a saga.
        (("stayer", "mover", True), ("stayer", "stayer", False)),
    ],
    ids=["items-apart", "an-item-across"],
)
async def test_a_chain_whose_merchants_a_config_change_parts_mid_call_is_never_split(
    ledger4: Ledger4, parts: tuple[tuple[str, str, bool], ...]
) -> None:
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (mover,) = merchants_moving(old, new, 1, destination="shard-d")
    stayer = staying_merchant(old, new, on=True, shard=ShardRing(old).shard_for(mover))
    await create_merchants(service, [mover, stayer])

    # A replica of its own, still on the old config: its file changes only after
    # the rebalance, so the call starts on the old ring and learns the new one from
    # the shard's newer epoch.
    path = write_config(ledger4.tmp_path / "chain-replica.toml", old)
    cluster = Cluster(load_config(path), config_path=path)
    await cluster.open(migrate=False)
    try:
        async with opened(new) as rebalancer:
            summary = await rebalancer.rebalance()
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(mover, "moved")]
        write_config(path, new)

        ledger = Ledger(cluster, SagaRunner(cluster, owner="test"))
        named = {"mover": mover, "stayer": stayer}
        chain = [
            TransferRequest(
                id=uid("ch"),
                debit=AccountKey(named[debit], "cash"),
                credit=AccountKey(named[credit], "sales"),
                amount_minor=AMOUNT_MINOR,
                currency="USD",
                action=TransferAction.POST,
                linked=linked,
            )
            for debit, credit, linked in parts
        ]
        outcomes = await ledger.create_transfers(chain)
        # Sent again, it starts on the new ring: refused whole, before anything runs.
        with pytest.raises(LinkedChainSpansShards):
            await ledger.create_transfers(chain)
    finally:
        await cluster.close()

    results = [o.result for o in outcomes]
    assert results == [TransferResult.SHARD_UNAVAILABLE] * 2, outcomes
    await ledger4.switch_to(new)
    balances = await all_balances(service, [mover, stayer])
    assert set(balances.values()) == {(0, 0, 0, 0)}, balances

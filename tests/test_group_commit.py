"""Group commit: concurrent calls for one shard share transactions, each keeping its outcomes."""

from __future__ import annotations

import asyncio

from ledger.core.batcher import TransferBatcher
from ledger.domain.accounts import AccountKey
from ledger.domain.transfers import TransferAction, TransferRequest, TransferResult
from tests.support import Service, account, balance, create_accounts, uid


async def _commits(service: Service, shard_name: str) -> int:
    async with service.cluster.shards[shard_name].pool.acquire() as conn:
        return int(
            await conn.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
        )


def _request(
    transfer_id: str, merchant: str, amount: int, *, linked: bool = False
) -> TransferRequest:
    return TransferRequest(
        id=transfer_id,
        debit=AccountKey(merchant, "cash"),
        credit=AccountKey(merchant, "wallet"),
        amount_minor=amount,
        currency="USD",
        action=TransferAction.POST,
        linked=linked,
    )


async def test_concurrent_calls_share_transactions_and_keep_their_own_outcomes(
    service: Service,
) -> None:
    shard = service.cluster.shards["shard-a"]
    merchant = service.merchant_on("shard-a")
    await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "wallet"))
    batcher = TransferBatcher(batches_in_flight_max=1)
    fence = service.cluster.fence(shard, {merchant})
    calls = [[_request(uid("t"), merchant, 1 + i)] for i in range(40)]
    duplicate = calls[0]
    before = await _commits(service, "shard-a")
    outcomes = await asyncio.gather(
        *(batcher.submit(shard, group, fence) for group in [*calls, duplicate])
    )
    commits = await _commits(service, "shard-a") - before
    assert all(len(o) == 1 and o[0].index == 0 for o in outcomes)
    assert [o[0].id for o in outcomes] == [g[0].id for g in [*calls, duplicate]]
    assert all(o[0].result is TransferResult.OK for o in outcomes)
    assert [o[0].replayed for o in outcomes].count(True) == 1, "the duplicate replays"
    # 41 calls, one runner: the first runs alone, the rest queue and share a few.
    assert commits < 20, f"{commits} transactions for 41 calls"
    wallet = await balance(service.stub, merchant, "wallet")
    assert wallet.credits_posted == sum(range(1, 41))


async def test_a_call_ending_in_an_open_chain_is_never_joined_to_another(service: Service) -> None:
    shard = service.cluster.shards["shard-a"]
    merchant = service.merchant_on("shard-a")
    await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "wallet"))
    batcher = TransferBatcher(batches_in_flight_max=1)
    fence = service.cluster.fence(shard, {merchant})
    open_chain = [_request(uid("t"), merchant, 5, linked=True)]
    plain = [_request(uid("t"), merchant, 7)]
    first, second = await asyncio.gather(
        batcher.submit(shard, open_chain, fence), batcher.submit(shard, plain, fence)
    )
    assert first[0].result is TransferResult.LINKED_EVENT_CHAIN_OPEN
    assert second[0].result is TransferResult.OK
    assert (await balance(service.stub, merchant, "wallet")).credits_posted == 7

"""Group commit of saga steps: concurrent cross-shard transfers share each step's
transaction on a shard, and every saga keeps its own outcome and its own money."""

from __future__ import annotations

import asyncio

import pytest

from ledger.domain.accounts import AccountKey
from ledger.domain.transfers import TransferAction, TransferRequest, TransferResult
from ledger.sagas.reconcile import reconcile
from ledger.sagas.step_batcher import StepBatcher
from ledger.storage.errors import MerchantsMoving
from ledger.storage.sagas import SagaBegin, SagaStart, SagaStore
from ledger.storage.shard import Fence, Shard
from ledger.v1 import ledger_pb2 as pb
from tests.support import Service, account, balance, create_accounts, ref, transfer, transfers, uid

SAGAS = 40


async def _transactions(shard: Shard, query: str, ids: list[str]) -> int:
    """How many transactions wrote the rows the query selects (their distinct xmin)."""
    async with shard.pool.acquire() as conn:
        return int(await conn.fetchval(query, ids))


STEP_1_TRANSACTIONS = (
    "SELECT count(DISTINCT xmin::text) FROM saga_steps WHERE transfer_id = ANY($1) AND step = 1"
)
STEP_2_TRANSACTIONS = (
    "SELECT count(DISTINCT xmin::text) FROM saga_credits WHERE transfer_id = ANY($1)"
)
STEP_3_TRANSACTIONS = (
    "SELECT count(DISTINCT xmin::text) FROM saga_steps WHERE transfer_id = ANY($1) AND step = 3"
)


async def test_concurrent_cross_shard_transfers_share_step_transactions_and_move_money_once(
    service: Service,
) -> None:
    payers = [service.merchant_on("shard-a") for _ in range(4)]
    payee = service.merchant_on("shard-b")
    await create_accounts(
        service.stub, *(account(p, "cash") for p in payers), account(payee, "sales")
    )
    ids = [uid("t") for _ in range(SAGAS)]
    calls = [
        transfer(t, ref(payers[i % len(payers)], "cash"), ref(payee, "sales"), 1 + i)
        for i, t in enumerate(ids)
    ]
    # The first transfer twice at once: it must move money once.
    results = await asyncio.gather(*(transfers(service.stub, c) for c in [*calls, calls[0]]))

    assert [r[0].result for r in results] == [pb.TRANSFER_RESULT_OK] * (SAGAS + 1)
    assert (await balance(service.stub, payee, "sales")).credits_posted == sum(range(1, SAGAS + 1))
    for p, payer in enumerate(payers):
        expected = sum(1 + i for i in range(SAGAS) if i % len(payers) == p)
        assert (await balance(service.stub, payer, "cash")).debits_posted == expected
    debit, credit = service.cluster.shards["shard-a"], service.cluster.shards["shard-b"]
    step_1 = await _transactions(debit, STEP_1_TRANSACTIONS, ids)
    step_2 = await _transactions(credit, STEP_2_TRANSACTIONS, ids)
    step_3 = await _transactions(debit, STEP_3_TRANSACTIONS, ids)
    # Alone, each saga's step would be its own transaction: SAGAS of each.
    for step, count in (("1", step_1), ("2", step_2), ("3", step_3)):
        assert count < SAGAS // 2, f"step {step}: {count} transactions for {SAGAS} sagas"
    report = await reconcile(service.cluster)
    assert report.ok, report.render()


async def test_a_group_with_an_overdraft_refuses_it_alone_and_completes_the_others(
    service: Service,
) -> None:
    payer = service.merchant_on("shard-a")
    poor = service.merchant_on("shard-a")
    payee = service.merchant_on("shard-b")
    await create_accounts(
        service.stub,
        account(payer, "cash"),
        account(poor, "cash", no_overdraft=True),
        account(payee, "sales"),
    )
    calls = [transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), 10) for _ in range(12)]
    calls.insert(6, transfer(uid("t"), ref(poor, "cash"), ref(payee, "sales"), 10))
    results = await asyncio.gather(*(transfers(service.stub, c) for c in calls))

    expected = [pb.TRANSFER_RESULT_OK] * len(calls)
    expected[6] = pb.TRANSFER_RESULT_EXCEEDS_CREDITS
    assert [r[0].result for r in results] == expected
    assert (await balance(service.stub, payee, "sales")).credits_posted == 120
    assert (await balance(service.stub, poor, "cash")).debits_pending == 0


def _begin(debit_merchant: str, payee: str) -> SagaBegin:
    request = TransferRequest(
        id=uid("t"),
        debit=AccountKey(debit_merchant, "cash"),
        credit=AccountKey(payee, "sales"),
        amount_minor=5,
        currency="USD",
        action=TransferAction.POST,
    )
    return SagaBegin(request, "shard-b", "")


async def test_a_saga_whose_merchant_is_moving_fails_alone_and_its_group_commits(
    service: Service,
) -> None:
    """A group that fails (here: one merchant fenced by a move) is rolled back and run
    one saga per transaction: only the fenced saga gets the error."""
    shard = service.cluster.shards["shard-a"]
    payer = service.merchant_on("shard-a")
    moving = service.merchant_on("shard-a")
    payee = service.merchant_on("shard-b")
    await create_accounts(
        service.stub, account(payer, "cash"), account(moving, "cash"), account(payee, "sales")
    )
    store = SagaStore(shard)

    async def reserve(shard: Shard, begins: list[SagaBegin], fence: Fence) -> list[SagaStart]:
        return await store.begin_transfers(begins, fence=fence, lease_owner="test", lease_s=60.0)

    batcher: StepBatcher[SagaBegin, SagaStart] = StepBatcher(
        reserve, key_of=lambda b: b.request.key
    )
    begins = [_begin(payer, payee) for _ in range(10)]
    begins.insert(5, _begin(moving, payee))
    async with shard.pool.acquire() as conn:
        await conn.execute("UPDATE merchants SET state = 'moving' WHERE merchant_id = $1", moving)
    try:
        fence = service.cluster.fence(shard, {payer, moving})
        answers = await asyncio.gather(
            *(batcher.submit(shard, fence, b) for b in begins), return_exceptions=True
        )
    finally:
        async with shard.pool.acquire() as conn:
            await conn.execute(
                "UPDATE merchants SET state = 'active' WHERE merchant_id = $1", moving
            )
    assert isinstance(answers[5], MerchantsMoving), answers[5]
    started = [a for i, a in enumerate(answers) if i != 5]
    for answer in started:
        assert isinstance(answer, SagaStart), answer
        assert answer.outcome.result is TransferResult.IN_PROGRESS
        assert answer.saga is not None
    # Reserved once each: the failed group's writes were rolled back.
    assert (await balance(service.stub, payer, "cash")).debits_pending == 50
    assert (await balance(service.stub, moving, "cash")).debits_pending == 0
    # Let the reserved sagas finish, so the module's later checks see a settled cluster.
    runner = service.server.sagas
    await asyncio.gather(
        *(runner.drive(a.saga) for a in started if isinstance(a, SagaStart) and a.saga)
    )
    assert (await balance(service.stub, payer, "cash")).debits_posted == 50


@pytest.mark.parametrize("sagas_per_group_max", [1, 3])
async def test_groups_never_exceed_their_limit_nor_hold_one_saga_twice(
    service: Service, sagas_per_group_max: int
) -> None:
    shard = service.cluster.shards["shard-a"]
    payer = service.merchant_on("shard-a")
    payee = service.merchant_on("shard-b")
    await create_accounts(service.stub, account(payer, "cash"), account(payee, "sales"))
    sizes: list[int] = []
    store = SagaStore(shard)

    async def reserve(shard: Shard, begins: list[SagaBegin], fence: Fence) -> list[SagaStart]:
        sizes.append(len(begins))
        assert len({b.request.key for b in begins}) == len(begins)
        return await store.begin_transfers(begins, fence=fence, lease_owner="test", lease_s=60.0)

    batcher: StepBatcher[SagaBegin, SagaStart] = StepBatcher(
        reserve,
        key_of=lambda b: b.request.key,
        sagas_per_group_max=sagas_per_group_max,
    )
    begins = [_begin(payer, payee) for _ in range(8)]
    fence = service.cluster.fence(shard, {payer})
    answers = await asyncio.gather(
        *(batcher.submit(shard, fence, b) for b in [*begins, begins[0], begins[0]])
    )
    assert max(sizes) <= sagas_per_group_max
    assert sum(sizes) == len(begins) + 2
    assert [a.outcome.replayed for a in answers].count(True) == 2, "the repeats replay"
    assert (await balance(service.stub, payer, "cash")).debits_pending == 40
    runner = service.server.sagas
    await asyncio.gather(*(runner.drive(a.saga) for a in answers[: len(begins)] if a.saga))
    assert (await balance(service.stub, payer, "cash")).debits_posted == 40

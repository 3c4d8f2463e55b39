"""Cross-shard transfers as sagas, end to end: a real service process on three real shards.

Each test uses fresh merchants, so the tests of this module share one cluster.
The shards' settlement accounts are shared, though: tests compare them before and
after, and every test ends with no saga in flight and a passing reconcile.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import grpc
import pytest

from ledger import limits
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.process_cluster import ProcessCluster
from tests.support import (
    RPC_TIMEOUT_S,
    account,
    account_row_locked,
    balance,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    wait_until,
)

SETTLEMENT_MERCHANT_ID = "$settlement"
# The gRPC deadline of a call that must come back before a blocked saga finishes.
SHORT_RPC_TIMEOUT_S = 1.5
# LookupTransfers waits up to this long for sagas to leave IN_PROGRESS.
LOOKUP_WAIT_MS = 10_000
# The concurrency scenario: this many transfers, half in each direction.
CONCURRENT_TRANSFERS = 200
CONCURRENT_AMOUNT_MINOR_MAX = 40
CONCURRENT_FUNDING_MINOR = 1_000
# A concurrent call may wait for its saga this long, then LookupTransfers waits.
CONCURRENT_RPC_TIMEOUT_S = 30.0
CONCURRENT_LOOKUP_WAIT_MS = 25_000


# Helpers.


@dataclass(frozen=True)
class Row:
    """The four balance columns of one account row, read straight from its shard."""

    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0


@dataclass(frozen=True)
class SettlementPair:
    """S's settlement account for T, and T's for S, for one currency."""

    on_debit_shard: Row
    on_credit_shard: Row


def stub_of(cluster: ProcessCluster) -> ledger_pb2_grpc.LedgerServiceStub:
    stub = cluster.service.stub
    assert stub is not None
    return stub


def admin_of(cluster: ProcessCluster) -> ledger_pb2_grpc.LedgerAdminServiceStub:
    admin = cluster.service.admin
    assert admin is not None
    return admin


@asynccontextmanager
async def shard_connection(
    cluster: ProcessCluster, shard: str
) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster.shards.servers[shard].dsn("ledger"))
    try:
        yield conn
    finally:
        await conn.close()


async def read_row(cluster: ProcessCluster, shard: str, merchant_id: str, account_id: str) -> Row:
    async with shard_connection(cluster, shard) as conn:
        found = await conn.fetchrow(
            "SELECT debits_posted, credits_posted, debits_pending, credits_pending"
            " FROM accounts WHERE merchant_id = $1 AND account_id = $2",
            merchant_id,
            account_id,
        )
    return Row(**dict(found)) if found is not None else Row()


async def read_settlement(cluster: ProcessCluster, shard: str, peer: str, currency: str) -> Row:
    """A shard's settlement position for a peer: the sum over its stripes."""
    async with shard_connection(cluster, shard) as conn:
        found = await conn.fetchrow(
            "SELECT coalesce(sum(debits_posted), 0)::bigint AS debits_posted,"
            " coalesce(sum(credits_posted), 0)::bigint AS credits_posted,"
            " coalesce(sum(debits_pending), 0)::bigint AS debits_pending,"
            " coalesce(sum(credits_pending), 0)::bigint AS credits_pending"
            " FROM accounts WHERE merchant_id = $1 AND account_id LIKE $2",
            SETTLEMENT_MERCHANT_ID,
            f"{peer}/{currency}/%",
        )
    assert found is not None
    return Row(**dict(found))


async def settlements(
    cluster: ProcessCluster, debit_shard: str, credit_shard: str, currency: str = "USD"
) -> SettlementPair:
    return SettlementPair(
        on_debit_shard=await read_settlement(cluster, debit_shard, credit_shard, currency),
        on_credit_shard=await read_settlement(cluster, credit_shard, debit_shard, currency),
    )


def assert_settlements_moved(
    before: SettlementPair, after: SettlementPair, *, posted_minor: int, pending_minor: int
) -> None:
    """S's account for T was credited, and T's for S debited, by the same amounts.

    posted_minor and pending_minor are the net changes a transfer S -> T made.
    """
    s0, s1 = before.on_debit_shard, after.on_debit_shard
    t0, t1 = before.on_credit_shard, after.on_credit_shard
    s_posted = (s1.credits_posted - s1.debits_posted) - (s0.credits_posted - s0.debits_posted)
    t_posted = (t1.debits_posted - t1.credits_posted) - (t0.debits_posted - t0.credits_posted)
    s_pending = (s1.credits_pending - s1.debits_pending) - (s0.credits_pending - s0.debits_pending)
    t_pending = (t1.debits_pending - t1.credits_pending) - (t0.debits_pending - t0.credits_pending)
    moved = (s_posted, t_posted, s_pending, t_pending)
    expected = (posted_minor, posted_minor, pending_minor, pending_minor)
    assert moved == expected, f"settlement moved (S posted, T posted, S pending, T pending) {moved}"


def assert_settlements_mirror(pair: SettlementPair) -> None:
    """With no saga in flight between S and T, each one's settlement account mirrors the other's."""
    s, t = pair.on_debit_shard, pair.on_credit_shard
    assert s.credits_posted - s.debits_posted == t.debits_posted - t.credits_posted, pair
    assert s.credits_pending - s.debits_pending == t.debits_pending - t.credits_pending, pair


async def assert_reconciled(cluster: ProcessCluster) -> None:
    report = await cluster.reconcile()
    assert report.ok, report.render()


async def post(
    cluster: ProcessCluster, item: pb.Transfer, *, timeout_s: float = RPC_TIMEOUT_S
) -> pb.CreateTransferResult:
    response = await stub_of(cluster).CreateTransfers(
        pb.CreateTransfersRequest(transfers=[item]), timeout=timeout_s
    )
    assert len(response.results) == 1
    return response.results[0]


async def lookup(
    cluster: ProcessCluster, merchant_id: str, transfer_id: str, *, wait_ms: int = 0
) -> pb.TransferRecord:
    response = await stub_of(cluster).LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=merchant_id, transfer_id=transfer_id)],
            wait_timeout_ms=wait_ms,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert len(response.transfers) == 1, response
    return response.transfers[0]


async def get_saga(
    cluster: ProcessCluster, merchant_id: str, transfer_id: str, kind: int = pb.SAGA_KIND_TRANSFER
) -> pb.Saga:
    return await admin_of(cluster).GetSaga(
        pb.GetSagaRequest(
            ref=pb.SagaRef(merchant_id=merchant_id, transfer_id=transfer_id, kind=kind)  # type: ignore[arg-type]
        ),
        timeout=RPC_TIMEOUT_S,
    )


async def saga_rows(cluster: ProcessCluster, shard: str, merchant_id: str, transfer_id: str) -> int:
    async with shard_connection(cluster, shard) as conn:
        count = await conn.fetchval(
            "SELECT count(*) FROM sagas WHERE merchant_id = $1 AND transfer_id = $2",
            merchant_id,
            transfer_id,
        )
    return int(count)


async def saga_credit_count(cluster: ProcessCluster, shard: str) -> int:
    async with shard_connection(cluster, shard) as conn:
        return int(await conn.fetchval("SELECT count(*) FROM saga_credits"))


async def saga_credit(
    cluster: ProcessCluster, shard: str, merchant_id: str, transfer_id: str
) -> tuple[int, int] | None:
    """(outcome, result) that step 2 recorded on the credit shard for a TRANSFER saga."""
    async with shard_connection(cluster, shard) as conn:
        found = await conn.fetchrow(
            "SELECT outcome, result FROM saga_credits"
            " WHERE merchant_id = $1 AND transfer_id = $2 AND kind = 1",
            merchant_id,
            transfer_id,
        )
    return (found["outcome"], found["result"]) if found is not None else None


def assert_balances(found: pb.Account, expected: Row) -> None:
    actual = Row(
        found.debits_posted, found.credits_posted, found.debits_pending, found.credits_pending
    )
    assert actual == expected, f"{found.ref.merchant_id}/{found.ref.account_id}: {actual}"


async def funded_payer(
    cluster: ProcessCluster, shard: str, amount_minor: int, *, no_overdraft: bool = True
) -> str:
    """A merchant on shard with a 'wallet' holding amount_minor, paid from its own 'funding'."""
    stub = stub_of(cluster)
    merchant = cluster.merchant_on(shard, "payer")
    await create_accounts(
        stub, account(merchant, "funding"), account(merchant, "wallet", no_overdraft=no_overdraft)
    )
    funded = await transfers(
        stub, transfer(uid("fund"), ref(merchant, "funding"), ref(merchant, "wallet"), amount_minor)
    )
    assert result_names(funded) == ["TRANSFER_RESULT_OK"]
    return merchant


# Single-phase transfers.


async def test_cross_shard_transfer_completes_within_the_call_and_moves_settlement(
    process_cluster: ProcessCluster,
) -> None:
    stub = stub_of(process_cluster)
    payer = await funded_payer(process_cluster, "shard-a", 500)
    payee = process_cluster.merchant_on("shard-b", "payee")
    await create_accounts(stub, account(payee, "sales"))
    before = await settlements(process_cluster, "shard-a", "shard-b")
    transfer_id = uid("t")

    result = await post(
        process_cluster, transfer(transfer_id, ref(payer, "wallet"), ref(payee, "sales"), 120)
    )

    assert pb.TransferResult.Name(result.result) == "TRANSFER_RESULT_OK"
    assert not result.replayed
    assert_balances(await balance(stub, payer, "wallet"), Row(120, 500, 0, 0))
    assert_balances(await balance(stub, payee, "sales"), Row(0, 120, 0, 0))
    after = await settlements(process_cluster, "shard-a", "shard-b")
    assert after.on_debit_shard.credits_posted - before.on_debit_shard.credits_posted == 120
    assert after.on_debit_shard.debits_posted == before.on_debit_shard.debits_posted
    assert after.on_credit_shard.debits_posted - before.on_credit_shard.debits_posted == 120
    assert after.on_credit_shard.credits_posted == before.on_credit_shard.credits_posted
    assert_settlements_moved(before, after, posted_minor=120, pending_minor=0)
    assert_settlements_mirror(after)

    record = await lookup(process_cluster, payer, transfer_id)
    assert record.result == pb.TRANSFER_RESULT_OK
    assert record.saga.state == pb.SAGA_STATE_COMPLETED
    assert record.saga.credit_shard == "shard-b"
    assert record.transfer.amount_minor == 120

    saga = await get_saga(process_cluster, payer, transfer_id)
    assert saga.state == pb.SAGA_STATE_COMPLETED
    assert (saga.debit_shard, saga.credit_shard) == ("shard-a", "shard-b")
    assert saga.result == pb.TRANSFER_RESULT_OK
    assert saga.amount_minor == 120
    assert await saga_credit(process_cluster, "shard-b", payer, transfer_id) == (1, 1)
    await assert_reconciled(process_cluster)
    # The history names every step: reserve (1), credit on T (2), finish (3).
    steps = [(s.step, s.outcome) for s in saga.steps]
    assert [s for s, _ in steps] == [1, 2, 3], f"saga history {steps}"
    assert steps[1][1] == "applied", f"saga history {steps}"


@dataclass(frozen=True)
class Refusal:
    """A credit shard refusal: how to set up the destination, and the code T gives."""

    name: str
    expected: pb.TransferResult.ValueType


REFUSALS = [
    Refusal("missing", pb.TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND),
    Refusal("closed", pb.TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED),
    Refusal("currency", pb.TRANSFER_RESULT_CURRENCY_MISMATCH),
    Refusal("limit", pb.TRANSFER_RESULT_EXCEEDS_DEBITS),
]


async def prepare_refusing_destination(cluster: ProcessCluster, payee: str, name: str) -> None:
    stub = stub_of(cluster)
    if name == "missing":
        return
    if name == "currency":
        await create_accounts(stub, account(payee, "sales", "EUR"))
        return
    await create_accounts(stub, account(payee, "sales", no_credit_overdraft=(name == "limit")))
    if name == "closed":
        closed = await stub.SetAccountsClosed(
            pb.SetAccountsClosedRequest(refs=[ref(payee, "sales")], closed=True),
            timeout=RPC_TIMEOUT_S,
        )
        assert list(closed.found) == [True]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.name for r in REFUSALS])
async def test_saga_compensates_when_credit_shard_refuses(
    process_cluster: ProcessCluster, refusal: Refusal
) -> None:
    stub = stub_of(process_cluster)
    payer = await funded_payer(process_cluster, "shard-a", 300)
    payee = process_cluster.merchant_on("shard-c", "payee")
    await prepare_refusing_destination(process_cluster, payee, refusal.name)
    before = await settlements(process_cluster, "shard-a", "shard-c")
    transfer_id = uid("t")
    item = transfer(transfer_id, ref(payer, "wallet"), ref(payee, "sales"), 70)

    result = await post(process_cluster, item)

    assert pb.TransferResult.Name(result.result) == pb.TransferResult.Name(refusal.expected)
    assert_balances(await balance(stub, payer, "wallet"), Row(0, 300, 0, 0))
    if refusal.name != "missing":
        assert_balances(await balance(stub, payee, "sales"), Row())
    after = await settlements(process_cluster, "shard-a", "shard-c")
    assert_settlements_moved(before, after, posted_minor=0, pending_minor=0)
    assert_settlements_mirror(after)
    record = await lookup(process_cluster, payer, transfer_id)
    assert record.result == refusal.expected
    assert record.saga.state == pb.SAGA_STATE_COMPENSATED
    assert record.saga.credit_shard == "shard-c"
    assert await saga_credit(process_cluster, "shard-c", payer, transfer_id) == (
        2,
        refusal.expected,
    )

    # Remove the cause of the refusal: the failed id still stays failed.
    if refusal.name == "missing":
        await create_accounts(stub, account(payee, "sales"))
    elif refusal.name == "closed":
        await stub.SetAccountsClosed(
            pb.SetAccountsClosedRequest(refs=[ref(payee, "sales")], closed=False),
            timeout=RPC_TIMEOUT_S,
        )
    replay = await post(process_cluster, item)
    assert pb.TransferResult.Name(replay.result) == pb.TransferResult.Name(refusal.expected)
    assert replay.replayed
    assert_balances(await balance(stub, payer, "wallet"), Row(0, 300, 0, 0))
    if refusal.name != "currency":
        assert_balances(await balance(stub, payee, "sales"), Row())
    assert await settlements(process_cluster, "shard-a", "shard-c") == after
    await assert_reconciled(process_cluster)


async def test_overdraft_is_refused_at_step_one_without_saga_or_credit(
    process_cluster: ProcessCluster,
) -> None:
    stub = stub_of(process_cluster)
    payer = await funded_payer(process_cluster, "shard-b", 50)
    payee = process_cluster.merchant_on("shard-c", "payee")
    await create_accounts(stub, account(payee, "sales"))
    credits_before = await saga_credit_count(process_cluster, "shard-c")
    before = await settlements(process_cluster, "shard-b", "shard-c")
    transfer_id = uid("t")

    result = await post(
        process_cluster, transfer(transfer_id, ref(payer, "wallet"), ref(payee, "sales"), 51)
    )

    assert pb.TransferResult.Name(result.result) == "TRANSFER_RESULT_EXCEEDS_CREDITS"
    assert await saga_rows(process_cluster, "shard-b", payer, transfer_id) == 0
    assert await saga_credit_count(process_cluster, "shard-c") == credits_before
    assert_balances(await balance(stub, payer, "wallet"), Row(0, 50, 0, 0))
    assert_balances(await balance(stub, payee, "sales"), Row())
    assert await settlements(process_cluster, "shard-b", "shard-c") == before
    record = await lookup(process_cluster, payer, transfer_id)
    assert record.result == pb.TRANSFER_RESULT_EXCEEDS_CREDITS
    assert record.saga.state == pb.SAGA_STATE_UNSPECIFIED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await get_saga(process_cluster, payer, transfer_id)
    assert error.value.code() is grpc.StatusCode.NOT_FOUND
    await assert_reconciled(process_cluster)


# Idempotency.


@asynccontextmanager
async def row_locked(
    cluster: ProcessCluster, shard: str, merchant_id: str, account_id: str
) -> AsyncIterator[None]:
    """Holds FOR UPDATE on one account row, so a saga step that needs it waits."""
    dsn = cluster.shards.servers[shard].dsn("ledger")
    async with account_row_locked(dsn, merchant_id, account_id):
        yield


async def test_replay_before_during_and_after_the_saga_moves_money_once(
    process_cluster: ProcessCluster,
) -> None:
    stub = stub_of(process_cluster)
    payer = await funded_payer(process_cluster, "shard-c", 400)
    payee = process_cluster.merchant_on("shard-a", "payee")
    await create_accounts(stub, account(payee, "sales"))
    before = await settlements(process_cluster, "shard-c", "shard-a")
    transfer_id = uid("t")
    item = transfer(transfer_id, ref(payer, "wallet"), ref(payee, "sales"), 90)

    async with row_locked(process_cluster, "shard-a", payee, "sales"):
        # Step 2 waits on the destination's row lock, so the call's deadline comes first.
        first = await post(process_cluster, item, timeout_s=SHORT_RPC_TIMEOUT_S)
        assert pb.TransferResult.Name(first.result) == "TRANSFER_RESULT_IN_PROGRESS"
        assert not first.replayed
        during = await post(process_cluster, item, timeout_s=SHORT_RPC_TIMEOUT_S)
        assert pb.TransferResult.Name(during.result) == "TRANSFER_RESULT_IN_PROGRESS"
        assert during.replayed
        assert during.created_at == first.created_at
        record = await lookup(process_cluster, payer, transfer_id)
        assert record.result == pb.TRANSFER_RESULT_IN_PROGRESS
        assert record.saga.state == pb.SAGA_STATE_RUNNING
        # Reserved on the debit side, nothing yet on the credit side.
        assert_balances(await balance(stub, payer, "wallet"), Row(0, 400, 90, 0))
        assert_balances(await balance(stub, payee, "sales"), Row())

    done = await lookup(process_cluster, payer, transfer_id, wait_ms=LOOKUP_WAIT_MS)
    assert pb.TransferResult.Name(done.result) == "TRANSFER_RESULT_OK"
    assert done.saga.state == pb.SAGA_STATE_COMPLETED
    after = await post(process_cluster, item)
    assert pb.TransferResult.Name(after.result) == "TRANSFER_RESULT_OK"
    assert after.replayed
    assert after.created_at == first.created_at

    assert_balances(await balance(stub, payer, "wallet"), Row(90, 400, 0, 0))
    assert_balances(await balance(stub, payee, "sales"), Row(0, 90, 0, 0))
    settled = await settlements(process_cluster, "shard-c", "shard-a")
    assert_settlements_moved(before, settled, posted_minor=90, pending_minor=0)
    assert_settlements_mirror(settled)
    await assert_reconciled(process_cluster)


async def test_batch_of_blocked_sagas_answers_in_progress_within_the_call_deadline(
    process_cluster: ProcessCluster,
) -> None:
    """More cross-shard items than start at once, all blocked at step 2: the call still
    answers before its deadline (IN_PROGRESS), and every saga finishes once unblocked."""
    stub = stub_of(process_cluster)
    count = limits.saga_starts_per_request_max + 1
    payer = await funded_payer(process_cluster, "shard-c", 1_000)
    payee = process_cluster.merchant_on("shard-a", "payee")
    await create_accounts(stub, account(payee, "sales"))
    before = await settlements(process_cluster, "shard-c", "shard-a")
    items = [
        transfer(uid("b"), ref(payer, "wallet"), ref(payee, "sales"), 10) for _ in range(count)
    ]

    failure: grpc.aio.AioRpcError | None = None
    answers: list[pb.CreateTransferResult] = []
    async with row_locked(process_cluster, "shard-a", payee, "sales"):
        try:
            response = await stub.CreateTransfers(
                pb.CreateTransfersRequest(transfers=items), timeout=SHORT_RPC_TIMEOUT_S
            )
            answers = list(response.results)
        except grpc.aio.AioRpcError as error:
            failure = error

    # Unblocked: every recorded saga finishes, and its money moves exactly once.
    final = await stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=payer, transfer_id=i.id) for i in items],
            wait_timeout_ms=LOOKUP_WAIT_MS,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert {r.result for r in final.transfers} <= {pb.TRANSFER_RESULT_OK}, final
    moved_minor = 10 * len(final.transfers)
    assert_balances(await balance(stub, payer, "wallet"), Row(moved_minor, 1_000, 0, 0))
    assert_balances(await balance(stub, payee, "sales"), Row(0, moved_minor, 0, 0))
    after = await settlements(process_cluster, "shard-c", "shard-a")
    assert_settlements_moved(before, after, posted_minor=moved_minor, pending_minor=0)
    await assert_reconciled(process_cluster)

    assert failure is None, (
        f"a batch of {count} blocked sagas with a {SHORT_RPC_TIMEOUT_S}s deadline got"
        f" {failure.code().name if failure else ''} instead of IN_PROGRESS results;"
        f" {len(final.transfers)} of the transfers were recorded"
    )
    assert result_names(answers) == ["TRANSFER_RESULT_IN_PROGRESS"] * count
    assert len(final.transfers) == count


async def test_replay_with_a_different_amount_is_refused_naming_amount_minor(
    process_cluster: ProcessCluster,
) -> None:
    stub = stub_of(process_cluster)
    payer = await funded_payer(process_cluster, "shard-a", 100)
    payee = process_cluster.merchant_on("shard-b", "payee")
    await create_accounts(stub, account(payee, "sales"))
    transfer_id = uid("t")
    first = await post(
        process_cluster, transfer(transfer_id, ref(payer, "wallet"), ref(payee, "sales"), 30)
    )
    assert pb.TransferResult.Name(first.result) == "TRANSFER_RESULT_OK"

    changed = await post(
        process_cluster, transfer(transfer_id, ref(payer, "wallet"), ref(payee, "sales"), 31)
    )

    assert pb.TransferResult.Name(changed.result) == "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FIELDS"
    assert changed.differing_field == "amount_minor"
    assert_balances(await balance(stub, payer, "wallet"), Row(30, 100, 0, 0))
    assert_balances(await balance(stub, payee, "sales"), Row(0, 30, 0, 0))
    await assert_reconciled(process_cluster)


# Two-phase transfers across shards.


@dataclass(frozen=True)
class TwoPhase:
    payer: str
    payee: str
    pending_id: str
    settlement_before: SettlementPair


async def open_pending(
    cluster: ProcessCluster, amount_minor: int, *, funding_minor: int = 1_000, timeout_ms: int = 0
) -> TwoPhase:
    """A cross-shard PENDING transfer from shard-b to shard-a, checked to hold both sides."""
    stub = stub_of(cluster)
    payer = await funded_payer(cluster, "shard-b", funding_minor)
    payee = cluster.merchant_on("shard-a", "payee")
    await create_accounts(stub, account(payee, "sales"))
    before = await settlements(cluster, "shard-b", "shard-a")
    pending_id = uid("p")
    held = await post(
        cluster,
        transfer(
            pending_id,
            ref(payer, "wallet"),
            ref(payee, "sales"),
            amount_minor,
            action=pb.TRANSFER_ACTION_PENDING,
            timeout_ms=timeout_ms,
        ),
    )
    assert pb.TransferResult.Name(held.result) == "TRANSFER_RESULT_OK"
    if not timeout_ms:
        assert_balances(
            await balance(stub, payer, "wallet"), Row(0, funding_minor, amount_minor, 0)
        )
        assert_balances(await balance(stub, payee, "sales"), Row(0, 0, 0, amount_minor))
        during = await settlements(cluster, "shard-b", "shard-a")
        assert_settlements_moved(before, during, posted_minor=0, pending_minor=amount_minor)
        assert_settlements_mirror(during)
        record = await lookup(cluster, payer, pending_id)
        assert record.pending_state == pb.PENDING_STATE_PENDING
        assert record.saga.state == pb.SAGA_STATE_COMPLETED
    return TwoPhase(payer, payee, pending_id, before)


def settle(
    case: TwoPhase, action: int, amount_minor: int = 0, *, with_accounts: bool = False
) -> pb.Transfer:
    return transfer(
        uid("s"),
        ref(case.payer, "wallet"),
        ref(case.payee, "sales") if with_accounts else None,
        amount_minor,
        "USD" if with_accounts else "",
        action=action,
        pending_id=case.pending_id,
    )


async def test_pending_across_shards_holds_both_sides_and_full_post_settles_once(
    process_cluster: ProcessCluster,
) -> None:
    stub = stub_of(process_cluster)
    case = await open_pending(process_cluster, 200)
    item = settle(case, pb.TRANSFER_ACTION_POST_PENDING)

    posted = await post(process_cluster, item)

    assert pb.TransferResult.Name(posted.result) == "TRANSFER_RESULT_OK"
    settle_saga = await get_saga(process_cluster, case.payer, item.id, pb.SAGA_KIND_SETTLE)
    assert settle_saga.state == pb.SAGA_STATE_COMPLETED
    assert_balances(await balance(stub, case.payer, "wallet"), Row(200, 1_000, 0, 0))
    assert_balances(await balance(stub, case.payee, "sales"), Row(0, 200, 0, 0))
    after = await settlements(process_cluster, "shard-b", "shard-a")
    assert_settlements_moved(case.settlement_before, after, posted_minor=200, pending_minor=0)
    assert_settlements_mirror(after)
    record = await lookup(process_cluster, case.payer, case.pending_id)
    assert record.pending_state == pb.PENDING_STATE_POSTED

    again = await post(
        process_cluster, settle(case, pb.TRANSFER_ACTION_POST_PENDING, with_accounts=True)
    )
    assert pb.TransferResult.Name(again.result) == "TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_POSTED"
    assert_balances(await balance(stub, case.payer, "wallet"), Row(200, 1_000, 0, 0))
    assert_balances(await balance(stub, case.payee, "sales"), Row(0, 200, 0, 0))
    assert await settlements(process_cluster, "shard-b", "shard-a") == after
    await assert_reconciled(process_cluster)


async def test_partial_post_pending_posts_part_and_releases_the_rest_on_both_sides(
    process_cluster: ProcessCluster,
) -> None:
    stub = stub_of(process_cluster)
    case = await open_pending(process_cluster, 200)

    posted = await post(
        process_cluster, settle(case, pb.TRANSFER_ACTION_POST_PENDING, 75, with_accounts=True)
    )

    assert pb.TransferResult.Name(posted.result) == "TRANSFER_RESULT_OK"
    assert_balances(await balance(stub, case.payer, "wallet"), Row(75, 1_000, 0, 0))
    assert_balances(await balance(stub, case.payee, "sales"), Row(0, 75, 0, 0))
    after = await settlements(process_cluster, "shard-b", "shard-a")
    assert_settlements_moved(case.settlement_before, after, posted_minor=75, pending_minor=0)
    assert_settlements_mirror(after)
    record = await lookup(process_cluster, case.payer, case.pending_id)
    assert record.pending_state == pb.PENDING_STATE_POSTED
    await assert_reconciled(process_cluster)


async def test_void_pending_releases_both_sides(process_cluster: ProcessCluster) -> None:
    stub = stub_of(process_cluster)
    case = await open_pending(process_cluster, 150)

    voided = await post(process_cluster, settle(case, pb.TRANSFER_ACTION_VOID_PENDING))

    assert pb.TransferResult.Name(voided.result) == "TRANSFER_RESULT_OK"
    assert_balances(await balance(stub, case.payer, "wallet"), Row(0, 1_000, 0, 0))
    assert_balances(await balance(stub, case.payee, "sales"), Row())
    after = await settlements(process_cluster, "shard-b", "shard-a")
    assert_settlements_moved(case.settlement_before, after, posted_minor=0, pending_minor=0)
    assert_settlements_mirror(after)
    record = await lookup(process_cluster, case.payer, case.pending_id)
    assert record.pending_state == pb.PENDING_STATE_VOIDED
    late = await post(process_cluster, settle(case, pb.TRANSFER_ACTION_POST_PENDING))
    assert pb.TransferResult.Name(late.result) == "TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_VOIDED"
    assert_balances(await balance(stub, case.payee, "sales"), Row())
    await assert_reconciled(process_cluster)


async def test_pending_with_timeout_expires_on_both_sides_and_cannot_be_posted(
    process_cluster: ProcessCluster,
) -> None:
    stub = stub_of(process_cluster)
    case = await open_pending(process_cluster, 120, timeout_ms=300)

    async def both_released() -> bool:
        payer = await balance(stub, case.payer, "wallet")
        payee = await balance(stub, case.payee, "sales")
        return payer.debits_pending == 0 and payee.credits_pending == 0

    await wait_until(both_released, what="the expiry to release both sides")

    assert_balances(await balance(stub, case.payer, "wallet"), Row(0, 1_000, 0, 0))
    assert_balances(await balance(stub, case.payee, "sales"), Row())
    record = await lookup(process_cluster, case.payer, case.pending_id)
    assert record.pending_state == pb.PENDING_STATE_EXPIRED
    expiry = await get_saga(process_cluster, case.payer, case.pending_id, pb.SAGA_KIND_EXPIRE)
    assert expiry.state == pb.SAGA_STATE_COMPLETED
    after = await settlements(process_cluster, "shard-b", "shard-a")
    assert_settlements_moved(case.settlement_before, after, posted_minor=0, pending_minor=0)
    assert_settlements_mirror(after)

    late = await post(process_cluster, settle(case, pb.TRANSFER_ACTION_POST_PENDING))
    assert pb.TransferResult.Name(late.result) == "TRANSFER_RESULT_PENDING_TRANSFER_EXPIRED"
    assert_balances(await balance(stub, case.payer, "wallet"), Row(0, 1_000, 0, 0))
    assert_balances(await balance(stub, case.payee, "sales"), Row())
    assert await settlements(process_cluster, "shard-b", "shard-a") == after
    await assert_reconciled(process_cluster)


# Concurrency.


async def test_concurrent_transfers_in_both_directions_settle_exactly_once(
    process_cluster: ProcessCluster,
) -> None:
    stub = stub_of(process_cluster)
    alice = await funded_payer(process_cluster, "shard-a", CONCURRENT_FUNDING_MINOR)
    bob = await funded_payer(process_cluster, "shard-b", CONCURRENT_FUNDING_MINOR)
    before = await settlements(process_cluster, "shard-a", "shard-b")
    rng = random.Random(20240917)
    items = []
    for n in range(CONCURRENT_TRANSFERS):
        payer, payee = (alice, bob) if n % 2 == 0 else (bob, alice)
        amount_minor = rng.randint(1, CONCURRENT_AMOUNT_MINOR_MAX)
        items.append(transfer(uid("c"), ref(payer, "wallet"), ref(payee, "wallet"), amount_minor))
    rng.shuffle(items)

    answers = await asyncio.gather(
        *(post(process_cluster, item, timeout_s=CONCURRENT_RPC_TIMEOUT_S) for item in items)
    )

    allowed = {
        pb.TRANSFER_RESULT_OK,
        pb.TRANSFER_RESULT_EXCEEDS_CREDITS,
        pb.TRANSFER_RESULT_IN_PROGRESS,
    }
    assert {a.result for a in answers} <= allowed, result_names(answers)
    final = await stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[
                pb.TransferRef(merchant_id=i.debit_account.merchant_id, transfer_id=i.id)
                for i in items
            ],
            wait_timeout_ms=CONCURRENT_LOOKUP_WAIT_MS,
        ),
        timeout=CONCURRENT_LOOKUP_WAIT_MS / 1000 + RPC_TIMEOUT_S,
    )
    assert [r.transfer.id for r in final.transfers] == [i.id for i in items]
    results = {r.transfer.id: r.result for r in final.transfers}
    assert set(results.values()) <= {pb.TRANSFER_RESULT_OK, pb.TRANSFER_RESULT_EXCEEDS_CREDITS}
    for answer in answers:
        if answer.result != pb.TRANSFER_RESULT_IN_PROGRESS:
            assert results[answer.id] == answer.result, answer.id

    def ok_sum(payer: str) -> int:
        return sum(
            i.amount_minor
            for i in items
            if i.debit_account.merchant_id == payer and results[i.id] == pb.TRANSFER_RESULT_OK
        )

    alice_paid, bob_paid = ok_sum(alice), ok_sum(bob)
    assert alice_paid > 0 and bob_paid > 0
    funding = CONCURRENT_FUNDING_MINOR
    assert_balances(await balance(stub, alice, "wallet"), Row(alice_paid, funding + bob_paid, 0, 0))
    assert_balances(await balance(stub, bob, "wallet"), Row(bob_paid, funding + alice_paid, 0, 0))
    after = await settlements(process_cluster, "shard-a", "shard-b")
    assert_settlements_moved(before, after, posted_minor=alice_paid - bob_paid, pending_minor=0)
    assert_settlements_mirror(after)
    unfinished = await admin_of(process_cluster).ListSagas(
        pb.ListSagasRequest(page_size=1000), timeout=RPC_TIMEOUT_S
    )
    ours = {i.id for i in items}
    assert [s.ref.transfer_id for s in unfinished.sagas if s.ref.transfer_id in ours] == []
    assert "deadlock detected" not in process_cluster.service.log()
    await assert_reconciled(process_cluster)

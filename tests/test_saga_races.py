"""Races on the cross-shard saga, driven in-process against real PostgreSQL shards.

Each test builds the state it races on directly through SagaStore, so what it
checks is the storage protocol itself: step 2 recorded exactly once on the
credit shard, step 3 fenced by the saga's version, and reconcile seeing both.
Sagas meant to stay put are begun with a long lease (the module's server runs
its own recovery worker every 0.2 s); sagas meant to be raced on are begun due.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from ledger.domain.accounts import AccountKey
from ledger.domain.sagas import (
    SETTLEMENT_MERCHANT_ID,
    SETTLEMENT_STRIPES,
    CreditOutcome,
    CreditRecord,
    Saga,
    SagaKey,
    SagaKind,
    SagaState,
    settlement_account,
)
from ledger.domain.transfers import TransferAction, TransferRequest, TransferResult
from ledger.routing.cluster import Cluster
from ledger.routing.config import load_config
from ledger.sagas.reconcile import reconcile
from ledger.sagas.recovery import RecoveryWorker
from ledger.sagas.runner import SagaRunner, SagaSettings
from ledger.storage.sagas import SagaRaced, SagaStore
from ledger.storage.shard import Shard
from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    balance,
    create_accounts,
    ref,
    transfer,
    transfers,
    uid,
    wait_until,
)

# Long enough that no recovery worker claims a saga a test wants to keep still.
HELD_LEASE_S = 60.0
# Concurrent step-2 calls for one saga in the duplicate-credit race.
CONCURRENT_CREDITS = 10
# Sagas raced on at once by the recovery workers (more sagas, more interleavings).
RACED_SAGAS = 5
AMOUNT_MINOR = 700
# Cross-shard transfers in one call, all first of their currency: several per stripe.
CONCURRENT_FIRST_SAGAS = 200
CURRENCY = "USD"


@dataclass(frozen=True)
class Pair:
    """A payer on the debit shard S and a payee on the credit shard T."""

    payer: str
    payee: str
    debit_shard: Shard
    credit_shard: Shard

    @property
    def debit(self) -> AccountKey:
        return AccountKey(self.payer, "cash")

    @property
    def credit(self) -> AccountKey:
        return AccountKey(self.payee, "sales")


async def new_pair(service: Service, *, debit: str = "shard-a", credit: str = "shard-b") -> Pair:
    payer = service.merchant_on(debit, "payer-")
    payee = service.merchant_on(credit, "payee-")
    await create_accounts(service.stub, account(payer, "cash"), account(payee, "sales"))
    return Pair(payer, payee, service.cluster.shards[debit], service.cluster.shards[credit])


async def begin(service: Service, pair: Pair, *, lease_s: float = HELD_LEASE_S) -> Saga:
    """Step 1 on S, straight through the store; lease_s=0 makes the saga due at once."""
    request = TransferRequest(
        id=uid("t-"),
        debit=pair.debit,
        credit=pair.credit,
        amount_minor=AMOUNT_MINOR,
        currency=CURRENCY,
        action=TransferAction.POST,
    )
    start = await SagaStore(pair.debit_shard).begin_transfer(
        request,
        peer_shard=pair.credit_shard.name,
        fence=service.cluster.fence(pair.debit_shard, {pair.payer}),
        trace_context="",
        lease_owner="test",
        lease_s=lease_s,
    )
    assert start.outcome.result is TransferResult.IN_PROGRESS
    assert start.saga is not None
    assert start.saga.state is SagaState.RUNNING
    return start.saga


async def credit(service: Service, pair: Pair, saga: Saga, *, abort: bool = False) -> CreditRecord:
    """Step 2 on T, straight through the store."""
    return await SagaStore(pair.credit_shard).credit(
        saga,
        home_shard=pair.debit_shard.name,
        fence=service.cluster.fence(pair.credit_shard, {pair.payee}),
        abort=abort,
    )


async def fetch_int(shard: Shard, query: str, *args: object) -> int:
    async with shard.pool.acquire() as conn:
        return int(await conn.fetchval(query, *args))


async def entries_for(shard: Shard, saga: Saga) -> int:
    return await fetch_int(
        shard,
        "SELECT count(*) FROM entries WHERE transfer_merchant_id = $1 AND transfer_id = $2",
        saga.key.merchant_id,
        saga.key.transfer_id,
    )


async def credit_rows(shard: Shard, saga: Saga) -> int:
    return await fetch_int(
        shard,
        "SELECT count(*) FROM saga_credits WHERE merchant_id = $1 AND transfer_id = $2"
        " AND kind = $3",
        saga.key.merchant_id,
        saga.key.transfer_id,
        int(saga.key.kind),
    )


async def step3_rows(shard: Shard, saga: Saga) -> int:
    return await fetch_int(
        shard,
        "SELECT count(*) FROM saga_steps WHERE merchant_id = $1 AND transfer_id = $2"
        " AND kind = $3 AND step = 3",
        saga.key.merchant_id,
        saga.key.transfer_id,
        int(saga.key.kind),
    )


async def saga_now(pair: Pair, key: SagaKey) -> Saga:
    found = await SagaStore(pair.debit_shard).get(key)
    assert found is not None
    return found[0]


async def balances(service: Service, pair: Pair) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(payer's, payee's) (debits_posted, credits_posted, debits_pending, credits_pending)."""
    found = []
    for merchant_id, account_id in ((pair.payer, "cash"), (pair.payee, "sales")):
        a = await balance(service.stub, merchant_id, account_id)
        found.append((a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending))
    return found[0], found[1]


async def lookup(service: Service, saga: Saga) -> pb.TransferRecord:
    response = await service.stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[
                pb.TransferRef(merchant_id=saga.key.merchant_id, transfer_id=saga.key.transfer_id)
            ]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert len(response.transfers) == 1
    return response.transfers[0]


@asynccontextmanager
async def own_runner(service: Service, owner: str) -> AsyncIterator[SagaRunner]:
    """A runner on a Cluster of its own (its own pools), as another replica would have."""
    cluster = Cluster(load_config(service.config_path), config_path=service.config_path)
    try:
        await cluster.open(migrate=False)
        yield SagaRunner(cluster, owner=owner)
    finally:
        await cluster.close()


async def finish_completed(service: Service, pair: Pair, saga: Saga) -> Saga:
    """Drives a saga whose credit may already have landed to its end (test clean-up)."""
    runner = SagaRunner(service.cluster, owner="test-cleanup")
    finished = await runner.drive(await saga_now(pair, saga.key))
    assert finished.state is SagaState.COMPLETED, finished
    return finished


# Step 2 after an abort.


async def test_late_credit_after_recorded_abort_is_refused_and_saga_compensates(
    service: Service,
) -> None:
    pair = await new_pair(service)
    saga = await begin(service, pair)
    payer_reserved, payee_before = await balances(service, pair)
    assert payer_reserved == (0, 0, AMOUNT_MINOR, 0)

    aborted = CreditRecord(CreditOutcome.ABORTED, TransferResult.ABORTED, pair.credit_shard.name)
    assert await credit(service, pair, saga, abort=True) == aborted
    # The late step 2 (a worker that read the saga before the abort) finds the abort.
    assert await credit(service, pair, saga) == aborted
    _, payee_after = await balances(service, pair)
    assert payee_after == payee_before == (0, 0, 0, 0)
    assert await entries_for(pair.credit_shard, saga) == 0
    assert await credit_rows(pair.credit_shard, saga) == 1

    runner = SagaRunner(service.cluster, owner="test-resolver")
    resolved = await runner.resolve(saga.key, outcome=SagaState.COMPENSATED)
    assert resolved.state is SagaState.COMPENSATED
    assert resolved.result is TransferResult.ABORTED
    assert resolved.version > saga.version

    payer_after, payee_final = await balances(service, pair)
    assert payer_after == (0, 0, 0, 0), "the reservation is released, nothing posted"
    assert payee_final == (0, 0, 0, 0)
    # Still refused after the saga finished.
    assert (await credit(service, pair, saga)).outcome is CreditOutcome.ABORTED
    assert await entries_for(pair.credit_shard, saga) == 0
    record = await lookup(service, saga)
    assert record.result == pb.TRANSFER_RESULT_ABORTED
    assert record.saga.state == pb.SAGA_STATE_COMPENSATED


async def test_abort_racing_a_credit_records_one_outcome_that_every_caller_sees(
    service: Service,
) -> None:
    pair = await new_pair(service)
    saga = await begin(service, pair)
    try:
        answers = await asyncio.gather(
            credit(service, pair, saga, abort=True),
            credit(service, pair, saga),
            credit(service, pair, saga, abort=True),
            credit(service, pair, saga),
            return_exceptions=True,
        )
        recorded = await SagaStore(pair.credit_shard).credit_outcome(saga.key)
        assert recorded is not None
        assert await credit_rows(pair.credit_shard, saga) == 1
        applied = recorded.outcome is CreditOutcome.APPLIED
        assert recorded.credited_on == pair.credit_shard.name
        assert await entries_for(pair.credit_shard, saga) == (2 if applied else 0)
        _, payee = await balances(service, pair)
        assert payee == ((0, AMOUNT_MINOR, 0, 0) if applied else (0, 0, 0, 0))
        assert list(answers) == [recorded] * len(answers), (
            f"every racer must get the one recorded outcome {recorded}: {answers}"
        )
    finally:
        runner = SagaRunner(service.cluster, owner="test-cleanup")
        recorded = await SagaStore(pair.credit_shard).credit_outcome(saga.key)
        target = (
            SagaState.COMPLETED
            if recorded is not None and recorded.outcome is CreditOutcome.APPLIED
            else SagaState.COMPENSATED
        )
        assert (await runner.resolve(saga.key, outcome=target)).state is target


# Duplicate step 2.


async def test_repeated_credit_applies_once(service: Service) -> None:
    pair = await new_pair(service)
    saga = await begin(service, pair)
    try:
        first = await credit(service, pair, saga)
        second = await credit(service, pair, saga)
        assert (
            first
            == second
            == CreditRecord(CreditOutcome.APPLIED, TransferResult.OK, pair.credit_shard.name)
        )
        _, payee = await balances(service, pair)
        assert payee == (0, AMOUNT_MINOR, 0, 0)
        assert await credit_rows(pair.credit_shard, saga) == 1
        assert await entries_for(pair.credit_shard, saga) == 2
    finally:
        await finish_completed(service, pair, saga)
    payer, payee = await balances(service, pair)
    assert payer == (AMOUNT_MINOR, 0, 0, 0)
    assert payee == (0, AMOUNT_MINOR, 0, 0)


async def test_concurrent_credits_for_a_fresh_saga_apply_once_and_all_report_applied(
    service: Service,
) -> None:
    pair = await new_pair(service)
    saga = await begin(service, pair)
    try:
        answers = await asyncio.gather(
            *(credit(service, pair, saga) for _ in range(CONCURRENT_CREDITS)),
            return_exceptions=True,
        )
        # Money first: whatever the callers were told, the payee is credited once.
        _, payee = await balances(service, pair)
        assert payee == (0, AMOUNT_MINOR, 0, 0)
        assert await credit_rows(pair.credit_shard, saga) == 1
        assert await entries_for(pair.credit_shard, saga) == 2
        applied = CreditRecord(CreditOutcome.APPLIED, TransferResult.OK, pair.credit_shard.name)
        assert answers == [applied] * CONCURRENT_CREDITS, (
            f"every concurrent step 2 must answer APPLIED: {answers}"
        )
    finally:
        await finish_completed(service, pair, saga)
    payer, _ = await balances(service, pair)
    assert payer == (AMOUNT_MINOR, 0, 0, 0)


# Step 3 races.


async def test_two_recovery_workers_and_a_driver_finish_each_saga_once(service: Service) -> None:
    pair = await new_pair(service)
    sagas = [await begin(service, pair, lease_s=0.0) for _ in range(RACED_SAGAS)]
    keys = [s.key for s in sagas]
    versions: dict[SagaKey, list[int]] = {k: [] for k in keys}
    stop = asyncio.Event()

    async def sample_versions() -> None:
        async with pair.debit_shard.pool.acquire() as conn:
            while not stop.is_set():
                rows = await conn.fetch(
                    "SELECT transfer_id, version FROM sagas WHERE merchant_id = $1 AND kind = 1",
                    pair.payer,
                )
                for row in rows:
                    versions[SagaKey(pair.payer, row["transfer_id"], SagaKind.TRANSFER)].append(
                        row["version"]
                    )
                await asyncio.sleep(0)

    sampler = asyncio.create_task(sample_versions())
    try:
        async with (
            own_runner(service, "replica-1") as runner_1,
            own_runner(service, "replica-2") as runner_2,
            own_runner(service, "replica-3") as runner_3,
        ):
            worker_1, worker_2 = RecoveryWorker(runner_1), RecoveryWorker(runner_2)
            claims = asyncio.gather(worker_1.run_once(), worker_2.run_once())
            drives = asyncio.gather(*(runner_3.drive(s) for s in sagas))
            (driven_1, driven_2), _ = await asyncio.gather(claims, drives)
            # Each saga is claimable once (a lease, then finished): never by both workers.
            assert driven_1 + driven_2 <= RACED_SAGAS

            async def all_finished() -> bool:
                states = [(await saga_now(pair, k)).finished for k in keys]
                return all(states)

            # The module server's own worker is one more racer; a drive that lost
            # its race leaves the saga to whoever claimed it.
            await wait_until(all_finished, what="every raced saga to finish")
    finally:
        stop.set()
        await sampler

    for saga in sagas:
        final = await saga_now(pair, saga.key)
        assert final.state is SagaState.COMPLETED
        assert final.result is TransferResult.OK
        assert final.version > saga.version
        assert await step3_rows(pair.debit_shard, saga) == 1
        assert await credit_rows(pair.credit_shard, saga) == 1
        assert await entries_for(pair.credit_shard, saga) == 2
        seen = versions[saga.key]
        assert seen == sorted(seen), f"version went backwards for {saga.key}: {seen}"
    for saga in sagas:
        final = await saga_now(pair, saga.key)
        # No shard failed here: a racer that lost must stop quietly, not count a failed attempt.
        assert (final.attempts, final.last_error) == (0, ""), (
            f"a lost race was recorded as a failed attempt of {saga.key}: {final.last_error!r}"
        )
    payer, payee = await balances(service, pair)
    total_minor = AMOUNT_MINOR * RACED_SAGAS
    assert payer == (total_minor, 0, 0, 0)
    assert payee == (0, total_minor, 0, 0)

    # A stale driver holding the step-1 version changes nothing.
    stale = sagas[0]
    store = SagaStore(pair.debit_shard)
    fence = service.cluster.fence(pair.debit_shard, {pair.payer})
    for outcome, result in (
        (CreditOutcome.APPLIED, TransferResult.OK),
        (CreditOutcome.ABORTED, TransferResult.ABORTED),
    ):
        try:
            again = await store.finish(
                stale.key,
                version=stale.version,
                credit=CreditRecord(outcome, result, pair.credit_shard.name),
                fence=fence,
            )
        except SagaRaced:
            pass
        else:
            assert again.state is SagaState.COMPLETED
            assert again.result is TransferResult.OK
    replayed = await SagaRunner(service.cluster, owner="stale").drive(stale)
    assert replayed.state is SagaState.COMPLETED
    assert await step3_rows(pair.debit_shard, stale) == 1
    assert await balances(service, pair) == (payer, payee)
    assert (await lookup(service, stale)).result == pb.TRANSFER_RESULT_OK


async def test_finish_with_a_stale_version_is_refused_while_the_saga_runs(
    service: Service,
) -> None:
    pair = await new_pair(service)
    saga = await begin(service, pair)
    store = SagaStore(pair.debit_shard)
    moved = await store.retry_later(saga, error="test: moved on", attempts_max=30, delay_s=60.0)
    assert moved is not None and moved.version > saga.version
    before = await balances(service, pair)
    with pytest.raises(SagaRaced):
        await store.finish(
            saga.key,
            version=saga.version,
            credit=CreditRecord(
                CreditOutcome.ABORTED, TransferResult.ABORTED, pair.credit_shard.name
            ),
            fence=service.cluster.fence(pair.debit_shard, {pair.payer}),
        )
    assert await balances(service, pair) == before
    assert await step3_rows(pair.debit_shard, saga) == 0
    assert (await saga_now(pair, saga.key)).state is SagaState.RUNNING
    finished = await SagaRunner(service.cluster, owner="test").drive(moved)
    assert finished.state is SagaState.COMPLETED
    assert await step3_rows(pair.debit_shard, saga) == 1


async def test_retry_later_with_a_stale_version_returns_none_and_changes_nothing(
    service: Service,
) -> None:
    pair = await new_pair(service)
    saga = await begin(service, pair)
    store = SagaStore(pair.debit_shard)
    current = await store.retry_later(saga, error="first", attempts_max=30, delay_s=60.0)
    assert current is not None
    assert current.attempts == saga.attempts + 1
    assert current.version > saga.version
    steps_before = (await store.get(saga.key) or (None, []))[1]

    assert await store.retry_later(saga, error="stale", attempts_max=1, delay_s=0.0) is None

    found = await store.get(saga.key)
    assert found is not None
    after, steps_after = found
    assert after == current, "a stale retry_later must not touch the row"
    assert after.state is SagaState.RUNNING, "a stale worker cannot dead-letter the saga"
    assert steps_after == steps_before
    finished = await SagaRunner(service.cluster, owner="test").drive(current)
    assert finished.state is SagaState.COMPLETED


# Reconcile (last: it checks the books everything above left behind).


async def test_reconcile_passes_flags_a_corrupted_settlement_account_and_a_stuck_saga(
    service: Service,
) -> None:
    pair = await new_pair(service)
    transfer_id = uid("t-")
    results = await transfers(
        service.stub,
        transfer(transfer_id, ref(pair.payer, "cash"), ref(pair.payee, "sales"), AMOUNT_MINOR),
    )
    assert [r.result for r in results] == [pb.TRANSFER_RESULT_OK]

    report = await reconcile(service.cluster)
    assert report.ok, report.render()
    assert (await reconcile(service.cluster, stuck_after_s=0.0)).ok, "no saga is running"

    shard = pair.debit_shard
    settlement = settlement_account(pair.credit_shard.name, CURRENCY, transfer_id)
    corrupt = (
        "UPDATE accounts SET credits_posted = credits_posted + $3"
        " WHERE merchant_id = $1 AND account_id = $2"
    )
    async with shard.pool.acquire() as conn:
        assert await conn.execute(corrupt, SETTLEMENT_MERCHANT_ID, settlement.account_id, 1) == (
            "UPDATE 1"
        )
    try:
        report = await reconcile(service.cluster)
        assert not report.ok
        failed = [f for f in report.findings if not f.ok]
        assert any(shard.name in f.check for f in failed), report.render()
        assert any(f.check == f"balance {shard.name} {CURRENCY}" for f in failed), report.render()
        assert any(f.check == f"entries {shard.name}" for f in failed), report.render()
    finally:
        async with shard.pool.acquire() as conn:
            await conn.execute(corrupt, SETTLEMENT_MERCHANT_ID, settlement.account_id, -1)
    report = await reconcile(service.cluster)
    assert report.ok, report.render()

    running = await begin(service, pair)
    try:
        report = await reconcile(service.cluster, stuck_after_s=0.0)
        stuck = [f for f in report.findings if f.check == f"stuck sagas {shard.name}"]
        assert len(stuck) == 1 and not stuck[0].ok, report.render()
        assert running.key.transfer_id in stuck[0].detail
        # Under the default limit a young running saga is not stuck.
        assert (await reconcile(service.cluster)).ok
    finally:
        await finish_completed(service, pair, running)
    report = await reconcile(service.cluster, stuck_after_s=0.0)
    assert report.ok, report.render()


async def test_settling_a_refused_cross_shard_pending_transfer_finds_nothing_to_settle(
    service: Service,
) -> None:
    """A refusal at step 1 is recorded on the debit shard, naming a credit merchant
    that lives elsewhere; settling it must say so, not try to fence that merchant."""
    pair = await new_pair(service)
    refused_id = uid("rf-")
    pending = transfer(
        refused_id,
        ref(pair.payer, "no-such-account"),
        ref(pair.payee, "sales"),
        AMOUNT_MINOR,
        action=pb.TRANSFER_ACTION_PENDING,
    )
    first = await transfers(service.stub, pending)
    assert [pb.TransferResult.Name(r.result) for r in first] == [
        "TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND"
    ]
    post = pb.Transfer(
        id=uid("po-"),
        debit_account=ref(pair.payer, "no-such-account"),
        action=pb.TRANSFER_ACTION_POST_PENDING,
        pending_id=refused_id,
    )
    answer = await transfers(service.stub, post)
    assert [pb.TransferResult.Name(r.result) for r in answer] == [
        "TRANSFER_RESULT_PENDING_TRANSFER_NOT_FOUND"
    ]


async def test_a_settlement_account_remembered_but_missing_is_made_again(
    service: Service,
) -> None:
    """Sagas skip creating settlement accounts a shard has seen; if one it remembers
    is missing after all (the transaction that made it rolled back), the step makes it
    and carries on instead of refusing the transfer."""
    payer = service.merchant_on("shard-a", "payer-")
    payee = service.merchant_on("shard-b", "payee-")
    # A currency no other test here uses, so no settlement account for it exists yet.
    currency = "CHF"
    await create_accounts(
        service.stub,
        account(payer, "cash", currency=currency),
        account(payee, "sales", currency=currency),
    )
    debit_shard, credit_shard = service.cluster.shards["shard-a"], service.cluster.shards["shard-b"]
    stale = {
        (debit_shard, "shard-b"),
        (credit_shard, "shard-a"),
    }
    for shard, peer in stale:
        for stripe in range(SETTLEMENT_STRIPES):
            key = AccountKey(SETTLEMENT_MERCHANT_ID, f"{peer}/{currency}/{stripe}")
            shard.settlement_accounts.add(key)
    transfer_id = uid("t-")
    results = await transfers(
        service.stub,
        transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 55, currency=currency),
    )
    assert [r.result for r in results] == [pb.TRANSFER_RESULT_OK]
    assert (await balance(service.stub, payee, "sales")).credits_posted == 55
    for shard, peer in stale:
        made = settlement_account(peer, currency, transfer_id)
        assert made in shard.settlement_accounts
        assert (
            await fetch_int(
                shard,
                "SELECT count(*) FROM accounts WHERE merchant_id = $1 AND account_id = $2",
                made.merchant_id,
                made.account_id,
            )
            == 1
        )


async def test_concurrent_first_sagas_of_a_currency_all_find_their_settlement_account(
    service: Service,
) -> None:
    """The first sagas of a currency between two shards start together: one makes
    each settlement account while others already remember it but cannot see it yet
    (not committed). Every one of them must wait for it, none may be refused."""
    currency = "JPY"  # no other test here uses it: no settlement account exists yet
    payers = [service.merchant_on("shard-a", "payer-") for _ in range(CONCURRENT_FIRST_SAGAS)]
    payees = [service.merchant_on("shard-b", "payee-") for _ in range(CONCURRENT_FIRST_SAGAS)]
    await create_accounts(
        service.stub,
        *[account(m, "cash", currency=currency) for m in payers],
        *[account(m, "sales", currency=currency) for m in payees],
    )
    results = await transfers(
        service.stub,
        *[
            transfer(uid("t-"), ref(payer, "cash"), ref(payee, "sales"), 3, currency=currency)
            for payer, payee in zip(payers, payees, strict=True)
        ],
    )
    assert {pb.TransferResult.Name(r.result) for r in results} <= {
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_IN_PROGRESS",
    }


async def test_a_saga_waiting_for_its_merchant_to_move_is_never_dead_lettered(
    service: Service,
) -> None:
    """Chaos seed 300 (drains, 10 clients): a hold's expiry waited for its credit
    merchant, fenced by a move that failed reruns kept unfinished, and ran out of
    attempts in 40 s (the run caps back-off at 1 s): dead-lettered, its merchant could
    never move again, and the drain that needed it could not finish. A wait for a
    placement to settle is not a failed attempt: the saga backs off and goes on."""
    pair = await new_pair(service)
    saga = await begin(service, pair)
    # Back-off long enough that the service's own recovery worker stays off it.
    settings = SagaSettings(attempts_max=2, retry_delay_s_min=30.0, retry_delay_s_max=60.0)
    runner = SagaRunner(service.cluster, owner="test", settings=settings)
    async with pair.credit_shard.pool.acquire() as conn:
        await conn.execute(
            "UPDATE merchants SET state = 'moving' WHERE merchant_id = $1", pair.payee
        )
    try:
        for _ in range(settings.attempts_max + 2):
            waited = await runner.drive(saga)
            assert waited.state is SagaState.RUNNING, (waited.state, waited.last_error)
            assert "moving" in waited.last_error, waited.last_error
            assert waited.attempts == 0
            backoff_s = (waited.next_attempt_at - waited.updated_at).total_seconds()
            assert backoff_s >= settings.retry_delay_s_min / 2 - 1, backoff_s
            saga = waited
    finally:
        async with pair.credit_shard.pool.acquire() as conn:
            await conn.execute(
                "UPDATE merchants SET state = 'active' WHERE merchant_id = $1", pair.payee
            )
    found = await SagaStore(pair.debit_shard).get(saga.key)
    assert found is not None
    assert [s.outcome for s in found[1] if s.step == 2] == ["wait"] * (settings.attempts_max + 2)
    assert (await runner.drive(saga)).state is SagaState.COMPLETED
    assert await balances(service, pair) == ((AMOUNT_MINOR, 0, 0, 0), (0, AMOUNT_MINOR, 0, 0))

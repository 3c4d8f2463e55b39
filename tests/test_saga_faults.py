"""Cross-shard sagas under faults, against real processes and real PostgreSQL servers.

The service runs as a child process, so it can crash (SIGKILL itself at a saga
crash point, see ledger/faults.py) and start again on the same shards; each
shard has a PostgreSQL server of its own, so the credit shard can be stopped
mid-saga. Every test ends with the books reconciled.

Transfers always go from a merchant on shard-a (the debit shard S) to one on
shard-b (the credit shard T).
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import grpc
import pytest

from ledger import faults
from ledger.client import ClientOptions, LedgerClient
from ledger.embedded.postgres import EmbeddedPostgresError
from ledger.v1 import ledger_pb2 as pb
from tests.event_support import collect_until
from tests.process_cluster import ROOT, ProcessCluster
from tests.support import (
    RPC_TIMEOUT_S,
    account,
    balance,
    create_accounts,
    error_reason,
    ref,
    transfer,
    transfers,
    uid,
    wait_until,
)

DEBIT_SHARD = "shard-a"
CREDIT_SHARD = "shard-b"
# Every start of the service gets these. A crashed replica's saga is resumed only once its
# lease runs out (10 s by default), and back-off is capped at 1 s, so recovery is quick here.
SERVICE_ENV = {"LEDGER_SAGA_LEASE_S": "1", "LEDGER_SAGA_RETRY_DELAY_S_MAX": "1"}
# The first call of a crash test: the service dies inside it, so it must not hang the test.
CRASHING_CALL_TIMEOUT_S = 5.0
# Per-attempt deadline of the client that retries after the restart; the service waits up to
# limits.saga_inline_wait_s_max (5 s) within it for the saga.
RETRYING_CLIENT_TIMEOUT_S = 8.0
# A cross-shard call made while the credit shard is down: step 1 commits and one attempt at
# step 2 fails; the caller must hear IN_PROGRESS well within this.
IN_PROGRESS_CALL_TIMEOUT_S = 3.0
# How long one LookupTransfers waits (server side) for a saga to leave IN_PROGRESS.
LOOKUP_WAIT_MS = 5_000
# A dead saga must stay dead this long after its credit shard is back: several recovery
# rounds (limits.saga_recovery_interval_s = 0.2 s) and well past the 0.2 s back-off cap.
STAYS_DEAD_WINDOW_S = 1.2
# Retries before the dead-letter list, and the back-off cap, in the dead-letter tests.
DEAD_LETTER_ENV = {"LEDGER_SAGA_ATTEMPTS_MAX": "3", "LEDGER_SAGA_RETRY_DELAY_S_MAX": "0.2"}
# A CLI command (a Python start-up plus one call or one reconcile) finishes within this.
CLI_DEADLINE_S = 60.0
# pg_ctl, initdb and psql run in a forked child of this process, where gRPC's fork handlers
# now and then crash the child before it execs (exit -11, nothing done); one more try is safe.
PG_CTL_ATTEMPTS_MAX = 2
# saga_credits.outcome for an abort recorded on the credit shard (migration 0002).
CREDIT_OUTCOME_ABORTED = 3


@pytest.fixture(scope="module")
async def saga_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ProcessCluster]:
    """Three shard servers of their own and the service as a process, with short saga leases."""
    cluster = ProcessCluster(tmp_path_factory.mktemp("saga-faults"))
    try:
        await _pg_ctl(cluster.start_shards)
        cluster.service.env = dict(SERVICE_ENV)
        await cluster.service.start()
        yield cluster
    finally:
        # As cluster.close(), but also after a failed start (no service process to kill).
        try:
            if cluster.service.process is not None:
                await cluster.service.kill()
        finally:
            await _stop_servers(cluster)


# Helpers.


async def _pg_ctl(action: Callable[[], None]) -> None:
    """Runs a blocking PostgreSQL server action off the event loop, retried as above."""
    for attempt in range(1, PG_CTL_ATTEMPTS_MAX + 1):
        try:
            await asyncio.to_thread(action)
            return
        except EmbeddedPostgresError:
            if attempt == PG_CTL_ATTEMPTS_MAX:
                raise


async def _stop_servers(cluster: ProcessCluster) -> None:
    """Stops every shard server, even when one of them refuses; raises the first refusal."""
    failures: list[BaseException] = []
    for name in cluster.shards.names:
        try:
            await _pg_ctl(functools.partial(cluster.shards.stop, name, mode="immediate"))
        except EmbeddedPostgresError as error:
            failures.append(error)
    if failures:
        raise failures[0]


def _log_tail(cluster: ProcessCluster, lines: int = 40) -> str:
    return "\n".join(cluster.service.log().splitlines()[-lines:])


async def _restart(cluster: ProcessCluster, **env: str) -> None:
    """Stops the service cleanly and starts it again; env applies to this start only."""
    await cluster.service.stop()
    await cluster.service.start(**env)


async def payer_and_payee(cluster: ProcessCluster) -> tuple[str, str]:
    """A fresh merchant on the debit shard and one on the credit shard, with accounts."""
    assert cluster.service.stub is not None
    payer = cluster.merchant_on(DEBIT_SHARD, "payer")
    payee = cluster.merchant_on(CREDIT_SHARD, "payee")
    await create_accounts(cluster.service.stub, account(payer, "cash"), account(payee, "sales"))
    return payer, payee


async def _lookup(
    cluster: ProcessCluster, merchant_id: str, transfer_id: str, *, wait_ms: int = 0
) -> pb.TransferRecord | None:
    assert cluster.service.stub is not None
    response = await cluster.service.stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=merchant_id, transfer_id=transfer_id)],
            wait_timeout_ms=wait_ms,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    return response.transfers[0] if response.transfers else None


async def _final_record(
    cluster: ProcessCluster, merchant_id: str, transfer_id: str
) -> pb.TransferRecord:
    """Looks the transfer up, waiting on the server, until its result is no longer IN_PROGRESS."""
    seen: list[pb.TransferRecord] = []

    async def final() -> bool:
        record = await _lookup(cluster, merchant_id, transfer_id, wait_ms=LOOKUP_WAIT_MS)
        if record is None:
            return False
        seen.append(record)
        return record.result != pb.TRANSFER_RESULT_IN_PROGRESS

    await wait_until(final, what=f"transfer {transfer_id} to leave IN_PROGRESS")
    return seen[-1]


def _saga_ref(merchant_id: str, transfer_id: str) -> pb.SagaRef:
    return pb.SagaRef(merchant_id=merchant_id, transfer_id=transfer_id, kind=pb.SAGA_KIND_TRANSFER)


async def _get_saga(cluster: ProcessCluster, merchant_id: str, transfer_id: str) -> pb.Saga:
    assert cluster.service.admin is not None
    return await cluster.service.admin.GetSaga(
        pb.GetSagaRequest(ref=_saga_ref(merchant_id, transfer_id)), timeout=RPC_TIMEOUT_S
    )


async def _list_sagas(cluster: ProcessCluster, state: int) -> list[pb.Saga]:
    assert cluster.service.admin is not None
    response = await cluster.service.admin.ListSagas(
        pb.ListSagasRequest(state=state, page_size=1000),  # type: ignore[arg-type]
        timeout=RPC_TIMEOUT_S,
    )
    return list(response.sagas)


async def _no_running_sagas(cluster: ProcessCluster) -> None:
    """Waits until no saga is RUNNING, so a crash point can only be reached by this test's."""

    async def idle() -> bool:
        return not await _list_sagas(cluster, pb.SAGA_STATE_RUNNING)

    await wait_until(idle, what="no saga left running by an earlier test")


async def _posted_entries(
    cluster: ProcessCluster, merchant_id: str, account_id: str, transfer_id: str, direction: int
) -> int:
    """How many POSTED entries the transfer made on one side of this account."""
    assert cluster.service.stub is not None
    response = await cluster.service.stub.ListEntries(
        pb.ListEntriesRequest(account=ref(merchant_id, account_id), page_size=1000),
        timeout=RPC_TIMEOUT_S,
    )
    return sum(
        1
        for e in response.entries
        if e.transfer_id == transfer_id
        and e.kind == pb.ENTRY_KIND_POSTED
        and e.direction == direction
    )


async def _assert_moved_once(
    cluster: ProcessCluster, payer: str, payee: str, transfer_id: str, amount_minor: int
) -> None:
    """The payer paid amount_minor and the payee got it, exactly once, with nothing pending."""
    assert cluster.service.stub is not None
    stub = cluster.service.stub
    cash = await balance(stub, payer, "cash")
    sales = await balance(stub, payee, "sales")
    assert (cash.debits_posted, cash.credits_posted) == (amount_minor, 0), cash
    assert (cash.debits_pending, cash.credits_pending) == (0, 0), cash
    assert (sales.credits_posted, sales.debits_posted) == (amount_minor, 0), sales
    assert (sales.debits_pending, sales.credits_pending) == (0, 0), sales
    assert await _posted_entries(cluster, payer, "cash", transfer_id, pb.DIRECTION_DEBIT) == 1
    assert await _posted_entries(cluster, payee, "sales", transfer_id, pb.DIRECTION_CREDIT) == 1


async def _assert_reconciled(cluster: ProcessCluster) -> None:
    report = await cluster.reconcile()
    assert report.ok, report.render()


@asynccontextmanager
async def _credit_shard_down(cluster: ProcessCluster) -> AsyncIterator[None]:
    """Stops the credit shard's PostgreSQL (immediate, as a crash); always restarts it."""
    await _pg_ctl(functools.partial(cluster.shards.stop, CREDIT_SHARD, mode="immediate"))
    try:
        yield
    finally:
        await _pg_ctl(functools.partial(cluster.shards.start_one, CREDIT_SHARD))


async def _credit_shard_reachable(cluster: ProcessCluster, payee: str) -> None:
    """Waits until the service reads from the credit shard again."""
    assert cluster.service.stub is not None
    stub = cluster.service.stub

    async def reachable() -> bool:
        try:
            response = await stub.LookupAccounts(
                pb.LookupAccountsRequest(refs=[ref(payee, "sales")]), timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return False
            raise
        return len(response.accounts) == 1

    await wait_until(reachable, what="the service to reach the credit shard again")


async def _stays(condition: Callable[[], Awaitable[bool]], *, window_s: float, what: str) -> None:
    """Fails if condition stops holding at any poll during window_s."""

    async def broken() -> bool:
        return not await condition()

    try:
        await wait_until(broken, deadline_s=window_s, what=f"{what} to stop holding")
    except AssertionError:
        return  # wait_until timed out: the condition held at every poll
    raise AssertionError(f"{what}: stopped holding within {window_s}s")


async def _send_in_progress(cluster: ProcessCluster, item: pb.Transfer) -> None:
    """Sends a cross-shard transfer whose credit shard is down: it must come back IN_PROGRESS."""
    assert cluster.service.stub is not None
    response = await cluster.service.stub.CreateTransfers(
        pb.CreateTransfersRequest(transfers=[item]), timeout=IN_PROGRESS_CALL_TIMEOUT_S
    )
    assert [r.result for r in response.results] == [pb.TRANSFER_RESULT_IN_PROGRESS], (
        response,
        _log_tail(cluster),
    )


async def _wait_dead(cluster: ProcessCluster, merchant_id: str, transfer_id: str) -> None:
    """Waits for the saga to reach the dead-letter list, reading only its home (debit) shard."""

    async def dead() -> bool:
        return (await _get_saga(cluster, merchant_id, transfer_id)).state == pb.SAGA_STATE_DEAD

    await wait_until(dead, what=f"saga {transfer_id} to go DEAD")


async def _dead_listed(cluster: ProcessCluster) -> set[tuple[str, str]]:
    return {
        (s.ref.merchant_id, s.ref.transfer_id)
        for s in await _list_sagas(cluster, pb.SAGA_STATE_DEAD)
    }


async def _retry_saga(cluster: ProcessCluster, merchant_id: str, transfer_id: str) -> pb.Saga:
    """RetrySaga, then waits for the saga to complete; returns it with its steps.

    RetrySaga drives the saga in the call, but it releases the saga's lease first, so the
    recovery worker may claim it meanwhile and the reply may still read RUNNING.
    """
    assert cluster.service.admin is not None
    reply = await cluster.service.admin.RetrySaga(
        pb.GetSagaRequest(ref=_saga_ref(merchant_id, transfer_id)), timeout=RPC_TIMEOUT_S
    )
    assert reply.state in (pb.SAGA_STATE_RUNNING, pb.SAGA_STATE_COMPLETED), (
        reply,
        _log_tail(cluster),
    )
    return await _wait_completed(cluster, merchant_id, transfer_id)


async def _wait_completed(cluster: ProcessCluster, merchant_id: str, transfer_id: str) -> pb.Saga:
    seen: list[pb.Saga] = []

    async def completed() -> bool:
        seen.append(await _get_saga(cluster, merchant_id, transfer_id))
        return seen[-1].state == pb.SAGA_STATE_COMPLETED

    await wait_until(completed, what=f"saga {transfer_id} to complete")
    return seen[-1]


async def _run_cli(*args: str) -> tuple[int, str]:
    """Runs `python -m ledger.cli ARGS`; returns its exit code and output (stderr included)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger.cli",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), CLI_DEADLINE_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"ledger {' '.join(args)} ran past {CLI_DEADLINE_S}s") from None
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


# Crash injection.


@pytest.mark.parametrize("point", [p for p in faults.POINTS if p.startswith("saga.")])
async def test_transfer_converges_to_ok_exactly_once_after_the_service_crashes_at(
    saga_cluster: ProcessCluster, point: str
) -> None:
    payer, payee = await payer_and_payee(saga_cluster)
    await converges_after_a_crash_at(saga_cluster, point, payer, payee, uid("t"))


async def converges_after_a_crash_at(
    cluster: ProcessCluster, point: str, payer: str, payee: str, transfer_id: str
) -> None:
    """A transfer payer -> payee (debit shard -> credit shard) sent while the service
    crashes at point ends OK exactly once after a restart and a caller's retry."""
    amount_minor = 1234
    item = transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), amount_minor)
    await _no_running_sagas(cluster)
    await _restart(cluster, **{faults.CRASH_POINT_ENV: point})

    assert cluster.service.stub is not None
    try:
        first = await cluster.service.stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=[item]), timeout=CRASHING_CALL_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as error:
        # The process died under the call: the connection dropped.
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    else:
        # Answered before the crash: it can only have been the final answer.
        assert [r.result for r in first.results] == [pb.TRANSFER_RESULT_OK], first
    returncode = await cluster.service.wait_exit()
    assert returncode == -signal.SIGKILL, (returncode, _log_tail(cluster))
    await cluster.service.kill()  # already gone: this only closes the dead channel

    await cluster.service.start()  # without the crash point
    # Retried as a caller would: same id, the client's own retries on UNAVAILABLE.
    options = ClientOptions(timeout_s=RETRYING_CLIENT_TIMEOUT_S)
    async with LedgerClient(f"127.0.0.1:{cluster.service.port}", options=options) as client:
        retried = (await client.create_transfers([item])).results[0]
    assert retried.result in (pb.TRANSFER_RESULT_OK, pb.TRANSFER_RESULT_IN_PROGRESS), retried
    # Only a crash before step 1 committed leaves nothing behind for the retry to find.
    assert retried.replayed is (point != "saga.step1.before_commit"), retried

    record = await _final_record(cluster, payer, transfer_id)
    assert record.result == pb.TRANSFER_RESULT_OK, (record, _log_tail(cluster))
    assert record.saga.state == pb.SAGA_STATE_COMPLETED, record
    assert record.saga.credit_shard == CREDIT_SHARD
    await _assert_moved_once(cluster, payer, payee, transfer_id, amount_minor)
    saga = await _get_saga(cluster, payer, transfer_id)
    assert saga.state == pb.SAGA_STATE_COMPLETED
    assert saga.result == pb.TRANSFER_RESULT_OK
    assert [s.outcome for s in saga.steps if s.step == 3] == ["completed"], saga.steps
    await _assert_reconciled(cluster)


# The credit shard's PostgreSQL down mid-saga.


async def test_transfer_is_in_progress_while_the_credit_shard_is_down_and_completes_after(
    saga_cluster: ProcessCluster,
) -> None:
    cluster = saga_cluster
    payer, payee = await payer_and_payee(cluster)
    amount_minor = 777
    transfer_id = uid("t")
    item = transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), amount_minor)
    assert cluster.service.stub is not None
    stub = cluster.service.stub

    async with _credit_shard_down(cluster):
        await _send_in_progress(cluster, item)
        cash = await balance(stub, payer, "cash")
        assert (cash.debits_pending, cash.debits_posted) == (amount_minor, 0), cash

        failed: list[pb.TransferRecord] = []

        async def attempt_failed() -> bool:
            record = await _lookup(cluster, payer, transfer_id)
            assert record is not None
            failed.append(record)
            return record.saga.attempts > 0

        await wait_until(attempt_failed, what="a failed attempt at step 2 to be recorded")
        record = failed[-1]
        assert record.result == pb.TRANSFER_RESULT_IN_PROGRESS, record
        assert record.saga.state == pb.SAGA_STATE_RUNNING, record
        assert record.saga.last_error, record
        assert record.saga.credit_shard == CREDIT_SHARD
        saga = await _get_saga(cluster, payer, transfer_id)
        assert saga.state == pb.SAGA_STATE_RUNNING
        assert saga.next_step == 2
        assert saga.attempts > 0 and saga.last_error, saga
        assert any(s.step == 2 and s.outcome == "retry" for s in saga.steps), saga.steps

    async def completed() -> bool:
        found = await _lookup(cluster, payer, transfer_id, wait_ms=LOOKUP_WAIT_MS)
        return found is not None and found.result == pb.TRANSFER_RESULT_OK

    await wait_until(completed, what="the saga to complete once the credit shard is back")
    await _assert_moved_once(cluster, payer, payee, transfer_id, amount_minor)
    assert (await _get_saga(cluster, payer, transfer_id)).state == pb.SAGA_STATE_COMPLETED
    again = await transfers(stub, item)
    assert [(r.result, r.replayed) for r in again] == [(pb.TRANSFER_RESULT_OK, True)]
    await _assert_moved_once(cluster, payer, payee, transfer_id, amount_minor)
    await _assert_reconciled(cluster)


# The dead-letter list, and the admin's retry and resolve.


async def test_dead_saga_keeps_funds_pending_stays_dead_and_completes_when_retried(
    saga_cluster: ProcessCluster,
) -> None:
    cluster = saga_cluster
    await _no_running_sagas(cluster)
    await _restart(cluster, **DEAD_LETTER_ENV)
    try:
        assert cluster.service.stub is not None
        stub = cluster.service.stub
        payer, payee = await payer_and_payee(cluster)
        amount_minor = 5_000
        transfer_id = uid("t")
        item = transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), amount_minor)

        async with _credit_shard_down(cluster):
            await _send_in_progress(cluster, item)
            await _wait_dead(cluster, payer, transfer_id)
            saga = await _get_saga(cluster, payer, transfer_id)
            assert saga.state == pb.SAGA_STATE_DEAD
            assert saga.attempts == 3, saga
            assert saga.last_error
            outcomes = [(s.step, s.outcome) for s in saga.steps]
            assert outcomes[0][0] == 1, outcomes  # step 1 reserved the funds
            assert outcomes[1:] == [(2, "retry"), (2, "retry"), (2, "dead")], outcomes
            cash = await balance(stub, payer, "cash")
            assert (cash.debits_pending, cash.debits_posted) == (amount_minor, 0), cash
            record = await _lookup(cluster, payer, transfer_id)
            assert record is not None
            assert record.result == pb.TRANSFER_RESULT_IN_PROGRESS
            assert record.saga.state == pb.SAGA_STATE_DEAD

        await _credit_shard_reachable(cluster, payee)

        async def listed() -> bool:
            return (payer, transfer_id) in await _dead_listed(cluster)

        await wait_until(listed, what="ListSagas(DEAD) to list the saga")

        async def still_dead() -> bool:
            found = await _get_saga(cluster, payer, transfer_id)
            return found.state == pb.SAGA_STATE_DEAD and found.attempts == 3

        await _stays(still_dead, window_s=STAYS_DEAD_WINDOW_S, what="the saga staying DEAD")
        cash = await balance(stub, payer, "cash")
        assert (cash.debits_pending, cash.debits_posted) == (amount_minor, 0), cash
        sales = await balance(stub, payee, "sales")
        assert (sales.credits_posted, sales.credits_pending) == (0, 0), sales

        retried = await _retry_saga(cluster, payer, transfer_id)
        assert retried.result == pb.TRANSFER_RESULT_OK
        assert any(s.outcome == "retry requested" for s in retried.steps), retried.steps
        record = await _final_record(cluster, payer, transfer_id)
        assert record.result == pb.TRANSFER_RESULT_OK
        await _assert_moved_once(cluster, payer, payee, transfer_id, amount_minor)
        assert (payer, transfer_id) not in await _dead_listed(cluster)
        await _assert_reconciled(cluster)
        # The event stream says it went dead, then that it completed.
        events = await collect_until(
            stub,
            pb.SubscribeEventsRequest(merchant_id=payer),
            lambda e: e.transfer_id == transfer_id and e.kind == pb.EVENT_KIND_SAGA_COMPLETED,
        )
        ends = [e for e in events if e.transfer_id == transfer_id and e.saga.state]
        assert [(e.kind, e.saga.attempts) for e in ends] == [
            (pb.EVENT_KIND_SAGA_DEAD_LETTERED, 3),
            (pb.EVENT_KIND_SAGA_COMPLETED, 0),
        ]
    finally:
        await _restart(cluster)


async def test_dead_letter_list_is_readable_while_the_credit_shard_is_down(
    saga_cluster: ProcessCluster,
) -> None:
    """An on-call engineer needs the dead-letter list most while a shard is down; the dead
    saga lives on its debit shard, which is up."""
    cluster = saga_cluster
    await _no_running_sagas(cluster)
    await _restart(cluster, **DEAD_LETTER_ENV)
    try:
        assert cluster.service.admin is not None
        payer, payee = await payer_and_payee(cluster)
        transfer_id = uid("t")
        item = transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 321)
        listing_error: grpc.aio.AioRpcError | None = None
        listed: set[tuple[str, str]] = set()
        async with _credit_shard_down(cluster):
            await _send_in_progress(cluster, item)
            await _wait_dead(cluster, payer, transfer_id)
            try:
                listed = await _dead_listed(cluster)
            except grpc.aio.AioRpcError as error:
                listing_error = error
        # Clean up before judging, so later tests find no dead saga.
        await _credit_shard_reachable(cluster, payee)
        await _retry_saga(cluster, payer, transfer_id)
        assert listing_error is None, (
            f"ListSagas(DEAD) failed while {CREDIT_SHARD} was down: "
            f"{listing_error.code().name} {listing_error.details()}"
        )
        assert (payer, transfer_id) in listed, listed
    finally:
        await _restart(cluster)


async def test_dead_saga_resolved_as_compensated_records_the_abort_and_releases_the_funds(
    saga_cluster: ProcessCluster,
) -> None:
    cluster = saga_cluster
    await _no_running_sagas(cluster)
    await _restart(cluster, **DEAD_LETTER_ENV)
    try:
        assert cluster.service.stub is not None and cluster.service.admin is not None
        stub, admin = cluster.service.stub, cluster.service.admin
        payer, payee = await payer_and_payee(cluster)
        amount_minor = 6_000
        transfer_id = uid("t")
        item = transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), amount_minor)
        saga_ref = _saga_ref(payer, transfer_id)

        async with _credit_shard_down(cluster):
            await _send_in_progress(cluster, item)
            await _wait_dead(cluster, payer, transfer_id)
        await _credit_shard_reachable(cluster, payee)

        # The credit shard never applied the credit, so COMPLETED would create money.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.ResolveSaga(
                pb.ResolveSagaRequest(ref=saga_ref, outcome=pb.SAGA_STATE_COMPLETED),
                timeout=RPC_TIMEOUT_S,
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
        assert error_reason(refused.value) == "RESOLUTION_NOT_SAFE"
        assert (await _get_saga(cluster, payer, transfer_id)).state == pb.SAGA_STATE_DEAD

        resolved = await admin.ResolveSaga(
            pb.ResolveSagaRequest(ref=saga_ref, outcome=pb.SAGA_STATE_COMPENSATED),
            timeout=RPC_TIMEOUT_S,
        )
        assert resolved.state == pb.SAGA_STATE_COMPENSATED, resolved
        assert resolved.result == pb.TRANSFER_RESULT_ABORTED, resolved

        # T recorded the abort, so a late step 2 can never apply the credit.
        connection = await asyncpg.connect(cluster.shards.servers[CREDIT_SHARD].dsn("ledger"))
        try:
            rows = await connection.fetch(
                "SELECT outcome, result FROM saga_credits"
                " WHERE merchant_id = $1 AND transfer_id = $2",
                payer,
                transfer_id,
            )
        finally:
            await connection.close()
        assert [(r["outcome"], r["result"]) for r in rows] == [
            (CREDIT_OUTCOME_ABORTED, pb.TRANSFER_RESULT_ABORTED)
        ]

        cash = await balance(stub, payer, "cash")
        assert (cash.debits_pending, cash.debits_posted, cash.credits_posted) == (0, 0, 0), cash
        sales = await balance(stub, payee, "sales")
        assert (sales.credits_posted, sales.credits_pending) == (0, 0), sales
        record = await _lookup(cluster, payer, transfer_id)
        assert record is not None
        assert record.result == pb.TRANSFER_RESULT_ABORTED, record
        assert record.saga.state == pb.SAGA_STATE_COMPENSATED
        # The id stays aborted: a caller's retry neither moves money nor restarts the saga.
        again = await transfers(stub, item)
        assert [(r.result, r.replayed) for r in again] == [(pb.TRANSFER_RESULT_ABORTED, True)]
        assert (await balance(stub, payee, "sales")).credits_posted == 0
        # And a finished saga cannot be resolved the other way.
        with pytest.raises(grpc.aio.AioRpcError) as finished:
            await admin.ResolveSaga(
                pb.ResolveSagaRequest(ref=saga_ref, outcome=pb.SAGA_STATE_COMPLETED),
                timeout=RPC_TIMEOUT_S,
            )
        assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await _assert_reconciled(cluster)
    finally:
        await _restart(cluster)


# The CLI against the running service.


async def test_saga_cli_lists_and_shows_a_dead_saga_and_reconcile_cli_finds_a_corrupt_balance(
    saga_cluster: ProcessCluster,
) -> None:
    cluster = saga_cluster
    await _no_running_sagas(cluster)
    # One failed attempt is enough for the dead-letter list.
    await _restart(cluster, LEDGER_SAGA_ATTEMPTS_MAX="1")
    try:
        target = f"127.0.0.1:{cluster.service.port}"
        payer, payee = await payer_and_payee(cluster)
        transfer_id = uid("t")
        item = transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 250)
        async with _credit_shard_down(cluster):
            await _send_in_progress(cluster, item)
            await _wait_dead(cluster, payer, transfer_id)
        await _credit_shard_reachable(cluster, payee)

        code, listed = await _run_cli("sagas", "list", "--target", target, "--state", "dead")
        assert code == 0, listed
        line = next((x for x in listed.splitlines() if f"{payer}/{transfer_id}" in x), None)
        assert line is not None, listed
        assert "SAGA_STATE_DEAD" in line and f"{DEBIT_SHARD}->{CREDIT_SHARD}" in line, line
        assert "attempts=1" in line, line

        code, shown = await _run_cli("sagas", "show", payer, transfer_id, "--target", target)
        assert code == 0, shown
        assert "SAGA_STATE_DEAD" in shown.splitlines()[0], shown
        assert " step 1 " in shown, shown
        assert "step 2 dead" in shown, shown

        code, retried = await _run_cli("sagas", "retry", payer, transfer_id, "--target", target)
        assert code == 0, retried
        # The reply reads COMPLETED, or RUNNING if the recovery worker took the saga over.
        assert "SAGA_STATE_DEAD" not in retried, retried
        assert any(state in retried for state in ("SAGA_STATE_COMPLETED", "SAGA_STATE_RUNNING")), (
            retried
        )
        await _wait_completed(cluster, payer, transfer_id)
        await _assert_moved_once(cluster, payer, payee, transfer_id, 250)
    finally:
        await _restart(cluster)

    config = str(cluster.config_path)
    code, report = await _run_cli("reconcile", "--config", config)
    assert code == 0, report
    assert report.rstrip().endswith("reconcile passed"), report

    # Corrupt one balance on purpose: accounts are updated in place, history is not.
    assert cluster.service.stub is not None
    throwaway = cluster.merchant_on("shard-c", "corrupt")
    await create_accounts(cluster.service.stub, account(throwaway, "cash"))
    update = (
        "UPDATE accounts SET credits_posted = credits_posted + $3"
        " WHERE merchant_id = $1 AND account_id = $2"
    )
    connection = await asyncpg.connect(cluster.shards.servers["shard-c"].dsn("ledger"))
    try:
        assert await connection.execute(update, throwaway, "cash", 1) == "UPDATE 1"
        try:
            code, report = await _run_cli("reconcile", "--config", config)
            assert code == 1, report
            failures = [x for x in report.splitlines() if x.startswith("FAIL")]
            assert failures, report
            assert any("shard-c" in x for x in failures), report
            assert "reconcile FAILED" in report, report
        finally:
            assert await connection.execute(update, throwaway, "cash", -1) == "UPDATE 1"
    finally:
        await connection.close()
    await _assert_reconciled(cluster)

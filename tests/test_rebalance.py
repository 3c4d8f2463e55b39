"""Online rebalancing: add, drain and reweight shards while the books stay whole.

Every test gets four fresh shard databases (shard-a..shard-d) and a service that
starts on the first three (epoch 1). A test changes the cluster the way an
admin does: it writes the new config over the live file (the service's watcher
reloads it) and then runs the rebalance, in-process or through the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import grpc
import pytest

from ledger.domain.accounts import AccountKey, AccountSpec
from ledger.domain.sagas import Saga, SagaState
from ledger.domain.transfers import TransferAction, TransferRequest, TransferResult
from ledger.moves.rebalance import Plan, Rebalancer, ShardPinned, Summary
from ledger.routing.cluster import Cluster
from ledger.routing.config import ShardConfig, load_config
from ledger.routing.ring import ShardRing
from ledger.sagas.reconcile import ReconcileReport, reconcile
from ledger.sagas.runner import SagaRunner, SagaSettings, SagaStart
from ledger.storage import chain_statements as chain_sql
from ledger.storage import saga_statements as saga_sql
from ledger.storage.audit import CLAIMS_PAUSED_WARNING
from ledger.storage.errors import MerchantsNotOwned, ShardUnavailable, StaleEpoch
from ledger.storage.moves import AdminBusy, MoveStore
from ledger.storage.sagas import SagaStore
from ledger.storage.shard import Fence, Shard
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.ledger4 import ALL_SHARDS, FIRST_SHARDS, Ledger4
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    wait_until,
    write_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Statuses a client retries with the same ids (as LedgerClient does).
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)
# The load of the add-a-shard test: enough writers to keep every shard busy on
# two cores, each with a bounded number of calls (the test stops them earlier).
LOAD_WRITERS = 8
LOAD_CALLS_PER_WRITER_MAX = 3000
LOAD_MERCHANTS = 120
# Pending transfers open through the move (merchants' own, local and cross-shard).
LOAD_HOLDS = 40
# A call is retried at most this often, with back-off up to the cap, before it
# counts as an error: a move pauses a merchant's writes for milliseconds.
CALL_ATTEMPTS_MAX = 60
CALL_RETRY_DELAY_S_MAX = 0.25
# A merchant deferred by a move is writable as before: a short retry budget.
DEFERRED_CALL_ATTEMPTS_MAX = 20
# Calls that must succeed before the move starts and after it ends, so the
# writers demonstrably straddle the whole rebalance.
LOAD_CALLS_AROUND_MOVE_MIN = 80
# How long LookupTransfers waits (server side) for a saga to leave IN_PROGRESS.
SAGA_WAIT_MS = 10_000
# Sagas delayed by a move retry with back-off (up to 30 s apart): look them up
# this many times, each waiting SAGA_WAIT_MS on the server, before giving up.
SAGA_LOOKUPS_MAX = 4
# References per lookup (the API limit is 1000).
LOOKUP_BATCH_MAX = 500
# A hold between a merchant's own accounts that must outlive its move (well
# under a second here) and then expire on its new shard.
OWN_HOLD_TIMEOUT_MS = 4000
# A call expected to wait for a merchant a rebalance has not marked yet gives up after this.
SHORT_CALL_TIMEOUT_S = 3.0
# A CLI subprocess must finish within this, or the test fails instead of hanging.
SUBPROCESS_TIMEOUT_S = 60.0


# --- The cluster of a test (tests/ledger4.py; the fixture is in conftest.py). ---


async def switch_and_rebalance(env: Ledger4, config: ShardConfig) -> Summary:
    """The service switched to config, then one rebalance to it (its summary printed)."""
    await env.switch_to(config)
    async with opened(config) as rebalancer:
        summary = await rebalancer.rebalance()
    print(f"\n{summary.render()}")
    return summary


@contextlib.asynccontextmanager
async def opened(new: ShardConfig, *, old: ShardConfig | None = None) -> AsyncIterator[Rebalancer]:
    rebalancer = Rebalancer(new, old=old)
    try:
        await rebalancer.open()
        yield rebalancer
    finally:
        await rebalancer.close()


async def reconcile_report(env: Ledger4, config: ShardConfig, name: str) -> ReconcileReport:
    path = env.copy_of(config, name)
    cluster = Cluster(load_config(path), config_path=path, audit=True)
    try:
        await cluster.open(migrate=False)
        return await reconcile(cluster)
    finally:
        await cluster.close()


async def assert_reconciled(
    env: Ledger4, config: ShardConfig, name: str, *, every_mirror_checked: bool = False
) -> None:
    """Reconcile passes; with every_mirror_checked, no settlement pair was skipped
    (no saga left running anywhere)."""
    report = await reconcile_report(env, config, name)
    assert report.ok, report.render()
    if every_mirror_checked:
        mirrors = [f for f in report.findings if f.check.startswith("settlement ")]
        assert mirrors and not [f for f in mirrors if "skipped" in f.detail], report.render()


# --- Merchants, accounts and history. ---


async def create_merchants(service: Service, merchant_ids: Iterable[str]) -> None:
    accounts = [account(m, name) for m in merchant_ids for name in ("cash", "sales")]
    for start in range(0, len(accounts), LOOKUP_BATCH_MAX):
        await create_accounts(service.stub, *accounts[start : start + LOOKUP_BATCH_MAX])


def merchants_moving(
    old: ShardConfig, new: ShardConfig, count: int, *, destination: str | None = None
) -> list[str]:
    """Fresh merchant ids whose owner changes from old to new (to destination, if given)."""
    old_ring, new_ring = ShardRing(old), ShardRing(new)
    found: list[str] = []
    for _ in range(20_000):
        candidate = uid("mv")
        owner = new_ring.shard_for(candidate)
        if owner != old_ring.shard_for(candidate) and destination in (None, owner):
            found.append(candidate)
            if len(found) == count:
                return found
    raise AssertionError("not enough moving merchants found")


async def lookup_settled(
    service: Service, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], pb.TransferRecord]:
    """Looks transfers up, waiting for sagas to finish; the records by (merchant, id)."""
    records: dict[tuple[str, str], pb.TransferRecord] = {}
    for start in range(0, len(keys), LOOKUP_BATCH_MAX):
        chunk = keys[start : start + LOOKUP_BATCH_MAX]
        response = await service.stub.LookupTransfers(
            pb.LookupTransfersRequest(
                refs=[pb.TransferRef(merchant_id=m, transfer_id=t) for m, t in chunk],
                wait_timeout_ms=SAGA_WAIT_MS,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        for record in response.transfers:
            key = (record.transfer.debit_account.merchant_id, record.transfer.id)
            assert key not in records, f"transfer {key} found twice"
            records[key] = record
    return records


async def settled(service: Service, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Looks transfers up, waiting for sagas to finish; their results by (merchant, id)."""
    return {k: r.result for k, r in (await lookup_settled(service, keys)).items()}


async def lookup_final(
    service: Service, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], pb.TransferRecord]:
    """The records once no saga among them is running (each lookup waits on the server)."""
    records = await lookup_settled(service, keys)
    for _ in range(SAGA_LOOKUPS_MAX - 1):
        if all(r.result != pb.TRANSFER_RESULT_IN_PROGRESS for r in records.values()):
            break
        records = await lookup_settled(service, keys)
    return records


def describe(record: pb.TransferRecord | None) -> str:
    if record is None:
        return "not recorded"
    text = pb.TransferResult.Name(record.result)
    if record.HasField("saga"):
        saga = record.saga
        text += (
            f" (saga {pb.SagaState.Name(saga.state)}, credit shard {saga.credit_shard}, "
            f"{saga.attempts} failed attempts, last error {saga.last_error!r})"
        )
    return text


async def make_history(service: Service, merchant_ids: Sequence[str], rng: random.Random) -> None:
    """A local transfer per merchant and cross-merchant (mostly cross-shard) transfers."""
    local = [
        transfer(uid("h"), ref(m, "cash"), ref(m, "sales"), rng.randint(1, 500))
        for m in merchant_ids
    ]
    across = [
        transfer(uid("x"), ref(m, "cash"), ref(rng.choice(merchant_ids), "sales"), 7)
        for m in merchant_ids[: max(2, len(merchant_ids) // 3)]
    ]
    for batch in (local, across):
        results = await transfers(service.stub, *batch)
        names = result_names(results)
        assert set(names) <= {"TRANSFER_RESULT_OK", "TRANSFER_RESULT_IN_PROGRESS"}, names
    final = await settled(service, [(t.debit_account.merchant_id, t.id) for t in local + across])
    assert set(final.values()) == {pb.TRANSFER_RESULT_OK}, final


async def all_balances(
    service: Service, merchant_ids: Sequence[str]
) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    refs = [ref(m, name) for m in merchant_ids for name in ("cash", "sales")]
    found: dict[tuple[str, str], tuple[int, int, int, int]] = {}
    for start in range(0, len(refs), LOOKUP_BATCH_MAX):
        response = await service.stub.LookupAccounts(
            pb.LookupAccountsRequest(refs=refs[start : start + LOOKUP_BATCH_MAX]),
            timeout=RPC_TIMEOUT_S,
        )
        for a in response.accounts:
            found[(a.ref.merchant_id, a.ref.account_id)] = (
                a.debits_posted,
                a.credits_posted,
                a.debits_pending,
                a.credits_pending,
            )
    assert len(found) == len(refs), f"{len(refs) - len(found)} accounts not found"
    return found


async def send_accepted(service: Service, *items: pb.Transfer) -> None:
    """Sends each item; each is accepted (OK, or a saga under way)."""
    for item in items:
        names = result_names(await transfers(service.stub, item))
        assert set(names) <= {"TRANSFER_RESULT_OK", "TRANSFER_RESULT_IN_PROGRESS"}, (item, names)


async def wait_for_balances(
    service: Service, expected: dict[tuple[str, str], tuple[int, int, int, int]], *, what: str
) -> None:
    """Waits until the named accounts hold exactly these balances (sagas settle late)."""
    merchants = sorted({m for m, _ in expected})

    async def reached() -> bool:
        found = await all_balances(service, merchants)
        return {k: found[k] for k in expected} == expected

    await wait_until(reached, what=what)


async def states_on_owners(
    rebalancer: Rebalancer, config: ShardConfig, merchant_ids: Iterable[str]
) -> Counter[tuple[str, str | None] | None]:
    """The state each merchant has on its owner under config (all 'active' after a move)."""
    ring = ShardRing(config)
    states: Counter[tuple[str, str | None] | None] = Counter()
    for m in merchant_ids:
        states[await MoveStore(rebalancer.shards[ring.shard_for(m)]).state_of(m)] += 1
    return states


def assert_plan_matches(plan: Plan, summary: Summary) -> None:
    planned = {(m.merchant_id, m.source, m.destination) for m in plan.moves}
    moved = {(r.move.merchant_id, r.move.source, r.move.destination) for r in summary.moved}
    assert moved == planned, summary.render()
    assert not summary.pending, summary.render()


# --- Continuous load. ---


@dataclass(frozen=True, slots=True)
class Sent:
    debit: tuple[str, str]
    credit: tuple[str, str]
    amount_minor: int


@dataclass
class Answer:
    """How a transfer call ended after its retries: a result, or the error that ended it."""

    result: int | None = None
    error: str = ""
    retries: Counter[str] = field(default_factory=Counter)
    duration_s: float = 0.0

    def describe(self) -> str:
        if self.result is not None and self.result != pb.TRANSFER_RESULT_SHARD_UNAVAILABLE:
            return pb.TransferResult.Name(self.result)
        return (
            f"{self.error} after {sum(self.retries.values())} retries over {self.duration_s:.1f} s"
        )


async def send_retrying(
    service: Service,
    item: pb.Transfer,
    rng: random.Random,
    *,
    attempts_max: int = CALL_ATTEMPTS_MAX,
) -> Answer:
    """Sends one transfer as a client would: retryable failures again, with the same id."""
    request = pb.CreateTransfersRequest(transfers=[item])
    answer = Answer()
    started = time.monotonic()
    for attempt in range(1, attempts_max + 1):
        delay_s = min(CALL_RETRY_DELAY_S_MAX, 0.005 * 2**attempt) * rng.uniform(0.5, 1)
        try:
            response = await service.stub.CreateTransfers(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            answer.error = f"{error.code().name} {error.details()}"
            if error.code() not in RETRYABLE_CODES:
                break
            answer.retries[error.code().name] += 1
        else:
            answer.result = response.results[0].result
            if answer.result != pb.TRANSFER_RESULT_SHARD_UNAVAILABLE:
                break
            answer.error = "SHARD_UNAVAILABLE"
            answer.retries[answer.error] += 1
        await asyncio.sleep(delay_s)
    else:
        answer.error = f"still retryable after {attempts_max} attempts: {answer.error}"
        answer.result = None
    answer.duration_s = time.monotonic() - started
    return answer


@dataclass
class Load:
    merchant_ids: list[str]
    rng: random.Random
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    acknowledged: dict[tuple[str, str], Sent] = field(default_factory=dict)
    in_progress: dict[tuple[str, str], Sent] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # The transfers behind errors, looked up afterwards: an error may hide a success.
    errored: dict[tuple[str, str], tuple[Sent, str]] = field(default_factory=dict)
    retries: Counter[str] = field(default_factory=Counter)
    calls_done: int = 0

    def next_transfer(self) -> tuple[pb.Transfer, Sent]:
        debit_merchant = self.rng.choice(self.merchant_ids)
        # Half local to one merchant, half to another (mostly on another shard).
        credit_merchant = (
            debit_merchant if self.rng.random() < 0.5 else self.rng.choice(self.merchant_ids)
        )
        amount_minor = self.rng.randint(1, 1000)
        item = transfer(
            uid("w"), ref(debit_merchant, "cash"), ref(credit_merchant, "sales"), amount_minor
        )
        return item, Sent((debit_merchant, "cash"), (credit_merchant, "sales"), amount_minor)

    async def send(self, service: Service, item: pb.Transfer, sent: Sent) -> None:
        """One transfer until it has an answer, retrying retryable failures with the same id."""
        key = (item.debit_account.merchant_id, item.id)
        answer = await send_retrying(service, item, self.rng)
        self.retries.update(answer.retries)
        if answer.result == pb.TRANSFER_RESULT_OK:
            self.acknowledged[key] = sent
        elif answer.result == pb.TRANSFER_RESULT_IN_PROGRESS:
            self.in_progress[key] = sent
        else:
            self.fail(key, sent, f"{answer.describe()} ({sent.debit} -> {sent.credit})")

    def fail(self, key: tuple[str, str], sent: Sent, message: str) -> None:
        self.errors.append(f"{key[1]}: {message}")
        self.errored[key] = (sent, message)

    async def writer(self, service: Service) -> None:
        for _ in range(LOAD_CALLS_PER_WRITER_MAX):
            if self.stop.is_set():
                return
            item, sent = self.next_transfer()
            await self.send(service, item, sent)
            self.calls_done += 1

    async def calls_at_least(self, count: int) -> None:
        async def reached() -> bool:
            return self.calls_done >= count

        await wait_until(reached, what=f"{count} calls answered by the writers")


def expected_deltas(sent: Iterable[Sent]) -> dict[tuple[str, str], tuple[int, int]]:
    deltas: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for s in sent:
        deltas[s.debit][0] += s.amount_minor
        deltas[s.credit][1] += s.amount_minor
    return {k: (v[0], v[1]) for k, v in deltas.items()}


async def copies_on_owners(
    rebalancer: Rebalancer, keys: Iterable[tuple[str, str]]
) -> Counter[tuple[str, str]]:
    """How many shards that own the merchant (state 'active') hold each transfer."""
    by_merchant: dict[str, list[str]] = defaultdict(list)
    for merchant_id, transfer_id in keys:
        by_merchant[merchant_id].append(transfer_id)
    copies: Counter[tuple[str, str]] = Counter()
    for shard in rebalancer.shards.values():
        async with shard.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT t.merchant_id, t.transfer_id FROM transfers t"
                " JOIN merchants m ON m.merchant_id = t.merchant_id AND m.state = 'active'"
                " WHERE t.merchant_id = ANY($1::text[])",
                list(by_merchant),
            )
        copies.update((r["merchant_id"], r["transfer_id"]) for r in rows)
    return copies


# --- The tests. ---


async def test_adding_a_shard_under_load_keeps_every_acknowledged_transfer_exactly_once(
    ledger4: Ledger4,
) -> None:
    service = ledger4.service
    rng = random.Random(4)
    # Seeded ids (the databases are fresh): the share that moves is the ring's, not luck's.
    merchant_ids = [f"m{rng.getrandbits(48):012x}" for _ in range(LOAD_MERCHANTS)]
    await create_merchants(service, merchant_ids)
    await make_history(service, merchant_ids, rng)
    # Holds left open through the move (a merchant's own, with another merchant
    # beside it or on another shard), settled after it.
    holds = [
        transfer(
            uid("hold"),
            ref(debit, "cash"),
            ref(debit if rng.random() < 0.3 else rng.choice(merchant_ids), "sales"),
            rng.randint(1, 500),
            action=pb.TRANSFER_ACTION_PENDING,
        )
        for debit in rng.sample(merchant_ids, LOAD_HOLDS)
    ]
    for item in holds:
        answer = await send_retrying(service, item, rng)
        assert answer.result in (pb.TRANSFER_RESULT_OK, pb.TRANSFER_RESULT_IN_PROGRESS), answer
    hold_keys = [(h.debit_account.merchant_id, h.id) for h in holds]
    assert set((await settled(service, hold_keys)).values()) == {pb.TRANSFER_RESULT_OK}
    before = await all_balances(service, merchant_ids)
    new = ledger4.config(2, ALL_SHARDS)

    load = Load(merchant_ids, rng)
    writers = [asyncio.create_task(load.writer(service)) for _ in range(LOAD_WRITERS)]
    try:
        await load.calls_at_least(LOAD_CALLS_AROUND_MOVE_MIN)
        await ledger4.switch_to(new)
        async with opened(new) as rebalancer:
            plan = await rebalancer.plan()
            summary = await rebalancer.rebalance()
            print(f"\n{plan.render()}\n{summary.render()}")
            await load.calls_at_least(load.calls_done + LOAD_CALLS_AROUND_MOVE_MIN)
            load.stop.set()
            await asyncio.gather(*writers)
            print(f"load: {load.calls_done} calls, retries {dict(load.retries)}")

            assert abs(plan.share_moved - 1 / 4) <= 0.1, plan.render()
            assert plan.merchants_total == LOAD_MERCHANTS
            assert {m.destination for m in plan.moves} == {"shard-d"}, plan.render()
            deferred = {r.move.merchant_id for r in summary.pending}
            assert all(r.outcome.startswith("deferred") for r in summary.pending), summary.render()
            assert len(summary.moved) + len(deferred) == len(plan.moves)
            if deferred:
                catch_up = await rebalancer.rebalance()
                print(catch_up.render())
                assert not catch_up.pending, catch_up.render()
                assert {r.move.merchant_id for r in catch_up.results} == deferred
            again = await rebalancer.rebalance()
            assert again.results == [], again.render()
            assert await states_on_owners(rebalancer, new, merchant_ids) == Counter(
                {("active", None): LOAD_MERCHANTS}
            )
            moved_ids = {m.merchant_id for m in plan.moves}
            carried = [
                h
                for h in holds
                if {h.debit_account.merchant_id, h.credit_account.merchant_id} & moved_ids
            ]
            print(f"holds carried by the move: {len(carried)} of {len(holds)}")
            assert carried
            # Every hold settles after the move: even ones posted, odd ones voided.
            posted_holds: dict[tuple[str, str], Sent] = {}
            for index, hold in enumerate(holds):
                settle = pb.Transfer(
                    id=uid("hs"),
                    debit_account=hold.debit_account,
                    action=(
                        pb.TRANSFER_ACTION_POST_PENDING
                        if index % 2 == 0
                        else pb.TRANSFER_ACTION_VOID_PENDING
                    ),
                    pending_id=hold.id,
                )
                answer = await send_retrying(service, settle, rng)
                assert answer.result in (
                    pb.TRANSFER_RESULT_OK,
                    pb.TRANSFER_RESULT_IN_PROGRESS,
                ), (hold.id, answer.describe())
                if index % 2 == 0:
                    posted_holds[(hold.debit_account.merchant_id, settle.id)] = Sent(
                        (hold.debit_account.merchant_id, "cash"),
                        (hold.credit_account.merchant_id, "sales"),
                        hold.amount_minor,
                    )
            settle_results = await lookup_final(service, list(posted_holds))
            not_ok = {k: describe(r) for k, r in settle_results.items() if r.result != 1}
            assert len(settle_results) == len(posted_holds) and not not_ok, not_ok

            later = await lookup_final(service, [*load.in_progress, *load.errored])
            unfinished = {
                key[1]: describe(later.get(key))
                for key in load.in_progress
                if key not in later or later[key].result != pb.TRANSFER_RESULT_OK
            }
            assert unfinished == {}, f"IN_PROGRESS answers that did not end OK: {unfinished}"
            found = await settled(service, list(load.acknowledged))
            lost = {key[1]: found.get(key) for key in load.acknowledged if found.get(key) != 1}
            assert lost == {}, f"acknowledged transfers missing or not OK: {lost}"
            # An answered error may hide a transfer that went through: count what did.
            accepted = {
                **load.acknowledged,
                **load.in_progress,
                **{
                    key: sent
                    for key, (sent, _) in load.errored.items()
                    if key in later and later[key].result == pb.TRANSFER_RESULT_OK
                },
            }
            copies = await copies_on_owners(rebalancer, accepted)
            assert {k: copies[k] for k in accepted if copies[k] != 1} == {}

        async def holds_settled() -> bool:
            balances = await all_balances(service, merchant_ids)
            return all(b[2] == 0 and b[3] == 0 for b in balances.values())

        await wait_until(holds_settled, what="every hold settled on both sides")
        after = await all_balances(service, merchant_ids)
        deltas = expected_deltas([*accepted.values(), *posted_holds.values()])
        off = {
            key: (before[key], after[key], deltas.get(key))
            for key in before
            if (
                after[key][0] - before[key][0],
                after[key][1] - before[key][1],
                after[key][2],
                after[key][3],
            )
            != (*deltas.get(key, (0, 0)), 0, 0)
        }
        assert off == {}, list(off.items())[:5]
        await assert_reconciled(ledger4, new, "reconcile.toml")
        # Last, so that a failure here means everything above held.
        errors = [
            f"{key[1]}: {message} -> finally {describe(later.get(key))}"
            for key, (_, message) in load.errored.items()
        ]
        assert errors == [], f"{len(errors)} calls failed without a retryable status: {errors}"
    finally:
        load.stop.set()
        await asyncio.gather(*writers, return_exceptions=True)


async def test_moved_merchant_is_refused_by_its_old_shard_and_read_on_its_new_one(
    ledger4: Ledger4,
) -> None:
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    merchant_id, peer = merchants_moving(old, new, 2, destination="shard-d")
    source = ShardRing(old).shard_for(merchant_id)
    await create_merchants(service, [merchant_id, peer])
    history = [
        transfer(uid("h"), ref(merchant_id, "cash"), ref(merchant_id, "sales"), 150),
        transfer(uid("h"), ref(merchant_id, "sales"), ref(merchant_id, "cash"), 40),
        transfer(uid("h"), ref(merchant_id, "cash"), ref(peer, "sales"), 25),
    ]
    assert result_names(await transfers(service.stub, *history)) == ["TRANSFER_RESULT_OK"] * 3

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
        assert {r.move.merchant_id: r.move.destination for r in summary.moved} == {
            merchant_id: "shard-d",
            peer: "shard-d",
        }, summary.render()
        assert await MoveStore(rebalancer.shards["shard-d"]).state_of(merchant_id) == (
            "active",
            None,
        )

        old_shard = service.cluster.shards[source]
        old_copy = await MoveStore(old_shard).digest(merchant_id)
        write = TransferRequest(
            id=uid("late"),
            debit=AccountKey(merchant_id, "cash"),
            credit=AccountKey(merchant_id, "sales"),
            amount_minor=10,
            currency="USD",
            action=TransferAction.POST,
        )
        # Even a caller that claims the merchant at the current epoch is refused.
        claiming = Fence(epoch=new.epoch, claimable=frozenset({merchant_id}))
        with pytest.raises(MerchantsNotOwned) as refused:
            await old_shard.create_transfers([write], claiming)
        assert refused.value.owners == {merchant_id: "shard-d"}
        with pytest.raises(MerchantsNotOwned) as refused_accounts:
            await old_shard.create_accounts(
                [AccountSpec(key=AccountKey(merchant_id, "late"), currency="USD")], claiming
            )
        assert refused_accounts.value.owners == {merchant_id: "shard-d"}
        with pytest.raises(StaleEpoch):
            await old_shard.create_transfers(
                [write], Fence(epoch=old.epoch, claimable=frozenset({merchant_id}))
            )
        assert await MoveStore(old_shard).digest(merchant_id) == old_copy

        # With the old copy gone, reads can only be answered by the new shard.
        merchants_cleaned, rows_cleaned = await rebalancer.cleanup()
        assert (merchants_cleaned, rows_cleaned > 0) == (2, True)

    entries = await service.stub.ListEntries(
        pb.ListEntriesRequest(account=ref(merchant_id, "cash"), order=pb.ORDER_OLDEST_FIRST),
        timeout=RPC_TIMEOUT_S,
    )
    # The saga reserves, releases and posts; the local batch and the saga commit in
    # either order: compare the posted entries as a set, and the sequence whole.
    posted = [e for e in entries.entries if e.kind == pb.ENTRY_KIND_POSTED]
    assert sorted((e.transfer_id, e.amount_minor) for e in posted) == sorted(
        [(history[0].id, 150), (history[1].id, 40), (history[2].id, 25)]
    )
    assert [e.sequence for e in entries.entries] == list(range(1, len(entries.entries) + 1))
    cash = await service.stub.GetBalance(
        pb.GetBalanceRequest(account=ref(merchant_id, "cash")), timeout=RPC_TIMEOUT_S
    )
    assert (cash.debits_posted, cash.credits_posted) == (175, 40)
    peer_sales = await service.stub.GetBalance(
        pb.GetBalanceRequest(account=ref(peer, "sales")), timeout=RPC_TIMEOUT_S
    )
    assert peer_sales.credits_posted == 25
    found = await settled(service, [(merchant_id, t.id) for t in history])
    assert list(found.values()) == [pb.TRANSFER_RESULT_OK] * 3
    # And the API writes to it again, on its new shard.
    after = transfer(uid("t"), ref(merchant_id, "cash"), ref(merchant_id, "sales"), 5)
    assert result_names(await transfers(service.stub, after)) == ["TRANSFER_RESULT_OK"]


async def test_draining_a_shard_moves_every_merchant_off_it_and_keeps_balances(
    ledger4: Ledger4,
) -> None:
    service = ledger4.service
    rng = random.Random(3)
    four = ledger4.config(2, ALL_SHARDS)
    # Four shards first (nothing to move yet); the merchants are born there, so the
    # drain is the only move they make (moving back is the next test's subject).
    await ledger4.switch_to(four)
    async with opened(four) as rebalancer:
        assert (await rebalancer.rebalance()).results == []
    merchant_ids = [uid("d") for _ in range(60)]
    await create_merchants(service, merchant_ids)
    # History on four shards, cross-shard transfers to and from shard-d included.
    await make_history(service, merchant_ids, rng)
    before = await all_balances(service, merchant_ids)
    on_d = {m for m in merchant_ids if ShardRing(four).shard_for(m) == "shard-d"}
    assert on_d

    draining = ledger4.config(3, ALL_SHARDS, states={"shard-d": "draining"})
    three = ledger4.config(3, FIRST_SHARDS)
    await ledger4.switch_to(draining)
    async with opened(draining) as rebalancer:
        plan = await rebalancer.plan()
        assert {m.merchant_id for m in plan.moves} == on_d, plan.render()
        assert {m.source for m in plan.moves} == {"shard-d"}
        # Off the ring, the draining shard's merchants go exactly where they would
        # without it.
        assert {m.destination for m in plan.moves} == {ShardRing(three).shard_for(m) for m in on_d}
        summary = await rebalancer.rebalance()
        print(f"\n{plan.render()}\n{summary.render()}")
        assert_plan_matches(plan, summary)
        assert summary.finished and "DRAINED shard-d" in summary.render(), summary.render()
        drained = MoveStore(rebalancer.shards["shard-d"])
        # Only its settlement accounts' merchant ($settlement) stays active there.
        assert await drained.active_merchants() == []
        assert await drained.merchants_in("moving") == []
        assert sorted(await drained.merchants_in("moved")) == sorted(
            (m, ShardRing(three).shard_for(m)) for m in on_d
        )
        assert await states_on_owners(rebalancer, draining, merchant_ids) == Counter(
            {("active", None): len(merchant_ids)}
        )
        assert await all_balances(service, merchant_ids) == before
        # shard-d still holds the old copies (and settlement accounts): reconcile with it.
        await assert_reconciled(ledger4, draining, "reconcile-before-cleanup.toml")

        merchants_cleaned, rows_cleaned = await rebalancer.cleanup()
        assert merchants_cleaned == len(on_d) and rows_cleaned > 0
        # A second cleanup finds nothing left to delete.
        assert (await rebalancer.cleanup())[1] == 0
        assert (await rebalancer.rebalance()).results == []

    # Drained: it may retire. Its settlement positions mirror the others', so it
    # stays listed for the audit tools, and deleting its entry is refused.
    retired = ledger4.config(4, ALL_SHARDS, states={"shard-d": "retired"})
    with pytest.raises(ShardPinned, match="settlement position"):
        async with opened(ledger4.config(4, FIRST_SHARDS), old=draining) as rebalancer:
            await rebalancer.rebalance()
    await ledger4.switch_to(retired)
    assert "shard-d" not in service.cluster.shards, "a retired shard is not served"
    async with opened(retired) as rebalancer:
        summary = await rebalancer.rebalance()
        assert summary.results == []
        assert "RETIRED shard-d: holds nothing" in summary.render(), summary.render()
    assert await all_balances(service, merchant_ids) == before
    await assert_reconciled(ledger4, retired, "reconcile-after-cleanup.toml")


async def test_a_draining_shard_relays_holds_and_cannot_leave_until_they_settle(
    ledger4: Ledger4,
) -> None:
    """Its merchants move with their holds (it relays them, staying routable); the
    summary and every attempt to retire or delete it say what still pins it."""
    service = ledger4.service
    four = ledger4.config(2, ALL_SHARDS)
    await ledger4.switch_to(four)
    async with opened(four) as rebalancer:
        assert (await rebalancer.rebalance()).results == []
    draining = ledger4.config(3, ALL_SHARDS, states={"shard-d": "draining"})
    ring4, ring_drained = ShardRing(four), ShardRing(draining)
    fresh = [uid("dr") for _ in range(2000)]
    held = next(m for m in fresh if ring4.shard_for(m) == "shard-d")
    partner = next(
        m
        for m in fresh
        if ring4.shard_for(m) == ring_drained.shard_for(m)
        and ring4.shard_for(m) != ring_drained.shard_for(held)
    )
    await create_merchants(service, [held, partner])
    pending = transfer(
        uid("p"), ref(held, "cash"), ref(partner, "sales"), 300, action=pb.TRANSFER_ACTION_PENDING
    )
    await send_retrying(service, pending, random.Random(9), attempts_max=DEFERRED_CALL_ATTEMPTS_MAX)
    assert await settled(service, [(held, pending.id)]) == {
        (held, pending.id): pb.TRANSFER_RESULT_OK
    }

    await ledger4.switch_to(draining)
    async with opened(draining) as rebalancer:
        summary = await rebalancer.rebalance()
        print(f"\n{summary.render()}")
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(held, "moved")]
        assert not summary.finished
        assert "DRAINING shard-d: still holds 2 settlement account(s)" in summary.render()
    retired = ledger4.config(4, ALL_SHARDS, states={"shard-d": "retired"})
    # Reconcile names the hold that could not settle under a config without shard-d.
    report = await reconcile_report(ledger4, retired, "reconcile-retired.toml")
    unsettleable = [f for f in report.findings if f.check.startswith("open holds") and not f.ok]
    assert unsettleable and "shard-d" in unsettleable[0].detail, report.render()
    for config, old in ((retired, None), (ledger4.config(4, FIRST_SHARDS), draining)):
        with pytest.raises(ShardPinned, match="shard-d still holds 2 settlement account"):
            async with opened(config, old=old) as rebalancer:
                await rebalancer.rebalance()
    # A replica refuses the same edit of its live config: it keeps serving shard-d.
    write_config(ledger4.config_path, retired)
    assert not await service.cluster.reload()
    assert service.cluster.epoch == draining.epoch and "shard-d" in service.cluster.shards

    void = pb.Transfer(
        id=uid("v"),
        debit_account=ref(held, "cash"),
        action=pb.TRANSFER_ACTION_VOID_PENDING,
        pending_id=pending.id,
    )
    await send_retrying(service, void, random.Random(9), attempts_max=DEFERRED_CALL_ATTEMPTS_MAX)

    async def released() -> bool:
        return (await all_balances(service, [partner]))[(partner, "sales")] == (0, 0, 0, 0)

    await wait_until(released, what="the void to pass shard-d's relay to the partner")
    async with opened(draining) as rebalancer:
        summary = await rebalancer.rebalance()
        assert summary.finished and "DRAINED shard-d" in summary.render(), summary.render()
    await ledger4.switch_to(retired)
    assert "shard-d" not in service.cluster.shards
    async with opened(retired) as rebalancer:
        assert (await rebalancer.rebalance()).results == []
    await assert_reconciled(ledger4, retired, "reconcile.toml", every_mirror_checked=True)


async def test_reconcile_names_a_move_marker_that_no_rebalance_is_finishing(
    ledger4: Ledger4,
) -> None:
    """A killed rebalance can leave a merchant marked incoming (or moving): reconcile
    fails naming it until a rerun finishes the move, and passes while one runs."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (mover,) = merchants_moving(old, new, 1, destination="shard-d")
    await create_merchants(service, [mover])
    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        await MoveStore(rebalancer.shards["shard-d"]).mark_incoming(
            mover, source=ShardRing(old).shard_for(mover), epoch=new.epoch
        )
        async with rebalancer.exclusive():
            # A rebalance holds the admin lock: its markers are moves in progress.
            assert (await reconcile_report(ledger4, new, "while-running.toml")).ok
    report = await reconcile_report(ledger4, new, "stale.toml")
    stale = [f for f in report.findings if f.check == "move markers shard-d"]
    assert stale and not stale[0].ok and f"{mover} incoming" in stale[0].detail, report.render()
    async with opened(new) as rebalancer:
        assert [r.outcome for r in (await rebalancer.rebalance()).results] == ["moved"]
    await assert_reconciled(ledger4, new, "after-rerun.toml")


async def test_a_second_rebalance_refuses_to_start_while_one_runs(ledger4: Ledger4) -> None:
    new = ledger4.config(2, ALL_SHARDS)
    await ledger4.switch_to(new)
    async with opened(new) as first, opened(new) as second:
        async with first.exclusive():
            with pytest.raises(AdminBusy):
                await second.rebalance()
            with pytest.raises(AdminBusy):
                await second.cleanup()
        # Released with the first run: the second goes ahead.
        assert (await second.rebalance()).finished


ADMIN_LOCK_CUTS = 30


async def test_a_run_whose_admin_lock_connection_is_cut_says_why_it_stopped(
    ledger4: Ledger4,
) -> None:
    """A shard cut off under a rebalance took the admin lock's connection with it;
    unlocking then raised "connection has been released back to the pool" over the
    run's ShardUnavailable (chaos), and the admin got a traceback, not the reason."""
    new = ledger4.config(2, ALL_SHARDS)
    shard_b = ledger4.specs["shard-b"]
    async with opened(new) as rebalancer:
        # Where the unlock finds the cut connection depends on how much of the
        # backend's end its client has read by then (closed, or half-way: asyncpg's
        # "another operation is in progress", which once failed this test when it
        # cut once): cut it many times.
        for _ in range(ADMIN_LOCK_CUTS):
            with pytest.raises(ShardUnavailable) as stopped:
                async with rebalancer.exclusive():
                    killer = await asyncpg.connect(shard_b.dsn)
                    try:
                        cut = await killer.fetchval(
                            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks AS l"
                            " WHERE l.locktype = 'advisory' AND l.classid = 7305"
                            " AND l.database = (SELECT oid FROM pg_database"
                            " WHERE datname = current_database())"
                        )
                    finally:
                        await killer.close()
                    assert cut == 1
                    # What the run's next statement says when the whole shard is cut off.
                    raise ShardUnavailable("shard-b", ConnectionResetError())
            assert stopped.value.shard_name == "shard-b"
        # The lock went with the connection: the next run takes it.
        assert (await rebalancer.rebalance()).finished


async def test_merchant_moves_back_to_a_shard_it_once_left(ledger4: Ledger4) -> None:
    """Add a shard, then drain it again: its merchants return to where they were."""
    service = ledger4.service
    three, four = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    back = ledger4.config(3, ALL_SHARDS, states={"shard-d": "draining"})
    movers = merchants_moving(three, four, 6, destination="shard-d")
    await create_merchants(service, movers)
    await make_history(service, movers, random.Random(7))
    before = await all_balances(service, movers)
    await ledger4.switch_to(four)
    async with opened(four) as rebalancer:
        assert len((await rebalancer.rebalance()).moved) == len(movers)
        assert (await rebalancer.cleanup())[0] == len(movers)

    await ledger4.switch_to(back)
    async with opened(back) as rebalancer:
        summary = await rebalancer.rebalance()
        print(f"\n{summary.render()}")
        assert {(r.move.merchant_id, r.move.destination) for r in summary.moved} == {
            (m, ShardRing(three).shard_for(m)) for m in movers
        }, summary.render()
        assert not summary.pending, summary.render()
        assert await states_on_owners(rebalancer, back, movers) == Counter(
            {("active", None): len(movers)}
        )
    assert await all_balances(service, movers) == before
    await assert_reconciled(ledger4, back, "reconcile.toml")


async def test_a_rebalance_that_fails_before_marking_its_moves_leaves_no_merchant_to_be_claimed(
    ledger4: Ledger4,
) -> None:
    """Chaos seed 298 (drains, 10 clients): a run raised every shard's epoch with claims
    paused, then its plan failed (the source shard was cut off), and it resumed claims
    on the way out. Replicas on the new config then wrote the movers on their new shard,
    which took them on as new merchants (active there, without their accounts) while
    they stayed active on the old one: a merchant owned twice, its transfers answered
    DEBIT_ACCOUNT_NOT_FOUND there. Claims now resume only once the moves are marked."""
    service = ledger4.service
    three, four = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    [mover] = merchants_moving(three, four, 1, destination="shard-d")
    source = ShardRing(three).shard_for(mover)
    await create_merchants(service, [mover])
    [funded] = await transfers(
        service.stub, transfer(uid("t"), ref(mover, "cash"), ref(mover, "sales"), 5)
    )
    assert funded.result == pb.TRANSFER_RESULT_OK
    await ledger4.switch_to(four)
    async with opened(four) as rebalancer:
        planned = rebalancer.plan

        async def plan_with_the_source_cut_off() -> Plan:
            async with ledger4.refusing_connections(source):
                await rebalancer.shards[source].pool.expire_connections()
                return await planned()

        rebalancer.plan = plan_with_the_source_cut_off  # type: ignore[method-assign]
        with pytest.raises(ShardUnavailable):
            await rebalancer.rebalance()
        destination = MoveStore(rebalancer.shards["shard-d"])
        # A write for the mover meanwhile: waited for (retryable) or written where the
        # mover is, never taken on by its new shard.
        answered: object
        try:
            response = await service.stub.CreateTransfers(
                pb.CreateTransfersRequest(
                    transfers=[transfer(uid("t"), ref(mover, "cash"), ref(mover, "sales"), 7)]
                ),
                timeout=SHORT_CALL_TIMEOUT_S,
            )
            answered = result_names(response.results)
        except grpc.aio.AioRpcError as error:
            answered = error.code()
        assert await destination.state_of(mover) is None, answered
        written_before = answered == ["TRANSFER_RESULT_OK"]
        assert written_before or answered in RETRYABLE_CODES | {
            grpc.StatusCode.DEADLINE_EXCEEDED
        }, answered
        assert await MoveStore(rebalancer.shards[source]).state_of(mover) == ("active", None)
        # Operators are told claims stay paused until a rerun (status and reconcile).
        warning = f"  WARNING: {CLAIMS_PAUSED_WARNING}"
        status = await rebalancer.status()
        assert status.count(warning) == len(ALL_SHARDS), status
        report = await reconcile_report(ledger4, four, "reconcile.toml")
        assert report.ok, report.render()
        assert f"ok   claims {source}: {CLAIMS_PAUSED_WARNING}" in report.render()

        rebalancer.plan = planned  # type: ignore[method-assign]
        summary = await rebalancer.rebalance()
        assert [r.move.merchant_id for r in summary.moved] == [mover], summary.render()
        assert await destination.state_of(mover) == ("active", None)
        assert warning not in await rebalancer.status()
    [after] = await transfers(
        service.stub, transfer(uid("t"), ref(mover, "cash"), ref(mover, "sales"), 7)
    )
    assert after.result == pb.TRANSFER_RESULT_OK
    sales = (await all_balances(service, [mover]))[(mover, "sales")]
    assert sales[1] == (19 if written_before else 12), sales
    await assert_reconciled(ledger4, four, "reconcile.toml")


async def test_raising_a_weight_moves_merchants_only_towards_that_shard(ledger4: Ledger4) -> None:
    service = ledger4.service
    rng = random.Random(2)
    heavier = ledger4.config(2, FIRST_SHARDS, weights={"shard-a": 3})
    merchant_ids = [uid("w") for _ in range(60)]
    await create_merchants(service, merchant_ids)
    await make_history(service, merchant_ids, rng)
    before = await all_balances(service, merchant_ids)

    await ledger4.switch_to(heavier)
    async with opened(heavier) as rebalancer:
        plan = await rebalancer.plan()
        print(f"\n{plan.render()}")
        assert plan.moves, plan.render()
        assert {m.destination for m in plan.moves} == {"shard-a"}, plan.render()
        assert "shard-a" not in {m.source for m in plan.moves}
        summary = await rebalancer.rebalance()
        print(summary.render())
        assert_plan_matches(plan, summary)
        assert sum(merchants for merchants, _, _ in plan.by_pair().values()) == len(summary.moved)
        assert await states_on_owners(rebalancer, heavier, merchant_ids) == Counter(
            {("active", None): len(merchant_ids)}
        )
    assert await all_balances(service, merchant_ids) == before
    await assert_reconciled(ledger4, heavier, "reconcile.toml")


def staying_merchant(old: ShardConfig, new: ShardConfig, *, on: bool, shard: str) -> str:
    """A fresh merchant id whose owner is the same under old and new, and is (on=True)
    or is not (on=False) the given shard."""
    old_ring, new_ring = ShardRing(old), ShardRing(new)
    return next(
        m
        for m in (uid("st") for _ in range(1000))
        if old_ring.shard_for(m) == new_ring.shard_for(m) and (old_ring.shard_for(m) == shard) == on
    )


async def held_saga(service: Service, payer: str, payee: str) -> tuple[SagaRunner, Saga]:
    """A cross-shard transfer from payer stopped after step 1, its lease held long
    enough that no recovery worker drives it while the test does not."""
    runner, start = await begun_saga(service, payer, payee)
    assert start.saga is not None
    return runner, start.saga


async def begun_saga(service: Service, payer: str, payee: str) -> tuple[SagaRunner, SagaStart]:
    """held_saga, with the start as begin() answered it."""
    runner = SagaRunner(service.cluster, owner="test", settings=SagaSettings(lease_s=120.0))
    start = await runner.begin(
        TransferRequest(
            id=uid("sg"),
            debit=AccountKey(payer, "cash"),
            credit=AccountKey(payee, "sales"),
            amount_minor=300,
            currency="USD",
            action=TransferAction.POST,
        )
    )
    assert start.saga is not None and start.saga.state is SagaState.RUNNING
    return runner, start


async def test_a_replay_waits_for_its_saga_while_the_ring_points_where_the_merchant_is_unknown(
    ledger4: Ledger4,
) -> None:
    """A chaos run's internal error, reproduced: a replayed cross-shard transfer
    waits for its saga, read where the new config's ring points before the
    rebalance has marked the merchant there (that shard does not know it). The
    wait read no saga and raised KeyError (the call failed UNKNOWN); it now keeps
    waiting, and the answer at its deadline is IN_PROGRESS."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (payer,) = merchants_moving(old, new, 1, destination="shard-d")
    payee = staying_merchant(old, new, on=False, shard=ShardRing(old).shard_for(payer))
    await create_merchants(service, [payer, payee])
    runner, start = await begun_saga(service, payer, payee)
    # shard-d set up (on the new epoch), and the config switched; nothing moved yet.
    async with opened(new):
        await ledger4.switch_to(new)
        assert service.cluster.shard_for(payer).name == "shard-d"
        replayed = replace(start, outcome=replace(start.outcome, replayed=True))
        deadline = asyncio.get_running_loop().time() + 0.5
        outcome = await runner.outcome_by(replayed, deadline=deadline)
    assert outcome.result is TransferResult.IN_PROGRESS and outcome.replayed, outcome


async def test_reads_find_a_merchant_where_it_is_while_the_ring_points_where_it_is_unknown(
    ledger4: Ledger4,
) -> None:
    """Between a config change and the rebalance that moves a merchant, the new ring
    points at a shard that has never seen it. Writes went to where the previous config
    placed it; reads answered there was no such account, transfer or entry (a caller
    that took NOT_FOUND at its word could pay twice). Reads now follow the merchant to
    where it is, as writes do; a merchant that exists nowhere is still not found, at
    once."""
    service, stub = ledger4.service, ledger4.service.stub
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (moving,) = merchants_moving(old, new, 1, destination="shard-d")
    await create_merchants(service, [moving])
    paid = transfer(uid("rd"), ref(moving, "cash"), ref(moving, "sales"), 250)
    assert result_names(await transfers(stub, paid)) == ["TRANSFER_RESULT_OK"]
    (nowhere,) = merchants_moving(old, new, 1, destination="shard-d")
    async with opened(new):
        await ledger4.switch_to(new)
        assert service.cluster.shard_for(moving).name == "shard-d"

        looked_up = await stub.LookupAccounts(
            pb.LookupAccountsRequest(refs=[ref(moving, "cash"), ref(nowhere, "cash")])
        )
        assert [(a.ref.merchant_id, a.ref.account_id) for a in looked_up.accounts] == [
            (moving, "cash")
        ]
        listed = await stub.ListAccounts(pb.ListAccountsRequest(merchant_id=moving))
        assert sorted(a.ref.account_id for a in listed.accounts) == ["cash", "sales"]
        got = await stub.GetBalance(pb.GetBalanceRequest(account=ref(moving, "sales")))
        assert got.credits_posted == 250
        entries = await stub.ListEntries(pb.ListEntriesRequest(account=ref(moving, "cash")))
        assert [e.amount_minor for e in entries.entries] == [250]
        found = await stub.LookupTransfers(
            pb.LookupTransfersRequest(
                refs=[
                    pb.TransferRef(merchant_id=moving, transfer_id=paid.id),
                    pb.TransferRef(merchant_id=nowhere, transfer_id=paid.id),
                ]
            )
        )
        assert [t.transfer.id for t in found.transfers] == [paid.id]
        admin = ledger_pb2_grpc.LedgerAdminServiceStub(service.channel)
        limits = await admin.GetAccountLimits(
            pb.GetAccountLimitsRequest(account=ref(moving, "cash"))
        )
        assert limits.HasField("limits")

        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetBalance(pb.GetBalanceRequest(account=ref(nowhere, "cash")))
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        # Answered, not waited out: no fence or rebalance to wait for.
        assert time.monotonic() - started < 5.0


async def test_holds_follow_a_merchant_there_back_and_there_again(ledger4: Ledger4) -> None:
    """A move away adds a relay; the move back folds it away (the holds span the two
    parties' shards again, directly), so moving there again is no longer held back;
    every hold settles through its whole path."""
    service = ledger4.service
    old = service.cluster.config
    there = ledger4.config(2, ALL_SHARDS)
    old_ring, there_ring = ShardRing(old), ShardRing(there)
    candidates = [uid("bf") for _ in range(4000)]
    held, source, back = "", "", there
    for m in candidates:
        if there_ring.shard_for(m) == "shard-d" and old_ring.shard_for(m) != "shard-d":
            source = old_ring.shard_for(m)
            heavier = ledger4.config(3, ALL_SHARDS, weights={source: 6})
            if ShardRing(heavier).shard_for(m) == source:
                held, back = m, heavier
                break
    assert held, "no merchant that moves there and back"
    partner = next(
        m
        for m in candidates
        if len({ShardRing(c).shard_for(m) for c in (old, there, back)}) == 1
        and old_ring.shard_for(m) not in (source, "shard-d")
    )
    await create_merchants(service, [held, partner])
    pending = pb.TRANSFER_ACTION_PENDING
    out_hold = transfer(uid("ho"), ref(held, "cash"), ref(partner, "sales"), 300, action=pending)
    in_hold = transfer(uid("hi"), ref(partner, "cash"), ref(held, "sales"), 70, action=pending)
    for item in (out_hold, in_hold):
        await send_retrying(
            service, item, random.Random(2), attempts_max=DEFERRED_CALL_ATTEMPTS_MAX
        )
    keys = [(h.debit_account.merchant_id, h.id) for h in (out_hold, in_hold)]
    assert set((await settled(service, keys)).values()) == {pb.TRANSFER_RESULT_OK}
    before = await all_balances(service, [held, partner])

    again = ledger4.config(4, ALL_SHARDS)
    relays_by_step = []
    for config in (there, back, again):
        summary = await switch_and_rebalance(ledger4, config)
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(held, "moved")]
        assert await all_balances(service, [held, partner]) == before
        relays_by_step.append(await relays_of(ledger4, [h.id for h in (out_hold, in_hold)]))
    # There: the shard left relays both holds. Back: both relays folded away.
    # There again: relayed once more, through the same single step.
    assert relays_by_step == [{source: 2}, {}, {source: 2}]

    post = pb.Transfer(
        id=uid("po"),
        debit_account=ref(held, "cash"),
        action=pb.TRANSFER_ACTION_POST_PENDING,
        pending_id=out_hold.id,
    )
    void = pb.Transfer(
        id=uid("vo"),
        debit_account=ref(partner, "cash"),
        action=pb.TRANSFER_ACTION_VOID_PENDING,
        pending_id=in_hold.id,
    )
    for item in (post, void):
        await send_retrying(
            service, item, random.Random(3), attempts_max=DEFERRED_CALL_ATTEMPTS_MAX
        )
    settled_both = {
        (held, "cash"): (300, 0, 0, 0),
        (held, "sales"): (0, 0, 0, 0),
        (partner, "cash"): (0, 0, 0, 0),
        (partner, "sales"): (0, 300, 0, 0),
    }
    await wait_for_balances(
        service, settled_both, what="the post and the void to pass every relay of their paths"
    )
    assert await all_balances(service, [held, partner]) == settled_both
    await assert_reconciled(ledger4, again, "reconcile.toml", every_mirror_checked=True)


async def on_every_shard(
    env: Ledger4, query: str, *args: object, shards: Collection[str] | None = None
) -> dict[str, int]:
    """A count that query reads on each shard, or on those named (shards where it is
    0 left out)."""
    found: dict[str, int] = {}
    for name, spec in env.specs.items():
        if shards is not None and name not in shards:
            continue
        shard = Shard(name=name, dsn=spec.dsn)
        await shard.open()
        try:
            async with shard.pool.acquire() as conn:
                count = await conn.fetchval(query, *args)
        finally:
            await shard.close()
        if count:
            found[name] = count
    return found


async def relays_of(env: Ledger4, transfer_ids: Sequence[str]) -> dict[str, int]:
    """How many relays each shard keeps for these holds (shards with none left out)."""
    return await on_every_shard(
        env,
        "SELECT count(*) FROM hold_relays WHERE transfer_id = ANY($1::text[])",
        list(transfer_ids),
    )


async def test_sagas_copied_ahead_of_a_move_are_not_driven_where_the_merchant_is_not_owned(
    ledger4: Ledger4,
) -> None:
    """A move copies a merchant's running sagas to its new shard before it owns them:
    that shard's recovery workers must leave them alone (they would credit against
    the wrong settlement account)."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (held,) = merchants_moving(old, new, 1, destination="shard-d")
    source = ShardRing(old).shard_for(held)
    partner = staying_merchant(old, new, on=False, shard=source)
    await create_merchants(service, [held, partner])
    runner, saga = await held_saga(service, held, partner)
    make_due = "UPDATE sagas SET lease_until = NULL, next_attempt_at = clock_timestamp()"
    # The service stays on its config (no rebalance runs): only the copy is made.
    async with opened(new) as rebalancer:
        ahead = MoveStore(rebalancer.shards["shard-d"])
        await ahead.mark_incoming(held, source=source, epoch=new.epoch)
        await ahead.write_rows(
            held, await MoveStore(rebalancer.shards[source]).read_rows(held, since_xid=None)
        )
        await rebalancer.shards["shard-d"].pool.execute(make_due)
        claimed = await SagaStore(rebalancer.shards["shard-d"]).claim_due(
            owner="test", limit=10, lease_s=60.0
        )
        assert claimed == []
        assert (
            await SagaStore(rebalancer.shards["shard-d"]).list([SagaState.RUNNING], limit=10) == []
        )
    assert (await runner.drive(saga)).state is SagaState.COMPLETED


async def test_merchant_with_a_saga_of_its_own_unfinished_is_deferred_until_it_finishes(
    ledger4: Ledger4,
) -> None:
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    held, *others = merchants_moving(old, new, 4)
    partner = staying_merchant(old, new, on=False, shard=ShardRing(old).shard_for(held))
    await create_merchants(service, [held, *others, partner])
    runner, saga = await held_saga(service, held, partner)

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
        print(f"\n{summary.render()}")
        assert [(r.move.merchant_id, r.outcome) for r in summary.pending] == [
            (held, "deferred: 1 saga(s) of its own not finished")
        ], summary.render()
        assert {r.move.merchant_id for r in summary.moved} == set(others)
        assert f"NOT MOVED {held}" in summary.render()
        # Still owned, and writable, where it was.
        source = ShardRing(old).shard_for(held)
        assert await MoveStore(rebalancer.shards[source]).state_of(held) == ("active", None)

        assert (await runner.drive(saga)).state is SagaState.COMPLETED
        again = await rebalancer.rebalance()
        print(again.render())
        assert [(r.move.merchant_id, r.outcome) for r in again.results] == [(held, "moved")]
        assert await MoveStore(rebalancer.shards["shard-d"]).state_of(held) == ("active", None)
    balances = await all_balances(service, [held, partner])
    assert balances[(held, "cash")] == (300, 0, 0, 0)
    assert balances[(partner, "sales")] == (0, 300, 0, 0)
    await assert_reconciled(ledger4, new, "reconcile.toml", every_mirror_checked=True)


async def test_a_deferred_move_that_the_config_takes_back_leaves_no_incoming_marker(
    ledger4: Ledger4,
) -> None:
    """A merchant deferred after its rows were copied (a saga of its own in flight),
    then the config changes back before it moves: the rerun leaves no `incoming`
    marker on the shard it was going to (a chaos run found one left there: reconcile
    flagged it, and no rerun cleared it), its partial copy there is an old copy that
    cleanup deletes, and it lives on where it was."""
    service = ledger4.service
    old = service.cluster.config
    new = ledger4.config(2, FIRST_SHARDS, weights={"shard-c": 3})
    back = ledger4.config(3, FIRST_SHARDS)
    (held,) = merchants_moving(old, new, 1, destination="shard-c")
    source = ShardRing(old).shard_for(held)
    assert ShardRing(back).shard_for(held) == source
    partner = staying_merchant(old, new, on=False, shard=source)
    await create_merchants(service, [held, partner])
    runner, saga = await held_saga(service, held, partner)

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
        assert [(r.move.merchant_id, r.outcome) for r in summary.pending] == [
            (held, "deferred: 1 saga(s) of its own not finished")
        ], summary.render()
        stale = MoveStore(rebalancer.shards["shard-c"])
        assert await stale.state_of(held) == ("incoming", source)
    await ledger4.switch_to(back)
    async with opened(back) as rebalancer:
        again = await rebalancer.rebalance()
        print(f"\n{again.render()}")
        assert again.finished and again.results == [], again.render()
        for name in FIRST_SHARDS:
            incoming = await MoveStore(rebalancer.shards[name]).merchants_in("incoming")
            assert incoming == [], (name, incoming)
        assert await MoveStore(rebalancer.shards[source]).state_of(held) == ("active", None)
        # What was copied is an old copy, of a merchant that lives on its source.
        stale = MoveStore(rebalancer.shards["shard-c"])
        assert await stale.state_of(held) == ("moved", source)
        assert (await stale.sizes([held]))[held][0] == 2  # its two accounts
        merchants_cleaned, rows_deleted = await rebalancer.cleanup()
        assert merchants_cleaned == 1 and rows_deleted > 0
        assert (await stale.sizes([held])).get(held, (0, 0)) == (0, 0)
    assert (await runner.drive(saga)).state is SagaState.COMPLETED
    balances = await all_balances(service, [held, partner])
    assert balances[(held, "cash")] == (300, 0, 0, 0)
    await assert_reconciled(ledger4, back, "reconcile.toml", every_mirror_checked=True)


async def test_cross_shard_holds_of_a_merchant_that_moves_settle_through_its_old_shard(
    ledger4: Ledger4,
) -> None:
    """Its old shard relays: post, void and timeout, from either side, pass through."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (held,) = merchants_moving(old, new, 1)
    source = ShardRing(old).shard_for(held)
    partner = staying_merchant(old, new, on=False, shard=source)
    await create_merchants(service, [held, partner])
    out_post, out_expire, in_void, in_post = (uid(p) for p in ("op", "oe", "iv", "ip"))
    pending = pb.TRANSFER_ACTION_PENDING
    holds = [
        transfer(out_post, ref(held, "cash"), ref(partner, "sales"), 300, action=pending),
        transfer(
            out_expire,
            ref(held, "cash"),
            ref(partner, "sales"),
            20,
            action=pending,
            timeout_ms=OWN_HOLD_TIMEOUT_MS,
        ),
        transfer(in_void, ref(partner, "cash"), ref(held, "sales"), 50, action=pending),
        transfer(in_post, ref(partner, "cash"), ref(held, "sales"), 70, action=pending),
    ]
    for item in holds:
        await send_retrying(
            service, item, random.Random(7), attempts_max=DEFERRED_CALL_ATTEMPTS_MAX
        )
    keys = [(t.debit_account.merchant_id, t.id) for t in holds]
    assert set((await settled(service, keys)).values()) == {pb.TRANSFER_RESULT_OK}
    before = await all_balances(service, [held, partner])
    assert before[(held, "cash")] == (0, 0, 320, 0)
    assert before[(held, "sales")] == (0, 0, 0, 120)

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
        print(f"\n{summary.render()}")
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(held, "moved")]
        relays = await rebalancer.shards[source].pool.fetchval("SELECT count(*) FROM hold_relays")
        assert relays == 4
    assert await all_balances(service, [held, partner]) == before

    settles = [
        pb.Transfer(
            id=uid("po"),
            debit_account=ref(held, "cash"),
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=out_post,
            amount_minor=200,
        ),
        pb.Transfer(
            id=uid("vo"),
            debit_account=ref(partner, "cash"),
            action=pb.TRANSFER_ACTION_VOID_PENDING,
            pending_id=in_void,
        ),
        pb.Transfer(
            id=uid("pi"),
            debit_account=ref(partner, "cash"),
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=in_post,
        ),
    ]
    await send_accepted(service, *settles)
    expected = {
        (held, "cash"): (200, 0, 0, 0),
        (held, "sales"): (0, 70, 0, 0),
        (partner, "cash"): (70, 0, 0, 0),
        (partner, "sales"): (0, 200, 0, 0),
    }
    await wait_for_balances(service, expected, what="every relayed hold to be settled")
    await assert_reconciled(ledger4, new, "reconcile.toml", every_mirror_checked=True)


async def test_pending_transfers_between_a_merchants_own_accounts_move_with_it(
    ledger4: Ledger4,
) -> None:
    """Holds, their records and their timers move; they are settled on the new shard."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (held,) = merchants_moving(old, new, 1)
    source, destination = ShardRing(old).shard_for(held), ShardRing(new).shard_for(held)
    await create_merchants(service, [held])
    to_post, to_void, to_expire, to_keep = (uid(p) for p in ("post", "void", "exp", "keep"))
    holds = [
        transfer(
            i, ref(held, "cash"), ref(held, "sales"), amount, action=pb.TRANSFER_ACTION_PENDING
        )
        for i, amount in ((to_post, 300), (to_void, 50), (to_keep, 7))
    ]
    # Long enough to outlive the move, short enough for the test to see it expire.
    holds.append(
        transfer(
            to_expire,
            ref(held, "cash"),
            ref(held, "sales"),
            20,
            action=pb.TRANSFER_ACTION_PENDING,
            timeout_ms=OWN_HOLD_TIMEOUT_MS,
        )
    )
    assert result_names(await transfers(service.stub, *holds)) == ["TRANSFER_RESULT_OK"] * 4
    assert (await all_balances(service, [held]))[(held, "cash")] == (0, 0, 377, 0)

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
        print(f"\n{summary.render()}")
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(held, "moved")]
        moved_to = MoveStore(rebalancer.shards[destination])
        assert await moved_to.state_of(held) == ("active", None)
        old_copy = MoveStore(rebalancer.shards[source])
        assert await old_copy.state_of(held) == ("moved", destination)
        digest = await moved_to.digest(held)
        assert (digest.open_pendings, digest.expiries) == (4, 1), digest
        assert await old_copy.digest(held) == digest
        # Still held on the new shard, timer included (it had not expired yet).
        assert (await all_balances(service, [held]))[(held, "cash")] == (0, 0, 377, 0)

        post = pb.Transfer(
            id=uid("po"),
            debit_account=ref(held, "cash"),
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=to_post,
            amount_minor=250,
        )
        void = pb.Transfer(
            id=uid("vo"),
            debit_account=ref(held, "cash"),
            action=pb.TRANSFER_ACTION_VOID_PENDING,
            pending_id=to_void,
        )
        assert result_names(await transfers(service.stub, post, void)) == ["TRANSFER_RESULT_OK"] * 2

        async def expired() -> bool:
            return (await all_balances(service, [held]))[(held, "cash")] == (250, 0, 7, 0)

        await wait_until(expired, what="the moved hold to expire on its new shard")
        # The old copy was left alone: its sweeper does not expire a merchant it handed over.
        assert await old_copy.digest(held) == digest
        assert (await moved_to.digest(held)).open_pendings == 1
    balances = await all_balances(service, [held])
    assert balances[(held, "sales")] == (0, 250, 0, 7)
    await assert_reconciled(ledger4, new, "reconcile.toml")


async def test_local_holds_with_a_merchant_that_stays_become_cross_shard_when_it_moves(
    ledger4: Ledger4,
) -> None:
    """Both directions, settled afterwards by either side, by post, void or timeout."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    (held,) = merchants_moving(old, new, 1)
    source = ShardRing(old).shard_for(held)
    partner = staying_merchant(old, new, on=True, shard=source)
    await create_merchants(service, [held, partner])
    out_post, out_expire, in_void, in_expire = (uid(p) for p in ("op", "oe", "iv", "ie"))
    pending = pb.TRANSFER_ACTION_PENDING
    timeout_ms = OWN_HOLD_TIMEOUT_MS
    holds = [
        transfer(out_post, ref(held, "cash"), ref(partner, "sales"), 300, action=pending),
        transfer(
            out_expire,
            ref(held, "cash"),
            ref(partner, "sales"),
            20,
            action=pending,
            timeout_ms=timeout_ms,
        ),
        transfer(in_void, ref(partner, "cash"), ref(held, "sales"), 50, action=pending),
        transfer(
            in_expire,
            ref(partner, "cash"),
            ref(held, "sales"),
            70,
            action=pending,
            timeout_ms=timeout_ms,
        ),
    ]
    assert result_names(await transfers(service.stub, *holds)) == ["TRANSFER_RESULT_OK"] * 4
    void = pb.Transfer(
        id=uid("vo"),
        debit_account=ref(partner, "cash"),
        action=pb.TRANSFER_ACTION_VOID_PENDING,
        pending_id=in_void,
    )
    before = await all_balances(service, [held, partner])

    # Settling a hold writes its credit party, which the request does not name:
    # while that party is fenced by a move, the settle waits (retryable), unwritten.
    fencing = Shard(name=source, dsn=ledger4.specs[source].dsn)
    await fencing.open()
    try:
        assert await MoveStore(fencing).fence(held, epoch=old.epoch) is None
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await transfers(service.stub, void)
        assert refused.value.code() in RETRYABLE_CODES, refused.value
        assert await all_balances(service, [partner]) == {
            k: v for k, v in before.items() if k[0] == partner
        }
        await MoveStore(fencing).unfence(held, epoch=old.epoch)
    finally:
        await fencing.close()

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
        print(f"\n{summary.render()}")
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(held, "moved")]
        # The partner's holds with it are cross-shard now (the old copy left behind
        # does not count), and would move with it too. The two with a timeout may
        # have expired by now on a slow machine (the end checks their balances).
        stays = MoveStore(rebalancer.shards[source])
        partner_holds = await stays.holds(partner)
        open_ids = {h.key.transfer_id for h in partner_holds.cross}
        assert partner_holds.local == [], partner_holds
        assert {out_post, in_void} <= open_ids <= {out_post, out_expire, in_void, in_expire}, (
            partner_holds
        )
        assert await stays.blockers(partner) is None
    assert await all_balances(service, [held, partner]) == before

    post = pb.Transfer(
        id=uid("po"),
        debit_account=ref(held, "cash"),
        action=pb.TRANSFER_ACTION_POST_PENDING,
        pending_id=out_post,
        amount_minor=200,
    )
    await send_accepted(service, post, void)
    expected = {
        (held, "cash"): (200, 0, 0, 0),
        (held, "sales"): (0, 0, 0, 0),
        (partner, "cash"): (0, 0, 0, 0),
        (partner, "sales"): (0, 200, 0, 0),
    }
    await wait_for_balances(
        service, expected, what="every carried hold to be posted, voided or expired"
    )
    await assert_reconciled(ledger4, new, "reconcile.toml", every_mirror_checked=True)


async def test_sagas_in_flight_to_a_merchant_that_moves_continue_on_its_new_shard(
    ledger4: Ledger4,
) -> None:
    """Step 2 follows the credit merchant; step 3 moves the hold to the settlement
    account that mirrors the shard that credited; none of it passes a move's fence."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    old_ring, new_ring = ShardRing(old), ShardRing(new)
    (payee,) = merchants_moving(old, new, 1, destination="shard-d")
    credit_shard = old_ring.shard_for(payee)
    payer = next(
        m
        for m in (uid("py") for _ in range(1000))
        if old_ring.shard_for(m) == new_ring.shard_for(m) != credit_shard
    )
    await create_merchants(service, [payer, payee])
    # Long leases: no recovery worker drives these sagas while the test holds them.
    runner = SagaRunner(service.cluster, owner="test", settings=SagaSettings(lease_s=120.0))

    async def step1(amount_minor: int, action: TransferAction) -> Saga:
        request = TransferRequest(
            id=uid("sg"),
            debit=AccountKey(payer, "cash"),
            credit=AccountKey(payee, "sales"),
            amount_minor=amount_minor,
            currency="USD",
            action=action,
        )
        start = await runner.begin(request)
        assert start.saga is not None and start.saga.peer_shard == credit_shard
        return start.saga

    late_post = await step1(100, TransferAction.POST)
    late_pending = await step1(40, TransferAction.PENDING)
    early = await step1(25, TransferAction.POST)
    # Step 2 of one saga lands on the old shard before the move; its outcome moves too.
    recorded = await SagaStore(service.cluster.shards[credit_shard]).credit(
        early,
        home_shard=early.home_shard,
        fence=service.cluster.fence(service.cluster.shards[credit_shard], {payee}),
    )
    assert recorded.credited_on == credit_shard

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
        print(f"\n{summary.render()}")
        assert [(r.move.merchant_id, r.outcome) for r in summary.results] == [(payee, "moved")]
        assert (await MoveStore(rebalancer.shards["shard-d"]).digest(payee)).credits == 1
        # A step 2 never passes a move's fence: fenced on its new shard, it waits.
        fenced = MoveStore(rebalancer.shards["shard-d"])
        assert await fenced.fence(payee, epoch=new.epoch) is None
        waited = await runner.drive(late_post)
        # A wait for the move, not a failed attempt (it never dead-letters the saga).
        assert (waited.state, waited.attempts) == (SagaState.RUNNING, 0)
        assert "moving" in waited.last_error, waited.last_error
        assert await fenced.digest(payee) == await MoveStore(
            rebalancer.shards[credit_shard]
        ).digest(payee)
        await fenced.unfence(payee, epoch=new.epoch)

    # The attempt that failed under the fence released its lease: the service's
    # recovery worker may drive the saga too (a racing drive returns its state as
    # it finds it), so each is then waited for.
    for saga in (waited, late_pending, early):
        await runner.drive(saga)
    finished = [
        await runner.wait(s, wait_s=SAGA_WAIT_MS / 1000) for s in (waited, late_pending, early)
    ]
    assert [(f.state, f.peer_shard) for f in finished] == [
        (SagaState.COMPLETED, "shard-d"),
        (SagaState.COMPLETED, "shard-d"),
        (SagaState.COMPLETED, credit_shard),
    ]
    found = await runner.get(late_post.key)
    assert found is not None
    assert any(step.step == 2 and "on shard-d" in step.detail for step in found[1]), found[1]
    balances = await all_balances(service, [payer, payee])
    assert balances[(payer, "cash")] == (125, 0, 40, 0)
    assert balances[(payee, "sales")] == (0, 125, 0, 40)

    # The pending one settles where its hold now is, on both sides.
    post = pb.Transfer(
        id=uid("po"),
        debit_account=ref(payer, "cash"),
        action=pb.TRANSFER_ACTION_POST_PENDING,
        pending_id=late_pending.key.transfer_id,
    )
    await send_accepted(service, post)
    await wait_for_balances(
        service,
        {(payee, "sales"): (0, 165, 0, 0), (payer, "cash"): (165, 0, 0, 0)},
        what="the cross-shard post to reach the moved merchant",
    )
    await assert_reconciled(ledger4, new, "reconcile.toml", every_mirror_checked=True)


async def test_merchant_deferred_by_a_move_still_transacts_and_its_sagas_stay_visible(
    ledger4: Ledger4,
) -> None:
    """While a merchant waits on its old shard, the rest of the cluster has moved on."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    old_ring, new_ring = ShardRing(old), ShardRing(new)
    held, *movers = merchants_moving(old, new, 12, destination="shard-d")
    source = old_ring.shard_for(held)
    mover_elsewhere = next(m for m in movers if old_ring.shard_for(m) != source)
    mover_alongside = next((m for m in movers if old_ring.shard_for(m) == source), None)
    stayer = next(
        m
        for m in (uid("st") for _ in range(1000))
        if old_ring.shard_for(m) == new_ring.shard_for(m) != source
    )
    await create_merchants(service, [held, *movers, stayer])
    # A saga of its own that does not finish keeps it where it is.
    runner, unfinished = await held_saga(service, held, stayer)

    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
    assert [r.move.merchant_id for r in summary.pending] == [held], summary.render()

    rng = random.Random(5)
    partners = {"a merchant that moved from another shard": mover_elsewhere, "a stayer": stayer}
    if mover_alongside is not None:
        partners["a merchant that moved from its shard"] = mover_alongside
    calls: dict[str, pb.Transfer] = {}
    for label, partner in partners.items():
        for debit, credit, direction in ((held, partner, "to"), (partner, held, "from")):
            calls[f"{direction} {label}"] = transfer(
                uid("t"), ref(debit, "cash"), ref(credit, "sales"), 9
            )
    sent = await asyncio.gather(
        *(
            send_retrying(service, item, rng, attempts_max=DEFERRED_CALL_ATTEMPTS_MAX)
            for item in calls.values()
        )
    )
    answers = {label: answer.describe() for label, answer in zip(calls, sent, strict=True)}
    # The admin view of the saga it started while deferred (its home is still `source`).
    admin = ledger_pb2_grpc.LedgerAdminServiceStub(service.channel)
    saga_ref = pb.SagaRef(
        merchant_id=held, transfer_id=calls["to a stayer"].id, kind=pb.SAGA_KIND_TRANSFER
    )
    try:
        saga = await admin.GetSaga(pb.GetSagaRequest(ref=saga_ref), timeout=RPC_TIMEOUT_S)
        answers["GetSaga of its saga to a stayer"] = (
            f"{pb.SagaState.Name(saga.state)} on {saga.debit_shard}"
        )
    except grpc.aio.AioRpcError as error:
        answers["GetSaga of its saga to a stayer"] = f"{error.code().name} {error.details()}"
    expected = {label: "TRANSFER_RESULT_OK" for label in calls}
    expected["GetSaga of its saga to a stayer"] = f"SAGA_STATE_COMPLETED on {source}"
    assert answers == expected, "\n".join(f"{k}: {v}" for k, v in answers.items())
    assert (await runner.drive(unfinished)).state is SagaState.COMPLETED


async def test_reconcile_counts_the_sagas_of_merchants_a_shard_owns_not_copies(
    ledger4: Ledger4,
) -> None:
    """A move deferred for the merchant's own saga leaves the copy it made on the
    destination (`incoming`), saga rows included, until a rerun (or, abandoned, as an
    old copy until cleanup). Reconcile counted that copy's saga as running after the
    saga itself finished, and skipped every settlement pair with the destination."""
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    held, mover = merchants_moving(old, new, 2, destination="shard-d")
    stayer = staying_merchant(old, new, on=False, shard=ShardRing(old).shard_for(held))
    await create_merchants(service, [held, mover, stayer])
    # The mover's balance makes a settlement pair with shard-d when it moves there.
    await send_accepted(service, transfer(uid("mp"), ref(stayer, "cash"), ref(mover, "sales"), 50))
    runner, unfinished = await held_saga(service, held, stayer)
    await ledger4.switch_to(new)
    async with opened(new) as rebalancer:
        summary = await rebalancer.rebalance()
    assert [r.move.merchant_id for r in summary.pending] == [held], summary.render()
    assert mover in [r.move.merchant_id for r in summary.moved], summary.render()
    assert (await runner.drive(unfinished)).state is SagaState.COMPLETED
    await wait_for_balances(
        service, {(mover, "sales"): (0, 50, 0, 0)}, what="the payment to the mover"
    )

    report = await reconcile_report(ledger4, new, "reconcile.toml")
    skipped = [f for f in report.findings if "skipped" in f.detail]
    failed = [f.check for f in report.findings if not f.ok]
    # What it does report: the deferred move, for a rerun.
    assert not skipped and failed == ["move markers shard-d"], report.render()


async def run_cli(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRPC_ENABLE_FORK_SUPPORT": "false"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger.cli",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), SUBPROCESS_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_plans_rebalances_reports_status_and_cleans_up(ledger4: Ledger4) -> None:
    service = ledger4.service
    old, new = service.cluster.config, ledger4.config(2, ALL_SHARDS)
    movers = merchants_moving(old, new, 6)
    stayers = [uid("s") for _ in range(10)]
    merchant_ids = movers + [m for m in stayers if m not in movers]
    await create_merchants(service, merchant_ids)
    await make_history(service, merchant_ids, random.Random(6))
    before = await all_balances(service, merchant_ids)
    moving = [m for m in merchant_ids if ShardRing(new).shard_for(m) != ShardRing(old).shard_for(m)]

    await ledger4.switch_to(new)
    config = str(ledger4.config_path)
    # The added shard waits for a run with claims paused; status says what to do.
    code, out, err = await run_cli("shards", "status", "--config", config)
    assert code == 0, err
    assert re.search(
        r"^shard-d: epoch \d+ \(claims paused\).*\n  WARNING: claims of new merchants paused "
        r"and no rebalance running: .*`ledger shards rebalance` runs \(again\)$",
        out,
        re.M,
    ), out
    assert out.count("WARNING") == 1, out
    started = time.monotonic()
    code, out, err = await run_cli("shards", "plan", "--config", config)
    assert code == 0, err
    assert (
        f"plan to epoch 2: {len(moving)} of {len(merchant_ids)} merchants move "
        f"({100 * len(moving) / len(merchant_ids):.1f}%)"
    ) in out, out
    pairs = Counter((ShardRing(old).shard_for(m), "shard-d") for m in moving)
    for (source, destination), merchants in pairs.items():
        assert re.search(rf"{source} -> {destination}: {merchants} merchants, \d+ accounts", out)

    code, out, err = await run_cli("shards", "rebalance", "--config", config)
    print(f"\n{out}{err}(CLI rebalance took {time.monotonic() - started:.1f} s with the plan)")
    assert code == 0, out + err
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert len(progress) == len(moving), err
    assert f"{len(moving)}/{len(moving)}" in progress[-1]
    assert all(re.search(r": moved, \d+ rows, pause \d+\.\d ms$", line) for line in progress), err
    assert re.search(rf"^moved {len(moving)} merchants, \d+ rows copied, in ", out, re.M), out
    assert re.search(r"merchants/s\)", out), out
    assert re.search(r"write pause per merchant: p50 \d+\.\d ms, p99 \d+\.\d ms", out), out

    # The running replica reports its config epoch to every shard every few seconds.
    await ledger4.service.server.recovery.refresh_gauges()
    code, out, err = await run_cli("shards", "status", "--config", config)
    assert code == 0, err
    shard_lines = [line for line in out.splitlines() if not line.startswith("  ")]
    assert [line.split(":")[0] for line in shard_lines] == list(ALL_SHARDS), out
    assert all(re.match(r"shard-[a-d]: epoch 2, merchants ", line) for line in shard_lines), out
    replica_lines = [line for line in out.splitlines() if line.startswith("  replica ")]
    assert replica_lines and all(line.endswith("config epoch 2") for line in replica_lines), out
    assert "in progress" not in out and "WARNING" not in out, out

    code, out, err = await run_cli("shards", "cleanup", "--config", config)
    assert code == 0, err
    match = re.search(r"removed old copies of (\d+) merchants \((\d+) rows\)", out)
    assert match is not None, out
    assert int(match.group(1)) == len(moving) and int(match.group(2)) > 0, out
    code, out, err = await run_cli("shards", "rebalance", "--config", config)
    assert code == 0 and out.startswith("moved 0 merchants"), out + err

    assert await all_balances(service, merchant_ids) == before


async def test_a_checkpoint_in_progress_is_not_taken_for_a_rebalance(ledger4: Ledger4) -> None:
    """Chaos seed 242: `ledger shards cleanup` after a run failed with "another
    `ledger shards rebalance` or `cleanup` is running (it holds shard-c)" while
    none was: a replica's hash-chain checkpoint was in progress there, and its
    lock had the admin lock's key. Reconcile took it for a move in progress too."""
    service = ledger4.service
    config = service.cluster.config
    shard = service.cluster.shards["shard-c"]
    async with shard.pool.acquire() as checkpointer, shard.pool.acquire() as reader:
        async with checkpointer.transaction():
            assert await checkpointer.fetchval(chain_sql.TRY_CHECKPOINT_LOCK)
            assert not await reader.fetchval(saga_sql.ADMIN_LOCK_HELD)
            async with opened(config) as rebalancer:
                summary = await rebalancer.rebalance()
                assert summary.finished, summary.render()
                await rebalancer.cleanup()
                # Reconcile sees the admin lock while a rebalance or cleanup holds it,
                # and never the checkpoint's.
                assert await reader.fetchval(saga_sql.ADMIN_LOCK_HELD) is False
                async with rebalancer.exclusive():
                    assert await reader.fetchval(saga_sql.ADMIN_LOCK_HELD)


def test_a_summary_names_the_shards_it_let_go_beside_what_is_left_to_do() -> None:
    """RETIRED and REMOVED are said whatever else the run leaves (chaos seed 294: a run
    that retired a shard exited 1 for a merchant elsewhere waiting to move)."""
    summary = Summary(retired=["shard-d"], removed=["shard-e"])
    lines = summary.render().splitlines()
    assert lines[1:] == [
        "RETIRED shard-d: holds nothing and every event consumer has its stream; the service "
        "routes nothing to it",
        "REMOVED shard-e: holds nothing; it is no longer part of the cluster",
    ]
    assert summary.finished

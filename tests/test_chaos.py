"""The chaos bank workload (chaos/): a seed fixes the whole plan, the checker catches
broken books, and short seeded runs under replica kills, shard stops, partitions, slow
shards and a killed rebalance find no violation."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from chaos import cluster as chaos_cluster
from chaos.checker import (
    CheckReport,
    Effect,
    Snapshot,
    TransferRow,
    check_entries,
    check_final_settles,
    check_history,
    check_reversals,
    open_holds_in,
)
from chaos.clients import (
    Caller,
    CallResult,
    ItemAnswer,
    OpRecord,
    _chain_of_merchants,
    send_operation,
)
from chaos.cluster import DRAIN_DEADLINE_S, REBALANCE_DEADLINE_S, ChaosCluster
from chaos.events import StreamState, compare_books
from chaos.holds import (
    SETTLES_IN_FLIGHT_MAX,
    Hold,
    holds_moves_wait_for,
    settle_holds,
    settle_operation,
)
from chaos.nemesis import FaultRecord, Nemesis
from chaos.plan import Action, Fault, FaultKind, Operation, Ref, TransferSpec, plan_run
from chaos.publisher import Published, compare_published
from chaos.run import unfinished_rebalances
from ledger.domain.transfers import PendingState
from ledger.telemetry.redaction import redact
from ledger.v1 import ledger_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
# Seed 33's first 20 s hold every fault kind, overlapping: a partition of one shard
# while another is stopped, and each replica killed in turn.
SEED = 33
DURATION_S = 20.0
CLIENTS = 4
# Start-up (three PostgreSQL servers, two replicas), 20 s of workload, healing, the
# wait for sagas and the checks take about 35 s on the 2-core development machine.
RUN_TIMEOUT_S = 80.0
# With rebalances and drains, a run may also spend each admin workflow's own
# deadline (a rebalance there and back, a drain and the move back), which a busy
# machine can reach: the bound is those deadlines on top of an ordinary run.
MOVES_RUN_TIMEOUT_S = RUN_TIMEOUT_S + DRAIN_DEADLINE_S + 4 * REBALANCE_DEADLINE_S
# A run stopped with SIGINT kills its replicas and stops its PostgreSQL servers.
CLEANUP_TIMEOUT_S = 30.0


def test_same_seed_plans_the_same_faults_and_operations() -> None:
    first = plan_run(seed=SEED, duration_s=DURATION_S, clients=CLIENTS)
    second = plan_run(seed=SEED, duration_s=DURATION_S, clients=CLIENTS)

    assert first.faults == second.faults
    assert first.operations == second.operations
    assert first.layout == second.layout
    assert first.digest() == second.digest()
    # Rebalances and drains are planned only when asked for (--rebalances, --drains).
    assert {f.fault for f in first.faults} == set(FaultKind) - {
        FaultKind.REBALANCE,
        FaultKind.DRAIN,
    }
    assert all(0 < f.at_s and f.at_s + f.duration_s <= DURATION_S for f in first.faults)
    other = plan_run(seed=SEED + 1, duration_s=DURATION_S, clients=CLIENTS)
    assert other.faults != first.faults
    assert other.operations != first.operations


# The digests of seed 33's plan and of seed 2's with --rebalances (the two runs
# below), as planned without drains: --drains must leave them as they are. (Renewed
# when the workload changed: chains over two merchants of one shard, 2026-12-07;
# reversals, and a paired chain's first member naming both merchants, 2026-12-07.)
PLAN_DIGESTS_BEFORE_DRAINS = {
    (33, False): "6ffb424eed3808f3444b07a46529d869dd83f1289a5d42a3525609051b9f9be8",
    (2, True): "acfe8a5d0a99290b04f6866ff772f43d1b21efd60f619b2c8cb0691dc2e1ce62",
}


def test_plans_without_drains_are_those_planned_before_drains_existed() -> None:
    for (seed, rebalances), digest in PLAN_DIGESTS_BEFORE_DRAINS.items():
        plan = plan_run(seed=seed, duration_s=DURATION_S, clients=CLIENTS, rebalances=rebalances)
        assert plan.digest() == digest, (seed, rebalances)
        assert FaultKind.DRAIN not in {f.fault for f in plan.faults}
    # With --drains, drains share the rebalances' lane: never two at once.
    plan = plan_run(seed=7, duration_s=600.0, clients=CLIENTS, rebalances=True, drains=True)
    admin = [f for f in plan.faults if f.fault in (FaultKind.REBALANCE, FaultKind.DRAIN)]
    assert {FaultKind.REBALANCE, FaultKind.DRAIN} <= {f.fault for f in admin}
    for earlier, later in itertools.pairwise(admin):
        assert earlier.at_s + earlier.duration_s < later.at_s, (earlier, later)


def test_plans_hold_chains_over_two_merchants_of_one_shard() -> None:
    """A rebalance may part them: such a chain must be refused or fail whole, never be
    applied in part (the checker's linked-chain check)."""
    plan = plan_run(seed=SEED, duration_s=DURATION_S, clients=CLIENTS, rebalances=True)
    paired = [o for client in plan.operations for o in client if o.kind.startswith("chain_pair")]
    assert paired
    for operation in paired:
        refs = [r for t in operation.transfers for r in (t.debit, t.credit) if r is not None]
        merchants = {r.merchant_id for r in refs}
        assert len(merchants) == 2, operation
        assert len({plan.layout.shard_of(m) for m in merchants}) == 1, operation
        assert [t.linked for t in operation.transfers][-1] is False, operation
        assert all(t.linked for t in operation.transfers[:-1]), operation
        assert _chain_of_merchants(operation)


class _RefusingCaller(Caller):
    """Answers every call as the service refuses a chain whose merchants are apart."""

    def __init__(self) -> None:
        super().__init__([], jitter=random.Random(0))

    async def call(self, method: str, request: Any, **_: Any) -> CallResult:
        return CallResult(
            attempts=1, error="FAILED_PRECONDITION: all transfers of a linked chain must live..."
        )


async def test_a_chain_over_two_merchants_refused_whole_is_a_refusal_not_an_error() -> None:
    """FAILED_PRECONDITION (LINKED_CHAIN_SPANS_SHARDS) is the answer to a chain whose
    merchants are apart (or its replay); for a chain of one merchant it is an error."""
    second = replace(_SPEC, id="t2")
    apart = replace(second, credit=Ref("m2", "usd-wallet-0"))
    outcomes = {}
    for kind, transfers in (
        ("chain", (replace(_SPEC, linked=True), second)),
        ("chain_pair", (replace(_SPEC, linked=True), apart)),
        ("replay", (replace(_SPEC, linked=True), apart)),
    ):
        record = await send_operation(
            _RefusingCaller(), Operation("c0-1", 0, kind, transfers, 0), now_s=lambda: 0.0
        )
        outcomes[kind] = (record.outcome, bool(record.error))
    assert outcomes == {
        "chain": ("error", True),
        "chain_pair": ("refused", False),
        "replay": ("refused", False),
    }


# How long a gated call waits for the others (the settles arrive at once).
GATE_WAIT_S = 10.0


class _GatedCaller(Caller):
    """Answers OK once SETTLES_IN_FLIGHT_MAX calls are in flight at once."""

    def __init__(self) -> None:
        super().__init__([], jitter=random.Random(0))
        self.in_flight = self.most = 0
        self.full = asyncio.Event()

    async def call(self, method: str, request: Any, **_: Any) -> CallResult:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight == SETTLES_IN_FLIGHT_MAX:
            self.full.set()
        # Fails (TimeoutError) if the settles were sent one at a time.
        await asyncio.wait_for(self.full.wait(), timeout=GATE_WAIT_S)
        self.in_flight -= 1
        results = [pb.CreateTransferResult(result=OK) for _ in request.transfers]
        return CallResult(response=pb.CreateTransfersResponse(results=results), attempts=1)


async def test_settles_run_several_at_once_and_are_recorded_in_the_holds_order() -> None:
    holds = [
        Hold(f"t{n:02d}", Ref("m1", "usd-wallet-0"), Ref("m2", "usd-wallet-0"), "USD")
        for n in reversed(range(2 * SETTLES_IN_FLIGHT_MAX + 3))
    ]
    caller = _GatedCaller()
    records = await settle_holds(caller, holds, suffix="s", kind="end_settle", now_s=lambda: 0.0)
    assert caller.most == SETTLES_IN_FLIGHT_MAX
    assert [r.op.transfers[0].pending_id for r in records] == sorted(h.transfer_id for h in holds)
    assert {r.outcome for r in records} == {"ok"}


# The checker, on hand-made books: one local transfer of 100 from a to b.

_A = Ref("m1", "usd-wallet-0")
_B = Ref("m1", "usd-wallet-1")
_KEY = ("m1", "t1")
OK = pb.TRANSFER_RESULT_OK
_SPEC = TransferSpec("t1", _A, _B, 100, "USD", Action.POST)


def _books(*, entries_applied: int = 1) -> Snapshot:
    snapshot = Snapshot()
    snapshot.transfers[_KEY] = TransferRow(
        "shard-a", _KEY, 1, 1, _A, _B, 100, 100, "USD", "", 0, False, pb.TRANSFER_RESULT_OK
    )
    snapshot.entries[(_A, _KEY)] = Effect(debits_posted=100 * entries_applied)
    snapshot.entries[(_B, _KEY)] = Effect(credits_posted=100 * entries_applied)
    return snapshot


def _answered(spec: TransferSpec, result: int, op_id: str = "c0-1") -> OpRecord:
    operation = Operation(op_id, 0, "local", (spec,), 0)
    return OpRecord(operation, 0.0, 0.1, 1, (ItemAnswer(result, False),), "ok")


def test_checker_passes_books_that_match_the_answers() -> None:
    report = CheckReport()
    check_entries(_books(), report)
    check_history(_books(), [_answered(_SPEC, pb.TRANSFER_RESULT_OK)], report)
    assert report.violations == []


def test_checker_flags_a_transfer_applied_twice() -> None:
    report = CheckReport()
    check_entries(_books(entries_applied=2), report)
    assert {v.check for v in report.violations} == {"idempotency"}
    assert len(report.violations) == 2  # one per account


def test_checker_flags_an_acknowledged_transfer_that_is_lost_or_different() -> None:
    lost = CheckReport()
    check_history(Snapshot(), [_answered(_SPEC, pb.TRANSFER_RESULT_OK)], lost)
    assert [v.check for v in lost.violations] == ["acknowledged"]

    refused = CheckReport()
    check_history(_books(), [_answered(_SPEC, pb.TRANSFER_RESULT_EXCEEDS_CREDITS)], refused)
    assert [v.check for v in refused.violations] == ["acknowledged"]


def _reversal(transfer_id: str, amount_minor: int, *, credit: Ref = _A) -> TransferRow:
    """m1's usd-wallet-1 -> credit, reversing t1 (usd-wallet-0 -> usd-wallet-1, 100)."""
    key = ("m1", transfer_id)
    return TransferRow(
        "shard-a",
        key,
        1,
        1,
        _B,
        credit,
        amount_minor,
        amount_minor,
        "USD",
        "",
        0,
        False,
        OK,
        reversal_of="t1",
    )


def test_checker_flags_reversals_beyond_the_original_or_between_other_accounts() -> None:
    snapshot = _books()
    for row in (_reversal("r1", 60), _reversal("r2", 40)):
        snapshot.transfers[row.key] = row
    report = CheckReport()
    check_reversals(snapshot, report)
    assert report.violations == []
    assert report.notes == ["reversals: {'TRANSFER_RESULT_OK': 2}, of 1 originals"]

    for row in (_reversal("r3", 1), _reversal("r4", 1, credit=Ref("m1", "usd-wallet-2"))):
        snapshot.transfers[row.key] = row
    report = CheckReport()
    check_reversals(snapshot, report)
    assert [(v.check, v.where) for v in report.violations] == [
        ("reversals", "reversal m1/r3 of t1"),
        ("reversals", "reversal m1/r4 of t1"),
    ]


def test_checker_flags_a_linked_chain_applied_in_part() -> None:
    snapshot = _books()
    second = ("m1", "t2")
    snapshot.transfers[second] = TransferRow(
        "shard-a",
        second,
        1,
        1,
        _B,
        _A,
        5,
        0,
        "USD",
        "",
        0,
        False,
        pb.TRANSFER_RESULT_EXCEEDS_CREDITS,
    )
    chain = (
        TransferSpec("t1", _A, _B, 100, "USD", Action.POST, linked=True),
        TransferSpec("t2", _B, _A, 5, "USD", Action.POST),
    )
    record = OpRecord(Operation("c0-1", 0, "chain", chain, 0), 0.0, 0.1, 1, None, "unknown")
    report = CheckReport()
    check_history(snapshot, [record], report)
    assert "linked chains" in {v.check for v in report.violations}


def _event(
    event_id: str, shard: str, position: int, *entries: tuple[str, int, int, int]
) -> pb.Event:
    """An event with entries (account id, sequence, credit posted amount, credits after)."""
    return pb.Event(
        event_id=event_id,
        shard=shard,
        position=position,
        kind=pb.EVENT_KIND_TRANSFER_POSTED,
        entries=[
            pb.EventEntry(
                account=pb.AccountRef(merchant_id="m1", account_id=account_id),
                sequence=sequence,
                direction=pb.DIRECTION_CREDIT,
                kind=pb.ENTRY_KIND_POSTED,
                amount_minor=amount_minor,
                credits_posted=credits_after,
            )
            for account_id, sequence, amount_minor, credits_after in entries
        ],
    )


def _created(event_id: str, shard: str, position: int, account_id: str) -> pb.Event:
    return pb.Event(
        event_id=event_id,
        shard=shard,
        position=position,
        kind=pb.EVENT_KIND_ACCOUNT_CREATED,
        account=pb.Account(ref=pb.AccountRef(merchant_id="m1", account_id=account_id)),
    )


def test_event_check_passes_a_complete_stream_delivered_twice_in_part() -> None:
    state = StreamState()
    stream = [
        _created("e1", "shard-a", 1, "cash"),
        _event("e2", "shard-a", 2, ("cash", 1, 100, 100)),
        _event("e3", "shard-a", 3, ("cash", 2, 50, 150)),
    ]
    # A client resuming from an older cursor sees events again: dropped by id.
    taken = [state.take(e) for e in (*stream, stream[1], stream[2])]
    assert taken == [True, True, True, False, False]
    assert state.duplicates == 2 and state.problems == []
    report = CheckReport()
    assert compare_books(state, {("m1", "cash"): (0, 150, 0, 0)}, report) == 0
    assert report.violations == []


def test_event_check_flags_gaps_reordering_and_balances_the_shard_does_not_hold() -> None:
    state = StreamState()
    state.take(_created("e1", "shard-a", 1, "cash"))
    state.take(_event("e3", "shard-a", 3, ("cash", 2, 50, 150)))  # position 2 missing
    state.take(_event("e2", "shard-a", 2, ("cash", 1, 100, 100)))  # late: reordered
    state.take(_event("e4", "shard-a", 4, ("cash", 3, 10, 999)))  # says the wrong balance
    state.take(_event("e2", "shard-a", 5))  # a known id at another position
    details = [(check, detail.split(":")[0]) for check, _, detail in state.problems]
    assert details == [
        ("events order", "gap"),
        ("events order", "gap"),  # entry 2 of cash before its entry 1
        ("events order", "reordered"),
        ("events order", "reordered"),
        ("events balances", "entry 3 says balances (0, 999, 0, 0), but the previous (0, 150, 0, 0) and its ENTRY_KIND_POSTED DIRECTION_CREDIT of 10 make (0, 160, 0, 0)"),  # noqa: E501
        ("events order", "delivered as shard-a#5, first as shard-a#2"),
    ]  # fmt: skip
    report = CheckReport()
    stored = {("m1", "cash"): (0, 160, 0, 0), ("m1", "sales"): (0, 0, 0, 0)}
    assert compare_books(state, stored, report) == 1
    assert [(v.check, v.where) for v in report.violations] == [
        ("events balances", "m1/cash"),
        ("events complete", "m1/sales"),  # stored, but never created in the stream
    ]


def test_published_check_passes_every_event_at_least_once_and_flags_the_rest() -> None:
    seen = {"e1": ("shard-a", 1), "e2": ("shard-a", 2), "e3": ("shard-b", 1)}
    complete = [
        Published("e1", "shard-a", 1),
        Published("e3", "shard-b", 1),
        Published("e2", "shard-a", 2),
        Published("e2", "shard-a", 2),  # sent again after a kill: dropped by id
    ]
    report = CheckReport()
    assert compare_published(complete, seen, report) == 1
    assert report.violations == []

    wrong = [
        Published("e1", "shard-a", 1),
        Published("e1", "shard-b", 7),  # a known id at another place
        Published("e2", "shard-a", 3),  # not where the stream delivered it
        Published("e9", "shard-a", 9),  # never in the stream
    ]  # e3 never published
    report = CheckReport()
    compare_published(wrong, seen, report)
    assert [(v.where, v.detail.split(",")[0]) for v in report.violations] == [
        ("event e1", "published as shard-b#7"),
        ("event e2", "published as shard-a#3"),
        ("event e9", "published as shard-a#9"),
        ("shard shard-b", "event e3 (#1) never published"),
    ]


def test_event_check_keys_settlement_accounts_by_shard() -> None:
    state = StreamState()
    for shard in ("shard-a", "shard-b"):
        state.take(
            pb.Event(
                event_id=f"s-{shard}",
                shard=shard,
                position=1,
                kind=pb.EVENT_KIND_SAGA_STEP,
                entries=[
                    pb.EventEntry(
                        account=pb.AccountRef(merchant_id="$settlement", account_id="USD"),
                        sequence=1,
                        direction=pb.DIRECTION_DEBIT,
                        kind=pb.ENTRY_KIND_PENDING,
                        amount_minor=7,
                        debits_pending=7,
                    )
                ],
            )
        )
    assert state.problems == []
    report = CheckReport()
    stored = {
        ("$settlement@shard-a", "USD"): (0, 0, 7, 0),
        ("$settlement@shard-b", "USD"): (0, 0, 0, 0),
    }
    assert compare_books(state, stored, report) == 1
    assert [v.where for v in report.violations] == ["$settlement@shard-b/USD"]


def test_checker_flags_a_hold_that_would_not_settle_at_the_end() -> None:
    snapshot = Snapshot()
    key = ("m1", "p1")
    snapshot.transfers[key] = TransferRow(
        "shard-a", key, 1, Action.PENDING, _A, _B, 100, 100, "USD", "", 0, False, OK
    )
    holds = open_holds_in(snapshot)
    assert [h.key for h in holds] == [key]
    settle = settle_operation(holds[0], suffix="end", kind="end_settle", replica=0)
    (spec,) = settle.transfers
    assert spec.pending_id == "p1" and spec.debit == _A
    not_found = pb.TRANSFER_RESULT_PENDING_TRANSFER_NOT_FOUND
    refused = OpRecord(settle, 0.0, 0.1, 1, (ItemAnswer(not_found, False),), "refused")

    report = CheckReport()
    check_final_settles(snapshot, holds, [refused], report)
    # The refused settle, and the hold it left open.
    assert [v.check for v in report.violations] == ["holds", "holds"]

    snapshot.resolutions[key] = PendingState.VOIDED
    settled = OpRecord(settle, 0.0, 0.1, 1, (ItemAnswer(OK, False),), "ok")
    report = CheckReport()
    check_final_settles(snapshot, holds, [settled], report)
    assert report.violations == []


# A drain, with `ledger shards rebalance` played by a script: what the drain does
# with what the command says.
_DRAINING = (
    "moved 0 merchants, 0 rows copied\nDRAINING shard-a: still holds 1 settlement account(s)"
)
_DRAINED = "moved 0 merchants, 0 rows copied\nDRAINED shard-a: holds nothing"
# Chaos seed 229: the drain was done, but the same run deferred another shard's
# merchant for a hold settled later, so it exited 1.
_DRAINED_OTHER_MOVE_DEFERRED = (
    "moved 0 merchants, 0 rows copied\n"
    "NOT MOVED s229-m10 shard-b -> shard-c: deferred: a cross-shard hold's path would "
    "repeat a relay step or pass 16 relays; it moves once the hold settles (rerun to finish)\n"
    "DRAINED shard-a: holds nothing"
)


_RETIRED = (
    "moved 0 merchants, 0 rows copied\n"
    "RETIRED shard-a: holds nothing and every event consumer has its stream; the service "
    "routes nothing to it"
)
# Chaos seed 294: the retiring run exits 1 for a merchant moving between two other
# shards that waits for a hold; shard-a is retired all the same.
_RETIRED_OTHER_MOVE_DEFERRED = (
    "moved 0 merchants, 0 rows copied\n"
    "NOT MOVED s294-m3 shard-c -> shard-b: deferred: cross-shard hold c4-1675 of s294-m1: "
    "its path would repeat a relay step or pass 16 relays; it moves once that hold settles "
    "(rerun to finish)\n"
    "RETIRED shard-a: holds nothing and every event consumer has its stream; the service "
    "routes nothing to it"
)
_CONSUMER_BEHIND = (
    "error: shard shard-a's event stream is not acknowledged to its end by "
    "'chaos-books' (3 events): let them catch up"
)


def _scripted_drain(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    drained_on_run: int | None,
    drained_answer: tuple[int, str] = (0, _DRAINED),
    retire_answers: list[tuple[int, str]] | None = None,
    draining_answer: str = _DRAINING,
    waiting: dict[int, list[tuple[str, str]]] | None = None,
) -> tuple[FaultRecord, ChaosCluster, list[int]]:
    """Runs one drain fault of shard-a against a cluster whose rebalance says DRAINED
    on run drained_on_run (never if None; draining_answer before) and answers the
    retire with retire_answers in turn (default: at once); returns its record, the
    cluster, and the rounds after which the drain settled what pins the shard
    (waiting, if given, gets per round the holds the summary said moves wait for)."""
    cluster = ChaosCluster(tmp_path)
    monkeypatch.setattr(cluster, "write_configs", lambda: None)
    monkeypatch.setattr(chaos_cluster, "REBALANCE_RETRY_PAUSE_S", 0.0)
    waiting = {} if waiting is None else waiting
    drain_runs = 0
    retiring = list(retire_answers or [(0, _RETIRED)])

    async def admin(
        *args: str, kill_after_s: float | None, direct: bool = False
    ) -> tuple[int, str]:
        nonlocal drain_runs
        if "retired" in cluster.states.values():
            return retiring.pop(0) if len(retiring) > 1 else retiring[0]
        if "draining" not in cluster.states.values():
            return 0, "moved 2 merchants, 10 rows copied"  # moving back
        drain_runs += 1
        return drained_answer if drain_runs == drained_on_run else (1, draining_answer)

    monkeypatch.setattr(cluster, "_admin", admin)
    nemesis = Nemesis(
        cluster,
        (Fault(1.0, FaultKind.DRAIN, "shard-a", 0.01),),
        caller=Caller([], jitter=random.Random(0)),
    )
    settled_after: list[int] = []

    async def settle_pinning(
        record: FaultRecord, index: int, round_number: int, summary: tuple[str, ...]
    ) -> str:
        settled_after.append(round_number)
        waiting[round_number] = holds_moves_wait_for(summary, source="shard-a")
        return "settled"

    monkeypatch.setattr(nemesis, "_settle_pinning", settle_pinning)
    asyncio.run(nemesis._inject(nemesis.records[0]))
    return nemesis.records[0], cluster, settled_after


@pytest.mark.timeout(10)
def test_a_drain_reruns_the_rebalance_until_it_says_drained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, cluster, settled_after = _scripted_drain(tmp_path, monkeypatch, drained_on_run=3)

    assert record.error == ""
    assert record.drain is not None and record.drain.finished
    assert record.drain.runs == ("exit 1 (moved 0 merchants)",) * 2 + (
        "exit 0 (moved 0 merchants)",
    )
    assert settled_after == [1, 2]
    assert record.violations == []
    # Drained at epoch 2, retired (epoch 3), then active again (epoch 4) with
    # merchants moved back.
    assert "; retired: epoch 3: exit 0 (moved 0 merchants);" in record.detail
    assert "active again: epoch 4: exit 0 (moved 2 merchants)" in record.detail
    assert cluster.states == dict.fromkeys(cluster.shards, "active")


@pytest.mark.timeout(10)
def test_a_drain_is_done_when_its_shard_is_drained_though_another_move_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run that says DRAINED exits 1 for a move between two other shards that
    waits for a hold (chaos seed 229 reported the drain as a violation, with the
    shard empty): the drain is judged by what the summary says of its shard."""
    record, cluster, settled_after = _scripted_drain(
        tmp_path,
        monkeypatch,
        drained_on_run=2,
        drained_answer=(1, _DRAINED_OTHER_MOVE_DEFERRED),
    )

    assert record.drain is not None and record.drain.finished
    assert record.violations == [] and record.error == ""
    assert settled_after == [1]
    assert "; retired: epoch 3: exit 0 (moved 0 merchants);" in record.detail
    assert cluster.states == dict.fromkeys(cluster.shards, "active")


# Chaos seed 272: two of the draining shard's merchants waited for holds whose
# paths would repeat a relay step; the drain settled only the holds the shard
# relays, and was not DRAINED in 80 s.
_DRAINING_MOVES_WAIT_FOR_HOLDS = (
    "moved 0 merchants, 4526 rows copied\n"
    "NOT MOVED s272-m0 shard-a -> shard-c: deferred: cross-shard hold c0-1347 of s272-m0: "
    "its path would repeat a relay step or pass 16 relays; it moves once that hold settles "
    "(rerun to finish)\n"
    "NOT MOVED s272-m2 shard-a -> shard-c: deferred: cross-shard hold c5-664 of s272-m9: "
    "its path would repeat a relay step or pass 16 relays; it moves once that hold settles "
    "(rerun to finish)\n"
    "NOT MOVED s272-m5 shard-b -> shard-c: deferred: cross-shard hold c1-1 of s272-m5: "
    "its path would repeat a relay step or pass 16 relays; it moves once that hold settles "
    "(rerun to finish)\n"
    # Chaos seed 305: a move waiting for several holds names them all.
    "NOT MOVED s305-m3 shard-a -> shard-c: deferred: cross-shard holds c4-1199 of s305-m6, "
    "c4-1178 of s305-m3: their paths would repeat a relay step or pass 16 relays; it moves "
    "once those holds settle (rerun to finish)\n"
    "DRAINING shard-a: still holds 2 merchant(s), 22 settlement account(s) with money "
    "pending for holds in flight or relayed through it; rerun once they settle"
)


@pytest.mark.timeout(10)
def test_a_drain_settles_the_holds_its_merchants_moves_wait_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting: dict[int, list[tuple[str, str]]] = {}
    record, _, settled_after = _scripted_drain(
        tmp_path,
        monkeypatch,
        drained_on_run=2,
        draining_answer=_DRAINING_MOVES_WAIT_FOR_HOLDS,
        waiting=waiting,
    )

    assert record.drain is not None and record.drain.finished
    assert settled_after == [1]
    # The holds the draining shard's moves wait for; not the other shard's.
    assert waiting == {
        1: [
            ("s272-m0", "c0-1347"),
            ("s272-m9", "c5-664"),
            ("s305-m6", "c4-1199"),
            ("s305-m3", "c4-1178"),
        ]
    }


@pytest.mark.timeout(10)
def test_a_drained_shard_retires_once_the_event_consumer_has_its_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retire is refused (exit 2) while the run's event subscriber has not
    acknowledged the shard's stream to its end; it is run again until it passes."""
    record, cluster, _ = _scripted_drain(
        tmp_path,
        monkeypatch,
        drained_on_run=1,
        retire_answers=[(2, _CONSUMER_BEHIND), (2, _CONSUMER_BEHIND), (0, _RETIRED)],
    )
    assert record.error == "" and record.violations == []
    assert "; retired: epoch 3: exit 2" in record.detail
    assert "exit 0 (moved 0 merchants); active again: epoch 4" in record.detail
    assert cluster.states == dict.fromkeys(cluster.shards, "active")


@pytest.mark.timeout(10)
def test_a_shard_is_retired_when_the_run_says_so_though_another_move_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deadline already passed: the first run must count, or it is a violation.
    monkeypatch.setattr(chaos_cluster, "REBALANCE_DEADLINE_S", 0.0)
    record, cluster, _ = _scripted_drain(
        tmp_path, monkeypatch, drained_on_run=1, retire_answers=[(1, _RETIRED_OTHER_MOVE_DEFERRED)]
    )
    assert record.error == "" and record.violations == []
    assert "; retired: epoch 3: exit 1 (moved 0 merchants); active again" in record.detail
    assert cluster.states == dict.fromkeys(cluster.shards, "active")


@pytest.mark.timeout(10)
def test_a_shard_never_retired_is_a_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chaos_cluster, "REBALANCE_DEADLINE_S", 0.0)
    record, cluster, _ = _scripted_drain(
        tmp_path, monkeypatch, drained_on_run=1, retire_answers=[(2, _CONSUMER_BEHIND)]
    )
    assert [v[0] for v in record.violations] == ["retire shard-a"]
    assert "not retired within the deadline" in record.violations[0][1]
    # It is made active again all the same, as the run's end expects.
    assert cluster.states == dict.fromkeys(cluster.shards, "active")


def _rebalance_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outputs: list[tuple[int, str]]
) -> str:
    """ChaosCluster.rebalance's report when `ledger shards rebalance` runs answer
    (exit code, output) in turn."""
    cluster = ChaosCluster(tmp_path)
    monkeypatch.setattr(cluster, "write_configs", lambda: None)
    monkeypatch.setattr(chaos_cluster, "REBALANCE_RETRY_PAUSE_S", 0.0)

    async def admin(
        *args: str, kill_after_s: float | None, direct: bool = False
    ) -> tuple[int, str]:
        return outputs.pop(0)

    monkeypatch.setattr(cluster, "_admin", admin)
    return asyncio.run(cluster.rebalance(dict.fromkeys(cluster.shards, 1), kill_after_s=None))


@pytest.mark.timeout(10)
def test_a_rebalance_reports_what_every_run_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run that moves merchants and exits 1 (one deferred), then a rerun that
    moves none and exits 0: the moves of the first run are in the report (CI once saw
    only the last run's 0 and the drain test failed)."""
    report = _rebalance_report(
        tmp_path,
        monkeypatch,
        [
            (1, "moved 2 merchants, 10 rows copied\nNOT moved: 1 merchant deferred"),
            (0, "moved 0 merchants, 0 rows copied"),
        ],
    )

    assert report == "epoch 2: exit 1 (moved 2 merchants), exit 0 (moved 0 merchants)"
    assert sum(int(n) for n in _MOVED.findall(report)) == 2


@pytest.mark.timeout(10)
def test_rebalances_left_unfinished_at_their_deadline_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebalance whose moves wait for holds past its deadline is a liveness finding
    that the run's summary counts (chaos seeds 311 and 313: a rebalance back left
    unfinished behind a hold with no timeout), not only words in a fault's detail."""
    monkeypatch.setattr(chaos_cluster, "REBALANCE_DEADLINE_S", 0.0)
    deferred = (
        "moved 0 merchants, 0 rows copied\nNOT MOVED m2 shard-a -> shard-b: deferred: "
        "cross-shard hold c2-2069 of m6: its path would repeat a relay step"
    )
    unfinished = _rebalance_report(tmp_path, monkeypatch, [(1, deferred)])
    finished = _rebalance_report(tmp_path, monkeypatch, [(0, "moved 1 merchants, 5 rows")])
    rebalance = Fault(1.0, FaultKind.REBALANCE, "shard-b", 1.0)
    records = [
        FaultRecord(rebalance, detail=f"{finished}; back: {unfinished}"),
        FaultRecord(rebalance, detail=f"{unfinished}; back: {unfinished}"),
        FaultRecord(rebalance, detail=f"{finished}; back: {finished}"),
    ]
    assert unfinished_rebalances(records) == 3


@pytest.mark.timeout(10)
def test_a_rebalance_that_fails_after_moving_reports_its_moves_and_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose shard is stopped under it by another fault exits 1 without its
    summary, after moving a merchant; the rerun finds it moved and moves none. The
    drain test saw only the rerun's 0 (CI, 2026-12-05): the run's progress lines
    say what it moved, and its last line why it stopped."""
    report = _rebalance_report(
        tmp_path,
        monkeypatch,
        [
            (
                1,
                "[###############               ] 1/2 0.5/s, ~2s left | m1 shard-b->shard-a: "
                "moved, 10 rows, pause 3.0 ms\n"
                "[##############################] 2/2 0.9/s, ~0s left | m2 shard-c->shard-a: "
                "moved, 12 rows, pause 2.0 ms\n"
                "ShardUnavailable: shard shard-a is unavailable: ConnectionError",
            ),
            (0, "moved 0 merchants, 0 rows copied"),
        ],
    )

    assert report == (
        "epoch 2: exit 1 (moved 2 merchants) [ShardUnavailable: shard shard-a is unavailable: "
        "ConnectionError], exit 0 (moved 0 merchants)"
    )
    assert sum(int(n) for n in _MOVED.findall(report)) == 2


@pytest.mark.timeout(10)
def test_after_the_settles_a_deferred_move_is_finished_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's last rebalance can end with a merchant deferred for a hold that only
    the end settles release; the admin then reruns the rebalance at the same epoch,
    and cleans up (a chaos run once ended with the merchant `incoming` and its old
    copy's timeouts still counted, and reported both as violations)."""
    cluster = ChaosCluster(tmp_path)
    monkeypatch.setattr(chaos_cluster, "REBALANCE_RETRY_PAUSE_S", 0.0)
    outputs = [
        (1, "moved 0 merchants, 0 rows copied\nNOT MOVED m shard-b -> shard-c: deferred"),
        (0, "moved 1 merchants, 40 rows copied"),
        (0, "removed old copies of 1 merchants (40 rows)"),
    ]
    commands: list[tuple[str, ...]] = []

    async def admin(
        *args: str, kill_after_s: float | None, direct: bool = False
    ) -> tuple[int, str]:
        commands.append(args)
        return outputs.pop(0)

    monkeypatch.setattr(cluster, "_admin", admin)
    epoch = cluster.epoch
    report = asyncio.run(cluster.finish_moves())

    assert commands == [("shards", "rebalance"), ("shards", "rebalance"), ("shards", "cleanup")]
    assert cluster.epoch == epoch
    runs = "exit 1 (moved 0 merchants), exit 0 (moved 1 merchants)"
    assert report.startswith(f"epoch {epoch}: {runs}")
    assert "cleanup: removed old copies of 1 merchants" in report


@pytest.mark.timeout(10)
def test_a_cleanup_that_finds_the_admin_lock_held_is_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ledger shards cleanup` exits 2 while another admin run holds the lock (a
    killed rebalance's, until its server notices); the harness raised at once."""
    cluster = ChaosCluster(tmp_path)
    monkeypatch.setattr(chaos_cluster, "REBALANCE_RETRY_PAUSE_S", 0.0)
    outputs = [
        (2, "another `ledger shards rebalance` or `cleanup` is running (it holds shard-a)"),
        (0, "removed old copies of 2 merchants (50 rows)"),
    ]

    async def admin(
        *args: str, kill_after_s: float | None, direct: bool = False
    ) -> tuple[int, str]:
        assert args == ("shards", "cleanup")
        return outputs.pop(0)

    monkeypatch.setattr(cluster, "_admin", admin)
    assert asyncio.run(cluster.cleanup()) == "removed old copies of 2 merchants (50 rows)"
    assert outputs == []


@pytest.mark.timeout(10)
def test_a_drain_not_drained_by_its_deadline_is_a_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chaos_cluster, "DRAIN_DEADLINE_S", 0.0)
    record, cluster, _ = _scripted_drain(tmp_path, monkeypatch, drained_on_run=None)

    assert record.drain is not None and not record.drain.finished
    assert [where for where, _ in record.violations] == ["drain shard-a (epoch 2)"]
    assert "not DRAINED within the deadline" in record.violations[0][1]
    # Made active again all the same.
    assert cluster.states == dict.fromkeys(cluster.shards, "active")


def _run_chaos(
    tmp_path: Path,
    *,
    seed: int,
    rebalances: bool = False,
    drains: bool = False,
    amqp_url: str | None = None,
    workers: int = 1,
    run_timeout_s: float = RUN_TIMEOUT_S,
) -> dict[str, Any]:
    """Runs chaos.run as an operator would and returns its summary, having checked
    that it found no violation and ran the plan its seed fixes."""
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chaos.run",
            *("--seed", str(seed), "--duration-s", str(DURATION_S)),
            *("--clients", str(CLIENTS), "--json", str(summary_path)),
            *(("--rebalances",) if rebalances else ()),
            *(("--drains",) if drains else ()),
            *(("--amqp", amqp_url) if amqp_url else ()),
            *("--workers", str(workers)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=run_timeout_s)
    except subprocess.TimeoutExpired:
        # SIGINT, not SIGKILL: the runner still stops its replicas and PostgreSQL servers.
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=CLEANUP_TIMEOUT_S)
        pytest.fail(f"the chaos run took longer than {run_timeout_s}s:\n{output}")
    assert summary_path.exists(), output
    summary: dict[str, Any] = json.loads(summary_path.read_text())

    assert summary["violations"] == [], output
    assert summary["harness_errors"] == [], output
    assert summary["fault_errors"] == [], output
    assert process.returncode == 0, output
    # The run executed this process's plan of the same seed (planned in another
    # process, so nothing in planning depends on Python's per-process hashing).
    plan = plan_run(
        seed=seed, duration_s=DURATION_S, clients=CLIENTS, rebalances=rebalances, drains=drains
    )
    schedule = tuple(Fault(**{**f, "fault": FaultKind(f["fault"])}) for f in summary["schedule"])
    assert schedule == plan.faults
    assert summary["plan_digest"] == plan.digest()
    assert summary["faults_injected"] == len(plan.faults)
    return summary


@pytest.mark.timeout(RUN_TIMEOUT_S + CLEANUP_TIMEOUT_S + 10)
def test_short_chaos_run_finds_no_violation(tmp_path: Path) -> None:
    # Each replica as production runs it by default on this machine: a worker a core.
    summary = _run_chaos(tmp_path, seed=SEED, workers=2)

    # The workload did real work of every kind while the faults ran.
    for kind in ("local", "cross", "pending_local", "pending_cross", "chain", "replay"):
        assert summary["operations"][kind].get("ok", 0) > 0, kind
    assert summary["sagas"].get("TRANSFER COMPLETED", 0) > 0
    assert summary["sagas"].get("TRANSFER COMPENSATED", 0) > 0
    _assert_events_checked(summary, both_replicas_killed=True)
    # Both replicas checkpointed every shard under the first key and exported it; the
    # checks with the rotated keys passed (no violation).
    checkpoints = summary["checkpoints"]
    assert set(checkpoints) == set(summary["shards"]), checkpoints
    for shard, signed in checkpoints.items():
        assert signed.get("before", 0) > 0 and signed["exported_through"] > 0, (shard, signed)
        assert signed.get("none", 0) == 0, (shard, signed)


def _assert_events_checked(summary: dict[str, Any], *, both_replicas_killed: bool) -> None:
    """The event subscriber followed the run through its faults, and its events
    rebuilt every account's balances on every shard, arriving complete and in order
    (_run_chaos checked there was no violation: this checks the check ran)."""
    events = summary["events"]
    (note,) = [n for n in summary["checks"] if n.startswith("events: ")]
    assert note.endswith(": 0 differ"), note
    compared = _COMPARED.search(note)
    assert compared is not None, note
    # Every client account (2 merchants a shard, 6 accounts each) and settlement ones.
    assert int(compared.group(1)) > 36, note
    assert events["events"] > 200, events
    assert set(events["per_shard"]) == set(summary["shards"]), events
    assert sum(events["per_shard"].values()) == events["events"]
    if both_replicas_killed:
        # Whichever replica it followed was killed at some point: it resumed elsewhere.
        assert events["calls"] >= 2, events


_COMPARED = re.compile(r"rebuilt balances of (\d+) accounts")


# Seed 2 with --rebalances: shard-b's weight goes up 2.5 s in, the rebalance is
# SIGKILLed 820 ms into its run and run again, then the weight goes back, all
# while cross-shard sagas and holds run and a replica is killed.
REBALANCE_SEED = 2
_MOVED = re.compile(r"moved (\d+) merchants")


@pytest.mark.timeout(MOVES_RUN_TIMEOUT_S + CLEANUP_TIMEOUT_S + 10)
def test_short_chaos_run_with_a_killed_rebalance_finds_no_violation(tmp_path: Path) -> None:
    summary = _run_chaos(
        tmp_path, seed=REBALANCE_SEED, rebalances=True, run_timeout_s=MOVES_RUN_TIMEOUT_S
    )

    (rebalance,) = [f for f in summary["faults"] if "rebalance" in f["fault"]]
    assert "killed" in rebalance["detail"], rebalance
    out, back = rebalance["detail"].split("back:")
    # Merchants moved out and back again (moves with money in flight, not an empty plan).
    assert sum(int(n) for n in _MOVED.findall(out)) > 0, rebalance
    assert sum(int(n) for n in _MOVED.findall(back)) > 0, rebalance
    assert any(h.startswith("cleanup: removed old copies") for h in summary["healed_after_run"])
    for kind in ("local", "cross", "pending_cross"):
        assert summary["operations"][kind].get("ok", 0) > 0, kind
    assert summary["sagas"].get("TRANSFER COMPLETED", 0) > 0


# Seed 35 with --rebalances --drains: shard-a is drained 2.2 s in, while the clients
# write: its merchants move off, the holds it then relays are settled through the
# service, a rerun says DRAINED; 1.4 s later it is made active again and merchants
# move back; later a shard is stopped and another's weight goes up and back.
DRAIN_SEED = 35
_SETTLED = (
    "OK",
    "IN_PROGRESS",
    "PENDING_TRANSFER_ALREADY_POSTED",
    "PENDING_TRANSFER_ALREADY_VOIDED",
    "PENDING_TRANSFER_EXPIRED",
)


@pytest.mark.timeout(MOVES_RUN_TIMEOUT_S + CLEANUP_TIMEOUT_S + 10)
def test_short_chaos_run_drains_a_shard_under_load_and_settles_every_hold(
    tmp_path: Path,
) -> None:
    summary = _run_chaos(
        tmp_path,
        seed=DRAIN_SEED,
        rebalances=True,
        drains=True,
        run_timeout_s=MOVES_RUN_TIMEOUT_S,
    )

    (drain,) = [f for f in summary["faults"] if " drain " in f["fault"]]
    assert summary["drains"]["finished"] == 1, drain
    assert summary["drains"]["not_finished"] == 0, drain
    # It began while the clients wrote, and ended DRAINED (exit 0).
    assert drain["started_s"] < DURATION_S, drain
    drained, back = drain["detail"].split("active again:")
    assert "DRAINED shard-a: holds nothing" in drained, drain
    # Merchants moved off the draining shard, and back once it was active again.
    assert sum(int(n) for n in _MOVED.findall(drained)) > 0, drain
    assert sum(int(n) for n in _MOVED.findall(back)) > 0, drain
    assert summary["shard_states_at_end"] == dict.fromkeys(summary["shards"], "active")
    # Every hold left open at the end was settled through the service, posts and voids.
    settled = summary["holds_settled_at_end"]
    assert sum(settled.values()) > 0, settled
    assert all(outcome.split()[-1] in _SETTLED for outcome in settled), settled
    assert {outcome.split()[0] for outcome in settled} == {"end_settle_post", "end_settle_void"}
    assert any(note.endswith("; 0 left open") for note in summary["checks"]), summary["checks"]
    for kind in ("local", "cross", "pending_cross"):
        assert summary["operations"][kind].get("ok", 0) > 0, kind
    # The events followed the merchants across the moves and still rebuild the books.
    _assert_events_checked(summary, both_replicas_killed=False)
    kinds = summary["events"]["kinds"]
    assert kinds.get("MERCHANT_MOVED_OUT", 0) > 0 and kinds.get("MOVE_BOOKED", 0) > 0, kinds


AMQP_URL = os.environ.get("LEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BROKER_CONNECT_TIMEOUT_S = 5.0


def _broker_or_skip() -> None:
    async def connect() -> None:
        connection = await aio_pika.connect(AMQP_URL, timeout=BROKER_CONNECT_TIMEOUT_S)
        await connection.close()

    try:
        asyncio.run(connect())
    except CONNECTION_EXCEPTIONS as error:
        pytest.skip(f"no RabbitMQ at {redact(AMQP_URL)} (set LEDGER_TEST_AMQP_URL): {error!r}")


@pytest.mark.timeout(MOVES_RUN_TIMEOUT_S + CLEANUP_TIMEOUT_S + 10)
def test_short_chaos_run_with_the_amqp_publisher_publishes_every_event(tmp_path: Path) -> None:
    """`ledger events publish` rides out the faults of the drain run (a shard stopped,
    one drained, retired once the publisher, a registered consumer, has published
    its stream, and made active again), SIGKILLed twice on the way: its queue
    holds every event the subscriber took, at the same shard and position."""
    _broker_or_skip()
    summary = _run_chaos(
        tmp_path,
        seed=DRAIN_SEED,
        rebalances=True,
        drains=True,
        amqp_url=AMQP_URL,
        run_timeout_s=MOVES_RUN_TIMEOUT_S,
    )

    assert summary["drains"]["finished"] == 1, summary["faults"]
    published = summary["published"]
    assert published["kills"] == 2 and published["starts"] == 3, published
    # Stopped at the end with SIGTERM (the killed ones are not waited for).
    assert published["exit_codes"] == [0], published
    # Every event at least once (_run_chaos checked no violation: nothing missing).
    assert published["messages"] - published["duplicates_dropped"] == summary["events"]["events"]

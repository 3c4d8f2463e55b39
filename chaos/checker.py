"""After the run: wait until the cluster is quiet, then prove the books.

Read straight from every shard (asyncpg, one repeatable-read snapshot per shard,
taken once nothing moves any more) and through the service (LookupTransfers,
LookupAccounts), the checker proves:

- conservation: per currency, over every account of every shard, credits minus
  debits is zero, posted and pending alike;
- limits: no no-overdraft account has debits (posted + pending) above its posted
  credits (nor the mirror);
- velocity: no velocity rule of the few limited wallets (chaos/velocity.py) was
  ever exceeded over its exact window, from the moment it was set;
- acknowledgements: every answer a client got is what is stored (an OK transfer
  exists once with the amount and accounts that were sent; a refusal is
  recorded as that refusal), through the service too; a replay of an answered
  request says replayed; no id is ever answered EXISTS_WITH_DIFFERENT_FIELDS
  (the clients never reuse an id with other content);
- idempotency: each (merchant, transfer id) is stored at most once across all
  shards, only for requests a client sent, with the fields that were sent; each
  transfer's entries on each client account are exactly the effect its stored
  outcome calls for (so nothing applied twice, nothing half applied), and each
  account's balances are the sum of its entries;
- linked chains are all or nothing;
- reversals: each applied one reverses a posted transfer between its accounts,
  swapped, and the ones applied of one original never exceed what it posted,
  whether each ran on one shard or as a saga, wherever moves had put them;
- sagas: every saga is completed, compensated, or in the dead-letter list with
  its funds still pending; finished sagas agree with the credit shard's record;
- ledger.sagas.reconcile passes;
- holds settle (liveness): before the checks, every hold still open (a pending
  transfer OK and pending) is posted or voided through the service
  (chaos/holds.py); each settle must answer OK (or find the hold settled or
  expired already), no hold may be left open, and the settles are judged with
  the rest of the history (a void releases the hold, a post moves the money).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from chaos.clients import Caller, OpRecord
from chaos.holds import Hold, settle_failure, settle_holds
from chaos.plan import PENDING_TIMEOUT_MS_MAX, Layout, Ref, TransferSpec
from chaos.velocity import check_velocity
from ledger import limits
from ledger.domain.moves import MOVE_MERCHANT_ID
from ledger.domain.sagas import (
    SETTLEMENT_MERCHANT_ID,
    CreditAction,
    CreditOutcome,
    SagaKind,
    SagaState,
)
from ledger.domain.transfers import (
    Direction,
    EntryKind,
    PendingState,
    RecordKind,
    TransferAction,
    TransferResult,
)
from ledger.routing.cluster import Cluster
from ledger.routing.config import load_config
from ledger.sagas.reconcile import reconcile
from ledger.v1 import ledger_pb2 as pb

# After healing, sagas finish within a few retries (back-off capped at 1 s, leases
# of 2 s) and pending timeouts (at most 4 s) run out; past this the cluster is
# stuck, which is itself reported.
QUIESCE_DEADLINE_S = 60.0
QUIESCE_POLL_INTERVAL_S = 0.2
SHARD_CONNECT_TIMEOUT_S = 10.0
# Reading a whole shard (tens of thousands of rows in a long run) in one query.
SHARD_QUERY_TIMEOUT_S = 120.0
LOOKUP_REFS_PER_CALL = limits.refs_per_lookup_max

if not QUIESCE_DEADLINE_S > PENDING_TIMEOUT_MS_MAX / 1000 + limits.expiry_sweep_interval_s:
    raise AssertionError("the wait for quiet must outlast every pending timeout and its sweep")

TKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    where: str
    detail: str

    def describe(self) -> str:
        return f"[{self.check}] {self.where}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Effect:
    """What entries did to one account: posted debits/credits, net pending debits/credits."""

    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    def __add__(self, other: Effect) -> Effect:
        return Effect(
            self.debits_posted + other.debits_posted,
            self.credits_posted + other.credits_posted,
            self.debits_pending + other.debits_pending,
            self.credits_pending + other.credits_pending,
        )

    def __str__(self) -> str:
        return (
            f"debits_posted={self.debits_posted} credits_posted={self.credits_posted} "
            f"debits_pending={self.debits_pending} credits_pending={self.credits_pending}"
        )


@dataclass(frozen=True, slots=True)
class AccountRow:
    shard: str
    ref: Ref
    currency: str
    no_overdraft: bool
    no_credit_overdraft: bool
    balances: Effect


@dataclass(frozen=True, slots=True)
class TransferRow:
    shard: str
    key: TKey
    kind: int
    action: int
    debit: Ref
    credit: Ref
    amount_minor: int
    amount_effective_minor: int
    currency: str
    pending_id: str
    timeout_ms: int
    linked: bool
    result: int
    reversal_of: str = ""


@dataclass(frozen=True, slots=True)
class SagaRow:
    shard: str
    key: TKey
    kind: SagaKind
    state: SagaState
    peer_shard: str
    credit: Ref
    credit_action: CreditAction
    amount_minor: int
    pending_minor: int
    pending_id: str
    result: int
    attempts: int
    last_error: str
    # A hold a move folded into a local one (migration 0019): it settles and
    # expires as a local hold.
    settles_locally: bool

    def describe(self) -> str:
        return (
            f"saga {self.key[0]}/{self.key[1]} {self.kind.name} on {self.shard}->{self.peer_shard} "
            f"{self.state.name} {self.credit_action.name} amount {self.amount_minor} "
            f"pending {self.pending_minor} attempts {self.attempts} last error {self.last_error!r}"
        )


@dataclass
class Snapshot:
    """Every shard's rows that the checks need, merged (shard names kept per row)."""

    accounts: dict[Ref, AccountRow] = field(default_factory=dict)
    transfers: dict[TKey, TransferRow] = field(default_factory=dict)
    sagas: dict[tuple[TKey, SagaKind], SagaRow] = field(default_factory=dict)
    # (credit shard, saga key, kind) -> outcome recorded by step 2.
    # Step 2's outcomes, wherever the credit merchant is now (they move with it).
    credits: dict[tuple[TKey, SagaKind], CreditOutcome] = field(default_factory=dict)
    resolutions: dict[TKey, PendingState] = field(default_factory=dict)
    # Net effect of the entries per (account, transfer that made them).
    entries: dict[tuple[Ref, TKey], Effect] = field(default_factory=dict)
    duplicates: list[Violation] = field(default_factory=list)

    def final_result(self, key: TKey) -> int | None:
        """The transfer's outcome: its saga's for a cross-shard one (None while unfinished)."""
        saga = self.sagas.get((key, SagaKind.TRANSFER))
        if saga is not None:
            if saga.state in (SagaState.COMPLETED, SagaState.COMPENSATED):
                return saga.result
            return None
        return self.transfers[key].result

    def entries_of(self, ref: Ref, key: TKey) -> Effect:
        return self.entries.get((ref, key), Effect())


@dataclass
class CheckReport:
    violations: list[Violation] = field(default_factory=list)
    # What was checked, for the summary.
    notes: list[str] = field(default_factory=list)
    sagas_by_state: dict[str, int] = field(default_factory=dict)
    dead_sagas: list[str] = field(default_factory=list)
    reconcile_findings: list[str] = field(default_factory=list)
    quiesce_s: float = 0.0
    # The settles of the holds left open at the end (they join the history).
    final_settles: list[OpRecord] = field(default_factory=list)

    def add(self, check: str, where: str, detail: str) -> None:
        self.violations.append(Violation(check, where, detail))


# Waiting for quiet.

# Of the merchants a shard owns: an old copy's sagas and timeouts are never run
# (they run where the merchant lives), and stay until cleanup.
_QUIET_SQL = """
WITH owned AS (SELECT merchant_id FROM merchants WHERE state IN ('active', 'moving'))
SELECT
  (SELECT count(*) FROM sagas WHERE state = 1 AND merchant_id IN (SELECT * FROM owned))
    AS running,
  (SELECT count(*) FROM pending_expiries e
   WHERE e.merchant_id IN (SELECT * FROM owned)
     AND (NOT EXISTS (SELECT 1 FROM sagas s WHERE s.merchant_id = e.merchant_id
                      AND s.transfer_id = e.transfer_id AND s.kind = 1)
          OR EXISTS (SELECT 1 FROM sagas s WHERE s.merchant_id = e.merchant_id
                     AND s.transfer_id = e.transfer_id AND s.kind = 1 AND s.state = 2))
  ) AS expiring
"""


async def wait_until_quiet(dsns: dict[str, str]) -> tuple[bool, str, float]:
    """Polls every shard until no saga runs and no pending transfer still has a timeout
    to run out (those of a refused cross-shard pending transfer never will); returns
    whether it got there, the last state seen, and how long it took."""
    started = time.monotonic()
    deadline = started + QUIESCE_DEADLINE_S
    state = "not read yet"
    while True:
        busy = []
        try:
            for name, dsn in dsns.items():
                connection = await asyncpg.connect(dsn, timeout=SHARD_CONNECT_TIMEOUT_S)
                try:
                    row = await connection.fetchrow(_QUIET_SQL, timeout=SHARD_QUERY_TIMEOUT_S)
                finally:
                    await connection.close()
                assert row is not None
                if row["running"] or row["expiring"]:
                    busy.append(
                        f"{name}: {row['running']} running saga(s), "
                        f"{row['expiring']} pending transfer(s) with a timeout"
                    )
        except (OSError, asyncpg.PostgresError) as error:
            busy.append(f"shard unreadable: {type(error).__name__}: {error}")
        state = "; ".join(busy) or "quiet"
        if not busy:
            return True, state, time.monotonic() - started
        if time.monotonic() > deadline:
            return False, state, time.monotonic() - started
        await asyncio.sleep(QUIESCE_POLL_INTERVAL_S)


# Reading the shards: only what each shard owns. A rebalance leaves copies of
# a merchant behind (moved, until cleanup) and ahead (incoming, until it moves).
_OWNED = "SELECT merchant_id FROM merchants WHERE state IN ('active', 'moving')"

_ACCOUNTS_SQL = f"""
SELECT merchant_id, account_id, currency, debits_must_not_exceed_credits,
       credits_must_not_exceed_debits, debits_posted, credits_posted,
       debits_pending, credits_pending
FROM accounts WHERE merchant_id IN ({_OWNED})
"""
_TRANSFERS_SQL = f"""
SELECT merchant_id, transfer_id, kind, action, debit_merchant_id, debit_account_id,
       credit_merchant_id, credit_account_id, amount_minor, amount_effective_minor,
       currency, pending_id, timeout_ms, linked, result, reversal_of
FROM transfers WHERE merchant_id IN ({_OWNED})
"""
_SAGAS_SQL = f"""
SELECT merchant_id, transfer_id, kind, state, peer_shard, credit_merchant_id,
       credit_account_id, credit_action, amount_minor, pending_minor, pending_id,
       result, attempts, last_error, settles_locally
FROM sagas WHERE merchant_id IN ({_OWNED})
"""
_CREDITS_SQL = f"""
SELECT merchant_id, transfer_id, kind, outcome FROM saga_credits
WHERE credit_merchant_id IN ({_OWNED})
"""
_RESOLUTIONS_SQL = f"""
SELECT merchant_id, pending_id, state FROM pending_resolutions WHERE merchant_id IN ({_OWNED})
"""
_ENTRIES_SQL = f"""
SELECT merchant_id, account_id, transfer_merchant_id, transfer_id,
  coalesce(sum(amount_minor) FILTER (WHERE direction = {Direction.DEBIT}
                                     AND kind = {EntryKind.POSTED}), 0) AS dp,
  coalesce(sum(amount_minor) FILTER (WHERE direction = {Direction.CREDIT}
                                     AND kind = {EntryKind.POSTED}), 0) AS cp,
  coalesce(sum(amount_minor) FILTER (WHERE direction = {Direction.DEBIT}
                                     AND kind = {EntryKind.PENDING}), 0)
  - coalesce(sum(amount_minor) FILTER (WHERE direction = {Direction.DEBIT}
                                       AND kind = {EntryKind.PENDING_RELEASED}), 0) AS dpe,
  coalesce(sum(amount_minor) FILTER (WHERE direction = {Direction.CREDIT}
                                     AND kind = {EntryKind.PENDING}), 0)
  - coalesce(sum(amount_minor) FILTER (WHERE direction = {Direction.CREDIT}
                                       AND kind = {EntryKind.PENDING_RELEASED}), 0) AS cpe
FROM entries WHERE merchant_id IN ({_OWNED})
GROUP BY merchant_id, account_id, transfer_merchant_id, transfer_id
"""


async def read_snapshot(dsns: dict[str, str]) -> Snapshot:
    snapshot = Snapshot()
    for name, dsn in dsns.items():
        connection = await asyncpg.connect(dsn, timeout=SHARD_CONNECT_TIMEOUT_S)
        try:
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                rows = {
                    what: await connection.fetch(sql, timeout=SHARD_QUERY_TIMEOUT_S)
                    for what, sql in (
                        ("accounts", _ACCOUNTS_SQL),
                        ("transfers", _TRANSFERS_SQL),
                        ("sagas", _SAGAS_SQL),
                        ("credits", _CREDITS_SQL),
                        ("resolutions", _RESOLUTIONS_SQL),
                        ("entries", _ENTRIES_SQL),
                    )
                }
        finally:
            await connection.close()
        _merge(snapshot, name, rows)
    return snapshot


def _merge(snapshot: Snapshot, shard: str, rows: dict[str, list[Any]]) -> None:
    for r in rows["accounts"]:
        ref = Ref(r["merchant_id"], r["account_id"])
        row = AccountRow(
            shard,
            ref,
            r["currency"],
            r["debits_must_not_exceed_credits"],
            r["credits_must_not_exceed_debits"],
            Effect(
                r["debits_posted"], r["credits_posted"], r["debits_pending"], r["credits_pending"]
            ),
        )
        if ref.merchant_id == SETTLEMENT_MERCHANT_ID:
            ref = Ref(f"{SETTLEMENT_MERCHANT_ID}@{shard}", ref.account_id)
            row = AccountRow(shard, ref, row.currency, False, False, row.balances)
        elif ref in snapshot.accounts:
            snapshot.duplicates.append(
                Violation(
                    "accounts unique", str(ref), f"on {snapshot.accounts[ref].shard} and {shard}"
                )
            )
        snapshot.accounts[ref] = row
    for r in rows["transfers"]:
        key = (r["merchant_id"], r["transfer_id"])
        if key in snapshot.transfers:
            snapshot.duplicates.append(
                Violation(
                    "idempotency",
                    f"transfer {key[0]}/{key[1]}",
                    f"stored on {snapshot.transfers[key].shard} and on {shard}",
                )
            )
        snapshot.transfers[key] = TransferRow(
            shard,
            key,
            r["kind"],
            r["action"],
            Ref(r["debit_merchant_id"], r["debit_account_id"]),
            Ref(r["credit_merchant_id"], r["credit_account_id"]),
            r["amount_minor"],
            r["amount_effective_minor"],
            r["currency"],
            r["pending_id"],
            r["timeout_ms"],
            r["linked"],
            r["result"],
            r["reversal_of"],
        )
    for r in rows["sagas"]:
        key = (r["merchant_id"], r["transfer_id"])
        kind = SagaKind(r["kind"])
        if (key, kind) in snapshot.sagas:
            snapshot.duplicates.append(
                Violation(
                    "sagas unique", f"saga {key} {kind.name}", f"on two shards, one is {shard}"
                )
            )
        snapshot.sagas[(key, kind)] = SagaRow(
            shard,
            key,
            kind,
            SagaState(r["state"]),
            r["peer_shard"],
            Ref(r["credit_merchant_id"], r["credit_account_id"]),
            CreditAction(r["credit_action"]),
            r["amount_minor"],
            r["pending_minor"],
            r["pending_id"],
            r["result"],
            r["attempts"],
            r["last_error"],
            r["settles_locally"],
        )
    for r in rows["credits"]:
        snapshot.credits[((r["merchant_id"], r["transfer_id"]), SagaKind(r["kind"]))] = (
            CreditOutcome(r["outcome"])
        )
    for r in rows["resolutions"]:
        snapshot.resolutions[(r["merchant_id"], r["pending_id"])] = PendingState(r["state"])
    for r in rows["entries"]:
        ref = Ref(r["merchant_id"], r["account_id"])
        if ref.merchant_id == SETTLEMENT_MERCHANT_ID:
            ref = Ref(f"{SETTLEMENT_MERCHANT_ID}@{shard}", ref.account_id)
        key = (r["transfer_merchant_id"], r["transfer_id"])
        snapshot.entries[(ref, key)] = snapshot.entries_of(ref, key) + Effect(
            r["dp"], r["cp"], r["dpe"], r["cpe"]
        )


# The checks on stored data.


def check_conservation(snapshot: Snapshot, report: CheckReport) -> None:
    posted: Counter[str] = Counter()
    pending: Counter[str] = Counter()
    for account in snapshot.accounts.values():
        b = account.balances
        posted[account.currency] += b.credits_posted - b.debits_posted
        pending[account.currency] += b.credits_pending - b.debits_pending
    for currency in sorted(set(posted) | set(pending)):
        if posted[currency] or pending[currency]:
            report.add(
                "conservation",
                f"currency {currency}",
                f"credits - debits over all shards: posted {posted[currency]}, "
                f"pending {pending[currency]} (both must be 0)",
            )
    report.notes.append(
        f"conservation: {len(posted)} currencies over {len(snapshot.accounts)} accounts"
    )


def check_limits(snapshot: Snapshot, report: CheckReport) -> None:
    limited = 0
    for account in snapshot.accounts.values():
        b = account.balances
        if account.no_overdraft:
            limited += 1
            if b.debits_posted + b.debits_pending > b.credits_posted:
                report.add(
                    "limits",
                    f"{account.ref} on {account.shard}",
                    f"no overdraft, yet debits {b.debits_posted} + pending {b.debits_pending} "
                    f"> credits {b.credits_posted}",
                )
        if account.no_credit_overdraft:
            limited += 1
            if b.credits_posted + b.credits_pending > b.debits_posted:
                report.add(
                    "limits", f"{account.ref} on {account.shard}", f"credits exceed debits: {b}"
                )
    report.notes.append(f"limits: {limited} accounts with a limit")


def check_placement(
    snapshot: Snapshot, layout: Layout, report: CheckReport, *, moved: bool
) -> None:
    """Every client account and transfer is on its merchant's shard, and only there:
    the ring's, or after merchant moves the one that owns it."""
    for violation in snapshot.duplicates:
        report.violations.append(violation)
    owners: dict[str, set[str]] = defaultdict(set)
    for account in snapshot.accounts.values():
        if not account.ref.merchant_id.startswith(SETTLEMENT_MERCHANT_ID):
            owners[account.ref.merchant_id].add(account.shard)
    for row in snapshot.transfers.values():
        owners[row.key[0]].add(row.shard)
    for merchant_id, shards in sorted(owners.items()):
        if len(shards) > 1:
            report.add("placement", merchant_id, f"owned on {sorted(shards)}")
    if moved:
        return
    for account in snapshot.accounts.values():
        if account.ref.merchant_id.startswith(SETTLEMENT_MERCHANT_ID):
            continue
        home = layout.shard_of(account.ref.merchant_id)
        if account.shard != home:
            report.add(
                "placement", str(account.ref), f"stored on {account.shard}, ring says {home}"
            )
    for row in snapshot.transfers.values():
        home = layout.shard_of(row.key[0])
        if row.shard != home:
            report.add(
                "placement", f"transfer {row.key}", f"stored on {row.shard}, ring says {home}"
            )


_AddEffect = Callable[[Ref, TKey, Effect], None]


def expected_effects(snapshot: Snapshot, report: CheckReport) -> dict[tuple[Ref, TKey], Effect]:
    """What each stored transfer's outcome must have done to each client account,
    keyed as the entries are (by the transfer that made them)."""
    expected: dict[tuple[Ref, TKey], Effect] = defaultdict(Effect)

    def add(ref: Ref, key: TKey, effect: Effect) -> None:
        expected[(ref, key)] = expected[(ref, key)] + effect

    for key, row in snapshot.transfers.items():
        if row.kind != RecordKind.TRANSFER:
            report.add("history", f"transfer {key}", "a journal was stored; no client posts one")
            continue
        transfer_saga = snapshot.sagas.get((key, SagaKind.TRANSFER))
        settle_saga = snapshot.sagas.get((key, SagaKind.SETTLE))
        if transfer_saga is not None:
            _expect_cross_shard(snapshot, row, transfer_saga, add)
        elif settle_saga is not None:
            _expect_cross_shard_settle(snapshot, row, settle_saga, add, report)
        elif row.result == TransferResult.OK:
            _expect_local(snapshot, row, add, report)
    return expected


def _expect_local(
    snapshot: Snapshot, row: TransferRow, add: _AddEffect, report: CheckReport
) -> None:
    amount = row.amount_effective_minor
    if row.action == TransferAction.POST:
        add(row.debit, row.key, Effect(debits_posted=amount))
        add(row.credit, row.key, Effect(credits_posted=amount))
    elif row.action == TransferAction.PENDING:
        # An expiry releases the reservation under the pending transfer's own id.
        if snapshot.resolutions.get(row.key) is not PendingState.EXPIRED:
            add(row.debit, row.key, Effect(debits_pending=amount))
            add(row.credit, row.key, Effect(credits_pending=amount))
    else:
        pending = snapshot.transfers.get((row.key[0], row.pending_id))
        if pending is None:
            report.add(
                "history", f"transfer {row.key}", f"settled pending {row.pending_id} is missing"
            )
            return
        held = pending.amount_effective_minor
        add(row.debit, row.key, Effect(debits_posted=amount, debits_pending=-held))
        add(row.credit, row.key, Effect(credits_posted=amount, credits_pending=-held))


def _expect_cross_shard(
    snapshot: Snapshot, row: TransferRow, saga: SagaRow, add: _AddEffect
) -> None:
    amount = row.amount_minor
    # The debit shard: reserved at step 1, then posted (completed) or released.
    if saga.state in (SagaState.RUNNING, SagaState.DEAD):
        add(row.debit, row.key, Effect(debits_pending=amount))
    elif saga.state is SagaState.COMPLETED:
        if row.action == TransferAction.POST:
            add(row.debit, row.key, Effect(debits_posted=amount))
        elif snapshot.resolutions.get(row.key) is not PendingState.EXPIRED:
            # A held pending transfer; a post or void releases it under its own id.
            add(row.debit, row.key, Effect(debits_pending=amount))
    # The credit shard, by what step 2 recorded there.
    if snapshot.credits.get((row.key, SagaKind.TRANSFER)) is CreditOutcome.APPLIED:
        if row.action == TransferAction.POST:
            add(saga.credit, row.key, Effect(credits_posted=amount))
        else:
            add(saga.credit, row.key, Effect(credits_pending=amount))
            expired = snapshot.credits.get((row.key, SagaKind.EXPIRE))
            # Folded into a local hold, it expires in one step on its one shard.
            expired_locally = (
                saga.settles_locally and snapshot.resolutions.get(row.key) is PendingState.EXPIRED
            )
            if expired is CreditOutcome.APPLIED or expired_locally:
                add(saga.credit, row.key, Effect(credits_pending=-amount))


def _expect_cross_shard_settle(
    snapshot: Snapshot, row: TransferRow, saga: SagaRow, add: _AddEffect, report: CheckReport
) -> None:
    if row.result != TransferResult.OK:
        report.add(
            "sagas", f"transfer {row.key}", f"a settle saga for a refused settle: {saga.describe()}"
        )
        return
    held = saga.pending_minor
    add(row.debit, row.key, Effect(debits_posted=row.amount_effective_minor, debits_pending=-held))
    if snapshot.credits.get((row.key, SagaKind.SETTLE)) is CreditOutcome.APPLIED:
        add(saga.credit, row.key, Effect(credits_posted=saga.amount_minor, credits_pending=-held))


def check_entries(snapshot: Snapshot, report: CheckReport) -> None:
    """Per client account and transfer: entries == the stored outcome's effect; per
    account: balances == the sum of its entries; no entry without its transfer."""
    expected = expected_effects(snapshot, report)
    client = [
        pair
        for pair in set(expected) | set(snapshot.entries)
        if not pair[0].merchant_id.startswith(SETTLEMENT_MERCHANT_ID)
    ]
    mismatched = 0
    for ref, key in sorted(client):
        want = expected.get((ref, key), Effect())
        got = snapshot.entries_of(ref, key)
        if want != got:
            mismatched += 1
            report.add(
                "idempotency",
                f"account {ref}, transfer {key[0]}/{key[1]}",
                f"entries do {got}; the stored outcome calls for {want}",
            )
    sums: dict[Ref, Effect] = defaultdict(Effect)
    for (ref, key), effect in snapshot.entries.items():
        sums[ref] = sums[ref] + effect
        # A merchant move books its net position on settlement accounts under its
        # own name; every other entry belongs to a stored transfer.
        if key not in snapshot.transfers and key[0] != MOVE_MERCHANT_ID:
            report.add("idempotency", f"account {ref}", f"entries of unknown transfer {key}")
    for ref, account in snapshot.accounts.items():
        if sums.get(ref, Effect()) != account.balances:
            report.add(
                "balances",
                f"{ref} on {account.shard}",
                f"balances {account.balances}, entries sum to {sums.get(ref, Effect())}",
            )
    report.notes.append(
        f"entries: {len(client)} (account, transfer) effects checked, {mismatched} mismatched"
    )


def check_sagas(snapshot: Snapshot, report: CheckReport) -> None:
    states: Counter[str] = Counter()
    for (key, kind), saga in sorted(snapshot.sagas.items()):
        states[f"{kind.name} {saga.state.name}"] += 1
        origin = key if kind is not SagaKind.EXPIRE else (key[0], saga.pending_id)
        if origin not in snapshot.transfers:
            report.add("sagas", saga.describe(), "has no transfer row on its debit shard")
            continue
        credit = snapshot.credits.get((key, kind))
        if saga.state is SagaState.RUNNING:
            report.add("sagas", saga.describe(), "still running after healing and waiting")
        elif saga.state is SagaState.DEAD:
            report.dead_sagas.append(saga.describe())
            _check_dead_saga_holds(snapshot, saga, report)
        elif saga.state is SagaState.COMPLETED and credit is not CreditOutcome.APPLIED:
            report.add(
                "sagas", saga.describe(), f"completed, yet the credit shard recorded {credit}"
            )
        elif saga.state is SagaState.COMPENSATED and credit not in (
            CreditOutcome.REFUSED,
            CreditOutcome.ABORTED,
        ):
            report.add(
                "sagas", saga.describe(), f"compensated, yet the credit shard recorded {credit}"
            )
        finished = saga.state in (SagaState.COMPLETED, SagaState.COMPENSATED)
        if finished and (saga.result == TransferResult.OK) != (saga.state is SagaState.COMPLETED):
            report.add("sagas", saga.describe(), f"finished with result {saga.result}")
    report.sagas_by_state = dict(sorted(states.items()))


def check_reversals(snapshot: Snapshot, report: CheckReport) -> None:
    reversed_minor: Counter[TKey] = Counter()
    outcomes: Counter[str] = Counter()
    for key, row in sorted(snapshot.transfers.items()):
        if not row.reversal_of:
            continue
        final = snapshot.final_result(key)
        outcomes[pb.TransferResult.Name(final) if final is not None else "unfinished"] += 1  # type: ignore[arg-type]
        if final != TransferResult.OK:
            continue
        target_key = (row.credit.merchant_id, row.reversal_of)
        target = snapshot.transfers.get(target_key)
        where = f"reversal {key[0]}/{key[1]} of {target_key[1]}"
        if target is None or snapshot.final_result(target_key) != TransferResult.OK:
            report.add("reversals", where, "applied, but its original is missing or failed")
            continue
        if target.action not in (TransferAction.POST, TransferAction.POST_PENDING) or (
            target.debit,
            target.credit,
        ) != (row.credit, row.debit):
            report.add("reversals", where, "applied to an original between other accounts")
            continue
        reversed_minor[target_key] += row.amount_effective_minor
        if reversed_minor[target_key] > target.amount_effective_minor:
            report.add(
                "reversals",
                where,
                f"reversals applied total {reversed_minor[target_key]}, "
                f"the original posted {target.amount_effective_minor}",
            )
    report.notes.append(
        f"reversals: {dict(sorted(outcomes.items()))}, of {len(reversed_minor)} originals"
    )


def _check_dead_saga_holds(snapshot: Snapshot, saga: SagaRow, report: CheckReport) -> None:
    """A dead saga's money is still visibly pending where its next step would move it."""
    if saga.kind is SagaKind.TRANSFER:
        debit = snapshot.transfers[saga.key].debit
        held = snapshot.entries_of(debit, saga.key).debits_pending
        want = saga.amount_minor
    else:
        pending_key = (saga.key[0], saga.pending_id)
        held = snapshot.entries_of(saga.credit, pending_key).credits_pending + (
            snapshot.entries_of(saga.credit, saga.key).credits_pending
            if saga.kind is SagaKind.SETTLE
            else 0
        )
        want = saga.pending_minor
    if held != want:
        report.add("sagas", saga.describe(), f"dead, but {held} is held pending, not {want}")


# The checks of answers against what is stored.


def _sent_requests(history: Sequence[OpRecord], report: CheckReport) -> dict[TKey, TransferSpec]:
    sent: dict[TKey, TransferSpec] = {}
    for record in history:
        for spec in record.op.transfers:
            key = (spec.debit.merchant_id, spec.id)
            if sent.setdefault(key, spec) != spec:
                report.add("plan", f"transfer {key}", "two different requests share an id")
    return sent


def _differing_field(row: TransferRow, spec: TransferSpec) -> str:
    checks: Iterable[tuple[str, object, object]] = (
        ("action", row.action, int(spec.action)),
        ("debit_account", row.debit, spec.debit),
        ("credit_account", row.credit, spec.credit if spec.credit is not None else row.credit),
        ("amount_minor", row.amount_minor, spec.amount_minor),
        ("currency", row.currency, spec.currency or row.currency),
        ("pending_id", row.pending_id, spec.pending_id),
        ("timeout_ms", row.timeout_ms, spec.timeout_ms),
        ("linked", row.linked, spec.linked),
        ("reversal_of", row.reversal_of, spec.reversal_of),
    )
    for name, stored, sent in checks:
        if stored != sent:
            return f"{name}: stored {stored}, sent {sent}"
    return ""


def check_history(
    snapshot: Snapshot, history: Sequence[OpRecord], report: CheckReport
) -> list[TKey]:
    """Answers against stored rows; returns the keys a client got an answer for."""
    sent = _sent_requests(history, report)
    for key, row in snapshot.transfers.items():
        spec = sent.get(key)
        if spec is None:
            report.add(
                "idempotency", f"transfer {key[0]}/{key[1]}", "stored, but no client sent it"
            )
            continue
        differing = _differing_field(row, spec)
        if differing:
            report.add("idempotency", f"transfer {key[0]}/{key[1]}", f"stored as sent? {differing}")
    answered: list[TKey] = []
    by_op = {record.op.op_id: record for record in history}
    checked = 0
    for record in history:
        if record.outcome == "error":
            report.add(
                "service errors",
                f"op {record.op.op_id} ({record.op.kind})",
                f"{record.error}; transfers {[t.id for t in record.op.transfers]}",
            )
        if record.answers is None:
            continue
        for spec, answer in zip(record.op.transfers, record.answers, strict=False):
            checked += 1
            key = (spec.debit.merchant_id, spec.id)
            answered.append(key)
            where = f"op {record.op.op_id} ({record.op.kind}) transfer {key[0]}/{key[1]}"
            _check_answer(snapshot, key, answer.result, where, report)
            if answer.result == TransferResult.EXISTS_WITH_DIFFERENT_FIELDS:
                report.add(
                    "idempotency",
                    where,
                    f"EXISTS_WITH_DIFFERENT_FIELDS ({answer.differing_field}) "
                    "for an identical request",
                )
            if record.op.kind != "replay" and record.attempts == 1 and answer.replayed:
                report.add("idempotency", where, "a first request of a fresh id answered replayed")
        original = by_op.get(record.op.replay_of)
        if original is not None and original.answers is not None:
            for spec, answer in zip(record.op.transfers, record.answers, strict=False):
                if not answer.replayed:
                    report.add(
                        "idempotency",
                        f"op {record.op.op_id} replay of {original.op.op_id}, transfer {spec.id}",
                        f"answered {answer.result_name} not replayed, "
                        "after the original was answered",
                    )
    # Each chain once (a replay sends the same members), answered or not.
    chains = {
        tuple((t.debit.merchant_id, t.id) for t in record.op.transfers): record.op.op_id
        for record in history
        if record.op.kind.startswith("chain")
    }
    for keys, op_id in sorted(chains.items()):
        _check_chain(snapshot, op_id, list(keys), report)
    report.notes.append(
        f"history: {len(history)} operations, {checked} answered items checked against "
        f"{len(snapshot.transfers)} stored transfers"
    )
    return sorted(set(answered))


def _check_answer(
    snapshot: Snapshot, key: TKey, result: int, where: str, report: CheckReport
) -> None:
    name = pb.TransferResult.Name(result)  # type: ignore[arg-type]
    row = snapshot.transfers.get(key)
    if row is None:
        report.add("acknowledged", where, f"answered {name}, but no transfer is stored")
        return
    if result == TransferResult.IN_PROGRESS:
        if (key, SagaKind.TRANSFER) not in snapshot.sagas:
            report.add("acknowledged", where, "answered IN_PROGRESS, but no saga carries it")
        return
    final = snapshot.final_result(key)
    if final is None:
        report.add("acknowledged", where, f"answered {name}, but its saga never finished")
    elif final != result:
        stored = pb.TransferResult.Name(final)  # type: ignore[arg-type]
        report.add("acknowledged", where, f"answered {name}, stored outcome {stored}")


def _check_chain(snapshot: Snapshot, op_id: str, keys: list[TKey], report: CheckReport) -> None:
    where = f"op {op_id} chain {[k[1] for k in keys]}"
    stored = [k in snapshot.transfers for k in keys]
    if any(stored) and not all(stored):
        report.add("linked chains", where, f"only some members stored: {stored}")
        return
    if not any(stored):
        return
    ok = [snapshot.transfers[k].result == TransferResult.OK for k in keys]
    if any(ok) and not all(ok):
        results = [snapshot.transfers[k].result for k in keys]
        report.add("linked chains", where, f"partly applied: results {results}")


# Through the service.


async def check_through_service(
    snapshot: Snapshot,
    layout: Layout,
    answered: Sequence[TKey],
    caller: Caller,
    report: CheckReport,
) -> None:
    """LookupTransfers for every answered transfer, LookupAccounts for every account."""
    keys = sorted(set(answered) | set(snapshot.transfers))
    seen = 0
    for start in range(0, len(keys), LOOKUP_REFS_PER_CALL):
        chunk = keys[start : start + LOOKUP_REFS_PER_CALL]
        request = pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=m, transfer_id=t) for m, t in chunk]
        )
        call = await caller.call("LookupTransfers", request, first_replica=start % 2)
        if call.response is None:
            report.add("service", "LookupTransfers", f"no answer: {call.error or call.failures}")
            return
        found = {
            (r.transfer.debit_account.merchant_id, r.transfer.id): r
            for r in call.response.transfers
        }
        for key in chunk:
            seen += 1
            _check_lookup(snapshot, key, found.get(key), report)
    accounts = [a.ref for a in layout.accounts]
    call = await caller.call(
        "LookupAccounts",
        pb.LookupAccountsRequest(
            refs=[
                pb.AccountRef(merchant_id=r.merchant_id, account_id=r.account_id) for r in accounts
            ]
        ),
        first_replica=1,
    )
    if call.response is None:
        report.add("service", "LookupAccounts", f"no answer: {call.error or call.failures}")
        return
    served = {
        Ref(a.ref.merchant_id, a.ref.account_id): Effect(
            a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending
        )
        for a in call.response.accounts
    }
    for ref in accounts:
        stored = snapshot.accounts.get(ref)
        if stored is None or served.get(ref) != stored.balances:
            report.add(
                "service",
                f"LookupAccounts {ref}",
                f"served {served.get(ref)}, stored {stored.balances if stored else None}",
            )
    report.notes.append(
        f"through the service: {seen} transfers looked up, {len(accounts)} accounts compared"
    )


def _check_lookup(
    snapshot: Snapshot, key: TKey, found: pb.TransferRecord | None, report: CheckReport
) -> None:
    where = f"LookupTransfers {key[0]}/{key[1]}"
    row = snapshot.transfers.get(key)
    if row is None:
        if found is not None:
            report.add("service", where, "served a transfer that is not stored")
        return
    if found is None:
        report.add("service", where, "a stored transfer was not found")
        return
    final = snapshot.final_result(key)
    want = final if final is not None else TransferResult.IN_PROGRESS
    if found.result != want or found.transfer.amount_minor != row.amount_minor:
        report.add(
            "service",
            where,
            f"served {pb.TransferResult.Name(found.result)} amount {found.transfer.amount_minor}, "
            f"stored {pb.TransferResult.Name(want)} amount {row.amount_minor}",  # type: ignore[arg-type]
        )
    if row.action == TransferAction.PENDING and want == TransferResult.OK:
        state = snapshot.resolutions.get(key, PendingState.PENDING)
        if found.pending_state != int(state):
            report.add(
                "service",
                where,
                f"served pending state {found.pending_state}, stored {state.name}",
            )


# Reconcile.


async def check_reconcile(config_path: Path, report: CheckReport) -> None:
    cluster = Cluster(load_config(config_path), config_path=config_path, audit=True)
    await cluster.open(migrate=False)
    try:
        result = await reconcile(cluster)
    finally:
        await cluster.close()
    for finding in result.findings:
        report.reconcile_findings.append(
            f"{'ok  ' if finding.ok else 'FAIL'} {finding.check}: {finding.detail}"
        )
        if not finding.ok:
            report.add("reconcile", finding.check, finding.detail)
    report.notes.append(
        f"reconcile: {'passed' if result.ok else 'FAILED'} ({len(result.findings)} findings)"
    )


# Every hold settles.


def open_holds_in(snapshot: Snapshot) -> list[Hold]:
    """The client holds still open: pending transfers that are OK and not settled."""
    holds = []
    for key, row in sorted(snapshot.transfers.items()):
        if row.action != TransferAction.PENDING or snapshot.final_result(key) != TransferResult.OK:
            continue
        if snapshot.resolutions.get(key, PendingState.PENDING) is not PendingState.PENDING:
            continue
        holds.append(Hold(key[1], row.debit, row.credit, row.currency))
    return holds


def check_final_settles(
    snapshot: Snapshot, holds: Sequence[Hold], settles: Sequence[OpRecord], report: CheckReport
) -> None:
    """Each settle of a hold left open settled it; no hold is open any more."""
    outcomes: Counter[str] = Counter()
    for record in settles:
        why = settle_failure(record)
        (spec,) = record.op.transfers
        key = (spec.debit.merchant_id, spec.id)
        answer = record.answers[0].result_name if record.answers else record.outcome
        if not why and record.answers and record.answers[0].result == TransferResult.IN_PROGRESS:
            final = snapshot.final_result(key) if key in snapshot.transfers else None
            answer = f"IN_PROGRESS, then {TransferResult(final).name if final else None}"
            if final != TransferResult.OK:
                why = f"answered IN_PROGRESS, stored outcome {final}"
        outcomes[f"{record.op.kind} {answer.removeprefix('TRANSFER_RESULT_')}"] += 1
        if why:
            report.add("holds", f"settle {record.op.op_id} of {spec.pending_id}", why)
    still_open = open_holds_in(snapshot)
    for hold in still_open:
        report.add(
            "holds",
            f"hold {hold.key[0]}/{hold.key[1]} ({hold.debit} -> {hold.credit})",
            "still open after the end-of-run settles",
        )
    report.notes.append(
        f"holds: {len(holds)} open at the end, settled through the service: "
        + (", ".join(f"{k} {n}" for k, n in sorted(outcomes.items())) or "none")
        + f"; {len(still_open)} left open"
    )


async def check_all(
    *,
    dsns: dict[str, str],
    direct_config_path: Path,
    layout: Layout,
    history: Sequence[OpRecord],
    caller: Caller,
    now_s: Callable[[], float],
    moved: bool = False,
    after_settles: Callable[[], Awaitable[str]] | None = None,
) -> CheckReport:
    """after_settles: the admin's work once the holds left open are settled (moves a
    rebalance deferred for them); what it says becomes a note."""
    report = CheckReport()
    quiet, state, report.quiesce_s = await wait_until_quiet(dsns)
    if not quiet:
        report.add("quiesce", "cluster", f"not quiet after {QUIESCE_DEADLINE_S}s: {state}")
    snapshot = await read_snapshot(dsns)
    # Every hold left open is settled, as its caller would; then the books are
    # read again and everything below judges them, settles included.
    holds = open_holds_in(snapshot)
    report.final_settles = await settle_holds(
        caller, holds, suffix="end", kind="end_settle", now_s=now_s
    )
    if after_settles is not None:
        report.notes.append(f"after the settles: {await after_settles()}")
    quiet, state, settle_quiesce_s = await wait_until_quiet(dsns)
    report.quiesce_s += settle_quiesce_s
    if not quiet:
        report.add(
            "quiesce", "cluster", f"not quiet after the settles in {QUIESCE_DEADLINE_S}s: {state}"
        )
    snapshot = await read_snapshot(dsns)
    check_final_settles(snapshot, holds, report.final_settles, report)
    history = [*history, *report.final_settles]
    check_placement(snapshot, layout, report, moved=moved)
    check_conservation(snapshot, report)
    check_limits(snapshot, report)
    findings, note = await check_velocity(dsns)
    for finding in findings:
        report.add("velocity", str(finding.account), finding.detail)
    report.notes.append(note)
    check_entries(snapshot, report)
    check_sagas(snapshot, report)
    check_reversals(snapshot, report)
    answered = check_history(snapshot, history, report)
    await check_through_service(snapshot, layout, answered, caller, report)
    await check_reconcile(direct_config_path, report)
    return report

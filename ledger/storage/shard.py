"""A Shard: one PostgreSQL server, its pool, and the ledger's operations on it."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
import orjson
from opentelemetry.trace import Span, Status, StatusCode

from ledger import limits
from ledger.domain import velocity_counters
from ledger.domain.accounts import Account, AccountKey, AccountSpec, Balances
from ledger.domain.engine import (
    AccountState,
    ItemOutcome,
    JournalPlan,
    PendingView,
    TransferBatchState,
    VelocityAdd,
    advanced,
    apply_journal,
    apply_transfers,
    expire_pending,
    pending_state_at,
)
from ledger.domain.events import EventKind, resolution_event_kind, transfer_event_kind
from ledger.domain.sagas import Saga
from ledger.domain.transfers import (
    Direction,
    Entry,
    EntryKind,
    JournalRecord,
    JournalRequest,
    PendingState,
    Posting,
    RecordKind,
    Resolution,
    TransferAction,
    TransferKey,
    TransferRecord,
    TransferRequest,
    TransferResult,
    linked_chains,
)
from ledger.domain.value import value
from ledger.domain.velocity import (
    VelocityMetric,
    VelocityRule,
    usage_keys,
)
from ledger.invariant import invariant
from ledger.storage import saga_statements as saga_sql
from ledger.storage import statements as sql
from ledger.storage.errors import (
    NOT_SET_UP_ERRORS,
    RETRYABLE_STATES,
    MerchantsMoving,
    MerchantsNotOwned,
    MerchantsUnknown,
    NotSetUp,
    RetryTransaction,
    ShardBusy,
    ShardUnavailable,
    StaleEpoch,
    is_unavailable,
)
from ledger.storage.migrate import apply_migrations
from ledger.storage.saga_rows import saga_from_row
from ledger.telemetry import metrics
from ledger.telemetry.tracing import (
    background_span_attributes,
    current_trace_id,
    mark_found_work,
    start_as_current_span,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# The index of an outcome that create_transfers hands back unwritten: the item
# settles a pending transfer that a saga carries, so it must run as a saga.
RUN_AS_SAGA = -2
if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]


@value
class Fence:
    """What a write tells the shard about the caller's routing.

    epoch: the caller's config epoch; the shard refuses a different one.
    claimable: merchants the caller's ring places on this shard. A merchant the
    shard has never seen is taken on only if it is claimable; otherwise the
    write is refused as sent to the wrong shard.
    """

    epoch: int
    claimable: frozenset[str]
    # Saga steps that continue work already under way (steps 2 and 3) pass the
    # fence of a merchant being moved, so its money in flight can settle first.
    allow_moving: bool = False


@dataclass(frozen=True, slots=True)
class AccountCreateOutcome:
    created: bool
    differing_field: str | None = None


@dataclass(frozen=True, slots=True)
class TransferView:
    record: TransferRecord
    pending_state: PendingState | None
    saga: Saga | None = None


@dataclass(frozen=True, slots=True)
class GaugeReadings:
    running_sagas: int
    dead_sagas: int
    oldest_running_saga_age_s: float
    merchants_by_state: dict[str, int]


@dataclass(frozen=True, slots=True)
class JournalOutcome:
    result: TransferResult
    replayed: bool
    failed_posting_index: int
    differing_field: str | None
    created_at: datetime
    refused_by_rule: str = ""


# Operations (the ledger_shard_transaction_duration "operation" label) that the
# background workers run on every shard several times a second; the dashboard's
# request panels leave them out (tests/test_dashboards.py keeps the two in step).
BACKGROUND_OPERATIONS = (
    "claim_due",
    "expire_due",
    "expire_due_pendings",
    "gauge_readings",
    "merchant_counts",
    "checkpoint",
)
# Every statement here is short, and the planner's row estimates for unnest()
# arrays and for tables never analysed (a new shard's) are guesses that can
# cross jit_above_cost: JIT compilation then costs 10-200 ms per execution of a
# statement that runs in a few. Servers built with JIT (most packaged ones)
# would otherwise pay it at random.
# Generic plans, made once per connection and statement: the statements are
# written so that their generic plans find rows by key whatever the tables'
# sizes (tests/test_key_lookup_plans.py). Left to choose, PostgreSQL kept
# replanning a statement whose generic plan it estimated dearer than a custom
# one, as for WRITE_BATCH (its arrays estimated at 10 rows each, against the
# one row of a single transfer): planning it cost 0.7 ms of PostgreSQL's CPU
# per single transfer (bench.cpu_cost: 2,283 against 1,180 us per call).
# Sequential scans only where no index serves: a generic plan made just after a
# table was analysed while small (a new shard's first autoanalyze, or an
# operator's VACUUM ANALYZE) read the whole table once per key, since a scan of
# one page costs less than an index probe; the plan then stayed while the table
# grew, until the next analysis. The benchmark's batches, its shards analysed
# empty, fell from 11,000 to 2,300 transfers/s, PostgreSQL reading 90,000 pages
# a call (docs/performance.md). Every statement of the service finds its rows by
# key or by a range of a key; verification, which reads whole tables, turns
# sequential scans back on in its snapshot (chain_statements.VERIFY_SCANS_WHOLE_TABLES).
SHARD_SERVER_SETTINGS = {
    "jit": "off",
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
}
# What ledger_shard_errors counts (its "kind" label), each exported at zero from the start.
SHARD_ERROR_KINDS = ("busy", "unavailable", "error", "contention")


class Shard:
    """One PostgreSQL server. Every write is one transaction that starts with the fence."""

    def __init__(
        self, *, name: str, dsn: str, pool_connections_max: int = limits.pool_connections_max
    ) -> None:
        invariant(pool_connections_max >= 1, "a shard pool holds at least one connection")
        self.name = name
        self.dsn = dsn
        # Smaller in each of several service processes (ledger/workers.py): a
        # replica's connections per shard stay limits.pool_connections_max in all.
        self.pool_connections_max = pool_connections_max
        self._pool: asyncpg.Pool | None = None
        # Settlement accounts seen on this shard (sagas skip creating them again).
        self.settlement_accounts: set[AccountKey] = set()
        # When connecting to it last failed (None: it answers), so that the change of
        # state is logged once instead of at every attempt.
        self._unavailable_since: float | None = None
        self._unavailable_last_s = 0.0
        # Told after every committed transaction: the event sequencer wakes for the
        # events it may have written (ledger/core/event_sequencer.py).
        self.on_commit: Callable[[str], None] | None = None
        # False while a shard that was down at start-up is not set up yet: everything
        # but the set-up itself gets ShardUnavailable, not the half-made schema (a
        # call in the moment between the server answering and its migrations ran
        # into a missing shard_meta row: INTERNAL instead of UNAVAILABLE).
        self.set_up = True

    async def open(self) -> None:
        invariant(self._pool is None, "a shard is opened once")
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=self.pool_connections_max,
            timeout=limits.shard_connect_timeout_s,
            command_timeout=limits.shard_command_timeout_s,
            init=init_connection,
            # No session state outlives a transaction here (advisory locks are
            # transaction-scoped), so skip the reset round trip on every release.
            reset=_no_reset,
            # Each shard is ours alone; prepared statements stay valid.
            max_inactive_connection_lifetime=300.0,
            server_settings=SHARD_SERVER_SETTINGS,
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        invariant(self._pool is not None, f"shard {self.name} is open")
        assert self._pool is not None
        return self._pool

    def pool_stats(self) -> tuple[int, int]:
        """(connections in use, connections open)."""
        pool = self.pool
        return pool.get_size() - pool.get_idle_size(), pool.get_size()

    # Set-up.

    async def migrate(self, *, epoch: int, claims_paused_if_new: bool = False) -> list[str]:
        """Applies migrations and records the shard's name and epoch on first use.

        A shard added for a rebalance starts with claims paused, so that no
        replica can take on a merchant there before the rebalance has marked
        the merchants that move in. Refuses a database that belongs to another
        shard name, and returns the migrations applied.
        """

        async def run(conn: Connection) -> list[str]:
            applied = await apply_migrations(conn)
            await conn.execute(sql.INIT_META, self.name, epoch, claims_paused_if_new)
            row = await conn.fetchrow(sql.READ_META)
            assert row is not None
            if row["shard_name"] != self.name:
                raise RuntimeError(
                    f"database at {self.name}'s DSN belongs to shard {row['shard_name']!r}"
                )
            return applied

        return await self._with_connection(run, setting_up=True)

    async def owner_of(self, merchant_id: str) -> str | None:
        """The shard that owns the merchant now, as this shard knows it: itself, or
        the shard a move handed it to (or is taking it from); None if this shard has
        no record of it."""

        async def run(conn: Connection) -> str | None:
            rows = await conn.fetch(sql.MERCHANT_STATES, [merchant_id])
            if not rows:
                return None
            if rows[0]["state"] in ("moved", "incoming"):
                return str(rows[0]["moved_to"])
            if rows[0]["state"] == "moving":
                # No new saga may aim at a merchant while it is being handed over.
                raise MerchantsMoving(self.name, [merchant_id])
            return self.name

        return await self._with_connection(run)

    async def gauge_readings(self, replica_id: str, epoch: int) -> GaugeReadings:
        """The shard gauges' readings; notes that a service replica uses this shard
        with this config epoch."""

        async def run(conn: Connection) -> GaugeReadings:
            row = await conn.fetchrow(sql.GAUGE_READINGS, replica_id, epoch)
            assert row is not None
            return GaugeReadings(
                running_sagas=row["running_sagas"],
                dead_sagas=row["dead_sagas"],
                oldest_running_saga_age_s=row["oldest_running_saga_age_s"],
                merchants_by_state=row["merchants_by_state"],
            )

        return await self._with_connection(run)

    async def recent_replicas(self, *, within_s: float) -> list[tuple[str, int]]:
        async def run(conn: Connection) -> list[tuple[str, int]]:
            rows = await conn.fetch(sql.RECENT_REPLICAS, within_s)
            return [(r["replica_id"], int(r["epoch"])) for r in rows]

        return await self._with_connection(run)

    async def recorded_epoch(self) -> int | None:
        """The epoch this shard has recorded, or None if it was never set up."""

        async def run(conn: Connection) -> int | None:
            if not await conn.fetchval("SELECT to_regclass('shard_meta') IS NOT NULL"):
                return None
            value = await conn.fetchval("SELECT epoch FROM shard_meta")
            return int(value) if value is not None else None

        return await self._with_connection(run, setting_up=True)

    async def create_accounts(
        self, specs: Sequence[AccountSpec], fence: Fence
    ) -> list[AccountCreateOutcome]:
        async def run(conn: Connection) -> list[AccountCreateOutcome]:
            await self._fence(conn, fence, {s.key.merchant_id for s in specs})
            inserted = await conn.fetch(
                sql.INSERT_ACCOUNTS,
                [s.key.merchant_id for s in specs],
                [s.key.account_id for s in specs],
                [s.currency for s in specs],
                [s.debits_must_not_exceed_credits for s in specs],
                [s.credits_must_not_exceed_debits for s in specs],
                [dict(s.metadata) for s in specs],
                current_trace_id(),
            )
            created = {AccountKey(r["merchant_id"], r["account_id"]) for r in inserted}
            others = [s.key for s in specs if s.key not in created]
            existing = await self._select_accounts(conn, others) if others else {}
            outcomes = []
            for spec in specs:
                if spec.key in created:
                    outcomes.append(AccountCreateOutcome(created=True))
                    continue
                stored = existing.get(spec.key)
                invariant(stored is not None, "an account that was not inserted exists")
                assert stored is not None
                outcomes.append(
                    AccountCreateOutcome(
                        created=False, differing_field=stored.spec.differing_field(spec)
                    )
                )
            return outcomes

        return await self._in_transaction(run)

    async def lookup_accounts(self, keys: Collection[AccountKey]) -> dict[AccountKey, Account]:
        async def run(conn: Connection) -> dict[AccountKey, Account]:
            await self._check_readable(conn, {k.merchant_id for k in keys})
            return await self._select_accounts(conn, keys)

        return await self._with_connection(run)

    async def list_accounts(self, merchant_id: str, *, after: str, limit: int) -> list[Account]:
        async def run(conn: Connection) -> list[Account]:
            await self._check_readable(conn, {merchant_id})
            rows = await conn.fetch(sql.LIST_ACCOUNTS, merchant_id, after, limit)
            return [_account(r) for r in rows]

        return await self._with_connection(run)

    async def set_accounts_closed(
        self, keys: Sequence[AccountKey], *, closed: bool, fence: Fence
    ) -> set[AccountKey]:
        async def run(conn: Connection) -> set[AccountKey]:
            await self._fence(conn, fence, {k.merchant_id for k in keys})
            # Locked first, in the writes' order: the update finds each row by key.
            found = await self._accounts(conn, keys, statement=sql.LOCK_ACCOUNTS)
            if found:
                await conn.execute(
                    sql.SET_ACCOUNTS_CLOSED,
                    [k.merchant_id for k in found],
                    [k.account_id for k in found],
                    closed,
                    current_trace_id(),
                )
            return set(found)

        return await self._in_transaction(run)

    # Transfers.

    async def create_transfers(
        self,
        requests: Sequence[TransferRequest],
        fence: Fence,
        *,
        trace_ids: Mapping[TransferKey, str] | None = None,
    ) -> list[ItemOutcome]:
        """Applies requests in one transaction. trace_ids: the trace of each request
        whose call is not the current trace's (group commit joins calls); a new
        record keeps its own call's trace."""
        # A settle's credit account only checks the pending transfer's: that
        # transfer's own credit party is fenced below, once it is read.
        merchants = {r.debit.merchant_id for r in requests} | {
            r.credit.merchant_id for r in requests if r.credit is not None and not r.settles_pending
        }

        async def run(conn: Connection) -> list[ItemOutcome]:
            await self._fence(conn, fence, merchants)
            pending_keys = {
                TransferKey(r.debit.merchant_id, r.pending_id)
                for r in requests
                if r.settles_pending
            }
            reversal_keys = {
                TransferKey(r.credit.merchant_id, r.reversal_of)
                for r in requests
                if r.reversal_of and r.credit is not None
            }
            referenced = await self._select_transfers(conn, pending_keys | reversal_keys)
            # A pending transfer carried by a saga is settled by a saga, never here,
            # whatever the ring said when its settle was routed here: such settles
            # (with their linked chains) are handed back unwritten.
            handed_back = _saga_settles(
                requests, await self._saga_backed(conn, pending_keys & referenced.keys())
            )
            applied = requests
            if handed_back:
                applied = [r for i, r in enumerate(requests) if i not in handed_back]
                pending_keys = {
                    TransferKey(r.debit.merchant_id, r.pending_id)
                    for r in applied
                    if r.settles_pending
                }
            # Settling a pending transfer writes its credit party too, which the
            # request does not name: fenced like the rest (it may be moving).
            parties = {
                target.request.credit.merchant_id
                for target in (referenced.get(k) for k in pending_keys)
                if target is not None
                and target.result is TransferResult.OK
                and target.request.action is TransferAction.PENDING
                and target.request.credit is not None
            }
            if parties - merchants:
                await self._fence(conn, fence, parties - merchants)
            account_keys: set[AccountKey] = set()
            for r in applied:
                account_keys.add(r.debit)
                if r.credit is not None:
                    account_keys.add(r.credit)
            for key in pending_keys:
                target = referenced.get(key)
                if target is not None and target.request.credit is not None:
                    account_keys |= {target.request.debit, target.request.credit}
            accounts = await self._lock_accounts(conn, account_keys, velocity_read_later=True)
            # Read after the locks: whatever committed before them is visible now.
            existing, journals, now = await self._select_records_and_now(
                conn, {r.key for r in requests}, accounts
            )
            states = await self._pending_states(conn, pending_keys & referenced.keys())
            reversed_minor = await self._reversed(conn, reversal_keys & referenced.keys())
            state = TransferBatchState(
                accounts=accounts,
                existing=existing,
                taken_by_journal=frozenset(journals),
                pendings={
                    k: PendingView(referenced[k], states.get(k, PendingState.PENDING))
                    for k in pending_keys & referenced.keys()
                },
                reversal_targets={k: referenced[k] for k in reversal_keys & referenced.keys()},
                reversed_minor=reversed_minor,
                now=now,
            )
            plan = apply_transfers(applied, state)
            records = plan.records
            if trace_ids:
                records = [
                    replace(r, trace_id=trace_ids[r.key]) if r.key in trace_ids else r
                    for r in records
                ]
            await write_plan(
                conn,
                records=records,
                entries=plan.entries,
                accounts=plan.accounts,
                resolutions=plan.resolutions,
                expiring=plan.expiring_pendings,
                velocity=plan.velocity,
                locked=accounts,
            )
            if handed_back:
                return _with_handed_back(requests, handed_back, plan.outcomes)
            return plan.outcomes

        return await self._in_transaction(run)

    async def lookup_transfers(
        self, keys: Collection[TransferKey]
    ) -> dict[TransferKey, TransferView]:
        async def run(conn: Connection) -> dict[TransferKey, TransferView]:
            await self._check_readable(conn, {k.merchant_id for k in keys})
            found = await self._select_transfers(conn, keys)
            pendings = {
                k
                for k, v in found.items()
                if v.request.action is TransferAction.PENDING and v.result is TransferResult.OK
            }
            states = await self._pending_states(conn, pendings)
            now: datetime = await conn.fetchval(sql.NOW)
            saga_rows = await conn.fetch(
                saga_sql.SELECT_SAGAS_OF_TRANSFERS,
                [k.merchant_id for k in found],
                [k.transfer_id for k in found],
            )
            sagas = {s.key.transfer: s for s in (saga_from_row(r, self.name) for r in saga_rows)}
            views = {}
            for key, record in found.items():
                pending_state = None
                if key in pendings:
                    view = PendingView(record, states.get(key, PendingState.PENDING))
                    pending_state = pending_state_at(view, now)
                views[key] = TransferView(record, pending_state, sagas.get(key))
            return views

        return await self._with_connection(run)

    async def transfers_by_trace(self, trace_id: str, *, limit: int) -> list[TransferKey]:
        async def run(conn: Connection) -> list[TransferKey]:
            rows = await conn.fetch(sql.TRANSFERS_BY_TRACE, trace_id, limit)
            return [TransferKey(r["merchant_id"], r["transfer_id"]) for r in rows]

        return await self._with_connection(run)

    @property
    def marked_unavailable(self) -> bool:
        """True from a failure as unavailable until a transaction logs it available again."""
        return self._unavailable_since is not None

    async def expire_due_pendings(self) -> int:
        """Releases up to expiry_sweep_batch_max due pending transfers; returns how many."""

        async def run(conn: Connection) -> int:
            if not await conn.fetchval(sql.TRY_SWEEPER_LOCK):
                return 0
            due = await conn.fetch(sql.DUE_EXPIRIES, limits.expiry_sweep_batch_max)
            if not due:
                return 0
            records = await self._select_transfers(
                conn, {TransferKey(r["merchant_id"], r["transfer_id"]) for r in due}
            )
            parties = {
                a.merchant_id
                for record in records.values()
                for a in (record.request.debit, record.request.credit)
                if a is not None
            }
            # A hold is expired here only if both its parties are this shard's now.
            active = active_merchants(await conn.fetch(sql.FENCE, sorted(parties)))
            records = {
                k: r
                for k, r in records.items()
                if r.request.debit.merchant_id in active
                and (r.request.credit is None or r.request.credit.merchant_id in active)
            }
            keys = set(records)
            if not keys:
                return 0
            account_keys: set[AccountKey] = set()
            for record in records.values():
                assert record.request.credit is not None
                account_keys |= {record.request.debit, record.request.credit}
            accounts = dict(await self._lock_accounts(conn, account_keys))
            states = await self._pending_states(conn, keys)
            now: datetime = await conn.fetchval(sql.NOW)
            entries: list[Entry] = []
            resolutions: list[Resolution] = []
            changed: dict[AccountKey, AccountState] = {}
            for key in sorted(keys):
                record = records[key]
                if key in states or record.expires_at is None or record.expires_at > now:
                    continue
                plan = expire_pending(record, accounts, now)
                entries += plan.entries
                resolutions.append(plan.resolution)
                for account_key, account_state in plan.accounts.items():
                    changed[account_key] = account_state
                    accounts[account_key] = advanced(accounts[account_key], account_state)
            stale = [k for k in keys if k in states]
            await write_plan(
                conn,
                records=[],
                entries=entries,
                accounts=changed,
                resolutions=resolutions,
                expiring=[],
                ended_extra=stale,
            )
            return len(resolutions)

        return await self._in_transaction(run)

    # Journals.

    async def post_journal(self, request: JournalRequest, fence: Fence) -> JournalOutcome:
        merchants = {request.merchant_id} | {p.account.merchant_id for p in request.postings}

        async def run(conn: Connection) -> JournalOutcome:
            await self._fence(conn, fence, merchants)
            accounts = await self._lock_accounts(conn, {p.account for p in request.postings})
            transfers, journals = await self._select_records(conn, {request.key})
            if request.key in transfers:
                return JournalOutcome(
                    TransferResult.EXISTS_WITH_DIFFERENT_FIELDS,
                    False,
                    -1,
                    "kind",
                    transfers[request.key].created_at,
                )
            if request.key in journals:
                return _journal_replay(journals[request.key], request)
            now: datetime = await conn.fetchval(sql.NOW)
            plan: JournalPlan = apply_journal(request, accounts, now)
            await write_plan(
                conn,
                records=[],
                journals=[(request, plan.result, plan.failed_posting_index, now)],
                entries=plan.entries,
                accounts=plan.accounts,
                resolutions=[],
                expiring=[],
                velocity=plan.velocity,
                locked=accounts,
            )
            return JournalOutcome(
                plan.result,
                False,
                plan.failed_posting_index,
                None,
                now,
                refused_by_rule=plan.refused_by_rule,
            )

        return await self._in_transaction(run)

    # Reads of history.

    async def balance_as_of(self, key: AccountKey, as_of: datetime) -> Balances:
        async def run(conn: Connection) -> Balances:
            await self._check_readable(conn, {key.merchant_id})
            row = await conn.fetchrow(sql.BALANCE_AS_OF, key.merchant_id, key.account_id, as_of)
            if row is None:
                return Balances()
            return Balances(
                row["debits_posted"],
                row["credits_posted"],
                row["debits_pending"],
                row["credits_pending"],
            )

        return await self._with_connection(run)

    async def list_entries(
        self, key: AccountKey, *, after_sequence: int | None, newest_first: bool, limit: int
    ) -> list[Entry]:
        async def run(conn: Connection) -> list[Entry]:
            await self._check_readable(conn, {key.merchant_id})
            if newest_first:
                cursor = after_sequence if after_sequence is not None else 2**63 - 1
                rows = await conn.fetch(
                    sql.ENTRIES_NEWEST_FIRST, key.merchant_id, key.account_id, cursor, limit
                )
            else:
                cursor = after_sequence if after_sequence is not None else 0
                rows = await conn.fetch(
                    sql.ENTRIES_OLDEST_FIRST, key.merchant_id, key.account_id, cursor, limit
                )
            return [_entry(r) for r in rows]

        return await self._with_connection(run)

    # Plumbing.

    async def _fence(
        self,
        conn: Connection,
        fence: Fence,
        merchant_ids: Iterable[str],
        *,
        movable: Collection[str] = (),
    ) -> None:
        """movable: merchants that may be being moved even when the fence does not allow
        it for all (saga steps that continue work under way, sharing a transaction)."""
        ids = sorted(set(merchant_ids))
        try:
            rows = await conn.fetch(sql.FENCE, ids)
        except NOT_SET_UP_ERRORS:
            # Like a shard on an older epoch, it is waited for (retryably).
            raise StaleEpoch(self.name, 0, fence.epoch) from None
        if not rows:
            # Its tables made but its name and epoch not recorded yet: set-up is
            # under way (Shard.migrate records them last). Waited for, as above.
            raise StaleEpoch(self.name, 0, fence.epoch)
        shard_epoch = int(rows[0]["epoch"])
        if shard_epoch > fence.epoch:
            raise StaleEpoch(self.name, shard_epoch, fence.epoch)
        # A caller ahead of this shard (its config is newer; the rebalance to it has
        # not raised the shards' epochs yet) may write what this shard owns now:
        # ownership is decided here, under the merchant's lock. It may claim nothing.
        caller_ahead = shard_epoch < fence.epoch
        known = {r["merchant_id"]: r for r in rows if r["merchant_id"] is not None}
        claims_paused = bool(rows[0]["claims_paused"])
        not_owned: dict[str, str | None] = {}
        moving: list[str] = []
        unknown: list[str] = []
        claim: list[str] = []
        for merchant_id in ids:
            row = known.get(merchant_id)
            if row is None:
                if merchant_id not in fence.claimable:
                    not_owned[merchant_id] = None
                elif caller_ahead:
                    raise StaleEpoch(self.name, shard_epoch, fence.epoch)
                elif claims_paused:
                    moving.append(merchant_id)
                    unknown.append(merchant_id)
                else:
                    claim.append(merchant_id)
            elif row["state"] in ("moved", "incoming"):
                # moved_to names the shard that owns it now (moved) or still (incoming).
                not_owned[merchant_id] = row["moved_to"]
            elif row["state"] == "moving" and not (fence.allow_moving or merchant_id in movable):
                moving.append(merchant_id)
        if not_owned:
            raise MerchantsNotOwned(self.name, not_owned)
        if moving:
            raise MerchantsMoving(self.name, moving, unknown=unknown)
        if claim:
            await conn.execute(sql.CLAIM_MERCHANTS, claim, fence.epoch)

    async def _check_readable(
        self, conn: Connection, merchant_ids: Iterable[str], *, unknown_raises: bool = True
    ) -> None:
        """Refuses a read of merchants this shard does not own, naming the owner, and
        (unknown_raises) of merchants it has no record of: the caller looks where the
        previous config placed them before it answers that nothing exists."""
        ids = set(merchant_ids)
        rows = await conn.fetch(sql.MERCHANT_STATES, sorted(ids))
        elsewhere = {
            r["merchant_id"]: r["moved_to"] for r in rows if r["state"] in ("moved", "incoming")
        }
        if elsewhere:
            raise MerchantsNotOwned(self.name, elsewhere)
        if unknown_raises and len(rows) < len(ids):
            raise MerchantsUnknown(self.name, ids - {r["merchant_id"] for r in rows})

    async def _lock_accounts(
        self, conn: Connection, keys: Collection[AccountKey], *, velocity_read_later: bool = False
    ) -> dict[AccountKey, Account]:
        """Locks the accounts and gives those with velocity rules their usage at the
        clock read after the locks, unless the caller reads the clock itself with its
        next statement and then calls with_velocity_usage (velocity_read_later)."""
        accounts = await self._accounts(conn, keys, statement=sql.LOCK_ACCOUNTS)
        if not velocity_read_later and any(a.velocity_rules for a in accounts.values()):
            with_velocity_usage(accounts, await conn.fetchval(sql.NOW))
        return accounts

    async def _select_accounts(
        self, conn: Connection, keys: Collection[AccountKey]
    ) -> dict[AccountKey, Account]:
        return await self._accounts(conn, keys, statement=sql.SELECT_ACCOUNTS)

    async def _accounts(
        self, conn: Connection, keys: Collection[AccountKey], *, statement: str
    ) -> dict[AccountKey, Account]:
        if not keys:
            return {}
        rows = await conn.fetch(
            statement, [k.merchant_id for k in keys], [k.account_id for k in keys]
        )
        return {a.key: a for a in map(_account, rows)}

    async def _select_transfers(
        self, conn: Connection, keys: Collection[TransferKey]
    ) -> dict[TransferKey, TransferRecord]:
        transfers, _ = await self._select_records(conn, keys)
        return transfers

    async def _select_records(
        self, conn: Connection, keys: Collection[TransferKey]
    ) -> tuple[dict[TransferKey, TransferRecord], dict[TransferKey, JournalRecord]]:
        """Transfers and journals share one id namespace; returns each kind apart."""
        if not keys:
            return {}, {}
        rows = await conn.fetch(
            sql.SELECT_TRANSFERS, [k.merchant_id for k in keys], [k.transfer_id for k in keys]
        )
        return await self._records(conn, rows)

    async def _select_records_and_now(
        self,
        conn: Connection,
        keys: Collection[TransferKey],
        locked: dict[AccountKey, Account],
    ) -> tuple[dict[TransferKey, TransferRecord], dict[TransferKey, JournalRecord], datetime]:
        """_select_records and the transaction's clock in one round trip (the hot
        path); gives the limited accounts among `locked` (locked with
        velocity_read_later) their usage at that clock."""
        rows = await conn.fetch(
            sql.SELECT_TRANSFERS_AND_NOW,
            [k.merchant_id for k in keys],
            [k.transfer_id for k in keys],
        )
        with_velocity_usage(locked, rows[0]["now"])
        now: datetime = rows[0]["now"]
        transfers, journals = await self._records(
            conn, [r for r in rows if r["transfer_id"] is not None]
        )
        return transfers, journals, now

    async def _records(
        self, conn: Connection, rows: Sequence[asyncpg.Record]
    ) -> tuple[dict[TransferKey, TransferRecord], dict[TransferKey, JournalRecord]]:
        transfers, journals = parse_records(rows)
        in_progress = [k for k, r in transfers.items() if r.result is TransferResult.IN_PROGRESS]
        if in_progress:
            # A cross-shard transfer's result is its saga's, once the saga finished.
            finals = await conn.fetch(
                saga_sql.FINAL_RESULTS,
                [k.merchant_id for k in in_progress],
                [k.transfer_id for k in in_progress],
            )
            with_saga_results(
                transfers,
                ((TransferKey(r["merchant_id"], r["transfer_id"]), r["result"]) for r in finals),
            )
        return transfers, journals

    async def _saga_backed(
        self, conn: Connection, keys: Collection[TransferKey]
    ) -> set[TransferKey]:
        return await self._keys_found(conn, saga_sql.SELECT_SAGA_KEYS_FOR, keys)

    async def _keys_found(
        self, conn: Connection, probe: str, keys: Collection[TransferKey]
    ) -> set[TransferKey]:
        """The keys that probe (a probe_by_key statement over transfer keys) finds."""
        if not keys:
            return set()
        rows = await conn.fetch(probe, [k.merchant_id for k in keys], [k.transfer_id for k in keys])
        return {TransferKey(r["merchant_id"], r["transfer_id"]) for r in rows}

    async def _pending_states(
        self, conn: Connection, keys: Collection[TransferKey]
    ) -> dict[TransferKey, PendingState]:
        if not keys:
            return {}
        rows = await conn.fetch(
            sql.SELECT_RESOLUTIONS, [k.merchant_id for k in keys], [k.transfer_id for k in keys]
        )
        return {
            TransferKey(r["merchant_id"], r["pending_id"]): PendingState(r["state"]) for r in rows
        }

    async def _reversed(
        self, conn: Connection, keys: Collection[TransferKey]
    ) -> dict[TransferKey, int]:
        if not keys:
            return {}
        rows = await conn.fetch(
            sql.SUM_REVERSALS, [k.merchant_id for k in keys], [k.transfer_id for k in keys]
        )
        return {
            TransferKey(r["merchant_id"], r["reversal_of"]): int(r["reversed_minor"]) for r in rows
        }

    async def _with_connection(
        self, fn: Callable[[Connection], Awaitable[T]], *, setting_up: bool = False
    ) -> T:
        with self._span(fn, transaction=False) as span:
            try:
                async with self._acquire(setting_up=setting_up) as conn:
                    # A read changes nothing: as background work it is never worth a span.
                    return await fn(conn)
            except ShardBusy:
                self._failed(span, "busy", TimeoutError())
                raise
            except ShardUnavailable as error:
                self._failed(span, "unavailable", error)
                raise
            except BaseException as error:
                if is_unavailable(error):
                    self._failed(span, "unavailable", error)
                    raise ShardUnavailable(self.name, error) from error
                raise

    async def _in_transaction(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Runs fn in one transaction, again from the start after a retryable race."""
        with self._span(fn, transaction=True) as span:
            for attempt in range(1, limits.transaction_attempts_max + 1):
                span.set_attribute("ledger.attempts", attempt)
                try:
                    async with self._acquire() as conn, conn.transaction():
                        result = await fn(conn)
                    if self.on_commit is not None:
                        self.on_commit(self.name)
                    if self._unavailable_since is not None:
                        self._maybe_available()
                    return _found_work(span, result)
                except ShardBusy:
                    self._failed(span, "busy", TimeoutError())
                    raise
                except ShardUnavailable as error:
                    self._failed(span, "unavailable", error)
                    raise
                except RetryTransaction:
                    log.info(
                        "shard %s: retrying a raced transaction (attempt %d)", self.name, attempt
                    )
                except asyncpg.PostgresError as error:
                    if error.sqlstate in RETRYABLE_STATES:
                        continue
                    if is_unavailable(error):
                        self._failed(span, "unavailable", error)
                        raise ShardUnavailable(self.name, error) from error
                    self._failed(span, "error", error)
                    raise
                except BaseException as error:
                    if is_unavailable(error):
                        self._failed(span, "unavailable", error)
                        raise ShardUnavailable(self.name, error) from error
                    raise
            self._failed(span, "contention", RetryTransaction("attempts exhausted"))
            raise ShardUnavailable(self.name, RetryTransaction("attempts exhausted"))

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pool connection for reads outside the ledger's transactions (audits, gauges);
        a shard that cannot be reached or refuses connections raises ShardUnavailable."""
        try:
            async with self._acquire() as conn:
                yield conn
        except ShardUnavailable:
            raise
        except BaseException as error:
            if is_unavailable(error):
                raise ShardUnavailable(self.name, error) from error
            raise

    @contextlib.asynccontextmanager
    async def _acquire(self, *, setting_up: bool = False) -> AsyncIterator[Connection]:
        """A pool connection; a wait for one that times out on a full pool is ShardBusy.

        A server that answers but refuses to let us connect (SQLSTATE 55000 "database
        does not allow connections" during maintenance, 57P03 "cannot connect now",
        53300 too many connections, ...) is unavailable, whatever the SQLSTATE: any
        database error while connecting means the shard cannot be used now.
        """
        if not self.set_up and not setting_up:
            raise ShardUnavailable(self.name, NotSetUp(self.name))
        pool = self.pool
        try:
            conn = await pool.acquire(timeout=limits.pool_acquire_timeout_s)
        except TimeoutError as error:
            if pool.get_size() >= self.pool_connections_max and pool.get_idle_size() == 0:
                raise ShardBusy(self.name, error) from error
            self._went_unavailable(error)
            raise
        except asyncpg.PostgresError as error:
            self._went_unavailable(error)
            raise ShardUnavailable(self.name, error) from error
        except BaseException as error:
            if is_unavailable(error):
                self._went_unavailable(error)
            raise
        try:
            yield conn
        finally:
            await pool.release(conn)

    def _went_unavailable(self, error: BaseException) -> None:
        """Logs the change to unavailable once, not at every attempt (the background
        workers try every shard several times a second). The change back is logged by
        a transaction that goes through once none failed for shard_recovered_after_s."""
        self._unavailable_last_s = time.monotonic()
        if self._unavailable_since is not None:
            return
        self._unavailable_since = self._unavailable_last_s
        log.warning(
            "shard %s is unavailable (%s%s): its merchants get UNAVAILABLE until it answers",
            self.name,
            type(error).__name__,
            f", SQLSTATE {error.sqlstate}" if isinstance(error, asyncpg.PostgresError) else "",
        )

    def _maybe_available(self) -> None:
        assert self._unavailable_since is not None
        now_s = time.monotonic()
        if now_s - self._unavailable_last_s < limits.shard_recovered_after_s:
            # Some calls still fail (a read-only shard passes reads, refuses writes).
            return
        down_s = now_s - self._unavailable_since
        self._unavailable_since = None
        log.info("shard %s is available again after %.1f s", self.name, down_s)

    @contextlib.contextmanager
    def _span(self, fn: Callable[..., object], *, transaction: bool) -> Iterator[Span]:
        """One span per shard transaction (or read), naming the shard and the operation."""
        operation = fn.__qualname__.split(".<locals>")[0].rsplit(".", 1)[-1].lstrip("_")
        started = time.perf_counter()
        with start_as_current_span(
            f"shard {operation}",
            attributes={
                "db.system": "postgresql",
                "ledger.shard": self.name,
                "ledger.operation": operation,
                "ledger.transaction": transaction,
                # Outside any request: background work, exported only if it found some.
                **background_span_attributes(),
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            finally:
                metrics.shard_transactions.record(
                    time.perf_counter() - started, {"shard": self.name, "operation": operation}
                )

    def _failed(self, span: Span, kind: str, error: BaseException) -> None:
        if kind == "unavailable":
            self._went_unavailable(error.__cause__ or error)
        metrics.shard_errors.add(1, {"shard": self.name, "kind": kind})
        span.set_status(Status(StatusCode.ERROR, f"{kind}: {type(error).__name__}"))


def _found_work(span: Span, result: T) -> T:
    """A background span is kept when its operation returned something (claimed sagas,
    released holds, a count above zero); an empty answer means it found nothing to do."""
    if result:
        mark_found_work(span)
    return result


async def _no_reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    return None


async def init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Sets up a connection to a shard as the pool's are (jsonb as the rows hold it)."""
    # Binary format (a version byte, then JSON text) so COPY, which moves
    # merchants between shards, can carry jsonb too.
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )
    # Event bodies (migration 0018): the same JSON, without the version byte.
    await conn.set_type_codec(
        "json",
        encoder=_encode_json,
        decoder=_decode_json,
        schema="pg_catalog",
        format="binary",
    )


_JSONB_VERSION = b"\x01"
_EMPTY_JSONB_OBJECT = _JSONB_VERSION + b"{}"
# Every account row carries its velocity rules, nearly always none.
_EMPTY_JSONB_ARRAY = _JSONB_VERSION + b"[]"


def _encode_jsonb(value: object) -> bytes:
    # Most transfers and accounts carry no metadata: one constant instead of json.dumps.
    if value == {}:
        return _EMPTY_JSONB_OBJECT
    return _JSONB_VERSION + _encode_json(value)


def _decode_jsonb(data: bytes) -> object:
    if data == _EMPTY_JSONB_OBJECT:
        return {}
    if data == _EMPTY_JSONB_ARRAY:
        return []
    return _decode_json(memoryview(data)[1:])


def _encode_json(value: object) -> bytes:
    return json.dumps(value).encode()


def _decode_json(data: bytes | memoryview) -> object:
    # orjson takes a third of json.loads's time on an event's body, which every
    # subscriber and the publisher decode per event. Its values are json.loads's
    # for every integer from -2**63 to 2**64 - 1 (beyond, it gives a float); the
    # ledger's JSON holds no other: numbers come from bigint columns and int64
    # fields, metadata values are strings. What orjson refuses (NaN, a lone
    # surrogate escape: PostgreSQL stores neither) json.loads decides.
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data))


def _saga_settles(requests: Sequence[TransferRequest], saga_backed: set[TransferKey]) -> set[int]:
    """Positions of the settles of saga-carried pending transfers, with every
    member of a linked chain that holds one (a chain succeeds or fails whole)."""
    if not saga_backed:
        return set()
    found = {
        i
        for i, r in enumerate(requests)
        if r.settles_pending and TransferKey(r.debit.merchant_id, r.pending_id) in saga_backed
    }
    for chain in linked_chains(requests):
        if found.intersection(chain):
            found.update(chain)
    return found


def _with_handed_back(
    requests: Sequence[TransferRequest], handed_back: set[int], applied: Sequence[ItemOutcome]
) -> list[ItemOutcome]:
    """The outcomes of every request: the applied ones in their places, RUN_AS_SAGA
    markers (IN_PROGRESS, nothing written) for the ones handed back."""
    outcomes = iter(applied)
    return [
        ItemOutcome(RUN_AS_SAGA, r.id, TransferResult.IN_PROGRESS)
        if i in handed_back
        else replace(next(outcomes), index=i)
        for i, r in enumerate(requests)
    ]


def parse_records(
    rows: Sequence[asyncpg.Record],
) -> tuple[dict[TransferKey, TransferRecord], dict[TransferKey, JournalRecord]]:
    """Transfer and journal rows (one id namespace) as records, each kind apart. A
    cross-shard transfer reads IN_PROGRESS here even once its saga finished."""
    transfers: dict[TransferKey, TransferRecord] = {}
    journals: dict[TransferKey, JournalRecord] = {}
    for row in rows:
        if row["kind"] == RecordKind.JOURNAL:
            journal = _journal(row)
            journals[journal.request.key] = journal
        else:
            record = _transfer(row)
            transfers[record.key] = record
    return transfers, journals


def with_saga_results(
    transfers: dict[TransferKey, TransferRecord], results: Iterable[tuple[TransferKey, int]]
) -> None:
    """A cross-shard transfer's result is its saga's, once the saga finished (its own
    record reads IN_PROGRESS for good)."""
    for key, result in results:
        record = transfers.get(key)
        if record is not None and record.result is TransferResult.IN_PROGRESS:
            transfers[key] = replace(record, result=TransferResult(result))


def _account(row: asyncpg.Record) -> Account:
    return Account(
        spec=AccountSpec(
            key=AccountKey(row["merchant_id"], row["account_id"]),
            currency=row["currency"],
            debits_must_not_exceed_credits=row["debits_must_not_exceed_credits"],
            credits_must_not_exceed_debits=row["credits_must_not_exceed_debits"],
            metadata=row["metadata"],
        ),
        closed=row["closed"],
        balances=Balances(
            row["debits_posted"],
            row["credits_posted"],
            row["debits_pending"],
            row["credits_pending"],
        ),
        entry_count=row["entry_count"],
        created_at=row["created_at"],
        head_hash=row["entry_hash"],
        velocity_rules=_velocity_rules_text(row["velocity_rules"]),
        velocity_counters=row["velocity_counters"],
    )


# Distinct rule sets parsed once: every locked account row carries its rules as
# text, and accounts mostly share a few sets; parsing is most of their cost.
_RULE_TEXTS_CACHED_MAX = 4096


@functools.lru_cache(maxsize=_RULE_TEXTS_CACHED_MAX)
def _velocity_rules_text(text: str) -> tuple[VelocityRule, ...]:
    if text == "[]":
        return ()
    return velocity_rules(json.loads(text))


def velocity_rules(stored: list[dict[str, Any]]) -> tuple[VelocityRule, ...]:
    """Rules as stored in accounts.velocity_rules (and the limits history)."""
    if not stored:
        return ()
    return tuple(
        VelocityRule(
            rule_id=r["rule_id"],
            direction=Direction(r["direction"]),
            metric=VelocityMetric(r["metric"]),
            window_s=r["window_s"],
            limit=r["limit"],
        )
        for r in stored
    )


def velocity_rules_json(rules: Sequence[VelocityRule]) -> list[dict[str, Any]]:
    return [
        {
            "rule_id": r.rule_id,
            "direction": int(r.direction),
            "metric": int(r.metric),
            "window_s": r.window_s,
            "limit": r.limit,
        }
        for r in rules
    ]


def with_velocity_usage(accounts: dict[AccountKey, Account], now: datetime) -> None:
    """Gives each account with velocity rules its usage at `now` from the counters
    read with its lock: no other transaction can add to them before this one
    commits, and `now`, read after the lock, is the check's own time."""
    now_s = int(now.timestamp())
    for key, a in accounts.items():
        if not a.velocity_rules:
            continue
        accounts[key] = Account(
            a.spec,
            a.closed,
            a.balances,
            a.entry_count,
            a.created_at,
            a.head_hash,
            a.velocity_rules,
            velocity_counters.Usage(a.velocity_counters, usage_keys(a.velocity_rules), now_s),
            now,
            a.velocity_counters,
        )


def _transfer(row: asyncpg.Record) -> TransferRecord:
    credit = (
        AccountKey(row["credit_merchant_id"], row["credit_account_id"])
        if row["credit_merchant_id"]
        else None
    )
    request = TransferRequest(
        id=row["transfer_id"],
        debit=AccountKey(row["debit_merchant_id"], row["debit_account_id"]),
        credit=credit,
        amount_minor=row["amount_minor"],
        currency=row["currency"],
        action=TransferAction(row["action"]),
        pending_id=row["pending_id"],
        timeout_ms=row["timeout_ms"],
        linked=row["linked"],
        reversal_of=row["reversal_of"],
        metadata=row["metadata"],
    )
    return TransferRecord(
        request=request,
        result=TransferResult(row["result"]),
        amount_effective_minor=row["amount_effective_minor"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        trace_id=row["trace_id"],
    )


def _entry(row: asyncpg.Record) -> Entry:
    return Entry(
        account=AccountKey(row["merchant_id"], row["account_id"]),
        sequence=row["sequence"],
        transfer=TransferKey(row["transfer_merchant_id"], row["transfer_id"]),
        direction=Direction(row["direction"]),
        kind=EntryKind(row["kind"]),
        amount_minor=row["amount_minor"],
        balances_after=Balances(
            row["debits_posted"],
            row["credits_posted"],
            row["debits_pending"],
            row["credits_pending"],
        ),
        created_at=row["created_at"],
        hash=row["entry_hash"],
    )


def _journal_replay(existing: JournalRecord, request: JournalRequest) -> JournalOutcome:
    stored = existing.request
    differing = None
    if stored.postings != request.postings:
        differing = "postings"
    elif dict(stored.metadata) != dict(request.metadata):
        differing = "metadata"
    if differing is not None:
        return JournalOutcome(
            TransferResult.EXISTS_WITH_DIFFERENT_FIELDS, False, -1, differing, existing.created_at
        )
    return JournalOutcome(
        existing.result, True, existing.failed_posting_index, None, existing.created_at
    )


def _journal(row: asyncpg.Record) -> JournalRecord:
    postings = tuple(
        Posting(
            account=AccountKey(p["merchant_id"], p["account_id"]),
            amount_minor=p["amount_minor"],
            currency=p["currency"],
            direction=Direction(p["direction"]),
        )
        for p in row["postings"]
    )
    return JournalRecord(
        request=JournalRequest(
            id=row["transfer_id"],
            merchant_id=row["merchant_id"],
            postings=postings,
            metadata=row["metadata"],
        ),
        result=TransferResult(row["result"]),
        failed_posting_index=row["failed_posting_index"],
        created_at=row["created_at"],
    )


JournalRow = tuple[JournalRequest, TransferResult, int, datetime]


async def write_plan(
    conn: Connection,
    *,
    records: Sequence[TransferRecord],
    entries: Sequence[Entry],
    accounts: Mapping[AccountKey, AccountState],
    resolutions: Sequence[Resolution],
    expiring: Sequence[TransferRecord],
    journals: Sequence[JournalRow] = (),
    ended_extra: Sequence[TransferKey] = (),
    change: EventKind | None = None,
    change_detail: Mapping[str, Any] | None = None,
    velocity: Sequence[VelocityAdd] = (),
    locked: Mapping[AccountKey, Account] | None = None,
) -> None:
    """Writes a batch and its events in one round trip and checks every row landed.

    Each transfer that applied, each journal and each pending transfer that expired
    is an event of its own kind; entries of any other transfer key (saga steps,
    move bookings) are events of kind `change`, with `change_detail`. The
    velocity adds go into the counters of the accounts as `locked` (every one
    added to changed, so its row is written).
    """
    # Every transfer records the trace that made it: "which postings did trace X make".
    trace_id = current_trace_id()
    transfer_rows: list[tuple[Any, ...]] = [
        (
            q.debit.merchant_id,
            q.id,
            RecordKind.TRANSFER,
            q.action,
            q.debit.merchant_id,
            q.debit.account_id,
            q.credit.merchant_id if q.credit else "",
            q.credit.account_id if q.credit else "",
            q.amount_minor,
            r.amount_effective_minor,
            q.currency,
            q.pending_id,
            q.timeout_ms,
            q.linked,
            q.reversal_of,
            dict(q.metadata),
            None,
            r.result,
            -1,
            r.expires_at,
            r.trace_id or trace_id,
            r.created_at,
        )
        for r in records
        for q in (r.request,)
    ]
    transfer_rows += [
        (
            request.merchant_id,
            request.id,
            RecordKind.JOURNAL,
            0,
            request.merchant_id,
            "",
            "",
            "",
            0,
            0,
            "",
            "",
            0,
            False,
            "",
            dict(request.metadata),
            _postings_json(request),
            result,
            failed_index,
            None,
            trace_id,
            created_at,
        )
        for request, result, failed_index, created_at in journals
    ]
    last_hashes = {e.account: e.hash for e in entries}
    invariant(
        all(accounts[k].head_hash == h for k, h in last_hashes.items()),
        "each account's new head is the hash of its last new entry",
    )
    entry_rows = [
        (
            e.account.merchant_id,
            e.account.account_id,
            e.sequence,
            e.transfer.merchant_id,
            e.transfer.transfer_id,
            e.direction,
            e.kind,
            e.amount_minor,
            b.debits_posted,
            b.credits_posted,
            b.debits_pending,
            b.credits_pending,
            e.created_at,
            e.hash,
        )
        for e in entries
        for b in (e.balances_after,)
    ]
    counters = _velocity_counters_after(velocity, locked or {}, accounts)
    account_rows = [
        (
            key.merchant_id,
            key.account_id,
            b.debits_posted,
            b.credits_posted,
            b.debits_pending,
            b.credits_pending,
            s.entry_count,
            s.head_hash,
            counters.get(key),
        )
        for key, s in accounts.items()
        for b in (s.balances,)
    ]
    ended = [
        (k.merchant_id, k.transfer_id) for k in (*(r.pending for r in resolutions), *ended_extra)
    ]
    events = _event_rows(records, journals, entries, resolutions, trace_id, change, change_detail)
    counts = await conn.fetchrow(
        sql.WRITE_BATCH,
        transfer_rows,
        entry_rows,
        account_rows,
        [
            (r.pending.merchant_id, r.pending.transfer_id, r.state, r.by_transfer_id, r.created_at)
            for r in resolutions
        ],
        [(r.key.merchant_id, r.key.transfer_id, r.expires_at) for r in expiring],
        ended,
        events,
    )
    assert counts is not None
    if counts["transfers"] != len(records) + len(journals):
        # A concurrent request with the same id committed first (only possible
        # when the two shared no account lock); the retry will see it as a replay.
        raise RetryTransaction()
    invariant(counts["entries"] == len(entries), "every entry was written")
    invariant(counts["accounts"] == len(accounts), "every changed account was updated")
    invariant(counts["resolutions"] == len(resolutions), "every resolution was written")
    invariant(counts["events"] == len(events), "every change wrote its event")
    if counts["crossings"]:
        # Counted when written: a transaction that then fails to commit (rare,
        # and retried) may count a crossing twice; the table is the record.
        for crossed in counts["crossings"]:
            monitor_id, _, direction = crossed.rpartition(":")
            metrics.monitor_crossings.add(
                1, {"monitor": monitor_id, "direction": _CROSSING_NAMES[direction]}
            )


# Results that changed the books: a transfer applied, or a saga's reservation made.
_APPLIED = (TransferResult.OK, TransferResult.IN_PROGRESS)


def _event_rows(
    records: Sequence[TransferRecord],
    journals: Sequence[JournalRow],
    entries: Sequence[Entry],
    resolutions: Sequence[Resolution],
    trace_id: str,
    change: EventKind | None,
    change_detail: Mapping[str, Any] | None,
) -> list[tuple[Any, ...]]:
    """One ledger_event_row per change in the batch (WRITE_BATCH joins in the rest)."""
    rows: list[tuple[Any, ...]] = []
    covered: set[TransferKey] = set()
    for r in records:
        if r.result not in _APPLIED:
            continue  # a failure is recorded, but moved no money
        q = r.request
        kind = (
            transfer_event_kind(q.action, q.reversal_of)
            if r.result is TransferResult.OK
            else EventKind.SAGA_STEP
        )
        merchant_id = q.debit.merchant_id
        rows.append((kind, merchant_id, merchant_id, q.id, r.trace_id or trace_id, None))
        covered.add(q.key)
    for request, result, _, _ in journals:
        if result is TransferResult.OK:
            merchant_id = request.merchant_id
            rows.append(
                (EventKind.JOURNAL_POSTED, merchant_id, merchant_id, request.id, trace_id, None)
            )
            covered.add(TransferKey(merchant_id, request.id))
    ended = {r.pending: r.state for r in resolutions}
    for e in entries:
        key = e.transfer
        if key in covered:
            continue
        covered.add(key)
        state = ended.get(key)
        expired = resolution_event_kind(state) if state is not None else None
        said, detail = (expired, None) if expired is not None else (change, change_detail)
        invariant(said is not None, "entries without a transfer say what changed")
        rows.append((said, key.merchant_id, key.merchant_id, key.transfer_id, trace_id, detail))
    return rows


_CROSSING_NAMES = {"1": "fell_below", "2": "rose_to"}


def _velocity_counters_after(
    velocity: Sequence[VelocityAdd],
    locked: Mapping[AccountKey, Account],
    changed: Mapping[AccountKey, AccountState],
) -> dict[AccountKey, bytes]:
    """Each counted account's counters after the adds (several plans in one
    transaction, saga steps, may add to one window: all start from the locked row)."""
    by_account: dict[AccountKey, list[tuple[tuple[Direction, int], int, int, int]]] = {}
    for v in velocity:
        by_account.setdefault(v.account, []).append(
            ((v.direction, v.window_s), v.bucket_index, v.amount_minor, v.count)
        )
    invariant(
        all(k in locked and k in changed for k in by_account),
        "velocity is counted on locked accounts whose rows are written",
    )
    return {key: _counters_after(locked[key], adds) for key, adds in by_account.items()}


def _counters_after(
    account: Account, adds: Sequence[tuple[tuple[Direction, int], int, int, int]]
) -> bytes:
    used = account.velocity_used
    if isinstance(used, velocity_counters.Usage):
        # The counters as the check parsed them, not parsed again.
        return used.counters_after(adds)
    return velocity_counters.added(account.velocity_counters, adds)


def _postings_json(request: JournalRequest) -> list[dict[str, Any]]:
    return [
        {
            "merchant_id": p.account.merchant_id,
            "account_id": p.account.account_id,
            "amount_minor": p.amount_minor,
            "currency": p.currency,
            "direction": int(p.direction),
        }
        for p in request.postings
    ]


def active_merchants(fenced: list[asyncpg.Record]) -> set[str]:
    """The merchants this shard owns and may write now, from the fence's rows.

    An expiry sweep skips the rest: a merchant being moved is expired once the
    move ends (wherever it then is), one moved away by its new shard, where its
    timers went with it.
    """
    return {r["merchant_id"] for r in fenced if r["state"] == "active"}

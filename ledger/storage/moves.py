"""The per-shard operations of a merchant move; each is one transaction and idempotent."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from ledger import limits
from ledger.domain.accounts import Account, AccountKey
from ledger.domain.engine import AccountState, advanced
from ledger.domain.events import EventKind
from ledger.domain.moves import (
    CrossHold,
    Holds,
    LocalHold,
    carried_hold_booking,
    move_key,
    position_account,
    position_booking,
    position_minor,
)
from ledger.domain.sagas import (
    SETTLEMENT_MERCHANT_ID,
    CreditOutcome,
    SagaKind,
)
from ledger.domain.transfers import Entry, TransferAction, TransferKey, TransferResult
from ledger.invariant import invariant
from ledger.storage import move_statements as sql
from ledger.storage import saga_statements as saga_sql
from ledger.storage import statements as ledger_sql
from ledger.storage.errors import is_unavailable
from ledger.storage.settlement_legs import Leg, NewLeg, candidates, open_legs, resolved
from ledger.storage.shard import Shard, write_plan

if TYPE_CHECKING:
    from ledger.storage.shard import Connection

# How long the fence waits for writes in flight on the merchant; a move that
# cannot fence within this is retried later rather than stalling writers.
FENCE_LOCK_TIMEOUT_MS = 5000


@dataclass(frozen=True, slots=True)
class MerchantRows:
    """A merchant's rows on one shard, table by table."""

    tables: Mapping[str, list[asyncpg.Record]]
    steps: list[asyncpg.Record]
    expiries: list[asyncpg.Record]
    credit_holds: list[asyncpg.Record]
    # The oldest transaction still running when the read began (its snapshot's
    # xmin, as a 32-bit xid): every row this read could not see was written by a
    # transaction at least this new, so the next copy reads only those.
    horizon_xid: str

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.tables.values()) + len(self.steps)


@dataclass(frozen=True, slots=True)
class MerchantDigest:
    accounts: int
    transfers: int
    entries: int
    resolutions: int
    # Open pending transfers recorded under the merchant, their timers, and the
    # outcomes of saga credits to it (they move with it).
    open_pendings: int
    expiries: int
    credits: int
    entries_md5: str
    accounts_md5: str
    # Limits, their history, velocity counters, monitors and crossings (migration 0012).
    limits_md5: str


async def _local_holds(conn: Connection, merchant_id: str) -> list[LocalHold]:
    rows = await conn.fetch(sql.LOCAL_OPEN_PENDINGS, merchant_id)
    return [
        LocalHold(
            key=TransferKey(r["merchant_id"], r["transfer_id"]),
            debit=AccountKey(r["debit_merchant_id"], r["debit_account_id"]),
            credit=AccountKey(r["credit_merchant_id"], r["credit_account_id"]),
            currency=r["currency"],
            amount_minor=r["amount_effective_minor"],
        )
        for r in rows
        if (r["debit_merchant_id"] == merchant_id) != (r["credit_merchant_id"] == merchant_id)
    ]


async def _holds(conn: Connection, merchant_id: str) -> Holds:
    as_debit = await conn.fetch(sql.CROSS_HOLDS_AS_DEBIT, merchant_id)
    as_credit = await conn.fetch(sql.CREDIT_HOLDS_OF, merchant_id)
    return Holds(
        local=await _local_holds(conn, merchant_id),
        cross=[
            CrossHold(
                TransferKey(merchant_id, r["transfer_id"]),
                r["currency"],
                r["amount_minor"],
                debit_party=True,
                beyond=r["peer_shard"],
                path_position=r["path_position"],
            )
            for r in as_debit
        ]
        + [
            CrossHold(
                TransferKey(r["merchant_id"], r["transfer_id"]),
                r["currency"],
                r["amount_minor"],
                debit_party=False,
                beyond=r["from_shard"],
                path_position=r["path_position"],
            )
            for r in as_credit
        ],
    )


def _move_detail(merchant_id: str, epoch: int, *, from_shard: str, to_shard: str) -> dict[str, Any]:
    """A move's record in its events (MOVE_BOOKED, MERCHANT_MOVED_IN/OUT)."""
    return {
        "merchant_id": merchant_id,
        "epoch": epoch,
        "from_shard": from_shard,
        "to_shard": to_shard,
    }


async def _write_booking(
    conn: Connection,
    entries: Sequence[Entry],
    accounts: Mapping[AccountKey, AccountState],
    detail: Mapping[str, Any],
) -> None:
    """A move's settlement entries, with their MOVE_BOOKED event."""
    await write_plan(
        conn,
        records=[],
        entries=entries,
        accounts=accounts,
        resolutions=[],
        expiring=[],
        change=EventKind.MOVE_BOOKED,
        change_detail=detail,
    )


async def _make_local(
    conn: Connection, k: TransferKey, merchant_id: str, *, credit_merchant_id: str
) -> bool:
    """Marks the cross-shard hold k of merchant_id local (its saga settles locally,
    its credit side's record goes), if its other party is active here and free;
    False, changing nothing, if not. The caller releases its settlement legs."""
    other = credit_merchant_id if k.merchant_id == merchant_id else k.merchant_id
    invariant(other != merchant_id, "a cross-shard hold has two parties")
    if not await conn.fetchval(sql.TRY_LOCK_MERCHANT_SHARED, other):
        return False
    state = await conn.fetchrow(sql.MERCHANT_ROW, other)
    if state is None or state["state"] != "active":
        return False
    await conn.execute(sql.SETTLE_LOCALLY, k.merchant_id, k.transfer_id)
    await conn.execute(saga_sql.DELETE_CREDIT_HOLD, k.merchant_id, k.transfer_id)
    return True


@dataclass(frozen=True, slots=True)
class ShardPins:
    """What keeps a shard routable (see SHARD_PINS)."""

    merchants: int
    holding: int
    sagas: int
    positions: int

    @property
    def routable_needed(self) -> bool:
        return bool(self.merchants or self.holding or self.sagas)

    def render(self) -> str:
        parts = [
            f"{self.merchants} merchant(s)" if self.merchants else "",
            f"{self.holding} settlement account(s) with money pending for holds in flight "
            "or relayed through it"
            if self.holding
            else "",
            f"{self.sagas} saga(s) not finished" if self.sagas else "",
        ]
        return ", ".join(p for p in parts if p) or "nothing"


class AdminBusy(Exception):
    """Another rebalance or cleanup holds the shard's admin lock."""


class MoveDeferred(Exception):
    """The merchant cannot be switched now (nothing was written): retry the move later."""


class MoveStore:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    @contextlib.asynccontextmanager
    async def admin_lock(self) -> AsyncIterator[int]:
        """Holds the shard's admin lock on a connection of its own, and gives that
        connection's backend pid; AdminBusy if taken, ShardUnavailable if the shard
        cannot be reached."""
        async with self.shard.connection() as conn:
            if not await conn.fetchval(sql.TRY_ADMIN_LOCK):
                raise AdminBusy(self.shard.name)
            stopped = True
            try:
                yield conn.get_server_pid()
                stopped = False
            finally:
                try:
                    await conn.fetchval(sql.ADMIN_UNLOCK)
                except BaseException as error:
                    # The connection was lost (a shard stopped or cut off under the
                    # run), or is half-way through learning it was (asyncpg: "another
                    # operation is in progress" after its backend was terminated).
                    # Closed now, its session and its lock end with it, so it never
                    # goes back to the pool (which does not reset sessions) holding
                    # the lock. The unlock's error must not hide why the run stopped
                    # (chaos: "connection has been released back to the pool" over
                    # ShardUnavailable; the suite once: the protocol error). A
                    # connection the pool already took back is closed.
                    with contextlib.suppress(asyncpg.InterfaceError):
                        conn.terminate()
                    if not stopped and not is_unavailable(error):
                        raise

    async def admin_lock_holder(self) -> int | None:
        """The backend pid holding the shard's admin lock, or None."""

        async def run(conn: Connection) -> int | None:
            pid = await conn.fetchval(sql.ADMIN_LOCK_HOLDER)
            return None if pid is None else int(pid)

        return await self.shard._with_connection(run)

    # Cluster-wide switches.

    async def set_epoch_and_claims(self, *, epoch: int, claims_paused: bool) -> int:
        async def run(conn: Connection) -> int:
            return int(await conn.fetchval(sql.SET_EPOCH_AND_CLAIMS, epoch, claims_paused))

        return await self.shard._in_transaction(run)

    async def meta(self) -> tuple[int, bool]:
        async def run(conn: Connection) -> tuple[int, bool]:
            row = await conn.fetchrow(sql.READ_META)
            assert row is not None
            return int(row["epoch"]), bool(row["claims_paused"])

        return await self.shard._with_connection(run)

    # What is where.

    async def active_merchants(self) -> list[str]:
        async def run(conn: Connection) -> list[str]:
            return [r["merchant_id"] for r in await conn.fetch(sql.ACTIVE_MERCHANTS)]

        return await self.shard._with_connection(run)

    async def merchants_in(self, state: str) -> list[tuple[str, str | None]]:
        async def run(conn: Connection) -> list[tuple[str, str | None]]:
            rows = await conn.fetch(sql.MERCHANTS_IN_STATE, state)
            return [(r["merchant_id"], r["moved_to"]) for r in rows]

        return await self.shard._with_connection(run)

    async def merchant_counts(self) -> dict[str, int]:
        async def run(conn: Connection) -> dict[str, int]:
            return {r["state"]: r["merchants"] for r in await conn.fetch(sql.MERCHANT_COUNTS)}

        return await self.shard._with_connection(run)

    async def state_of(self, merchant_id: str) -> tuple[str, str | None] | None:
        async def run(conn: Connection) -> tuple[str, str | None] | None:
            row = await conn.fetchrow(sql.MERCHANT_ROW, merchant_id)
            return (row["state"], row["moved_to"]) if row is not None else None

        return await self.shard._with_connection(run)

    async def sizes(self, merchants: list[str]) -> dict[str, tuple[int, int]]:
        async def run(conn: Connection) -> dict[str, tuple[int, int]]:
            rows = await conn.fetch(sql.MERCHANT_SIZES, merchants)
            return {r["merchant_id"]: (r["accounts"], r["entries"]) for r in rows}

        return await self.shard._with_connection(run)

    # Copying (source reads, destination writes).

    async def mark_incoming(self, merchant_id: str, *, source: str, epoch: int) -> None:
        async def run(conn: Connection) -> None:
            await conn.execute(sql.MARK_INCOMING, merchant_id, source, epoch)

        await self.shard._in_transaction(run)

    async def abandon_incoming(self, merchant_id: str, *, source: str, epoch: int) -> bool:
        """incoming -> moved (to source), for a move the config no longer asks for:
        what was copied here becomes an old copy of a merchant that lives on its
        source (a prefix of its history there), which cleanup deletes like any
        other. False if it was not incoming here."""

        async def run(conn: Connection) -> bool:
            row = await conn.fetchrow(
                sql.SET_STATE, merchant_id, "moved", source, epoch, ["incoming"]
            )
            return row is not None

        return await self.shard._in_transaction(run)

    async def read_rows(self, merchant_id: str, *, since_xid: str | None) -> MerchantRows:
        """The merchant's rows; with since_xid (a previous read's horizon_xid), only
        those written since that read's snapshot (and some before: copies are
        idempotent), however late their transactions committed."""

        async def run(conn: Connection) -> MerchantRows:
            horizon_xid: str = await conn.fetchval(sql.SNAPSHOT_HORIZON_XID)
            tables: dict[str, list[asyncpg.Record]] = {}
            for table, column, _ in sql.MOVED_TABLES:
                query = f"SELECT * FROM {table} WHERE {column} = $1"
                args: list[object] = [merchant_id]
                if since_xid is not None:
                    query += f" AND {sql.WRITTEN_SINCE_XID}"
                    args.append(since_xid)
                tables[table] = await conn.fetch(query, *args)
            steps = await conn.fetch(
                "SELECT merchant_id, transfer_id, kind, step, outcome, detail, at"
                " FROM saga_steps WHERE merchant_id = $1 ORDER BY id",
                merchant_id,
            )
            expiries = await conn.fetch(
                "SELECT * FROM pending_expiries WHERE merchant_id = $1", merchant_id
            )
            credit_holds = await conn.fetch(sql.CREDIT_HOLDS_OF, merchant_id)
            return MerchantRows(tables, steps, expiries, credit_holds, horizon_xid)

        return await self.shard._in_transaction(run)

    async def write_rows(self, merchant_id: str, rows: MerchantRows) -> int:
        """Inserts what is missing (history) and refreshes what changes (accounts)."""

        async def run(conn: Connection) -> int:
            state = await conn.fetchrow(sql.MERCHANT_ROW, merchant_id)
            invariant(
                state is not None and state["state"] == "incoming",
                "rows are copied only to a shard where the merchant is incoming",
            )
            written = 0
            for table, _, key in sql.MOVED_TABLES:
                records = rows.tables[table]
                if not records:
                    continue
                columns = list(records[0].keys())
                staging = f"staging_{table}"
                await conn.execute(
                    f"CREATE TEMP TABLE {staging} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP"
                )
                await conn.copy_records_to_table(
                    staging, records=[tuple(r) for r in records], columns=columns
                )
                names = ", ".join(columns)
                if table in sql.MUTABLE_MOVED_TABLES:
                    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns)
                    conflict = f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
                else:
                    conflict = f"ON CONFLICT ({key}) DO NOTHING"
                status = await conn.execute(
                    f"INSERT INTO {table} ({names}) SELECT {names} FROM {staging} {conflict}"
                )
                written += int(status.rsplit(" ", 1)[-1])
            # Saga step history and expiry timers are replaced whole on each copy.
            await conn.execute(sql.ALLOW_HISTORY_CLEANUP, merchant_id)
            await conn.execute("DELETE FROM saga_steps WHERE merchant_id = $1", merchant_id)
            await conn.execute("DELETE FROM pending_expiries WHERE merchant_id = $1", merchant_id)
            await conn.execute(sql.DELETE_CREDIT_HOLDS_OF, merchant_id)
            if rows.credit_holds:
                await conn.executemany(
                    saga_sql.INSERT_CREDIT_HOLD, [tuple(r) for r in rows.credit_holds]
                )
            if rows.steps:
                await conn.executemany(
                    "INSERT INTO saga_steps (merchant_id, transfer_id, kind, step, outcome,"
                    " detail, at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    [tuple(r) for r in rows.steps],
                )
            if rows.expiries:
                await conn.executemany(
                    "INSERT INTO pending_expiries (merchant_id, transfer_id, expires_at)"
                    " VALUES ($1, $2, $3)",
                    [(r["merchant_id"], r["transfer_id"], r["expires_at"]) for r in rows.expiries],
                )
            return written + len(rows.steps)

        return await self.shard._in_transaction(run)

    # Fencing (source).

    async def fence(self, merchant_id: str, *, epoch: int) -> str | None:
        """Marks the merchant moving once writes in flight finish; returns why not, or None.

        New writes for it then wait; saga steps already under way still pass
        (see Fence.allow_moving), so its money in flight can settle while fenced.
        """

        async def run(conn: Connection) -> str | None:
            await conn.execute(f"SET LOCAL lock_timeout = {FENCE_LOCK_TIMEOUT_MS}")
            await conn.execute(sql.LOCK_MERCHANT_EXCLUSIVE, merchant_id)
            row = await conn.fetchrow(sql.MERCHANT_ROW, merchant_id)
            if row is None:
                return "unknown here"
            if row["state"] == "moving":
                return None
            if row["state"] != "active":
                return f"state {row['state']}"
            await conn.fetchrow(sql.SET_STATE, merchant_id, "moving", None, epoch, ["active"])
            return None

        try:
            return await self.shard._in_transaction(run)
        except asyncpg.exceptions.LockNotAvailableError:
            return "writes in flight did not finish within the fence timeout"

    async def blockers(self, merchant_id: str) -> str | None:
        """Why the merchant cannot move yet (sagas of its own open, money pending that
        it cannot carry), or None."""

        async def run(conn: Connection) -> str | None:
            row = await conn.fetchrow(sql.MERCHANT_BLOCKERS, merchant_id)
            assert row is not None
            if row["open_sagas"]:
                return f"{row['open_sagas']} saga(s) of its own not finished"
            if row["pending_minor"] != row["held_minor"]:
                # Holds credited before migration 0006 are not tracked: they settle first.
                return "money pending that no open transfer explains"
            return None

        return await self.shard._with_connection(run)

    async def holds(self, merchant_id: str) -> Holds:
        """What the merchant holds pending with other merchants, here and across shards."""

        async def run(conn: Connection) -> Holds:
            return await _holds(conn, merchant_id)

        return await self.shard._with_connection(run)

    async def relay_next(
        self, hold: TransferKey, *, came_from: str, after: int | None
    ) -> tuple[str, int | None] | None:
        """Where this shard passes the hold on, and the number of that relay, when
        it arrives from came_from, the stop numbered after; None if it ends here."""

        async def run(conn: Connection) -> tuple[str, int | None] | None:
            found = await conn.fetchrow(
                saga_sql.RELAY_AFTER, hold.merchant_id, hold.transfer_id, came_from, after
            )
            if found is None:
                return None
            invariant(found["from_shard"] == came_from, "a relay passes on from the stop before")
            return str(found["to_shard"]), found["path_position"]

        return await self.shard._with_connection(run)

    async def saga_peer(self, hold: TransferKey) -> tuple[str, int | None] | None:
        """The peer of the saga that made a cross-shard hold and the number of its
        end on the hold's path, if its row is here."""

        async def run(conn: Connection) -> tuple[str, int | None] | None:
            found = await conn.fetchrow(sql.SAGA_PEER, hold.merchant_id, hold.transfer_id)
            return (str(found["peer_shard"]), found["path_position"]) if found else None

        return await self.shard._with_connection(run)

    async def leave_refused(self, *, deleted: bool) -> str | None:
        """Why this shard may not stop being routed (retired, or deleted from the
        config when deleted), or None."""
        pins = await self.pins()
        name = self.shard.name
        if pins.routable_needed:
            return (
                f'shard {name} still holds {pins.render()}: keep it `state = "draining"` '
                "and rerun `ledger shards rebalance` until it reports DRAINED"
            )
        if deleted and pins.positions:
            return (
                f"shard {name} holds {pins.positions} settlement position(s) that mirror "
                'the other shards\' (reconcile needs both sides): set `state = "retired"` '
                "instead of deleting its entry"
            )
        return await self._stream_refused()

    async def _stream_refused(self) -> str | None:
        """Why the shard's event stream cannot end yet (see STREAM_PINS), or None."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(sql.STREAM_PINS)

        row = await self.shard._with_connection(run)
        assert row is not None
        name = self.shard.name
        if not row["live"]:
            return None  # no consumer to deliver the rest of the stream to
        if row["unnumbered"]:
            return (
                f"shard {name} has {row['unnumbered']} event(s) not numbered yet: run a "
                "replica until its sequencer numbers them, then try again"
            )
        if row["behind"]:
            behind = ", ".join(
                f"{consumer!r} ({count} events)"
                for consumer, _, count in (b.rpartition(":") for b in row["behind"])
            )
            return (
                f"shard {name}'s event stream is not acknowledged to its end by {behind}: "
                "let them catch up (or drop a consumer gone for good, `ledger events "
                "consumers --drop NAME`), then try again"
            )
        return None

    async def pins(self) -> ShardPins:
        """What keeps this shard routable now (a drain is done when nothing does)."""

        async def run(conn: Connection) -> ShardPins:
            row = await conn.fetchrow(sql.SHARD_PINS)
            assert row is not None
            return ShardPins(**dict(row))

        return await self.shard._with_connection(run)

    async def unfence(self, merchant_id: str, *, epoch: int) -> None:
        async def run(conn: Connection) -> None:
            await conn.fetchrow(sql.SET_STATE, merchant_id, "active", None, epoch, ["moving"])

        await self.shard._in_transaction(run)

    # Verifying.

    async def digest(self, merchant_id: str) -> MerchantDigest:
        async def run(conn: Connection) -> MerchantDigest:
            row = await conn.fetchrow(
                sql.MERCHANT_DIGEST, merchant_id, TransferAction.PENDING, TransferResult.OK
            )
            assert row is not None
            return MerchantDigest(**dict(row))

        return await self.shard._with_connection(run)

    async def balance_mismatches(self, merchant_id: str) -> list[str]:
        """Accounts whose balances differ from the sum of their entries."""

        async def run(conn: Connection) -> list[str]:
            rows = await conn.fetch(sql.ACCOUNT_ENTRY_MISMATCHES, merchant_id)
            return [r["account_id"] for r in rows]

        return await self.shard._with_connection(run)

    # Switching, in this order: activate on the destination, then moved on the source.

    async def activate(self, merchant_id: str, *, source: str, epoch: int, holds: Holds) -> bool:
        """incoming -> active, with the settlement booking; False if already done.

        holds: what the merchant holds pending with others, read on the source
        under the fence; the booking carries each across (ledger/domain/moves.py),
        or folds a hold's path where the merchant comes back to the shard the path
        passes next. Raises MoveDeferred, writing nothing, if a settle is passing
        the relay step a fold would remove.
        """
        return await self._switch(
            merchant_id,
            to_state="active",
            moved_to=None,
            from_states=["incoming"],
            peer=source,
            leaving=False,
            epoch=epoch,
            holds=holds,
            folded=None,
        )

    async def mark_moved(
        self,
        merchant_id: str,
        *,
        destination: str,
        epoch: int,
        folded: Collection[TransferKey] = (),
    ) -> bool:
        """moving -> moved (redirecting to destination), with the booking; False if done.

        folded: the holds whose paths the destination folded as the merchant arrived
        (MoveStore.folds there): this shard releases its leg of each instead of
        relaying it."""
        return await self._switch(
            merchant_id,
            to_state="moved",
            moved_to=destination,
            from_states=["moving"],
            peer=destination,
            leaving=True,
            epoch=epoch,
            holds=None,
            folded=folded,
        )

    async def folds(self, merchant_id: str, *, epoch: int) -> set[TransferKey]:
        """The holds whose paths this shard folded as the merchant arrived at epoch."""

        async def run(conn: Connection) -> set[TransferKey]:
            rows = await conn.fetch(sql.HOLD_FOLDS_OF, merchant_id, epoch)
            return {TransferKey(r["merchant_id"], r["transfer_id"]) for r in rows}

        return await self.shard._with_connection(run)

    async def _switch(
        self,
        merchant_id: str,
        *,
        to_state: str,
        moved_to: str | None,
        from_states: list[str],
        peer: str,
        leaving: bool,
        epoch: int,
        holds: Holds | None,
        folded: Collection[TransferKey] | None,
    ) -> bool:
        async def run(conn: Connection) -> bool:
            await conn.execute(sql.LOCK_MERCHANT_EXCLUSIVE, merchant_id)
            # Read before the switch: a merchant marked moved no longer holds anything here.
            carried = holds if holds is not None else await _holds(conn, merchant_id)
            if folded is None:
                # Arriving: the relays a fold may remove, granted while it is incoming.
                here = [h.key for h in carried.cross if h.beyond == self.shard.name]
                state = await conn.fetchrow(sql.MERCHANT_ROW, merchant_id)
                if here and state is not None and state["state"] == "incoming":
                    await conn.execute(
                        sql.ALLOW_RELAY_FOLDS,
                        merchant_id,
                        [k.merchant_id for k in here],
                        [k.transfer_id for k in here],
                    )
            switched = await conn.fetchrow(
                sql.SET_STATE, merchant_id, to_state, moved_to, epoch, from_states
            )
            if switched is None:
                return False
            positions = await conn.fetch(sql.NET_POSITIONS, merchant_id)
            held_minor = carried.net_pending_minor(merchant_id)
            for position in positions:
                invariant(
                    position["net_pending"] == held_minor.get(position["currency"], 0),
                    "a merchant moves only with pending transfers it can carry",
                )
            # The settlement account for the other shard takes the side the moving
            # merchant leaves here (or, arriving, the side it left behind).
            sides: list[tuple[LocalHold | CrossHold, bool]] = [
                (local, (local.debit.merchant_id == merchant_id) == leaving)
                for local in carried.local
            ]
            sides += [(cross, cross.debit_party == leaving) for cross in carried.cross]
            legs = {hold.key: Leg(peer, hold.currency, hold.key) for hold, _ in sides}
            for stripe, currency in {leg.stripe: leg.currency for leg in legs.values()}.items():
                await conn.execute(
                    saga_sql.ENSURE_SETTLEMENT_ACCOUNT,
                    SETTLEMENT_MERCHANT_ID,
                    stripe.account_id,
                    currency,
                )
            accounts = dict(await self.shard._lock_accounts(conn, candidates(legs.values())))
            # Decided under the settlement locks that a relay pass takes too.
            folds = (
                set(folded)
                if folded is not None
                else await self._fold_arrivals(
                    conn, carried.cross, merchant_id, source=peer, epoch=epoch
                )
            )
            # A hold carried (not folded) opens its leg for peer here; its path may
            # have passed here and peer before, so it stays where entries of it are.
            opened = await open_legs(
                conn,
                self.shard,
                accounts,
                [
                    NewLeg(legs[hold.key], debit=debit, amount_minor=hold.amount_minor)
                    for hold, debit in sides
                    if hold.key not in folds
                ],
                may_have_entries=True,
            )
            # After every other lock, in (currency, generation) order: no other
            # transaction locks position accounts but a move, so none waits in a cycle.
            positioned = await self._lock_position_accounts(
                conn, peer, {p["currency"]: int(p["net_posted"]) for p in positions}, leaving
            )
            for locked in positioned.values():
                accounts.update((a.key, a) for a in locked)
            # Read after the locks: entries' times rise with their sequence on every account.
            now: datetime = await conn.fetchval(ledger_sql.NOW)
            entries: list[Entry] = []
            changed: dict[AccountKey, AccountState] = {}

            def book(key: AccountKey, booked: tuple[Entry, AccountState] | None) -> None:
                if booked is not None:
                    entries.append(booked[0])
                    changed[key] = booked[1]
                    accounts[key] = advanced(accounts[key], booked[1])

            move = move_key(merchant_id, epoch)
            move_detail = _move_detail(
                merchant_id,
                epoch,
                from_shard=self.shard.name if leaving else peer,
                to_shard=peer if leaving else self.shard.name,
            )
            for position in positions:
                left = position_minor(int(position["net_posted"]), leaving=leaving)
                for account in positioned.get(position["currency"], []):
                    booking, left = position_booking(
                        account, position_minor=left, key=move, now=now
                    )
                    book(account.key, booking)
                invariant(left == 0, "a move books a merchant's whole position")
            for hold, debit in sides:
                leg = legs[hold.key]
                key = opened[leg] if leg in opened else resolved(leg, accounts)
                book(
                    key,
                    carried_hold_booking(
                        accounts[key],
                        amount_minor=hold.amount_minor,
                        debit=debit,
                        key=hold.key,
                        now=now,
                        folded=isinstance(hold, CrossHold) and hold.key in folds,
                    ),
                )
            for local in carried.local:
                await self._carry_local_hold(
                    conn, local, merchant_id, peer=peer, leaving=leaving, now=now
                )
            for cross in carried.cross:
                if cross.key not in folds:
                    await self._carry_cross_hold(conn, cross, peer=peer, leaving=leaving)
            await _write_booking(conn, entries, changed, move_detail)
            # The last event of the merchant on the shard it leaves, or the first on
            # the one it joins: readers order its events across the move by them.
            await conn.execute(
                sql.INSERT_MOVE_EVENT,
                EventKind.MERCHANT_MOVED_OUT if leaving else EventKind.MERCHANT_MOVED_IN,
                merchant_id,
                move_detail,
            )
            return True

        return await self.shard._in_transaction(run)

    async def _lock_position_accounts(
        self, conn: Connection, peer: str, net_posted: Mapping[str, int], leaving: bool
    ) -> dict[str, list[Account]]:
        """Per currency, the position accounts for peer (made on first use) that
        take the merchant's position between them, locked in generation order:
        the first with room on the position's side, and as many after it as the
        rest needs (ledger/domain/moves.py, position_account)."""
        found: dict[str, list[Account]] = {}
        for currency in sorted(net_posted):
            position = position_minor(net_posted[currency], leaving=leaving)
            left_minor = abs(position)
            for generation in range(limits.position_generations_max):
                if left_minor == 0:
                    break
                key = position_account(peer, currency, generation)
                await conn.execute(
                    saga_sql.ENSURE_SETTLEMENT_ACCOUNT, key.merchant_id, key.account_id, currency
                )
                account = (await self.shard._lock_accounts(conn, {key}))[key]
                room_minor = account.balances.room_minor(debit=position < 0)
                if room_minor > 0:
                    found.setdefault(currency, []).append(account)
                    left_minor -= min(room_minor, left_minor)
            invariant(left_minor == 0, "a position finds room within position_generations_max")
        return found

    async def _fold_arrivals(
        self,
        conn: Connection,
        holds: Sequence[CrossHold],
        merchant_id: str,
        *,
        source: str,
        epoch: int,
    ) -> set[TransferKey]:
        """Folds the path of each hold that the arriving merchant brings back to this
        shard, the one its path passes next from the source; returns them.

        Debit party: this shard relays the hold from the source onward; the saga now
        aims onward directly. Credit party: this shard relays it from an earlier
        shard to the source; the credit now arrives from that earlier shard. The
        relay is removed and the fold recorded for the source's half of the switch.
        Where this shard holds the hold's other end instead, the hold becomes local
        (_fold_to_local).
        """
        here = self.shard.name
        folds: set[TransferKey] = set()
        for hold in holds:
            if hold.beyond != here:
                continue
            k = hold.key
            relay: asyncpg.Record | None
            if hold.debit_party:
                relay = await conn.fetchrow(
                    saga_sql.RELAY_AFTER, k.merchant_id, k.transfer_id, source, hold.path_position
                )
            else:
                before = await conn.fetch(
                    sql.RELAYS_BEFORE, k.merchant_id, k.transfer_id, source, hold.path_position
                )
                numbered = hold.path_position is not None
                relay = before[0] if len(before) == 1 or (before and numbered) else None
            if relay is None:
                if await self._fold_to_local(conn, k, merchant_id, source=source, epoch=epoch):
                    folds.add(k)
                continue
            if await conn.fetchval(sql.RELAY_PASSED, k.merchant_id, k.transfer_id):
                raise MoveDeferred(
                    f"a settle of a hold is passing {here}; it moves once the hold settles"
                )
            # The stop next to the moving party's end, on this shard.
            invariant(
                relay["from_shard" if hold.debit_party else "to_shard"] == source,
                "a fold removes the relay next to the moving party's end",
            )
            onward = relay["to_shard" if hold.debit_party else "from_shard"]
            position = relay["path_position"]
            await conn.execute(
                sql.DELETE_HOLD_RELAY, k.merchant_id, k.transfer_id, relay["from_shard"], position
            )
            # The moving party's end takes the number of the relay folded away.
            if hold.debit_party:
                await conn.execute(
                    sql.MOVE_SAGA_PEER, k.merchant_id, k.transfer_id, onward, position
                )
            else:
                await conn.execute(
                    sql.MOVE_CREDIT_HOLD, k.merchant_id, k.transfer_id, onward, position
                )
            await conn.execute(
                sql.INSERT_HOLD_FOLD,
                *(k.merchant_id, k.transfer_id, merchant_id, epoch, source, onward),
            )
            folds.add(k)
        return folds

    async def _fold_to_local(
        self, conn: Connection, k: TransferKey, merchant_id: str, *, source: str, epoch: int
    ) -> bool:
        """Makes a cross-shard hold local where the merchant arriving from source
        joins the hold's other party here; False, changing nothing, where it cannot.

        The hold's path is then source and here alone: each shard's settlement
        account for the other holds both sides of it, which net to zero, so the
        switch releases them on both (the source reads the fold recorded here). The
        saga that made the hold keeps its row, marked as settling locally; the
        credit side's record goes. A settle or an expiry that looked before this
        commits reads the mark again under the settlement lock and goes local.
        """
        here = self.shard.name
        row = await conn.fetchrow(sql.FOLDABLE_HOLD, k.merchant_id, k.transfer_id)
        if row is None or {row["peer_shard"], row["from_shard"]} != {source, here}:
            return False
        if not await _make_local(
            conn, k, merchant_id, credit_merchant_id=row["credit_merchant_id"]
        ):
            return False
        await conn.execute(
            sql.INSERT_HOLD_FOLD, k.merchant_id, k.transfer_id, merchant_id, epoch, source, here
        )
        return True

    async def localise_holds(self, merchant_id: str, *, epoch: int, destination: str) -> int:
        """Makes local the merchant's cross-shard holds whose two ends are both here
        (SELF_HOLDS_OF), before it moves to destination at epoch; returns how many.

        Such a hold's settlement account for this shard holds both its sides, which
        net to zero: they are released, and the hold is carried as a local one, not
        relayed by this shard to itself (which made its path grow with each later
        move of either party: chaos seed 315). Under the settlement locks that a
        settle's or an expiry's first step takes too, as MoveStore._fold_to_local.
        """
        here = self.shard.name

        async def run(conn: Connection) -> int:
            seen = await conn.fetch(sql.SELF_HOLDS_OF, merchant_id, here)
            if not seen:
                return 0
            legs: dict[TransferKey, Leg] = {}
            for r in seen:
                k = TransferKey(r["merchant_id"], r["transfer_id"])
                legs[k] = Leg(here, r["currency"], k)
            accounts = dict(await self.shard._lock_accounts(conn, candidates(legs.values())))
            now: datetime = await conn.fetchval(ledger_sql.NOW)
            entries: list[Entry] = []
            changed: dict[AccountKey, AccountState] = {}
            # Read again under the locks: a settle may have resolved one meanwhile.
            for r in await conn.fetch(sql.SELF_HOLDS_OF, merchant_id, here):
                k = TransferKey(r["merchant_id"], r["transfer_id"])
                leg = legs.get(k)
                if leg is None:
                    continue
                key = resolved(leg, accounts)
                if key not in accounts or not await _make_local(
                    conn, k, merchant_id, credit_merchant_id=r["credit_merchant_id"]
                ):
                    continue
                for debit in (True, False):
                    entry, state = carried_hold_booking(
                        accounts[key],
                        amount_minor=r["amount_minor"],
                        debit=debit,
                        key=k,
                        now=now,
                        folded=True,
                    )
                    entries.append(entry)
                    changed[key] = state
                    accounts[key] = advanced(accounts[key], state)
            if entries:
                detail = _move_detail(merchant_id, epoch, from_shard=here, to_shard=destination)
                await _write_booking(conn, entries, changed, detail)
            return len(entries) // 2

        return await self.shard._in_transaction(run)

    async def _carry_cross_hold(
        self, conn: Connection, hold: CrossHold, *, peer: str, leaving: bool
    ) -> None:
        """The shard left becomes a relay between the shard beyond and the new one;
        the new one records which shard holds the other side for it."""
        k = hold.key
        # The relay takes the number the moving party's end had; the end moves one
        # further out (migration 0020), so the numbers keep the path's order.
        position = hold.path_position
        if leaving:
            came_from, goes_to = (peer, hold.beyond) if hold.debit_party else (hold.beyond, peer)
            await conn.execute(
                sql.INSERT_HOLD_RELAY, k.merchant_id, k.transfer_id, came_from, goes_to, position
            )
        elif hold.debit_party:
            outward = None if position is None else position - 1
            await conn.execute(sql.MOVE_SAGA_PEER, k.merchant_id, k.transfer_id, peer, outward)
        else:
            outward = None if position is None else position + 1
            await conn.execute(sql.MOVE_CREDIT_HOLD, k.merchant_id, k.transfer_id, peer, outward)

    async def _carry_local_hold(
        self,
        conn: Connection,
        hold: LocalHold,
        merchant_id: str,
        *,
        peer: str,
        leaving: bool,
        now: datetime,
    ) -> None:
        """The saga rows of a hold that becomes cross-shard, as its saga would have
        left them: the saga on the debit party's shard, the credit outcome on the
        credit party's."""
        if (hold.debit.merchant_id == merchant_id) != leaving:
            status = await conn.execute(
                sql.INSERT_CARRIED_SAGA,
                hold.key.merchant_id,
                hold.key.transfer_id,
                peer,
                hold.debit.account_id,
                hold.credit.merchant_id,
                hold.credit.account_id,
                hold.currency,
                hold.amount_minor,
                now,
                "",
            )
            invariant(
                status == "INSERT 0 1",
                "a carried hold's saga is new, or made it and was folded into a local hold",
            )
            await conn.execute(
                saga_sql.INSERT_STEP,
                hold.key.merchant_id,
                hold.key.transfer_id,
                int(SagaKind.TRANSFER),
                1,
                "carried",
                f"a local pending transfer, carried to {peer} by a merchant move",
            )
        else:
            await conn.execute(
                saga_sql.INSERT_CREDIT,
                hold.key.merchant_id,
                hold.key.transfer_id,
                int(SagaKind.TRANSFER),
                hold.credit.merchant_id,
                int(CreditOutcome.APPLIED),
                int(TransferResult.OK),
                peer,
                self.shard.name,
            )
            await conn.execute(
                saga_sql.INSERT_CREDIT_HOLD,
                hold.key.merchant_id,
                hold.key.transfer_id,
                hold.credit.merchant_id,
                hold.currency,
                hold.amount_minor,
                peer,
                1,  # the credit party's end, after the saga's (INSERT_CARRIED_SAGA: 0)
            )

    # Cleaning up (source, on command).

    async def cleanup(self, merchant_id: str) -> int:
        """Deletes the old copy of a merchant that moved away; returns rows deleted."""

        async def run(conn: Connection) -> int:
            row = await conn.fetchrow(sql.MERCHANT_ROW, merchant_id)
            invariant(row is not None and row["state"] == "moved", "only moved merchants")
            await conn.execute(sql.ALLOW_HISTORY_CLEANUP, merchant_id)
            deleted = 0
            for table, column, _ in reversed(sql.MOVED_TABLES):
                status = await conn.execute(f"DELETE FROM {table} WHERE {column} = $1", merchant_id)
                deleted += int(status.rsplit(" ", 1)[-1])
            status = await conn.execute(sql.DELETE_CREDIT_HOLDS_OF, merchant_id)
            deleted += int(status.rsplit(" ", 1)[-1])
            for table in ("saga_steps", "pending_expiries"):
                status = await conn.execute(
                    f"DELETE FROM {table} WHERE merchant_id = $1", merchant_id
                )
                deleted += int(status.rsplit(" ", 1)[-1])
            return deleted

        return await self.shard._in_transaction(run)

"""Read-only queries reconcile runs on one shard."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from ledger import limits
from ledger.domain import velocity_counters
from ledger.domain.sagas import SagaKey, SagaKind, SagaState
from ledger.domain.transfers import Direction
from ledger.storage import limits_statements
from ledger.storage import saga_statements as sql
from ledger.storage.shard import Shard

# Reconcile reads finished sagas in pages of this many.
SAGA_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class SettlementBalance:
    peer_shard: str
    currency: str
    net_posted: int
    net_pending: int


@dataclass(frozen=True, slots=True)
class FinishedSaga:
    key: SagaKey
    state: SagaState
    credit_action: int
    peer_shard: str


# What reconcile and `ledger shards status` say of claims_paused_without_a_run.
CLAIMS_PAUSED_WARNING = (
    "claims of new merchants paused and no rebalance running: merchants no shard "
    "has seen wait (UNAVAILABLE) until `ledger shards rebalance` runs (again)"
)


class ShardAudit:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    async def sums_by_currency(self) -> dict[str, tuple[Decimal, Decimal]]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(sql.SUMS_BY_CURRENCY)
        return {r["currency"]: (r["posted"], r["pending"]) for r in rows}

    async def accounts_off_their_entries(self) -> list[str]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(sql.ACCOUNTS_OFF_THEIR_ENTRIES)
        return [f"{r['merchant_id']}/{r['account_id']}" for r in rows]

    async def velocity_counters_off(self) -> list[str]:
        """Rule windows whose counters disagree with the account's entries."""
        async with self.shard.connection() as conn:
            rows = await conn.fetch(
                limits_statements.VELOCITY_COUNTERS_OFF, limits.velocity_buckets_per_window
            )
        off = []
        for r in rows:
            key = (Direction(r["direction"]), r["window_s"])
            if key not in velocity_counters.keys_of(r["counters"]):
                counted = "none"
            else:
                used = velocity_counters.usage(r["counters"], [key], r["now_s"])[key]
                if (used.amount_minor, used.count) == (r["entries_minor"], r["entries_count"]):
                    continue
                counted = f"{used.amount_minor} in {used.count}"
            off.append(
                f"{r['merchant_id']}/{r['account_id']} direction {r['direction']} "
                f"window {r['window_s']}s: counters {counted}, "
                f"entries {r['entries_minor']} in {r['entries_count']}"
            )
        return off

    async def settlement_balances(self) -> list[SettlementBalance]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(sql.SETTLEMENT_BALANCES)
        found = []
        for r in rows:
            peer, currency, _stripe = r["account_id"].rsplit("/", 2)
            found.append(
                SettlementBalance(
                    peer,
                    currency,
                    r["credits_posted"] - r["debits_posted"],
                    r["credits_pending"] - r["debits_pending"],
                )
            )
        return found

    async def saga_counts(self) -> dict[tuple[SagaState, str], int]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(sql.SAGA_COUNTS)
        return {(SagaState(r["state"]), r["peer_shard"]): r["sagas"] for r in rows}

    async def stale_move_markers(self) -> list[str]:
        """Merchants marked incoming or moving while no rebalance runs (a killed run
        left them: a moving merchant's writes wait until a rerun finishes the move)."""
        async with self.shard.connection() as conn:
            if await conn.fetchval(sql.ADMIN_LOCK_HELD):
                return []
            rows = await conn.fetch(sql.MOVE_MARKERS)
        return [f"{r['merchant_id']} {r['state']}" for r in rows]

    async def claims_paused_without_a_run(self) -> bool:
        """Claims of new merchants paused while no rebalance runs: a run failed before
        marking its moves, or the config gained a shard and no run has started. New
        merchants routed here wait (UNAVAILABLE) until a rebalance runs."""
        async with self.shard.connection() as conn:
            return bool(await conn.fetchval(sql.CLAIMS_PAUSED)) and not bool(
                await conn.fetchval(sql.ADMIN_LOCK_HELD)
            )

    async def hold_route_shards(self) -> dict[str, int]:
        """The shards open cross-shard holds need, to settle, and how many need each."""
        async with self.shard.connection() as conn:
            rows = await conn.fetch(sql.HOLD_ROUTE_SHARDS)
        return {r["shard"]: r["holds"] for r in rows}

    async def stuck_sagas(self, *, older_than_s: float) -> list[SagaKey]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(sql.STUCK_SAGAS, older_than_s)
        return [SagaKey(r["merchant_id"], r["transfer_id"], SagaKind(r["kind"])) for r in rows]

    async def finished_sagas(self, *, after: SagaKey | None) -> list[FinishedSaga]:
        cursor = after or SagaKey("", "", SagaKind.TRANSFER)
        async with self.shard.connection() as conn:
            rows = await conn.fetch(
                sql.FINISHED_SAGAS_PAGE,
                cursor.merchant_id,
                cursor.transfer_id,
                int(cursor.kind) if after else 0,
                SAGA_PAGE_SIZE,
            )
        return [
            FinishedSaga(
                SagaKey(r["merchant_id"], r["transfer_id"], SagaKind(r["kind"])),
                SagaState(r["state"]),
                r["credit_action"],
                r["peer_shard"],
            )
            for r in rows
        ]

    async def credit_outcomes(self, keys: list[SagaKey]) -> dict[SagaKey, int]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(
                sql.CREDITS_FOR,
                [k.merchant_id for k in keys],
                [k.transfer_id for k in keys],
                [int(k.kind) for k in keys],
            )
        return {
            SagaKey(r["merchant_id"], r["transfer_id"], SagaKind(r["kind"])): r["outcome"]
            for r in rows
        }

    async def posted_debits(self, keys: list[SagaKey]) -> set[tuple[str, str]]:
        async with self.shard.connection() as conn:
            rows = await conn.fetch(
                sql.POSTED_DEBITS_FOR,
                [k.merchant_id for k in keys],
                [k.transfer_id for k in keys],
            )
        return {(r["merchant_id"], r["transfer_id"]) for r in rows}

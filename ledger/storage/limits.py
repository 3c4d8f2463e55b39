"""Account limits and balance monitors on one shard: changes, reads, crossings.

Velocity counters and crossings are written by WRITE_BATCH with the entries
(ledger/storage/statements.py); this module changes and reads the limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from ledger.domain import velocity_counters
from ledger.domain.accounts import AccountKey, Balances
from ledger.domain.limits import AccountLimits, LimitsChange, LimitsChangeRequest, broken_now
from ledger.domain.monitors import BalanceMonitor, Crossing, MonitoredBalance
from ledger.domain.transfers import TransferKey
from ledger.domain.velocity import UsageKey, bucket_width_s, usage_keys
from ledger.storage import limits_statements as sql
from ledger.storage.shard import Fence, Shard, velocity_rules, velocity_rules_json

if TYPE_CHECKING:
    from ledger.storage.shard import Connection


class LimitsRefused(Exception):
    """The change cannot be made (nothing was written); reason names why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LimitsSetOutcome:
    change: LimitsChange
    replayed: bool


@dataclass(frozen=True, slots=True)
class MonitorCrossingRow:
    sequence: int
    monitor_id: str
    account: AccountKey
    direction: Crossing
    balance: MonitoredBalance
    threshold_minor: int
    balance_after_minor: int
    transfer: TransferKey
    crossed_at: Any


class LimitsStore:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    async def set_limits(
        self, request: LimitsChangeRequest, fence: Fence
    ) -> LimitsSetOutcome | None:
        """Records the change and makes it current, under the account's lock; None if
        the account does not exist. A change_id seen before replays its change."""
        key = request.account

        async def run(conn: Connection) -> LimitsSetOutcome | None:
            await self.shard._fence(conn, fence, {key.merchant_id})
            row = await conn.fetchrow(sql.LOCK_ACCOUNT, key.merchant_id, key.account_id)
            if row is None:
                return None
            known = await conn.fetchrow(
                sql.CHANGE_BY_ID, key.merchant_id, key.account_id, request.change_id
            )
            if known is not None:
                change = _change(known)
                if (change.limits, change.reason) != (request.limits, request.reason):
                    raise LimitsRefused(
                        "EXISTS_WITH_DIFFERENT_FIELDS",
                        f"change {request.change_id!r} exists with other limits or reason",
                    )
                return LimitsSetOutcome(change, replayed=True)
            balances = Balances(
                row["debits_posted"],
                row["credits_posted"],
                row["debits_pending"],
                row["credits_pending"],
            )
            broken = broken_now(request.limits, balances)
            if broken is not None:
                raise LimitsRefused(
                    broken.name, "the account's balances already break this overdraft flag"
                )
            limits = request.limits
            monitor_ids = [m.monitor_id for m in limits.monitors]
            taken = await conn.fetch(
                sql.MONITORS_IN_USE_ELSEWHERE, key.merchant_id, key.account_id, monitor_ids
            )
            if taken:
                raise LimitsRefused(
                    "MONITOR_ID_IN_USE",
                    f"monitor {taken[0]['monitor_id']!r} watches another account",
                )
            rules = velocity_rules_json(limits.velocity_rules)
            now_s: int = await conn.fetchval(sql.CLOCK_S)
            windows = sorted(usage_keys(limits.velocity_rules))
            recounted: dict[UsageKey, dict[int, tuple[int, int]]] = {}
            for direction, window_s in windows:
                rows = await conn.fetch(
                    sql.RECOUNT_VELOCITY,
                    key.merchant_id,
                    key.account_id,
                    int(direction),
                    window_s,
                    bucket_width_s(window_s),
                    now_s,
                )
                recounted[(direction, window_s)] = {
                    r["bucket_index"]: (r["amount_minor"], r["transfer_count"]) for r in rows
                }
            await conn.execute(
                sql.SET_ACCOUNT_LIMITS,
                key.merchant_id,
                key.account_id,
                limits.debits_must_not_exceed_credits,
                limits.credits_must_not_exceed_debits,
                rules,
                velocity_counters.rebuilt(windows, recounted, now_s),
            )
            await conn.execute(
                sql.DEACTIVATE_MONITORS, key.merchant_id, key.account_id, monitor_ids
            )
            if limits.monitors:
                await conn.execute(
                    sql.UPSERT_MONITORS,
                    key.merchant_id,
                    key.account_id,
                    monitor_ids,
                    [int(m.balance) for m in limits.monitors],
                    [m.threshold_minor for m in limits.monitors],
                )
            inserted = await conn.fetchrow(
                sql.INSERT_CHANGE,
                key.merchant_id,
                key.account_id,
                request.change_id,
                limits.debits_must_not_exceed_credits,
                limits.credits_must_not_exceed_debits,
                rules,
                _monitors_json(limits.monitors),
                request.changed_by,
                request.reason,
            )
            assert inserted is not None
            return LimitsSetOutcome(_change(inserted), replayed=False)

        return await self.shard._in_transaction(run)

    async def get_limits(
        self, key: AccountKey, *, history_max: int
    ) -> tuple[AccountLimits, list[LimitsChange]] | None:
        async def run(conn: Connection) -> tuple[AccountLimits, list[LimitsChange]] | None:
            await self.shard._check_readable(conn, {key.merchant_id})
            row = await conn.fetchrow(sql.ACCOUNT_LIMITS, key.merchant_id, key.account_id)
            if row is None:
                return None
            monitors = await conn.fetch(sql.ACTIVE_MONITORS, key.merchant_id, key.account_id)
            history = await conn.fetch(sql.HISTORY, key.merchant_id, key.account_id, history_max)
            return _limits(row, monitors), [_change(r) for r in history]

        return await self.shard._with_connection(run)

    async def crossings(
        self, merchant_id: str, *, after_sequence: int, limit: int
    ) -> list[MonitorCrossingRow]:
        async def run(conn: Connection) -> list[MonitorCrossingRow]:
            await self.shard._check_readable(conn, {merchant_id})
            rows = await conn.fetch(sql.CROSSINGS, merchant_id, after_sequence, limit)
            return [
                MonitorCrossingRow(
                    sequence=after_sequence + i + 1,
                    monitor_id=r["monitor_id"],
                    account=AccountKey(r["merchant_id"], r["account_id"]),
                    direction=Crossing(r["direction"]),
                    balance=MonitoredBalance(r["balance"]),
                    threshold_minor=r["threshold_minor"],
                    balance_after_minor=int(r["balance_after_minor"]),
                    transfer=TransferKey(r["transfer_merchant_id"], r["transfer_id"]),
                    crossed_at=r["crossed_at"],
                )
                for i, r in enumerate(rows)
            ]

        return await self.shard._with_connection(run)


def _monitors_json(monitors: Sequence[BalanceMonitor]) -> list[dict[str, Any]]:
    return [
        {
            "monitor_id": m.monitor_id,
            "balance": int(m.balance),
            "threshold_minor": m.threshold_minor,
        }
        for m in monitors
    ]


def _limits(row: asyncpg.Record, monitors: Iterable[Any]) -> AccountLimits:
    """An account's limits: the flags and rules of an accounts or history row, and
    its monitors (rows of balance_monitors, or the history's JSON)."""
    return AccountLimits(
        debits_must_not_exceed_credits=row["debits_must_not_exceed_credits"],
        credits_must_not_exceed_debits=row["credits_must_not_exceed_debits"],
        velocity_rules=velocity_rules(row["velocity_rules"]),
        monitors=tuple(
            BalanceMonitor(m["monitor_id"], MonitoredBalance(m["balance"]), m["threshold_minor"])
            for m in monitors
        ),
    )


def _change(row: asyncpg.Record) -> LimitsChange:
    return LimitsChange(
        account=AccountKey(row["merchant_id"], row["account_id"]),
        sequence=row["sequence"],
        change_id=row["change_id"],
        limits=_limits(row, row["balance_monitors"]),
        changed_by=row["changed_by"],
        reason=row["reason"],
        changed_at=row["changed_at"],
    )


__all__ = [
    "LimitsRefused",
    "LimitsSetOutcome",
    "LimitsStore",
    "MonitorCrossingRow",
]

"""Velocity limits in a chaos run: a few wallets get rules tight enough to refuse
some of the clients' transfers, and the checker proves that no rule was ever
exceeded over its exact window, whatever faults, replicas and moves did.

What counts is read from the entries with the service's own rule
(ledger/storage/limits_statements.py, COUNTED_MOVEMENT): reservations, and
postings that settle nothing. For every counted movement of a limited account
at or after the moment its rules were set, the movements within
(t - window_s, t] must stay within every rule of that direction.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from chaos.plan import CURRENCIES, Layout, Ref, wallet_account
from ledger.api.limits_servicer import account_limits
from ledger.domain.limits import AccountLimits
from ledger.domain.transfers import Direction
from ledger.domain.velocity import VelocityMetric, VelocityRule, total_within
from ledger.storage.limits_statements import COUNTED_MOVEMENT
from ledger.storage.shard import velocity_rules
from ledger.v1 import ledger_pb2 as pb

# Limited accounts: the first wallet of the first currency of the first merchant on
# each shard (three accounts), so refusals happen without starving the run.
LIMITED_WALLET_INDEX = 0
# Short windows (a run lasts seconds to minutes) so that windows fill and slide:
# at most 4 debits per 3 s and 6 credits per 3 s, and 600 minor units of debits per 20 s.
RULES: tuple[VelocityRule, ...] = (
    VelocityRule("debits-burst", Direction.DEBIT, VelocityMetric.COUNT, 3, 4),
    VelocityRule("credits-burst", Direction.CREDIT, VelocityMetric.COUNT, 3, 6),
    VelocityRule("debits-amount", Direction.DEBIT, VelocityMetric.AMOUNT, 20, 600),
)
CONNECT_TIMEOUT_S = 10.0
QUERY_TIMEOUT_S = 120.0

_OWNED = "SELECT merchant_id FROM merchants WHERE state IN ('active', 'moving')"
_LIMITED_SQL = f"""
SELECT a.merchant_id, a.account_id, a.velocity_rules,
       (SELECT max(c.changed_at) FROM account_limit_changes c
        WHERE c.merchant_id = a.merchant_id AND c.account_id = a.account_id) AS set_at
FROM accounts a
WHERE a.merchant_id IN ({_OWNED}) AND a.velocity_rules <> '[]'::jsonb
"""
_MOVEMENTS_SQL = f"""
SELECT e.merchant_id, e.account_id, e.direction, e.amount_minor, e.created_at
FROM entries e
JOIN accounts a ON a.merchant_id = e.merchant_id AND a.account_id = e.account_id
WHERE e.merchant_id IN ({_OWNED}) AND a.velocity_rules <> '[]'::jsonb
  AND {COUNTED_MOVEMENT}
"""


def limited_accounts(layout: Layout) -> list[Ref]:
    return [
        Ref(merchants[0], wallet_account(CURRENCIES[0], LIMITED_WALLET_INDEX))
        for _, merchants in layout.merchants
    ]


def limits_request(account: Ref) -> pb.SetAccountLimitsRequest:
    return pb.SetAccountLimitsRequest(
        account=pb.AccountRef(merchant_id=account.merchant_id, account_id=account.account_id),
        change_id="chaos-velocity",
        reason="chaos run: velocity rules under faults",
        # The wallets are no-overdraft accounts: the flag stays set.
        limits=account_limits(
            AccountLimits(debits_must_not_exceed_credits=True, velocity_rules=RULES)
        ),
    )


@dataclass(frozen=True, slots=True)
class VelocityFinding:
    account: Ref
    detail: str


async def check_velocity(dsns: dict[str, str]) -> tuple[list[VelocityFinding], str]:
    """Violations of any velocity rule over its exact window, and a summary note."""
    rules: dict[Ref, tuple[tuple[VelocityRule, ...], datetime | None]] = {}
    movements: dict[Ref, list[tuple[datetime, Direction, int]]] = defaultdict(list)
    for dsn in dsns.values():
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.set_type_codec("jsonb", encoder=str, decoder=_json, schema="pg_catalog")
                for r in await conn.fetch(_LIMITED_SQL, timeout=QUERY_TIMEOUT_S):
                    rules[Ref(r["merchant_id"], r["account_id"])] = (
                        velocity_rules(r["velocity_rules"]),
                        r["set_at"],
                    )
                for r in await conn.fetch(_MOVEMENTS_SQL, timeout=QUERY_TIMEOUT_S):
                    movements[Ref(r["merchant_id"], r["account_id"])].append(
                        (r["created_at"], Direction(r["direction"]), r["amount_minor"])
                    )
        finally:
            await conn.close()
    findings: list[VelocityFinding] = []
    checked = 0
    for ref, (account_rules, set_at) in sorted(rules.items()):
        moved = sorted(movements.get(ref, []))
        for rule in account_rules:
            events = [(t, a) for t, d, a in moved if d is rule.direction]
            for t, _ in events:
                if set_at is not None and t < set_at:
                    continue  # the rule was not in force yet
                checked += 1
                used = total_within(events, now=t, window_s=rule.window_s)
                value = used.amount_minor if rule.metric is VelocityMetric.AMOUNT else used.count
                if value > rule.limit:
                    findings.append(
                        VelocityFinding(
                            ref,
                            f"rule {rule.rule_id}: {value} > {rule.limit} within "
                            f"{rule.window_s}s ending {t.isoformat()}",
                        )
                    )
    note = (
        f"velocity: {len(rules)} limited accounts, {checked} windows checked, "
        f"{sum(len(v) for v in movements.values())} counted movements"
    )
    return findings, note


def _json(text: str) -> object:
    import json

    return json.loads(text)

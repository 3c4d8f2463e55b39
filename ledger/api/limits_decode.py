"""SetAccountLimits and the limits reads: protobuf -> domain values, every violation named."""

from __future__ import annotations

from ledger import limits
from ledger.api.decode import CARD_NUMBER_REASON, CONTROL_CHARACTERS, Violations, account_ref
from ledger.domain.accounts import AccountKey
from ledger.domain.limits import AccountLimits, LimitsChangeRequest
from ledger.domain.monitors import BalanceMonitor, MonitoredBalance
from ledger.domain.transfers import Direction
from ledger.domain.velocity import VelocityMetric, VelocityRule
from ledger.limits import AMOUNT_MINOR_MAX
from ledger.telemetry.card_numbers import contains_card_number
from ledger.v1 import ledger_pb2 as pb


def set_account_limits(
    request: pb.SetAccountLimitsRequest, *, changed_by: str
) -> LimitsChangeRequest:
    v = Violations()
    key = account_ref(v, "account", request.account)
    v.id("change_id", request.change_id)
    _reason(v, request.reason)
    new = account_limits(v, "limits", request.limits)
    v.raise_if_any()
    assert key is not None
    return LimitsChangeRequest(
        account=key,
        change_id=request.change_id,
        limits=new,
        reason=request.reason,
        changed_by=changed_by,
    )


def account_limits(v: Violations, field: str, given: pb.AccountLimits) -> AccountLimits:
    if given.debits_must_not_exceed_credits and given.credits_must_not_exceed_debits:
        v.add(field, "an account cannot limit both debits and credits by each other")
    rules: list[VelocityRule] = []
    if v.count(
        f"{field}.velocity_rules",
        len(given.velocity_rules),
        minimum=0,
        maximum=limits.velocity_rules_per_account_max,
    ):
        for i, r in enumerate(given.velocity_rules):
            rule = _rule(v, f"{field}.velocity_rules[{i}]", r)
            if rule is not None:
                rules.append(rule)
    ids = [r.rule_id for r in given.velocity_rules]
    if len(set(ids)) != len(ids):
        v.add(f"{field}.velocity_rules", "rule ids must be unique")
    monitors: list[BalanceMonitor] = []
    if v.count(
        f"{field}.monitors",
        len(given.monitors),
        minimum=0,
        maximum=limits.balance_monitors_per_account_max,
    ):
        for i, m in enumerate(given.monitors):
            path = f"{field}.monitors[{i}]"
            v.id(f"{path}.monitor_id", m.monitor_id)
            if int(m.balance) not in {b.value for b in MonitoredBalance}:
                v.add(f"{path}.balance", "must be NET_POSTED or AVAILABLE")
                continue
            monitors.append(
                BalanceMonitor(m.monitor_id, MonitoredBalance(m.balance), m.threshold_minor)
            )
    monitor_ids = [m.monitor_id for m in given.monitors]
    if len(set(monitor_ids)) != len(monitor_ids):
        v.add(f"{field}.monitors", "monitor ids must be unique")
    return AccountLimits(
        debits_must_not_exceed_credits=given.debits_must_not_exceed_credits,
        credits_must_not_exceed_debits=given.credits_must_not_exceed_debits,
        velocity_rules=tuple(rules),
        monitors=tuple(monitors),
    )


def _rule(v: Violations, path: str, r: pb.VelocityRule) -> VelocityRule | None:
    before = len(v.items)
    v.id(f"{path}.rule_id", r.rule_id)
    if int(r.direction) not in {d.value for d in Direction}:
        v.add(f"{path}.direction", "must be DEBIT or CREDIT")
    if int(r.metric) not in {m.value for m in VelocityMetric}:
        v.add(f"{path}.metric", "must be AMOUNT or COUNT")
    if not limits.velocity_window_s_min <= r.window_s <= limits.velocity_window_s_max:
        v.add(
            f"{path}.window_s",
            f"must be {limits.velocity_window_s_min} to {limits.velocity_window_s_max} seconds",
        )
    if not 0 <= r.limit <= AMOUNT_MINOR_MAX:
        v.add(f"{path}.limit", "must be 0 or more")
    if len(v.items) != before:
        return None
    return VelocityRule(
        rule_id=r.rule_id,
        direction=Direction(r.direction),
        metric=VelocityMetric(r.metric),
        window_s=r.window_s,
        limit=r.limit,
    )


def _reason(v: Violations, reason: str) -> None:
    size = len(reason.encode("utf-8", "surrogatepass"))
    if size == 0 or size > limits.limits_reason_bytes_max:
        v.add("reason", f"must be 1 to {limits.limits_reason_bytes_max} bytes")
    elif contains_card_number(reason):
        v.add("reason", CARD_NUMBER_REASON)
    elif CONTROL_CHARACTERS.search(reason):
        v.add("reason", "must not contain control characters")


def account_limits_request(request: pb.GetAccountLimitsRequest) -> tuple[AccountKey, int]:
    v = Violations()
    key = account_ref(v, "account", request.account)
    page_size = v.page_size("page_size", request.page_size)
    v.raise_if_any()
    assert key is not None
    return key, page_size


def crossings_request(request: pb.ListMonitorCrossingsRequest) -> tuple[str, int, int]:
    v = Violations()
    v.merchant_id("merchant_id", request.merchant_id)
    if request.after_sequence < 0:
        v.add("after_sequence", "must be 0 or more")
    page_size = v.page_size("page_size", request.page_size)
    v.raise_if_any()
    return request.merchant_id, request.after_sequence, page_size

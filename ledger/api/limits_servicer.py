"""The limits methods of LedgerAdminService: set and read an account's limits, list
balance monitor crossings. Admin scope: a merchant's own service cannot raise its limits."""

from __future__ import annotations

from typing import Any

import grpc

from ledger.api import encode, limits_decode
from ledger.api.auth import current_principal, require_merchants
from ledger.api.servicer import statuses
from ledger.api.status import failed_precondition, with_reason
from ledger.core.ledger import Ledger
from ledger.domain.limits import AccountLimits, LimitsChange
from ledger.domain.monitors import Crossing
from ledger.storage.limits import LimitsRefused, MonitorCrossingRow
from ledger.v1 import ledger_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]
# Who changed limits when the server requires no tokens.
ANONYMOUS = "anonymous"
_CROSSINGS = {
    Crossing.FELL_BELOW: pb.MONITOR_CROSSING_DIRECTION_FELL_BELOW,
    Crossing.ROSE_TO: pb.MONITOR_CROSSING_DIRECTION_ROSE_TO,
}


def _account_not_found() -> Exception:
    return with_reason(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "no such account")


class LimitsMethods:
    ledger: Ledger

    @statuses
    async def SetAccountLimits(
        self, request: pb.SetAccountLimitsRequest, context: Context
    ) -> pb.SetAccountLimitsResponse:
        principal = current_principal.get()
        change = limits_decode.set_account_limits(
            request, changed_by=principal.name if principal is not None else ANONYMOUS
        )
        require_merchants([("account.merchant_id", change.account.merchant_id)])
        try:
            outcome = await self.ledger.set_account_limits(change)
        except LimitsRefused as refused:
            if refused.reason == "EXISTS_WITH_DIFFERENT_FIELDS":
                raise with_reason(
                    grpc.StatusCode.ALREADY_EXISTS, refused.reason, str(refused), field="change_id"
                ) from None
            raise failed_precondition(refused.reason, str(refused), subjects=["limits"]) from None
        if outcome is None:
            raise _account_not_found()
        return pb.SetAccountLimitsResponse(
            change=limits_change(outcome.change), replayed=outcome.replayed
        )

    @statuses
    async def GetAccountLimits(
        self, request: pb.GetAccountLimitsRequest, context: Context
    ) -> pb.GetAccountLimitsResponse:
        key, page_size = limits_decode.account_limits_request(request)
        require_merchants([("account.merchant_id", key.merchant_id)])
        found = await self.ledger.account_limits(key, history_max=page_size)
        if found is None:
            raise _account_not_found()
        current, history = found
        return pb.GetAccountLimitsResponse(
            limits=account_limits(current), history=[limits_change(c) for c in history]
        )

    @statuses
    async def ListMonitorCrossings(
        self, request: pb.ListMonitorCrossingsRequest, context: Context
    ) -> pb.ListMonitorCrossingsResponse:
        merchant_id, after, page_size = limits_decode.crossings_request(request)
        require_merchants([("merchant_id", merchant_id)])
        rows = await self.ledger.monitor_crossings(
            merchant_id, after_sequence=after, limit=page_size
        )
        return pb.ListMonitorCrossingsResponse(crossings=[monitor_crossing(r) for r in rows])


def account_limits(a: AccountLimits) -> pb.AccountLimits:
    return pb.AccountLimits(
        debits_must_not_exceed_credits=a.debits_must_not_exceed_credits,
        credits_must_not_exceed_debits=a.credits_must_not_exceed_debits,
        velocity_rules=[
            pb.VelocityRule(
                rule_id=r.rule_id,
                direction=int(r.direction),  # type: ignore[arg-type]
                metric=int(r.metric),  # type: ignore[arg-type]
                window_s=r.window_s,
                limit=r.limit,
            )
            for r in a.velocity_rules
        ],
        monitors=[
            pb.BalanceMonitor(
                monitor_id=m.monitor_id,
                balance=int(m.balance),  # type: ignore[arg-type]
                threshold_minor=m.threshold_minor,
            )
            for m in a.monitors
        ],
    )


def limits_change(c: LimitsChange) -> pb.AccountLimitsChange:
    return pb.AccountLimitsChange(
        sequence=c.sequence,
        change_id=c.change_id,
        limits=account_limits(c.limits),
        changed_by=c.changed_by,
        reason=c.reason,
        changed_at=encode.timestamp(c.changed_at),
    )


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def monitor_crossing(r: MonitorCrossingRow) -> pb.MonitorCrossing:
    return pb.MonitorCrossing(
        monitor_id=r.monitor_id,
        account=encode.account_ref(r.account),
        direction=_CROSSINGS[r.direction],
        # The available balance can go below int64 in principle; clamped, never wrapped.
        balance_after_minor=min(max(r.balance_after_minor, _INT64_MIN), _INT64_MAX),
        threshold_minor=r.threshold_minor,
        transfer=pb.TransferRef(
            merchant_id=r.transfer.merchant_id, transfer_id=r.transfer.transfer_id
        ),
        crossed_at=encode.timestamp(r.crossed_at),
        sequence=r.sequence,
    )

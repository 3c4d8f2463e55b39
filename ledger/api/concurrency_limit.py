"""A limit on concurrent ledger calls that health checks do not count against.

gRPC's own maximum_concurrent_rpcs counts every call from its headers, so a
saturated replica would answer its health probe RESOURCE_EXHAUSTED and be
restarted for being busy, and callers that never send a body could exhaust it
(issue 23); the server does not set it. This interceptor enforces the
configured limit on everything but the open services, and counts a call only
once its request has arrived (see ledger/api/admission.py) and its token was
accepted, so silent and unauthenticated callers hold none of it.
"""

from __future__ import annotations

from typing import Any

import grpc

from ledger.api.handlers import Continuation, is_open, with_behavior
from ledger.api.status import AbortError, send_abort


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, calls_max: int) -> None:
        assert calls_max >= 1, "at least one call at a time"
        self.calls_max = calls_max
        self.in_flight = 0

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or is_open(method):
            return handler
        inner = handler.unary_unary
        if self.full():
            # Refused on arrival: the request bytes are not even parsed.
            return with_behavior(handler, self._refuse, parse_request=False)

        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self.full():
                await self._refuse(request, context)
            self.in_flight += 1
            try:
                return await inner(request, context)
            finally:
                self.in_flight -= 1

        return with_behavior(handler, limited)

    def full(self) -> bool:
        return self.in_flight >= self.calls_max

    def refusal(self) -> AbortError:
        return AbortError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"more than {self.calls_max} calls in progress; retry shortly",
        )

    async def _refuse(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Fail fast: queueing would only grow latency and memory.
        await send_abort(context, self.refusal())

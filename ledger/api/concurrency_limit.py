"""A limit on concurrent ledger calls that health checks do not count against.

gRPC's own maximum_concurrent_rpcs counts every call, so a saturated replica
would answer its health probe RESOURCE_EXHAUSTED and be restarted for being
busy. This interceptor enforces the configured limit on everything but the
open services; gRPC's cap, set a little higher, stays as the hard bound.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ledger.api.auth import OPEN_SERVICES
from ledger.api.status import AbortError, send_abort

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Any]]


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
        if (
            handler is None
            or handler.unary_unary is None
            or method.lstrip("/").partition("/")[0] in OPEN_SERVICES
        ):
            return handler
        inner = handler.unary_unary
        if self.in_flight >= self.calls_max:
            # Refused on arrival: the request bytes are not even parsed.
            return grpc.unary_unary_rpc_method_handler(
                self._refuse,
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )

        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self.in_flight >= self.calls_max:
                await self._refuse(request, context)
            self.in_flight += 1
            try:
                return await inner(request, context)
            finally:
                self.in_flight -= 1

        return grpc.unary_unary_rpc_method_handler(
            limited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _refuse(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Fail fast: queueing would only grow latency and memory.
        await send_abort(
            context,
            AbortError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self.calls_max} calls in progress; retry shortly",
            ),
        )

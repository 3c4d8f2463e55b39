"""The outermost interceptor: decides about a call from its headers, before its body.

gRPC Python reads a unary call's request before it runs any behavior, so a call
that sends headers and never a body used to sit in the server indefinitely,
unauthenticated, counted against gRPC's call limit, while health checks and
valid callers were refused. Here every unary call is served as a stream whose
first message is read by us:

- a call the token table refuses (no token, a bad, revoked or expired one, a
  missing scope) is answered at once, its body never read, holding nothing;
- an admitted call must deliver its request within the receive deadline, and
  only then do the concurrency limit and the servicer see it;
- health and reflection need no token, and hold nothing but their own stream;
- one token may have at most caller_calls_max calls in progress (from its
  headers to its answer), so one caller, idle or busy, cannot take every call
  slot from the others;
- while the concurrency limit is full, a call is refused from its headers too,
  its body never read: an overload is shed as cheaply as gRPC's own limit did.

Everything inside (telemetry, the concurrency limit, authorization, decoding)
still sees an ordinary unary call.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from ledger.api.auth import AuthInterceptor
from ledger.api.concurrency_limit import ConcurrencyLimitInterceptor
from ledger.api.handlers import Continuation, is_open
from ledger.api.status import AbortError, invalid_argument, send_abort
from ledger.telemetry import metrics


class AdmissionInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        *,
        auth: AuthInterceptor | None,
        receive_timeout_s: float,
        caller_calls_max: int,
        limit: ConcurrencyLimitInterceptor | None = None,
    ) -> None:
        assert receive_timeout_s > 0, "a request must have some time to arrive"
        assert caller_calls_max >= 1, "a caller may make at least one call"
        self.auth = auth
        self.receive_timeout_s = receive_timeout_s
        self.caller_calls_max = caller_calls_max
        self.limit = limit
        # Calls in progress per token name; entries leave at zero, so the map
        # holds at most one entry per token in the file.
        self._calls_of: dict[str, int] = {}

    def calls_in_progress(self, caller: str) -> int:
        return self._calls_of.get(caller, 0)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = handler_call_details.method
        if self.limit is not None and not is_open(method) and self.limit.full():
            return grpc.stream_unary_rpc_method_handler(
                _refuse_unread(self.limit.refusal(), method),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        caller: str | None = None
        if self.auth is not None and not is_open(method):
            principal, refusal = self.auth.admit(handler_call_details)
            if principal is not None:
                caller = principal.name
            if refusal is not None:
                return grpc.stream_unary_rpc_method_handler(
                    _refuse_unread(refusal, method),
                    request_deserializer=None,
                    response_serializer=handler.response_serializer,
                )
        inner = handler.unary_unary
        timeout_s = self.receive_timeout_s

        async def received(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if caller is None:
                return await receive_and_serve(context)
            held = self._calls_of.get(caller, 0)
            if held >= self.caller_calls_max:
                metrics.requests.add(
                    1, {"method": method.rpartition("/")[2], "code": "RESOURCE_EXHAUSTED"}
                )
                await send_abort(
                    context,
                    AbortError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this token has {held} calls in progress, its most; retry shortly",
                    ),
                )
            self._calls_of[caller] = held + 1
            try:
                return await receive_and_serve(context)
            finally:
                left = self._calls_of[caller] - 1
                if left:
                    self._calls_of[caller] = left
                else:
                    del self._calls_of[caller]

        async def receive_and_serve(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                # A timeout scope, not wait_for: no extra task per call.
                async with asyncio.timeout(timeout_s):
                    request = await context.read()
            except TimeoutError:
                await send_abort(
                    context,
                    AbortError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the request did not arrive within {timeout_s:g} s of its headers",
                    ),
                )
            if request is grpc.aio.EOF:  # type: ignore[attr-defined]
                await send_abort(context, invalid_argument([("request", "no request message")]))
            return await inner(request, context)

        return grpc.stream_unary_rpc_method_handler(
            received,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _refuse_unread(refusal: AbortError, method: str) -> Any:
    name = method.rpartition("/")[2]

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metrics.requests.add(1, {"method": name, "code": refusal.code.name})
        await send_abort(context, refusal)

    return refuse

"""The server's one interceptor: decides about a call from its headers, before its body,
then counts, traces, limits, authorizes and parses it.

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

After the read, in this order: the call is traced (when tracing is on) and
counted (ledger/api/interceptor.py), held under the concurrency limit
(ledger/api/concurrency_limit.py), its principal is set for the servicer's
merchant checks (ledger/api/auth.py), and its bytes are parsed, with
INVALID_ARGUMENT for bytes that are not the message (ledger/api/request_decode.py).
The servicer sees an ordinary unary call.

One interceptor instead of a chain of five, and one wrapped handler per method
built once: a chain costs a coroutine, a closure and a handler object per
interceptor and call (issue 18).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import grpc

from ledger.api.auth import Authenticator, Principal, current_principal
from ledger.api.concurrency_limit import ConcurrencyLimit
from ledger.api.handlers import Behavior, Continuation, is_open
from ledger.api.interceptor import Context, counted, traced
from ledger.api.request_decode import PARSE_ERRORS, undecodable
from ledger.api.status import AbortError, invalid_argument, send_abort
from ledger.telemetry import metrics
from ledger.telemetry.tracing import tracing_active


class _Method:
    """What the interceptor knows about one method, worked out once."""

    __slots__ = ("inner", "name", "open", "parse", "path", "service")

    def __init__(self, path: str, handler: grpc.RpcMethodHandler[Any, Any]) -> None:
        self.path = path
        self.service, _, self.name = path.lstrip("/").partition("/")
        self.open = is_open(path)
        assert handler.unary_unary is not None
        self.inner: Behavior = handler.unary_unary  # type: ignore[assignment]
        self.parse: Callable[[bytes], Any] | None = handler.request_deserializer


class AdmissionInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        *,
        auth: Authenticator | None,
        receive_timeout_s: float,
        caller_calls_max: int,
        concurrent_rpcs_max: int,
    ) -> None:
        assert receive_timeout_s > 0, "a request must have some time to arrive"
        assert caller_calls_max >= 1, "a caller may make at least one call"
        self.auth = auth
        self.receive_timeout_s = receive_timeout_s
        self.caller_calls_max = caller_calls_max
        self.limit = ConcurrencyLimit(concurrent_rpcs_max)
        # Calls in progress per token name; entries leave at zero, so the map
        # holds at most one entry per token in the file.
        self._calls_of: dict[str, int] = {}
        # Method path -> the stream handler serving it; one entry per registered
        # unary method (unknown methods have no handler and are not kept).
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def calls_in_progress(self, caller: str) -> int:
        return self._calls_of.get(caller, 0)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        path: str = handler_call_details.method
        wrapped = self._handlers.get(path)
        if wrapped is None:
            wrapped = grpc.stream_unary_rpc_method_handler(
                functools.partial(self._call, _Method(path, handler)),
                # The raw bytes: parsed by us, after admission (see _serve).
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
            self._handlers[path] = wrapped
        return wrapped

    async def _call(self, method: _Method, requests: Any, context: Context) -> Any:
        if not method.open and self.limit.full():
            # Overload is shed from the headers, the body never read, as gRPC's own
            # limit did (parsing 2000 refused batches of 200 cost seconds).
            metrics.requests.add(1, {"method": method.name, "code": "RESOURCE_EXHAUSTED"})
            await send_abort(context, self.limit.refusal())
        principal: Principal | None = None
        if self.auth is not None and not method.open:
            # From the headers alone: a refused call's body is never read.
            principal, refusal = self.auth.admit(method.path, context.invocation_metadata())
            if refusal is not None:
                metrics.requests.add(1, {"method": method.name, "code": refusal.code.name})
                await send_abort(context, refusal)
        if principal is None:
            return await self._receive_and_serve(method, None, context)
        caller = principal.name
        held = self._calls_of.get(caller, 0)
        if held >= self.caller_calls_max:
            metrics.requests.add(1, {"method": method.name, "code": "RESOURCE_EXHAUSTED"})
            await send_abort(
                context,
                AbortError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this token has {held} calls in progress, its most; retry shortly",
                ),
            )
        self._calls_of[caller] = held + 1
        try:
            return await self._receive_and_serve(method, principal, context)
        finally:
            left = self._calls_of[caller] - 1
            if left:
                self._calls_of[caller] = left
            else:
                del self._calls_of[caller]

    async def _receive_and_serve(
        self, method: _Method, principal: Principal | None, context: Context
    ) -> Any:
        timeout_s = self.receive_timeout_s
        try:
            # A timeout scope, not wait_for: no extra task per call.
            async with asyncio.timeout(timeout_s):
                raw = await context.read()
        except TimeoutError:
            await send_abort(
                context,
                AbortError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request did not arrive within {timeout_s:g} s of its headers",
                ),
            )
        if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
            await send_abort(context, invalid_argument([("request", "no request message")]))
        serve = functools.partial(self._serve, method, principal, raw, context)
        if tracing_active():
            return await traced(
                method.service, method.name, serve, context, context.invocation_metadata()
            )
        return await counted(method.name, serve, context)

    async def _serve(
        self, method: _Method, principal: Principal | None, raw: bytes, context: Context
    ) -> Any:
        if method.open:
            return await method.inner(await _parsed(method, raw, context), context)
        limit = self.limit
        if limit.full():
            await send_abort(context, limit.refusal())
        limit.in_flight += 1
        reset = current_principal.set(principal)
        try:
            return await method.inner(await _parsed(method, raw, context), context)
        finally:
            current_principal.reset(reset)
            limit.in_flight -= 1


async def _parsed(method: _Method, raw: bytes, context: Context) -> Any:
    """The request message; INVALID_ARGUMENT for bytes that are not one."""
    if method.parse is None:
        return raw
    try:
        return method.parse(raw)
    except PARSE_ERRORS as error:
        await send_abort(context, undecodable(error))
        raise AssertionError("unreachable: abort raises") from error

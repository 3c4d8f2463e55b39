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
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from ledger.api.auth import Authenticator, Principal, current_principal
from ledger.api.concurrency_limit import ConcurrencyLimit
from ledger.api.handlers import Behavior, Continuation, is_open
from ledger.api.interceptor import Context, code_of, counted, traced
from ledger.api.request_decode import PARSE_ERRORS, undecodable
from ledger.api.status import AbortError, invalid_argument, send_abort
from ledger.telemetry import metrics
from ledger.telemetry.tracing import tracing_active


class _Method:
    """What the interceptor knows about one method, worked out once."""

    __slots__ = ("inner", "name", "open", "parse", "path", "service", "streams")

    def __init__(self, path: str, handler: grpc.RpcMethodHandler[Any, Any]) -> None:
        self.path = path
        self.service, _, self.name = path.lstrip("/").partition("/")
        self.open = is_open(path)
        # Server-streaming (SubscribeEvents): one request, a stream of responses.
        self.streams = handler.unary_unary is None
        inner = handler.unary_stream if self.streams else handler.unary_unary
        assert inner is not None
        self.inner: Behavior = inner  # type: ignore[assignment]
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
        if handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        path: str = handler_call_details.method
        wrapped = self._handlers.get(path)
        if wrapped is None:
            method = _Method(path, handler)
            # The raw bytes: parsed by us, after admission (see _serve).
            if method.streams:
                wrapped = grpc.stream_stream_rpc_method_handler(
                    functools.partial(self._stream_call, method),
                    request_deserializer=None,
                    response_serializer=handler.response_serializer,
                )
            else:
                wrapped = grpc.stream_unary_rpc_method_handler(
                    functools.partial(self._call, method),
                    request_deserializer=None,
                    response_serializer=handler.response_serializer,
                )
            self._handlers[path] = wrapped
        return wrapped

    async def _stream_call(
        self, method: _Method, requests: Any, context: Context
    ) -> AsyncIterator[Any]:
        """A server-streaming call, admitted as a unary one is; it holds a call slot
        while it streams. Counted when it ends; not traced (it may last for days)."""
        code = "OK"
        try:
            principal = await self._admit(method, context)
            raw = await self._receive(context)
            if self.limit.full():
                await send_abort(context, self.limit.refusal())
            request = await _parsed(method, raw, context)
            with self._held(principal):
                self.limit.in_flight += 1
                # Not reset: a stream closed by its client is finalised from another
                # context; each call runs in a task (a context) of its own anyway.
                current_principal.set(principal)
                try:
                    async for response in method.inner(request, context):  # type: ignore[attr-defined]
                        yield response
                finally:
                    self.limit.in_flight -= 1
        except BaseException:
            found = code_of(context)
            code = found.name if found is not None else "CANCELLED"
            raise
        finally:
            metrics.requests.add(1, {"method": method.name, "code": code})

    async def _admit(self, method: _Method, context: Context) -> Principal | None:
        """The caller's principal, from the headers alone; aborts a refused call."""
        if method.open:
            return None
        if self.limit.full():
            metrics.requests.add(1, {"method": method.name, "code": "RESOURCE_EXHAUSTED"})
            await send_abort(context, self.limit.refusal())
        if self.auth is None:
            return None
        principal, refusal = self.auth.admit(method.path, context.invocation_metadata())
        if refusal is not None:
            metrics.requests.add(1, {"method": method.name, "code": refusal.code.name})
            await send_abort(context, refusal)
        assert principal is not None
        held = self._calls_of.get(principal.name, 0)
        if held >= self.caller_calls_max:
            metrics.requests.add(1, {"method": method.name, "code": "RESOURCE_EXHAUSTED"})
            await send_abort(
                context,
                AbortError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this token has {held} calls in progress, its most; retry shortly",
                ),
            )
        return principal

    @contextlib.contextmanager
    def _held(self, principal: Principal | None) -> Iterator[None]:
        """Counts a call against its token's calls in progress while it runs."""
        if principal is None:
            yield
            return
        caller = principal.name
        self._calls_of[caller] = self._calls_of.get(caller, 0) + 1
        try:
            yield
        finally:
            left = self._calls_of[caller] - 1
            if left:
                self._calls_of[caller] = left
            else:
                del self._calls_of[caller]

    async def _call(self, method: _Method, requests: Any, context: Context) -> Any:
        # Overload is shed from the headers, the body never read, as gRPC's own
        # limit did (parsing 2000 refused batches of 200 cost seconds); so is a
        # call the token table refuses.
        principal = await self._admit(method, context)
        with self._held(principal):
            return await self._receive_and_serve(method, principal, context)

    async def _receive(self, context: Context) -> bytes:
        """The request's bytes, which must arrive within the receive deadline."""
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
        return raw  # type: ignore[no-any-return]

    async def _receive_and_serve(
        self, method: _Method, principal: Principal | None, context: Context
    ) -> Any:
        raw = await self._receive(context)
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

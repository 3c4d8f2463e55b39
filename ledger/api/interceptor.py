"""Server span and metrics for every unary call, used by the call interceptor
(ledger/api/admission.py) around the servicers.

The incoming W3C trace context is honoured, so a caller's trace continues.
The status is read from the context after the handler ran, so calls ended by
abort() with rich details (google.rpc.Status in the trailers) are marked as
errors with their real code, which the stock instrumentation misses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from ledger.telemetry import metrics
from ledger.telemetry.redaction import redact
from ledger.telemetry.tracing import tracer

Context = grpc.aio.ServicerContext[Any, Any]


async def counted(method: str, serve: Callable[[], Awaitable[Any]], context: Context) -> Any:
    """serve(), with the call counted by method and status code and its latency recorded."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        return await serve()
    except BaseException:
        code = code_of(context) or grpc.StatusCode.UNKNOWN
        raise
    finally:
        metrics.requests.add(1, {"method": method, "code": code.name})
        metrics.request_duration.record(time.perf_counter() - started, {"method": method})


async def traced(
    service: str,
    method: str,
    serve: Callable[[], Awaitable[Any]],
    context: Context,
    metadata: Any,
) -> Any:
    """counted(serve) inside a server span that continues the caller's trace."""
    # metadata: the call's invocation metadata, (key, str or bytes) pairs, or None.
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    token = otel_context.attach(propagate.extract(carrier))
    try:
        with _server_span(service, method, context):
            return await counted(method, serve, context)
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def _server_span(service: str, method: str, context: Context) -> Iterator[None]:
    with tracer.start_as_current_span(
        f"{service}/{method}",
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        failed = True
        try:
            yield
            failed = False
        finally:
            code = code_of(context) or grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(
                    Status(StatusCode.ERROR, redact(f"{code.name}: {_details(context)}"))
                )


def code_of(context: Context) -> grpc.StatusCode | None:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return None


def _details(context: Context) -> str:
    details = context.details()
    if isinstance(details, bytes):
        return details.decode(errors="replace")
    return str(details or "")

"""Server span and metrics for every unary call, as an interceptor around the servicers.

The incoming W3C trace context is honoured, so a caller's trace continues.
The status is read from the context after the handler ran, so calls ended by
abort() with rich details (google.rpc.Status in the trailers) are marked as
errors with their real code, which the stock instrumentation misses.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from ledger.api.handlers import Continuation, with_behavior
from ledger.telemetry import metrics
from ledger.telemetry.redaction import redact
from ledger.telemetry.tracing import tracer, tracing_active


class TelemetryInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method_path: str = handler_call_details.method  # "/ledger.v1.LedgerService/CreateTransfers"
        service, _, method = method_path.lstrip("/").partition("/")
        inner = handler.unary_unary

        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # Tracing off: no context to extract and no span to build, only the metrics.
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await inner(request, context)
            except BaseException:
                code = _code_of(context) or grpc.StatusCode.UNKNOWN
                raise
            finally:
                _count(method, code, started)

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            carrier = {
                key: value
                for key, value in handler_call_details.invocation_metadata or ()
                if isinstance(value, str)
            }
            token = otel_context.attach(propagate.extract(carrier))
            try:
                with tracer.start_as_current_span(
                    f"{service}/{method}",
                    kind=SpanKind.SERVER,
                    attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
                    record_exception=False,
                    set_status_on_exception=False,
                ) as span:
                    failed = True
                    try:
                        response = await counted(request, context)
                        failed = False
                        return response
                    finally:
                        code = (
                            _code_of(context) or grpc.StatusCode.UNKNOWN
                            if failed
                            else grpc.StatusCode.OK
                        )
                        span.set_attribute("rpc.grpc.status_code", code.value[0])
                        if code is not grpc.StatusCode.OK:
                            span.set_status(
                                Status(
                                    StatusCode.ERROR, redact(f"{code.name}: {_details(context)}")
                                )
                            )
            finally:
                otel_context.detach(token)

        return with_behavior(handler, traced if tracing_active() else counted)


def _count(method: str, code: grpc.StatusCode, started: float) -> None:
    metrics.requests.add(1, {"method": method, "code": code.name})
    metrics.request_duration.record(time.perf_counter() - started, {"method": method})


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return None


def _details(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    details = context.details()
    if isinstance(details, bytes):
        return details.decode(errors="replace")
    return str(details or "")

"""OpenTelemetry tracing, set up from the standard OTEL_* environment variables.

Tracing is on when OTEL_TRACES_EXPORTER is "otlp" (or unset while
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set),
unless OTEL_SDK_DISABLED is true. Off, the API's no-op tracer is used and a
span costs a function call. Sampling follows OTEL_TRACES_SAMPLER(_ARG).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.util.types import AttributeValue

from ledger.telemetry.span_gate import (
    BACKGROUND_ATTRIBUTE,
    IDLE_ATTRIBUTE,
    LedgerTracerProvider,
    SpanGate,
)

TRACER_NAME = "ledger"
DEFAULT_SERVICE_NAME = "ledger"

tracer = trace.get_tracer(TRACER_NAME)


def tracing_requested() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter:
        return exporter == "otlp"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


_tracing_active = False
# Spans waiting for export, per queue (the SDK's default is 2048 for its one queue):
# requests keep the whole default; background work gets a quarter of its own.
_REQUEST_QUEUE_SPANS_MAX = 2048
_BACKGROUND_QUEUE_SPANS_MAX = 512


def setup_tracing(*, extra_processor: SpanProcessor | None = None) -> TracerProvider | None:
    """Installs the SDK provider when tracing is requested (or a processor is given)."""
    if not tracing_requested() and extra_processor is None:
        return None
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", DEFAULT_SERVICE_NAME)}
    )
    # Every processor sits behind a SpanGate: redaction, idle background work dropped.
    provider = LedgerTracerProvider(resource=resource)
    if tracing_requested():
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Two export queues: background traces (that did something) cannot take the
        # places of request traces when the receiver is slow or away.
        provider.add_span_processor(
            SpanGate(
                BatchSpanProcessor(OTLPSpanExporter(), max_queue_size=_REQUEST_QUEUE_SPANS_MAX),
                BatchSpanProcessor(OTLPSpanExporter(), max_queue_size=_BACKGROUND_QUEUE_SPANS_MAX),
            )
        )
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
    trace.set_tracer_provider(provider)
    global _tracing_active
    _tracing_active = True
    return provider


def background_span_attributes() -> dict[str, AttributeValue]:
    """Attributes for a span that background work opens: when no span is current
    (the work runs for no request), the span is a background root, dropped unless
    the work marks it not idle (see mark_found_work and ledger.telemetry.span_gate)."""
    if not _tracing_active or trace.get_current_span().get_span_context().is_valid:
        return {}
    return {BACKGROUND_ATTRIBUTE: True, IDLE_ATTRIBUTE: True}


def mark_found_work(span: trace.Span) -> None:
    """Keeps a background root span (and its trace) for export: the work did something."""
    span.set_attribute(IDLE_ATTRIBUTE, False)


def tracing_active() -> bool:
    """True once setup_tracing() installed a provider: spans are then recorded. Hot
    paths skip building no-op spans (and extracting trace context) while it is False."""
    return _tracing_active


# Reusable: nullcontext keeps no state between uses.
_NO_SPAN: AbstractContextManager[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)


def start_as_current_span(name: str, **options: Any) -> AbstractContextManager[trace.Span]:
    """tracer.start_as_current_span, or one shared no-op while tracing is off: the
    API's no-op span still costs a few microseconds, and the hot path opens three or
    four per call."""
    if not _tracing_active:
        return _NO_SPAN
    return tracer.start_as_current_span(name, **options)


def current_trace_id() -> str:
    """The hex trace id of the current span, or "" when there is none."""
    return trace_id_in(None)


def trace_id_in(context: Context | None) -> str:
    """The hex trace id of a context's span (a caller's, kept for later; None: the
    current one), or "" when there is none."""
    span_context = trace.get_current_span(context).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


def trace_id_of(traceparent: str) -> str:
    """The hex trace id a W3C traceparent carries, or "" (tracing off)."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def current_traceparent() -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> Context | None:
    if not traceparent:
        return None
    return propagate.extract({"traceparent": traceparent})


def joined_spans(
    name: str,
    contexts: Iterable[Context],
    shared_span: trace.Span,
    started_ns: int,
    attributes: Mapping[str, AttributeValue],
) -> None:
    """A span in each joined caller's own trace, covering a transaction it shared
    (group commit) and linked to the shared span in the first caller's trace."""
    if not _tracing_active:
        return
    link = trace.Link(shared_span.get_span_context())
    ended_ns = time.time_ns()
    for context in contexts:
        tracer.start_span(
            name, context=context, start_time=started_ns, links=[link], attributes=attributes
        ).end(end_time=ended_ns)

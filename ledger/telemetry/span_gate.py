"""The one gate every finished span passes before any exporter sees it.

It does three things, in this order:

1. Redaction. Span names, attribute values, event names and attributes, link
   attributes and status descriptions pass through redact(): the card-number
   detector the API refuses with, and the secret patterns of the logs. Integer
   attributes long enough to be a card number are checked too. Exporters receive
   a redacted copy, never the span the code wrote.
2. Idle background work is dropped. A trace that background work started on its
   own (attribute BACKGROUND_ATTRIBUTE on its root span, set when the span had no
   parent) is held until its root ends; if the root says it found nothing to do
   (IDLE_ATTRIBUTE) and did not fail, the whole trace is dropped. A database
   statement span that is a root (a read no request or transaction asked for) is
   dropped too.
3. Background traces that did something go to their own processor (their own
   export queue), so however many there are, they cannot push request traces out
   of the request queue.

LedgerTracerProvider wraps every processor added to it in a SpanGate, so a
processor added later (a test's in-memory exporter included) sees only what an
exporter may see.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import Link, Status, StatusCode

from ledger.telemetry.card_numbers import PAN_DIGITS_MIN
from ledger.telemetry.redaction import CARD_MASK, redact

# Set on a root span by work that no request asked for (sweeps, claims, checkpoints).
BACKGROUND_ATTRIBUTE = "ledger.background"
# Set on such a root span when the work found nothing to do: its trace is not exported.
IDLE_ATTRIBUTE = "ledger.idle"
# Set by the asyncpg instrumentation on its statement spans.
_STATEMENT_ATTRIBUTE = "db.statement"
# Spans of one background trace held until its root ends; beyond this many the rest
# are dropped (a background trace is a shard transaction and its few statements).
HELD_SPANS_PER_TRACE_MAX = 256
# Background traces held at once; a root that never ends must not grow this forever.
HELD_TRACES_MAX = 1024
# Integers from this value up have at least 13 digits and might be a card number.
_CARD_SIZED_INT_MIN = 10 ** (PAN_DIGITS_MIN - 1)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= _CARD_SIZED_INT_MIN and redact(str(value)) != str(value):
            return CARD_MASK
        return value
    if isinstance(value, tuple | list):
        return tuple(_redact_value(item) for item in value)
    return value


def _redact_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not attributes:
        return None if attributes is None else {}
    return {redact(key): _redact_value(value) for key, value in attributes.items()}


def _same(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    return dict(a or {}) == dict(b or {})


def redacted(span: ReadableSpan) -> ReadableSpan:
    """span itself when nothing in it needed redaction, else a redacted copy."""
    name = redact(span.name)
    attributes = _redact_attributes(span.attributes)
    events = [
        Event(redact(e.name), _redact_attributes(e.attributes), e.timestamp) for e in span.events
    ]
    links = [Link(link.context, _redact_attributes(link.attributes)) for link in span.links]
    description = span.status.description
    status = span.status
    if description:
        cleaned = redact(description)
        if cleaned != description:
            status = Status(span.status.status_code, cleaned)
    unchanged = (
        name == span.name
        and status is span.status
        and _same(attributes, span.attributes)
        and all(
            e.name == o.name and _same(e.attributes, o.attributes)
            for e, o in zip(events, span.events, strict=True)
        )
        and all(_same(n.attributes, o.attributes) for n, o in zip(links, span.links, strict=True))
    )
    if unchanged:
        return span
    return ReadableSpan(
        name=name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class SpanGate(SpanProcessor):
    """Redacts every span, drops idle background traces, and sends background traces
    that did something to their own processor (requests' processor if none is given)."""

    def __init__(self, requests: SpanProcessor, background: SpanProcessor | None = None) -> None:
        self.requests = requests
        self.background = background or requests
        self._lock = threading.Lock()
        # Background traces whose root has not ended: trace id -> spans ended so far.
        self._held: dict[int, list[ReadableSpan]] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if span.parent is None and (span.attributes or {}).get(BACKGROUND_ATTRIBUTE):
            with self._lock:
                if len(self._held) < HELD_TRACES_MAX:
                    self._held[span.context.trace_id] = []

    def on_end(self, span: ReadableSpan) -> None:
        trace_id = span.context.trace_id if span.context is not None else 0
        with self._lock:
            held = self._held.get(trace_id)
            if held is not None and span.parent is not None:
                if len(held) < HELD_SPANS_PER_TRACE_MAX:
                    held.append(span)
                return
            if held is not None:
                del self._held[trace_id]
        attributes = span.attributes or {}
        if held is None:
            if span.parent is None and _STATEMENT_ATTRIBUTE in attributes:
                # A lone statement no request, saga or shard transaction asked for: a
                # background read (gauges, the replica's heartbeat), never worth a trace.
                return
            if span.parent is None and attributes.get(BACKGROUND_ATTRIBUTE):
                # Not held (too many held at once): judged alone.
                held = []
            else:
                self.requests.on_end(redacted(span))
                return
        failed = span.status.status_code is StatusCode.ERROR
        if (
            attributes.get(IDLE_ATTRIBUTE)
            and not failed
            and not any(s.status.status_code is StatusCode.ERROR for s in held)
        ):
            return
        for item in [*held, span]:
            self.background.on_end(redacted(item))

    def shutdown(self) -> None:
        self.requests.shutdown()
        if self.background is not self.requests:
            self.background.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flushed = self.requests.force_flush(timeout_millis)
        if self.background is not self.requests:
            flushed = self.background.force_flush(timeout_millis) and flushed
        return flushed


class LedgerTracerProvider(TracerProvider):
    """A TracerProvider whose every span processor sits behind a SpanGate."""

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        if not isinstance(span_processor, SpanGate):
            span_processor = SpanGate(span_processor)
        super().add_span_processor(span_processor)

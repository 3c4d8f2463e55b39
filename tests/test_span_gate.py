"""Every span passes the SpanGate before an exporter sees it: card numbers redacted in
every part of a span, idle background traces dropped whole, background traces that did
something exported through their own queue, never in the place of request traces.

A provider of the test's own (LedgerTracerProvider, not the process's global one) with
in-memory exporters: what they hold is exactly what an OTLP exporter would be given.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, Status, StatusCode

from ledger.telemetry.redaction import CARD_MASK
from ledger.telemetry.span_gate import (
    BACKGROUND_ATTRIBUTE,
    IDLE_ATTRIBUTE,
    LedgerTracerProvider,
    SpanGate,
)

CARDS = [
    "4111111111111111",
    "4111 1111 1111 1111",
    "4111  1111  1111  1111",
    "4111-1111-1111-1111",
    "4111.1111.1111.1111",
    "4111\t1111\t1111\t1111",
]
DIGITS = "4111111111111111"
# The blocked exporter is released by the test itself; this only bounds a broken run.
RELEASE_TIMEOUT_S = 10.0
BACKGROUND = {BACKGROUND_ATTRIBUTE: True, IDLE_ATTRIBUTE: True}


def texts_of(span: ReadableSpan) -> list[str]:
    texts = [span.name, span.status.description or ""]
    texts += [f"{k}={v!r}" for k, v in (span.attributes or {}).items()]
    for event in span.events:
        texts.append(event.name)
        texts += [f"{k}={v!r}" for k, v in (event.attributes or {}).items()]
    for link in span.links:
        texts += [f"{k}={v!r}" for k, v in (link.attributes or {}).items()]
    return texts


@pytest.mark.parametrize("card", CARDS)
def test_a_card_number_is_redacted_from_every_part_of_a_span(card: str) -> None:
    exported = InMemorySpanExporter()
    provider = LedgerTracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        outer_context = outer.get_span_context()
    with tracer.start_as_current_span(
        f"work {card}",
        attributes={"ledger.transfer_id": f"t {card} x", "list": [card, "ok"]},
        links=[Link(outer_context, {"why": card})],
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        span.set_attribute("ledger.amount_minor", int(DIGITS))
        span.add_event(f"saw {card}", {"pan": card})
        span.record_exception(ValueError(f"bad {card}"))
        span.set_status(Status(StatusCode.ERROR, f"refused {card}"))
    spans = exported.get_finished_spans()
    assert [s.name for s in spans] == ["outer", f"work {CARD_MASK}"]
    work = spans[1]
    for text in texts_of(work):
        assert card not in text and DIGITS not in text, text
    assert dict(work.attributes or {})["ledger.transfer_id"] == f"t {CARD_MASK} x"
    assert dict(work.attributes or {})["ledger.amount_minor"] == CARD_MASK
    assert work.status.description == f"refused {CARD_MASK}"
    assert work.status.status_code is StatusCode.ERROR
    assert work.parent is None and len(work.links) == 1


def test_a_span_without_card_numbers_is_passed_on_as_it_is() -> None:
    exported = InMemorySpanExporter()
    provider = LedgerTracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    with provider.get_tracer("test").start_as_current_span(
        "shard create_transfers", attributes={"ledger.shard": "shard-a", "n": 1234567890123}
    ):
        pass
    (span,) = exported.get_finished_spans()
    assert dict(span.attributes or {}) == {"ledger.shard": "shard-a", "n": 1234567890123}


def test_idle_background_trace_is_dropped_with_its_child_spans() -> None:
    exported = InMemorySpanExporter()
    provider = LedgerTracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("shard claim_due", attributes=BACKGROUND):
        with tracer.start_as_current_span("SELECT"):
            pass
    assert exported.get_finished_spans() == ()


def test_background_trace_that_found_work_is_exported_whole() -> None:
    exported = InMemorySpanExporter()
    provider = LedgerTracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("shard expire_due", attributes=BACKGROUND) as root:
        with tracer.start_as_current_span("UPDATE"):
            pass
        root.set_attribute(IDLE_ATTRIBUTE, False)
    assert [s.name for s in exported.get_finished_spans()] == ["UPDATE", "shard expire_due"]


def test_idle_background_trace_that_failed_is_exported() -> None:
    exported = InMemorySpanExporter()
    provider = LedgerTracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    with provider.get_tracer("test").start_as_current_span(
        "shard claim_due", attributes=BACKGROUND
    ) as root:
        root.set_status(Status(StatusCode.ERROR, "unavailable: OSError"))
    assert [s.name for s in exported.get_finished_spans()] == ["shard claim_due"]


def test_background_traces_go_to_their_own_queue_and_requests_to_theirs() -> None:
    requests = InMemorySpanExporter()
    background = InMemorySpanExporter()
    provider = LedgerTracerProvider()
    provider.add_span_processor(
        SpanGate(SimpleSpanProcessor(requests), SimpleSpanProcessor(background))
    )
    tracer = provider.get_tracer("test")
    for _ in range(3):
        with tracer.start_as_current_span("shard expire_due", attributes=BACKGROUND) as root:
            root.set_attribute(IDLE_ATTRIBUTE, False)
    with tracer.start_as_current_span("ledger.v1.LedgerService/CreateTransfers"):
        with tracer.start_as_current_span("route"):
            pass
    assert [s.name for s in requests.get_finished_spans()] == [
        "route",
        "ledger.v1.LedgerService/CreateTransfers",
    ]
    assert [s.name for s in background.get_finished_spans()] == ["shard expire_due"] * 3


def test_a_lone_statement_span_outside_any_request_is_dropped() -> None:
    exported = InMemorySpanExporter()
    provider = LedgerTracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("SELECT", attributes={"db.statement": "SELECT 1"}):
        pass
    with tracer.start_as_current_span("ledger.v1.LedgerService/LookupAccounts"):
        with tracer.start_as_current_span("SELECT", attributes={"db.statement": "SELECT 2"}):
            pass
    assert [s.name for s in exported.get_finished_spans()] == [
        "SELECT",
        "ledger.v1.LedgerService/LookupAccounts",
    ]


class _BlockedExporter(InMemorySpanExporter):
    """An exporter whose receiver is away: every export waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.released.wait(timeout=RELEASE_TIMEOUT_S)
        return super().export(spans)


def test_a_flood_of_background_traces_cannot_push_request_traces_out() -> None:
    """The background queue overflows (its receiver is away) and drops background spans;
    every request span still reaches the request exporter."""
    requests = InMemorySpanExporter()
    background = _BlockedExporter()
    background_queue = BatchSpanProcessor(background, max_queue_size=4, max_export_batch_size=2)
    provider = LedgerTracerProvider()
    provider.add_span_processor(SpanGate(SimpleSpanProcessor(requests), background_queue))
    tracer = provider.get_tracer("test")
    try:
        for index in range(100):
            with tracer.start_as_current_span("shard expire_due", attributes=BACKGROUND) as root:
                root.set_attribute(IDLE_ATTRIBUTE, False)
            if index % 20 == 0:
                with tracer.start_as_current_span("ledger.v1.LedgerService/CreateTransfers"):
                    pass
    finally:
        background.released.set()
        provider.shutdown()
    assert len(requests.get_finished_spans()) == 5
    assert 0 < len(background.get_finished_spans()) < 100, "the background queue did not overflow"

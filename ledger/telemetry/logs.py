"""Structured JSON logs with trace and span ids, redacted whatever logger wrote them."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

from ledger.telemetry.redaction import redact


class JsonFormatter(logging.Formatter):
    """One JSON object a line. The message and the exception pass through redact()
    before encoding (JSON writes a tab as the two characters \\t, which would split a
    tab-separated card number), and the whole line once more after it."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return redact(json.dumps(entry, ensure_ascii=False, default=str))


def setup_logging(level: int = logging.INFO) -> None:
    """Routes every logger through one redacting JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings become log records too, so they are JSON and redacted.
    logging.captureWarnings(True)
    # Library loggers that bypass propagation would bypass redaction too.
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        if not logger.propagate or logger.handlers:
            for existing in list(logger.handlers):
                logger.removeHandler(existing)
            logger.propagate = True

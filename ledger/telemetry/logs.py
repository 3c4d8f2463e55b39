"""Structured JSON logs with trace and span ids, redacted whatever logger wrote them."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime
from typing import TextIO

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


# gRPC's C core logs through absl straight to file descriptor 2:
# "I1204 13:28:03.382493   12990 fork_posix.cc:71] message".
_NATIVE_LINE = re.compile(r"^(?P<severity>[IWEF])\d{4} [\d:.]+\s+\d+ (?P<where>[^\]]+)\] ?")
_NATIVE_LEVELS = {
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
# What native code writes on one line is cut into records of at most this many bytes.
_NATIVE_LINE_BYTES_MAX = 64 * 1024
# At exit, lines still in the pipe get this long to be written out.
_NATIVE_DRAIN_S = 1.0


def _native_record(raw: bytes) -> tuple[str, int, str]:
    """(logger name, level, message) for one line that native code wrote to stderr."""
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    match = _NATIVE_LINE.match(line)
    if match is None:
        return "stderr", logging.WARNING, line
    message = f"{match.group('where')}: {line[match.end() :]}"
    return "grpc.core", _NATIVE_LEVELS[match.group("severity")], message


def _route_native_stderr() -> TextIO:
    """Makes file descriptor 2 a pipe read by a thread that logs each line as a record
    (so JSON and redacted, like every other line) and returns a stream on the original
    stderr for the JSON handler. Whatever writes to fd 2 without Python's logging, gRPC's
    C core above all, then goes through the same formatter and redaction."""
    original_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    out = os.fdopen(original_fd, "w", buffering=1, encoding="utf-8", errors="replace")

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in iter(lambda: pipe.readline(_NATIVE_LINE_BYTES_MAX), b""):
                if raw.strip():
                    name, level, message = _native_record(raw)
                    logging.getLogger(name).log(level, "%s", message)

    reader = threading.Thread(target=pump, name="native-stderr", daemon=True)
    reader.start()

    def restore() -> None:
        # The pipe's only writer is fd 2: pointing it back ends the reader at EOF.
        sys.stderr.flush()
        os.dup2(original_fd, 2)
        reader.join(_NATIVE_DRAIN_S)

    atexit.register(restore)
    return out


def setup_logging(level: int = logging.INFO, *, route_native_stderr: bool = False) -> None:
    """Routes every logger through one redacting JSON handler on stderr; with
    route_native_stderr (the service), also what native code writes to stderr."""
    stream = _route_native_stderr() if route_native_stderr else sys.stderr
    handler = logging.StreamHandler(stream)
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

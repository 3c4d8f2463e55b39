"""Results of one-shot admin runs (`ledger reconcile`) as a Prometheus text file.

The admin commands run as short processes (from cron or a systemd timer), so they
have no /metrics endpoint to scrape. They write their result to a file in the
Prometheus text format instead, for node-exporter's textfile collector
(`--collector.textfile.directory`), which serves it with the host's metrics; the
alerting rules in deploy/prometheus/ read it. The file is replaced atomically
(written beside it, then renamed), so the collector never reads half a file.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Gauge:
    name: str
    help: str
    value: float


def render_gauges(gauges: list[Gauge]) -> str:
    lines: list[str] = []
    for gauge in gauges:
        assert gauge.name.isidentifier(), gauge.name
        assert "\n" not in gauge.help
        value = "NaN" if math.isnan(gauge.value) else repr(float(gauge.value))
        lines += [
            f"# HELP {gauge.name} {gauge.help}",
            f"# TYPE {gauge.name} gauge",
            f"{gauge.name} {value}",
        ]
    return "\n".join(lines) + "\n"


def write_gauges(path: Path, gauges: list[Gauge]) -> None:
    """Replaces path with the gauges, atomically."""
    text = render_gauges(gauges)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        # node-exporter runs as another user and must read it.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def reconcile_gauges(
    *, ok: bool, discrepancies: int, duration_s: float, at_s: float
) -> list[Gauge]:
    """What `ledger reconcile --metrics-file` exports (see docs/alerts.md)."""
    return [
        Gauge(
            "ledger_reconcile_ok",
            "1 if the last ledger reconcile ran and found the books balanced, else 0.",
            1.0 if ok else 0.0,
        ),
        Gauge(
            "ledger_reconcile_discrepancies",
            "Failed checks in the last ledger reconcile (NaN if it could not run).",
            float(discrepancies) if discrepancies >= 0 else math.nan,
        ),
        Gauge(
            "ledger_reconcile_duration_seconds",
            "How long the last ledger reconcile took.",
            duration_s,
        ),
        Gauge(
            "ledger_reconcile_last_run_timestamp_seconds",
            "When the last ledger reconcile finished (Unix time).",
            at_s,
        ),
    ]

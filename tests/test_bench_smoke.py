"""The benchmark keeps working: its smoke mode runs end to end and writes its figures.

No thresholds: the figures only have to exist and show that every mode applied
transfers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.report import median_rounds
from ledger.embedded.postgres import PG_BIN_ENV_VAR, find_bin_dir

ROOT = Path(__file__).resolve().parent.parent
# The smoke run takes well under a minute; this leaves room for a loaded CI machine.
SMOKE_TIMEOUT_S = 180.0
MODES = (
    *("single", "batch", "cross", "raw_single", "raw_batch", "raw_half_peak", "single_half_peak"),
    *("floor_single", "floor_batch"),
)
RATIOS = {"single": "raw_single", "batch": "raw_batch", "cross": "single"}


PGBENCH_RATIOS = {"single": "pgbench_single", "batch": "pgbench_batch"}
# An exec_share rounded to 3 decimals is at most this far from its value.
SHARE_ROUNDING_MAX = 0.0005


@dataclass(frozen=True)
class SmokeRun:
    out_dir: Path
    figures: dict[str, Any]
    table: str


def smoke(out_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`python -m bench.run --mode smoke` with options, which must succeed."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--mode", "smoke", "--out", str(out_dir), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """One smoke run shared by the tests that read its figures (it takes ~20 s)."""
    out_dir = tmp_path_factory.mktemp("bench-smoke")
    completed = smoke(out_dir)
    figures = json.loads((out_dir / "latest.json").read_text())
    return SmokeRun(out_dir, figures, completed.stdout)


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)
def test_bench_smoke_run_writes_figures_for_every_mode(smoke_run: SmokeRun) -> None:
    tmp_path = smoke_run.out_dir
    figures = smoke_run.figures
    for mode in MODES:
        assert figures["modes"][mode]["transfers_per_s"] > 0, mode
        latency = figures["modes"][mode]["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"], mode
    for mode, base in RATIOS.items():
        assert figures["modes"][mode]["ratio_to"] == base
        assert figures["modes"][mode]["ratio"] > 0
        assert figures["ratios"][f"{mode}_vs_{base}"] == figures["modes"][mode]["ratio"]
    assert figures["service"]["rss_mb_peak"] > 0
    for mode in ("raw_half_peak", "single_half_peak"):
        assert figures["modes"][mode]["target_rate_per_s"] > 0, mode
    assert (
        figures["modes"]["raw_half_peak"]["target_rate_per_s"]
        == figures["modes"]["single_half_peak"]["target_rate_per_s"]
    ), "raw PostgreSQL is offered the same rate as the service"

    # The floor modes ran against the bare server, which writes nothing: their
    # service CPU is the bare server's (the service sat idle), and no WAL is counted.
    for mode in ("floor_single", "floor_batch"):
        assert figures["modes"][mode]["cpu_cores"]["service"] > 0, mode
        assert "wal" not in figures["modes"][mode], mode
    # Each ratio target's budget is printed from the run's own floor.
    _, _, budgets = smoke_run.table.partition("what each target leaves the ledger's own work")
    starts = [line.split(":")[0] for line in budgets.splitlines()[1:] if " at " in line]
    assert [s.split(" (")[0] for s in starts if "pgbench" not in s] == [
        "single at 0.8 of raw_single",
        "batch  at 0.75 of raw_batch",
    ]

    chart = tmp_path / "latest.png"
    assert chart.stat().st_size > 0
    assert chart.read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)
@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench is not on PATH")
def test_bench_smoke_reports_the_pgbench_limit_and_both_ratios(smoke_run: SmokeRun) -> None:
    """pgbench drives the raw modes' SQL at the same concurrency; the service is
    compared with both limits and the table prints both ratios."""
    figures = smoke_run.figures
    for mode, base in PGBENCH_RATIOS.items():
        limit = figures["modes"][base]
        assert limit["transfers_per_s"] > 0, base
        assert limit["failed_calls"] == {}, base
        assert 0 < limit["latency_ms"]["p50"] <= limit["latency_ms"]["p99"], base
        assert figures["modes"][mode]["ratio_pgbench_to"] == base
        assert figures["modes"][mode]["ratio_pgbench"] > 0
        assert figures["ratios"][f"{mode}_vs_{base}"] == figures["modes"][mode]["ratio_pgbench"]
        # The table shows the asyncpg ratio and the pgbench ratio on the mode's line.
        line = next(x for x in smoke_run.table.splitlines() if x.startswith(f"{mode} "))
        assert f"of raw_{mode}" in line and f"of {base}" in line, line
    # A batch transaction applies batch_size transfers.
    batch = figures["modes"]["pgbench_batch"]
    assert batch["transfers"] == batch["calls"] * figures["settings"]["batch_size"]


def test_rounds_report_each_modes_median_and_the_median_of_each_rounds_ratio() -> None:
    """--rounds N: each round's service mode is compared with the raw limit of its own
    round, and the medians are taken after that (the machine's speed drifts)."""

    def mode(transfers_per_s: float) -> dict[str, Any]:
        return {"transfers_per_s": transfers_per_s, "latency_ms": {"p99": transfers_per_s / 10}}

    rounds = [
        {"raw_single": mode(100), "single": mode(60)},  # ratio 0.6
        {"raw_single": mode(200), "single": mode(100)},  # ratio 0.5
        {"raw_single": mode(300), "single": mode(90)},  # ratio 0.3
    ]
    modes, ratios = median_rounds(rounds)
    assert ratios == {"single_vs_raw_single": 0.5}
    assert modes["single"]["ratio"] == 0.5
    assert modes["single"]["ratio_rounds"] == [0.6, 0.5, 0.3]
    # The figures shown for a mode are its median round's.
    assert modes["single"]["transfers_per_s"] == 90
    assert modes["raw_single"]["transfers_per_s"] == 200
    assert modes["single"]["transfers_per_s_rounds"] == [60, 100, 90]
    assert modes["single"]["p99_ms_rounds"] == [6, 10, 9]


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)
def test_bench_with_an_event_subscriber_reports_its_cost_and_the_delivery_delay(
    tmp_path: Path,
) -> None:
    """--events subscriber: single and batch again with a subscriber attached, each
    compared with the run just before it, and the delay from commit to delivery."""
    completed = smoke(
        tmp_path, "--modes", "single,batch", "--events", "subscriber", "--event-subscribers", "2"
    )

    figures = json.loads((tmp_path / "latest.json").read_text())
    assert list(figures["modes"]) == ["single", "single_events", "batch", "batch_events"]
    for base in ("single", "batch"):
        mode = figures["modes"][f"{base}_events"]
        assert mode["transfers_per_s"] > 0 and mode["ratio_to"] == base
        assert figures["ratios"][f"{base}_events_vs_{base}"] == mode["ratio"] > 0
        assert mode["event_consumers"] == ["subscriber"]
        subscribers = mode["event_subscribers"]
        assert subscribers["processes"] == 2 and subscribers["errors"] == []
        # Every subscriber read the events of the transfers the phase applied.
        assert all(n > 0 for n in subscribers["events"]), subscribers
        delay = subscribers["delivery_delay_ms"]
        assert 0 < delay["p50"] <= delay["p99"] <= delay["max"], delay
        assert "event_subscribers" not in figures["modes"][base]
    assert "commit to delivery p50" in completed.stdout
    # Issue 20's targets as CPU per event, from the run's own figures.
    _, _, delivery = completed.stdout.partition("what each target leaves delivering the event")
    assert [line.split(" (")[0] for line in delivery.splitlines()[1:3]] == [
        "single_events at 0.9 of single",
        "batch_events at 0.9 of batch",
    ]


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)
def test_bench_with_velocity_rules_reports_their_cost_beside_each_base_mode(
    tmp_path: Path,
) -> None:
    """--velocity-rules: single and batch again over a twin set of merchants whose
    accounts have three rules each, each compared with the run just before it."""
    completed = smoke(tmp_path, "--modes", "single,batch", "--velocity-rules", "--rounds", "2")

    figures = json.loads((tmp_path / "latest.json").read_text())
    assert list(figures["modes"]) == ["single", "single_velocity", "batch", "batch_velocity"]
    # The second round measured each pair the other way round.
    assert "round 2 of 2\n  single_velocity:" in completed.stderr
    assert figures["velocity_rules"] is True
    for base in ("single", "batch"):
        mode = figures["modes"][f"{base}_velocity"]
        assert mode["transfers_per_s"] > 0 and mode["ratio_to"] == base
        assert len(mode["ratio_rounds"]) == 2
        assert figures["ratios"][f"{base}_velocity_vs_{base}"] == mode["ratio"] > 0
        # What the phase wrote to PostgreSQL's log, per transfer.
        assert mode["wal"]["bytes_per_transfer"] > 0, mode
        # Never refused: the rules are loose, and every item was applied.
        assert mode["failed_items"] == {} and mode["failed_calls"] == {}, mode
    assert "with three velocity rules each" in completed.stderr
    assert "of batch (target >= 0.85)" in completed.stdout


def test_bench_refuses_the_publisher_without_a_broker() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--events", "subscriber,publisher"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "--events publisher needs --amqp-url" in completed.stderr


def _postgres_bin_with_statement_stats() -> Path | None:
    """A PostgreSQL bin/ folder whose install has pg_stat_statements (Debian's), if any."""
    for bin_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (bin_dir.parent / "lib" / "pg_stat_statements.so").is_file():
            return bin_dir
    return None


@pytest.mark.skipif(
    _postgres_bin_with_statement_stats() is None,
    reason="no PostgreSQL install with pg_stat_statements under /usr/lib/postgresql",
)
def test_bench_shows_the_statements_that_took_postgresqls_time_per_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PG_BIN_ENV_VAR, str(_postgres_bin_with_statement_stats()))
    completed = smoke(tmp_path, "--modes", "raw_batch,batch", "--pg-statements", "3")

    figures = json.loads((tmp_path / "latest.json").read_text())
    for mode, writes in (
        ("raw_batch", "INSERT INTO bench_transfers"),
        ("batch", "INSERT INTO transfers"),
    ):
        statements = figures["modes"][mode]["pg_statements"]
        assert len(statements) == 3, statements
        # The batch's write is where PostgreSQL spends most of a batch (no other
        # statement of the phase comes close), and it writes the WAL.
        assert writes in statements[0]["statement"], statements
        assert statements[0]["exec_share"] > 0.3 and statements[0]["wal_bytes_per_transfer"] > 0
        shares = [s["exec_share"] for s in statements]
        # Each share is rounded to 3 decimals (bench/statement_stats.py), so three
        # that sum to 1.0 may read 1.001 (0.875 + 0.118 + 0.008 did, in CI).
        rounding_slack = SHARE_ROUNDING_MAX * len(shares)
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 1.0 + rounding_slack
        assert all(s["calls"] > 0 and s["exec_us_per_transfer"] >= 0 for s in statements)
        assert statements[0]["buffers_per_call"] > 0, "a write reads and writes pages"
    assert "B/transfer" in completed.stdout and "WITH new_transfers AS" in completed.stdout


def test_bench_says_how_to_count_statements_where_postgresql_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pip-installed PostgreSQL ships no contrib modules: the run stops at once
    and says what to do, instead of failing deep inside a server's log."""
    monkeypatch.delenv(PG_BIN_ENV_VAR, raising=False)
    if any(find_bin_dir().parent.rglob("pg_stat_statements.so")):
        pytest.skip("the pip-installed PostgreSQL has pg_stat_statements")
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--mode", "smoke", "--out", str(tmp_path),
         "--pg-statements", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "set LEDGER_PG_BIN" in completed.stderr

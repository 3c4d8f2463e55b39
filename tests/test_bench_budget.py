"""bench/budget.py: what each ratio target leaves the ledger's own work, from a run's
figures and its floor modes (issue 18). The floor modes themselves run in the
bench's smoke run (tests/test_bench_smoke.py)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.budget import FloorPhase, budget, budgets, delivery_budgets, targets


def _mode(transfers_per_s: float, **cores: float) -> dict[str, Any]:
    return {"transfers_per_s": transfers_per_s, "cpu_cores": {"interrupts": 0.0, **cores}}


def _figures(**modes: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": {"cpus": 2},
        "modes": modes,
        "targets": {"single_vs_raw_single_min": 0.8, "batch_vs_raw_batch_min": 0.75},
    }


SINGLE_FLOOR = FloorPhase(
    "floor_single", 1600.0, server_us_per_transfer=300, clients_us_per_transfer=300
)
BATCH_FLOOR = FloorPhase(
    "floor_batch", 15000.0, server_us_per_transfer=5, clients_us_per_transfer=10
)


def test_a_budget_is_what_the_target_rate_leaves_of_the_cores_per_transfer() -> None:
    figures = _figures(
        single=_mode(1000, service=0.8, postgres=0.5, interrupts=0.1),
        raw_single=_mode(2000, postgres=1.6, clients=0.4),
    )
    (target,) = targets(figures)
    assert (target.mode, target.baseline, target.ratio) == ("single", "raw_single", 0.8)
    assert target.rate_per_s == pytest.approx(1600)
    found = budget(figures, target, SINGLE_FLOOR)
    # 1,600/s: PostgreSQL 0.8, floor 0.48, clients 0.48, interrupts 0.16 of 2 cores.
    assert found.postgres_cores == pytest.approx(0.8)
    assert found.cores_left == pytest.approx(0.08)
    assert found.ledger_us_allowed == pytest.approx(50)
    assert found.ledger_us_today == pytest.approx(500)
    text = found.render()
    assert "0.08 left, 50 us per transfer for the ledger's work; it costs 500 (10.0x)" in text
    assert "PostgreSQL per transfer 500 us under the service, 800 under raw_single" in text
    assert "own peak" not in text
    slow = FloorPhase(
        "floor_single", 1000.0, server_us_per_transfer=300, clients_us_per_transfer=300
    )
    assert "(the bare server's own peak is 1,000/s)" in budget(figures, target, slow).render()


def test_a_target_past_the_machine_says_by_how_much_and_baselines_not_run_are_passed_over() -> None:
    figures = _figures(
        batch=_mode(7000, service=0.7, postgres=0.91),
        raw_batch=_mode(20000, postgres=1.2),
        pgbench_batch=_mode(20000, postgres=1.8),
    )
    found = targets(figures)
    assert [t.baseline for t in found] == ["raw_batch", "pgbench_batch"]
    short = budget(figures, found[0], BATCH_FLOOR)
    # 15,000/s at 130 us of PostgreSQL per transfer is 1.95 cores before anything else.
    assert short.cores_left == pytest.approx(2 - 1.95 - 0.075 - 0.15)
    assert "nothing left for the ledger (short by 0.18 cores)" in short.render()


def test_a_runs_budgets_take_each_floor_from_its_floor_mode() -> None:
    figures = _figures(
        single=_mode(1000, service=0.8, postgres=0.5, interrupts=0.1),
        raw_single=_mode(2000, postgres=1.6),
        floor_single=_mode(1600, service=0.48, clients=0.48),
        batch=_mode(7000, service=0.7, postgres=0.91),
        raw_batch=_mode(20000, postgres=1.2),
    )
    # No floor_batch in this run: batch has no budget, single has its floor's.
    (found,) = budgets(figures)
    assert found.target.mode == "single"
    assert found.floor.mode == "floor_single"
    assert found.floor.server_us_per_transfer == pytest.approx(300)
    assert found.floor.clients_us_per_transfer == pytest.approx(300)
    assert found.cores_left == pytest.approx(0.08)


def test_delivery_is_what_the_consumers_cost_beyond_the_modes_own_cpu_per_transfer() -> None:
    figures = _figures(
        batch=_mode(8000, service=0.8, postgres=0.9, idle=0.2),
        batch_events=_mode(4000, service=0.6, postgres=0.8, clients=0.5, idle=0.0),
    )
    figures["targets"]["batch_events_vs_batch_min"] = 0.9
    figures["modes"]["batch_events"]["event_subscribers"] = {"events_per_s": 4000.0}
    (found,) = delivery_budgets(figures)
    # Alone: 1.8 busy cores at 8,000/s, 225 us per transfer; at 0.9 (7,200/s) 1.62
    # cores, leaving 0.38 for 7,200 events/s. With consumers: 2.0 busy at 4,000/s,
    # 0.9 of it the transfers' own, 1.1 cores for 4,000 events/s.
    assert found.rate_per_s == pytest.approx(7200)
    assert found.ledger_cores == pytest.approx(1.62)
    assert found.delivery_us_allowed == pytest.approx(0.38e6 / 7200)
    assert found.delivery_us_today == pytest.approx(275)
    assert found.render() == (
        "batch_events at 0.9 of batch (7,200/s, 1.00 events per transfer): batch's own "
        "work takes 1.62 of 2 cores: 0.38 left, 53 us per event to deliver it; "
        "delivering cost 275 (5.2x)"
    )
    # Without a subscriber's figures there is no stream to price.
    del figures["modes"]["batch_events"]["event_subscribers"]
    assert delivery_budgets(figures) == []

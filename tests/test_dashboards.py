"""The Grafana dashboard and the Prometheus/Grafana provisioning files agree with each other.

Dashboards break silently: a panel querying a metric the service does not export
just shows "No data". Every PromQL expression here may name only metrics from
EXPORTED_METRICS, the list tests/test_otlp_export.py checks against a real
service's /metrics. The provisioning files must point where the compose snippet
in deploy/README.md (and docker-compose.yml, once it has these services) mounts
them. Neither Docker nor Grafana is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from ledger.storage.shard import BACKGROUND_OPERATIONS
from tests.test_otlp_export import EXPORTED_METRICS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD_PATH = DEPLOY / "grafana" / "dashboards" / "ledger.json"
DATASOURCES_PATH = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS_PATH = DEPLOY / "grafana" / "provisioning" / "dashboards" / "ledger.yml"
PROMETHEUS_PATH = DEPLOY / "prometheus.yml"
README_PATH = DEPLOY / "README.md"
COMPOSE_PATH = ROOT / "docker-compose.yml"

# Where the images read their configuration (fixed by the prom/prometheus and
# grafana/grafana images).
PROMETHEUS_CONFIG_IN_CONTAINER = "/etc/prometheus/prometheus.yml"
GRAFANA_PROVISIONING_IN_CONTAINER = "/etc/grafana/provisioning"
# The port the compose snippet makes the ledger serve /metrics on.
METRICS_PORT = 9464

# What the dashboard must show (issue 5): success rate, latency, saga outcomes,
# dead letters, per-shard load.
REQUIRED_METRICS = (
    "ledger_requests_total",
    "ledger_request_duration_seconds_bucket",
    "ledger_sagas_finished_total",
    "ledger_sagas",
    "ledger_shard_transaction_duration_seconds_count",
    "ledger_pool_connections",
)

_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions and labels left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery selectors
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function call
        if match.group(0).lower() in _PROMQL_WORDS:
            continue
        names.add(match.group(0))
    return names


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels += panel.get("panels", [])  # collapsed rows hold their panels
    return panels


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels_of(dashboard) for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document = json.loads(DASHBOARD_PATH.read_text())
    assert isinstance(document, dict)
    return document


def compose_services_with_metrics(yaml: Any) -> list[dict[str, Any]]:
    """prometheus and grafana as docker-compose.yml has them (deploy/README.md describes
    them there, no longer as additions to make)."""
    compose = yaml.safe_load(COMPOSE_PATH.read_text())
    return [compose.get("services", {})]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts (short syntax)."""
    result = {}
    for volume in service.get("volumes", []):
        parts = str(volume).split(":")
        if parts[0].startswith("."):
            result[parts[1]] = parts[0]
    return result


# --- the extractor itself --------------------------------------------------------------


def test_metric_names_finds_selected_metrics_and_skips_functions_labels_and_ranges() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (shard, le) (rate(x_seconds_bucket{code!="OK",'
        'method=~"a|b"}[$__rate_interval]))) / on (shard) group_left sum(y_total offset 5m)'
        " > bool 0 and z"
    )
    assert metric_names(expr) == {"x_seconds_bucket", "y_total", "z"}
    assert metric_names('sum(ledger_sagas{state="dead"})') == {"ledger_sagas"}


# --- the dashboard ---------------------------------------------------------------------


def test_dashboard_is_valid_json_with_unique_panel_ids_and_a_stable_uid(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["uid"] == "ledger-overview"
    assert dashboard["title"]
    ids = [p["id"] for p in panels_of(dashboard)]
    assert len(ids) == len(set(ids)), ids
    for panel in panels_of(dashboard):
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_query_names_only_metrics_the_service_exports(dashboard: dict[str, Any]) -> None:
    exported = set(EXPORTED_METRICS)
    for expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} names unknown metrics {names - exported}"


def test_dashboard_shows_success_rate_latency_sagas_dead_letters_and_shard_load(
    dashboard: dict[str, Any],
) -> None:
    queried = set().union(*(metric_names(e) for e in expressions(dashboard)))
    missing = set(REQUIRED_METRICS) - queried
    assert not missing, f"the dashboard queries none of {missing}"
    compact = [re.sub(r"\s+", "", e) for e in expressions(dashboard)]
    assert any('ledger_requests_total{code!="OK"}' in e for e in compact), "no success rate"
    for quantile in ("0.5", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({quantile},") and "ledger_request_duration" in e
            for e in compact
        ), f"no p{quantile} latency"
    assert any('ledger_sagas{state="dead"}' in e for e in compact), "no dead-letter count"


def test_every_panel_uses_the_provisioned_prometheus_datasource(
    dashboard: dict[str, Any], yaml: Any
) -> None:
    (source,) = yaml.safe_load(DATASOURCES_PATH.read_text())["datasources"]
    for panel in panels_of(dashboard):
        if panel["type"] == "row":
            continue
        for where in [panel, *panel["targets"]]:
            assert where["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel[
                "title"
            ]


# --- provisioning and compose ---------------------------------------------------------


def test_datasource_points_at_the_compose_prometheus(yaml: Any) -> None:
    document = yaml.safe_load(DATASOURCES_PATH.read_text())
    assert document["apiVersion"] == 1
    (source,) = document["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["access"] == "proxy"


def test_prometheus_scrapes_the_ledger_metrics_port(yaml: Any) -> None:
    document = yaml.safe_load(PROMETHEUS_PATH.read_text())
    (job,) = document["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    compose = yaml.safe_load(COMPOSE_PATH.read_text())
    assert "ledger" in compose["services"], "the scrape target names no compose service"
    # `ledger serve --workers N`: worker i serves its metrics on the port + i.
    command = compose["services"]["ledger"]["command"]
    workers = int(command[command.index("--workers") + 1])
    assert targets == [f"ledger:{METRICS_PORT + i}" for i in range(workers)]


def test_readme_makes_the_ledger_serve_metrics_to_other_containers() -> None:
    text = README_PATH.read_text()
    assert f"LEDGER_METRICS_LISTEN: 0.0.0.0:{METRICS_PORT}" in text


def test_provisioning_files_are_mounted_where_grafana_and_prometheus_read_them(
    yaml: Any,
) -> None:
    providers = yaml.safe_load(PROVIDERS_PATH.read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    dashboards_in_container = provider["options"]["path"]
    for services in compose_services_with_metrics(yaml):
        assert {"prometheus", "grafana"} <= set(services)
        prometheus = mounts(services["prometheus"])
        assert prometheus[PROMETHEUS_CONFIG_IN_CONTAINER] == "./deploy/prometheus.yml"
        grafana = mounts(services["grafana"])
        assert grafana[GRAFANA_PROVISIONING_IN_CONTAINER] == "./deploy/grafana/provisioning"
        assert grafana[dashboards_in_container] == "./deploy/grafana/dashboards"
        for host_path in [*prometheus.values(), *grafana.values()]:
            assert (ROOT / host_path).exists(), host_path
    # Grafana reads <provisioning>/datasources and <provisioning>/dashboards.
    assert DATASOURCES_PATH.parent.name == "datasources"
    assert PROVIDERS_PATH.parent.name == "dashboards"
    assert DASHBOARD_PATH.parent == DEPLOY / "grafana" / "dashboards"


def test_shard_load_panels_leave_out_the_background_operations(dashboard: dict[str, Any]) -> None:
    """On an idle system the shard panels showed mostly sweeps and claims: the request
    panels filter out exactly the operations the background workers run."""
    shard_exprs = [
        e
        for e in expressions(dashboard)
        if "ledger_shard_transaction_duration_seconds" in e and "operation" in e
    ]
    excluded = [re.search(r'operation!~"([^"]*)"', e) for e in shard_exprs]
    assert len([m for m in excluded if m]) == 2, shard_exprs
    for match in excluded:
        if match:
            assert set(match.group(1).split("|")) == set(BACKGROUND_OPERATIONS)
    assert any('operation=~"' in e for e in shard_exprs), "no line for background work"
    for e in expressions(dashboard):
        if "ledger_shard_transaction_duration_seconds" in e:
            assert "operation" in e, f"a shard load query without the operation filter: {e}"

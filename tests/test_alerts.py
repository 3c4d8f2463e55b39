"""The alerting and recording rules in deploy/prometheus/, tested with Prometheus's own tools.

- `promtool check rules` and `promtool test rules`: every alert fires on the series that
  should page and stays silent on healthy ones (deploy/prometheus/tests/).
- A real Prometheus scrapes a real service (three shard servers, `ledger serve` as a
  process) and the textfile `ledger reconcile --metrics-file` writes, evaluates the rules,
  and answers every dashboard panel query and every rule expression: each returns data,
  or is expected to be empty and is. Then a failed reconcile fires its alert, and a
  stopped shard makes the shard-unavailable expression return that shard.

Debian's `prometheus` package brings both binaries; without them these tests skip
and say so (.ci/run installs the package).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ledger.v1 import ledger_pb2 as pb
from tests.process_cluster import ProcessCluster
from tests.support import (
    RPC_TIMEOUT_S,
    account,
    create_accounts,
    ref,
    transfer,
    transfers,
    uid,
    wait_until,
)
from tests.test_dashboards import DASHBOARD_PATH, metric_names

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
ALERTS_DOC = ROOT / "docs" / "alerts.md"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
_NO_PROMTOOL = "promtool not installed (apt-get install prometheus; .ci/run does)"
_NO_PROMETHEUS = "prometheus not installed (apt-get install prometheus; .ci/run does)"

# Prometheus scrapes and evaluates every this often in the live test, so that a
# rate() over a few seconds has samples (production uses 5 s, deploy/prometheus.yml).
SCRAPE_INTERVAL_S = 1
# Grafana's $__rate_interval at that scrape interval (4 scrapes).
RATE_INTERVAL = "4s"
# Prometheus starts, replays an empty TSDB and answers /-/ready within this long.
PROMETHEUS_READY_DEADLINE_S = 30.0
# Enough scrapes and rule evaluations for every rate() and recording rule to have data.
SETTLE_DEADLINE_S = 30.0
# One HTTP API call to a local Prometheus.
API_TIMEOUT_S = 10.0
# promtool on one rules file.
PROMTOOL_TIMEOUT_S = 60.0
# The reconcile child process (imports the package, reads three small shards).
RECONCILE_TIMEOUT_S = 90.0
_METRICS_LINE = re.compile(r"metrics on http://([\d.]+):(\d+)/metrics")

# Panel queries that select only failure counters: they are exported at zero from
# start-up, and on a healthy cluster nothing has failed, so every value they return
# is 0 (and a failure in this test would show).
FAILURE_ONLY_METRICS = frozenset(
    {
        "ledger_saga_attempts_failed_total",
        "ledger_shard_errors_total",
        "ledger_checkpoint_problems_total",
    }
)


def _yaml() -> Any:
    return pytest.importorskip("yaml")


def rules() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in _yaml().safe_load(path.read_text())["groups"]:
            found.extend(group["rules"])
    return found


def alerts() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def recordings() -> list[dict[str, Any]]:
    return [r for r in rules() if "record" in r]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    document = json.loads(DASHBOARD_PATH.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in document["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


# --- the files, without Prometheus ------------------------------------------------------


def test_rule_files_and_their_unit_tests_exist() -> None:
    assert RULE_FILES, "no deploy/prometheus/*.rules.yml"
    assert RULE_TESTS, "no deploy/prometheus/tests/*.yml"
    names = {a["alert"] for a in alerts()}
    # What issue 22 asks on-call to be told about.
    assert {
        "LedgerSagasDeadLettered",
        "LedgerSagasUnfinished",
        "LedgerTransferSuccessRateLow",
        "LedgerShardUnavailable",
        "LedgerShardTransactionsSlow",
        "LedgerRebalanceStalled",
        "LedgerReconcileFailed",
    } <= names


def test_every_alert_has_a_severity_and_a_runbook_entry_in_docs_alerts() -> None:
    headings = {
        line.lstrip("#").strip().lower()
        for line in ALERTS_DOC.read_text().splitlines()
        if line.startswith("## ")
    }
    for alert in alerts():
        assert alert["labels"]["severity"] in ("page", "ticket"), alert["alert"]
        url = alert["annotations"]["runbook_url"]
        assert url == f"docs/alerts.md#{alert['alert'].lower()}", url
        assert alert["alert"].lower() in headings, f"docs/alerts.md has no ## {alert['alert']}"


def test_every_alert_has_a_unit_test_that_expects_it_to_fire() -> None:
    tested = set()
    for path in RULE_TESTS:
        for case in _yaml().safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:
                    tested.add(check["alertname"])
    assert {a["alert"] for a in alerts()} <= tested


def test_prometheus_config_loads_the_rules_from_the_repository_and_in_compose() -> None:
    yaml = _yaml()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    loaded = {p for pattern in config["rule_files"] for p in PROMETHEUS_CONFIG.parent.glob(pattern)}
    assert loaded == set(RULE_FILES)
    # In the container the config is /etc/prometheus/prometheus.yml; the rules must be
    # mounted where its relative patterns point.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    mounted = dict(reversed(str(v).split(":")[:2]) for v in volumes if str(v).startswith("."))
    for pattern in config["rule_files"]:
        directory = str(Path("/etc/prometheus") / Path(pattern).parent)
        assert mounted.get(directory) == "./deploy/prometheus", (directory, mounted)


@pytest.mark.skipif(PROMTOOL is None, reason=_NO_PROMTOOL)
def test_promtool_checks_the_config_and_rules() -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout + checked.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=_NO_PROMTOOL)
@pytest.mark.parametrize("rule_test", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests_of_the_rules_pass(rule_test: Path) -> None:
    assert PROMTOOL is not None
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", rule_test.name],
        capture_output=True,
        text=True,
        cwd=rule_test.parent,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


# --- a real Prometheus scraping a real service ----------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def textfile_server(directory: Path) -> Iterator[int]:
    """Serves a directory over HTTP, as node-exporter's textfile collector serves its
    files: Prometheus parses the file `ledger reconcile --metrics-file` wrote."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Prometheus:
    url: str
    process: asyncio.subprocess.Process
    log_path: Path

    async def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)

        def get() -> Any:
            with urllib.request.urlopen(
                f"{self.url}{path}?{query}", timeout=API_TIMEOUT_S
            ) as response:
                return json.loads(response.read())

        reply = await asyncio.to_thread(get)
        assert reply["status"] == "success", reply
        return reply["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    async def has_data(self, expr: str) -> bool:
        return bool(await self.query(expr))

    async def firing(self) -> set[str]:
        data = await self.api("/api/v1/alerts")
        return {a["labels"]["alertname"] for a in data["alerts"] if a["state"] == "firing"}


@contextlib.asynccontextmanager
async def prometheus(
    work_dir: Path, *, ledger_target: str, textfile_target: str
) -> AsyncIterator[Prometheus]:
    assert PROMETHEUS is not None
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {"job_name": "ledger", "static_configs": [{"targets": [ledger_target]}]},
            {
                "job_name": "node",
                "metrics_path": "/ledger_reconcile.prom",
                "static_configs": [{"targets": [textfile_target]}],
            },
        ],
    }
    config_path = work_dir / "prometheus.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    port = _free_port()
    log_path = work_dir / "prometheus.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            PROMETHEUS,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={work_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:

        async def ready() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"prometheus exited:\n{log_path.read_text()}")
            try:
                await server.api("/api/v1/status/buildinfo")
            except OSError:
                return False
            return True

        await wait_until(ready, deadline_s=PROMETHEUS_READY_DEADLINE_S, what="prometheus ready")
        yield server
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


def _reconcile(config_path: Path, metrics_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", "reconcile", "--metrics-file", str(metrics_file)],
        capture_output=True,
        text=True,
        env={**_child_env(), "LEDGER_CONFIG": str(config_path)},
        cwd=ROOT,
        timeout=RECONCILE_TIMEOUT_S,
        check=False,
    )


def _child_env() -> dict[str, str]:
    # LEDGER_* settings from the outer environment would point the CLI elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


async def _traffic(cluster: ProcessCluster) -> None:
    """Local and cross-shard transfers, one refused by a rule, one invalid call."""
    stub = cluster.service.stub
    assert stub is not None
    payer = cluster.merchant_on("shard-a")
    payee = cluster.merchant_on("shard-b")
    await create_accounts(
        stub,
        account(payer, "cash"),
        account(payer, "wallet", no_overdraft=True),
        account(payee, "sales"),
    )
    results = await transfers(
        stub,
        transfer(uid("t"), ref(payer, "cash"), ref(payer, "wallet"), 500),
        transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), 300),
        transfer(uid("t"), ref(payer, "wallet"), ref(payer, "cash"), 9_000),
    )
    assert [pb.TransferResult.Name(r.result) for r in results] == [
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_EXCEEDS_CREDITS",
    ]
    # A registered event consumer, a few seconds behind (the lag alert's series exist).
    start = pb.EventCursor(positions=dict.fromkeys(("shard-a", "shard-b", "shard-c"), 0))
    await stub.AckEvents(
        pb.AckEventsRequest(consumer="warehouse", cursor=start), timeout=RPC_TIMEOUT_S
    )
    # A call the service refuses (a panel shows non-OK codes).
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        await stub.CreateTransfers(
            pb.CreateTransfersRequest(
                transfers=[transfer(uid("t"), ref(payer, "cash"), ref(payer, "wallet"), 0)]
            ),
            timeout=RPC_TIMEOUT_S,
        )


@pytest.mark.skipif(PROMETHEUS is None, reason=_NO_PROMETHEUS)
@pytest.mark.timeout(300)
async def test_a_real_prometheus_answers_every_panel_and_rule_from_a_live_service(
    tmp_path: Path,
) -> None:
    cluster = ProcessCluster(tmp_path / "cluster")
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    try:
        await asyncio.to_thread(cluster.start_shards)
        cluster.service.env = {"LEDGER_METRICS_LISTEN": "127.0.0.1:0"}
        await cluster.service.start()
        match = _METRICS_LINE.search(cluster.service.log())
        assert match, cluster.service.log()
        await _traffic(cluster)
        reconciled = await asyncio.to_thread(
            _reconcile, cluster.config_path, textfiles / "ledger_reconcile.prom"
        )
        assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr

        with textfile_server(textfiles) as textfile_port:
            async with prometheus(
                tmp_path,
                ledger_target=f"{match.group(1)}:{match.group(2)}",
                textfile_target=f"127.0.0.1:{textfile_port}",
            ) as server:
                await _check_everything_answers(server)
                await _check_a_failed_reconcile_fires(server, cluster, textfiles)
                await _check_a_stopped_shard_shows(server, cluster)
    finally:
        await cluster.close()


async def _check_everything_answers(server: Prometheus) -> None:
    # Both targets up, and every recording rule evaluated with data.
    async def settled() -> bool:
        up = await server.query("up")
        if len(up) != 2 or any(sample["value"][1] != "1" for sample in up):
            return False
        for recording in recordings():
            if not await server.has_data(recording["record"]):
                return False
        # A rate() over the dashboard's interval needs two scrapes after the traffic.
        return await server.has_data(f"rate(ledger_transfers_total[{RATE_INTERVAL}])") and all(
            [
                await server.has_data(name)
                for name in (
                    "ledger_saga_oldest_running_age_seconds",
                    # Refreshed every 10 s by the event sequencer's retention pass.
                    "ledger_event_consumer_lag_age_seconds",
                )
            ]
        )

    await wait_until(settled, deadline_s=SETTLE_DEADLINE_S, what="scrapes and rule evaluations")

    for title, expr in dashboard_queries():
        promql = expr.replace("$__rate_interval", RATE_INTERVAL)
        result = await server.query(promql)
        assert result, f"panel {title!r}: no data for {promql}"
        if metric_names(expr) <= FAILURE_ONLY_METRICS:
            assert {float(r["value"][1]) for r in result} == {0.0}, (title, promql, result)

    for recording in recordings():
        assert await server.has_data(recording["record"]), recording["record"]

    for alert in alerts():
        # Healthy and reconciled: no alert condition holds ...
        assert await server.query(alert["expr"]) == [], alert["alert"]
        # ... and not because a name is misspelt: every series it reads exists.
        for name in metric_names(alert["expr"]):
            assert await server.has_data(f'{{__name__="{name}"}}'), (alert["alert"], name)

    groups = (await server.api("/api/v1/rules"))["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rules())
    assert all(rule["health"] == "ok" for rule in loaded), [
        (rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"
    ]


async def _check_a_failed_reconcile_fires(
    server: Prometheus, cluster: ProcessCluster, textfiles: Path
) -> None:
    """A reconcile that cannot reach a shard proves nothing: the metric says 0 and pages."""
    unreachable = cluster.base_dir / "unreachable.toml"
    text = cluster.config_path.read_text()
    port = re.findall(r"@127\.0\.0\.1:(\d+)/", text)[0]
    unreachable.write_text(text.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{_free_port()}/", 1))
    failed = await asyncio.to_thread(_reconcile, unreachable, textfiles / "ledger_reconcile.prom")
    assert failed.returncode != 0, failed.stdout
    written = (textfiles / "ledger_reconcile.prom").read_text()
    assert "ledger_reconcile_ok 0.0" in written
    assert "ledger_reconcile_discrepancies NaN" in written

    async def fired() -> bool:
        return "LedgerReconcileFailed" in await server.firing()

    await wait_until(fired, deadline_s=SETTLE_DEADLINE_S, what="LedgerReconcileFailed firing")


async def _check_a_stopped_shard_shows(server: Prometheus, cluster: ProcessCluster) -> None:
    """The shard-unavailable condition names the shard whose PostgreSQL stopped."""
    expr = next(a["expr"] for a in alerts() if a["alert"] == "LedgerShardUnavailable")
    await asyncio.to_thread(cluster.shards.stop, "shard-c")

    async def shown() -> bool:
        return [s["metric"].get("shard") for s in await server.query(expr)] == ["shard-c"]

    await wait_until(shown, deadline_s=SETTLE_DEADLINE_S, what="shard-c shown unavailable")

    # The replica's own reachability gauge says so too, not only the error counter.
    async def unreachable() -> bool:
        found = await server.query("min by (shard) (ledger_shard_reachable) == 0")
        return [s["metric"].get("shard") for s in found] == ["shard-c"]

    await wait_until(unreachable, deadline_s=SETTLE_DEADLINE_S, what="shard-c unreachable")

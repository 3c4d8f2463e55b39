"""The deployment files agree with each other and with what the service expects.

docker-compose.yml, the Dockerfile and shard_config/*.toml are written by hand and
break silently: a renamed compose service, a shard map pointing at a host that does not
exist, or a health probe that always passes only show up when someone runs the stack.
These tests read the files (Docker itself is not needed) and run the health probe
against a real in-process gRPC health server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "Dockerfile"
SHARD_CONFIG_DIR = ROOT / "shard_config"
DOCKER_CONFIG_PATH = SHARD_CONFIG_DIR / "docker.toml"

SHARD_SERVICES = ("shard-a", "shard-b", "shard-c")
CONTAINER_CONFIG_DIR = "/app/shard_config"
PROBE_ADDRESS = "127.0.0.1:50051"
# The probe's own deadline is 2 s; this bounds the whole interpreter start plus probe so
# a regression (say, a probe without a deadline) fails the test instead of hanging it.
PROBE_PROCESS_TIMEOUT_S = 30

SHARD_CONFIG_PATHS = sorted(SHARD_CONFIG_DIR.glob("*.toml"))


# --- helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed; docker-compose.yml checks need it"
    )
    document = yaml.safe_load(COMPOSE_PATH.read_text())
    assert isinstance(document, dict), "docker-compose.yml must be a mapping"
    assert isinstance(document.get("services"), dict), "docker-compose.yml has no services"
    return document


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _postgres_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _services(compose).items()
        if str(service.get("image", "")).startswith("postgres:")
    }


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """Compose allows environment as a mapping or as a list of KEY=VALUE strings."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports of `ports:`, short ("8080:80/tcp") or long syntax."""
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/", 1)[0].rsplit(":", 1)[-1]))
    return ports


def _healthcheck_argv(test: list[str] | str) -> list[str]:
    assert isinstance(test, list) and test[0] == "CMD", f"expected exec-form CMD, got {test!r}"
    return list(test[1:])


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    lines = [
        line
        for line in DOCKERFILE_PATH.read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _dockerfile_values(keyword: str) -> list[str]:
    return [arguments for name, arguments in _dockerfile_instructions() if name == keyword]


def _dockerfile_healthcheck_argv() -> list[str]:
    (healthcheck,) = _dockerfile_values("HEALTHCHECK")
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", healthcheck)
    assert match, f"HEALTHCHECK must use exec-form CMD [...], got {healthcheck!r}"
    argv = json.loads(match.group(1))
    assert isinstance(argv, list)
    return argv


def _load_shard_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        return tomllib.load(file)


# --- docker-compose.yml -------------------------------------------------------------


def test_compose_runs_three_postgres_shards_each_with_a_pg_isready_healthcheck(
    compose: dict[str, Any],
) -> None:
    shards = _postgres_services(compose)
    assert sorted(shards) == sorted(SHARD_SERVICES)
    for name, service in shards.items():
        assert service["image"].startswith("postgres:16"), name
        environment = _environment(service)
        for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
            assert environment.get(key) == "ledger", f"{name}: {key}"
        healthcheck = service.get("healthcheck") or {}
        assert not healthcheck.get("disable", False), name
        assert "pg_isready" in " ".join(_healthcheck_argv(healthcheck["test"])), name


def test_each_shard_keeps_its_data_in_its_own_named_volume(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    data_volumes = []
    for name, service in _postgres_services(compose).items():
        mounts = [str(volume) for volume in service.get("volumes") or []]
        data_mounts = [m for m in mounts if m.split(":")[1] == "/var/lib/postgresql/data"]
        assert len(data_mounts) == 1, f"{name} has no data volume: {mounts}"
        source = data_mounts[0].split(":")[0]
        assert source in declared_volumes, f"{name}: {source} is not a named volume"
        data_volumes.append(source)
    assert len(set(data_volumes)) == len(SHARD_SERVICES), f"shards share volumes: {data_volumes}"


def test_jaeger_publishes_otlp_grpc_port_4317_and_the_ui(compose: dict[str, Any]) -> None:
    jaeger = _services(compose)["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    assert {4317, 16686} <= _container_ports(jaeger)


def test_ledger_starts_only_after_every_shard_is_healthy(compose: dict[str, Any]) -> None:
    depends_on = _services(compose)["ledger"]["depends_on"]
    assert isinstance(depends_on, dict), "depends_on needs the long form to carry conditions"
    for shard in _postgres_services(compose):
        assert depends_on.get(shard, {}).get("condition") == "service_healthy", shard
    assert "jaeger" in depends_on


def test_ledger_sends_traces_to_jaeger_on_a_port_jaeger_listens_on(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    environment = _environment(services["ledger"])
    assert environment["OTEL_SERVICE_NAME"] == "ledger"
    assert environment["OTEL_TRACES_EXPORTER"] == "otlp"
    endpoint = urlsplit(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname in services
    assert endpoint.port in _container_ports(services[endpoint.hostname])


def test_ledger_listens_on_all_interfaces_and_publishes_the_grpc_port(
    compose: dict[str, Any],
) -> None:
    ledger = _services(compose)["ledger"]
    assert _environment(ledger)["LEDGER_LISTEN"] == "0.0.0.0:50051"
    assert 50051 in _container_ports(ledger)


def test_ledger_has_fixed_pseudonym_and_page_token_keys_so_restarts_keep_them(
    compose: dict[str, Any],
) -> None:
    """Without LEDGER_PSEUDONYM_KEY a merchant's pseudonym changes at every restart and
    its traces cannot be followed across one; page tokens likewise need a fixed key."""
    environment = _environment(_services(compose)["ledger"])
    for name in ("LEDGER_PSEUDONYM_KEY", "LEDGER_PAGE_TOKEN_KEY"):
        assert len(str(environment.get(name, "")).encode()) >= 16, name
    assert environment["LEDGER_PSEUDONYM_KEY"] != environment["LEDGER_PAGE_TOKEN_KEY"]


def test_deploy_readme_describes_the_compose_stack_as_it_is() -> None:
    """Prometheus and Grafana are in docker-compose.yml: the README must not tell a
    reader to add them."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "Adding it to docker-compose.yml" not in readme
    assert "LEDGER_PSEUDONYM_KEY" in readme


def test_ledger_reads_its_shard_map_from_a_read_only_mount_of_shard_config(
    compose: dict[str, Any],
) -> None:
    ledger = _services(compose)["ledger"]
    assert f"./shard_config:{CONTAINER_CONFIG_DIR}:ro" in ledger["volumes"]
    for argv in (ledger.get("command"), json.loads(_dockerfile_values("CMD")[-1])):
        config_path = argv[argv.index("--config") + 1]
        assert config_path.startswith(CONTAINER_CONFIG_DIR + "/"), argv
        # The mounted directory is the repository's shard_config/, so the file must exist.
        assert (SHARD_CONFIG_DIR / config_path.removeprefix(CONTAINER_CONFIG_DIR + "/")).is_file()


def test_every_shard_host_in_the_docker_shard_map_is_a_compose_shard_with_matching_credentials(
    compose: dict[str, Any],
) -> None:
    shards = _postgres_services(compose)
    config = _load_shard_config(DOCKER_CONFIG_PATH)
    hosts = []
    for shard in config["shards"]:
        dsn = urlsplit(shard["dsn"])
        assert dsn.hostname in shards, f"{shard['name']}: no compose service {dsn.hostname!r}"
        environment = _environment(shards[dsn.hostname])
        assert dsn.port in (None, 5432), shard["name"]
        assert dsn.username == environment["POSTGRES_USER"], shard["name"]
        assert dsn.password == environment["POSTGRES_PASSWORD"], shard["name"]
        assert dsn.path.lstrip("/") == environment["POSTGRES_DB"], shard["name"]
        hosts.append(dsn.hostname)
    # Two map entries on one database would put two ring positions on the same books.
    assert sorted(hosts) == sorted(shards)


# --- Dockerfile ---------------------------------------------------------------------


def test_dockerfile_runs_the_service_as_a_non_root_user() -> None:
    users = _dockerfile_values("USER")
    assert users, "the Dockerfile never switches away from root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_listens_on_all_interfaces_and_exposes_the_grpc_port() -> None:
    environment = " ".join(_dockerfile_values("ENV"))
    assert "LEDGER_LISTEN=0.0.0.0:50051" in environment
    assert "50051" in " ".join(_dockerfile_values("EXPOSE")).split()


def test_compose_and_dockerfile_use_the_same_grpc_health_probe(compose: dict[str, Any]) -> None:
    compose_argv = _healthcheck_argv(_services(compose)["ledger"]["healthcheck"]["test"])
    assert compose_argv == _dockerfile_healthcheck_argv()


# --- the health probe itself ------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[str, Any, Any]]:
    """A real grpc.health.v1 server on a free port: (address, servicer, server)."""
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, server
    finally:
        server.stop(grace=None)


def _run_probe(argv: list[str], address: str) -> int:
    assert argv[0] == "python"
    (script,) = [arg for arg in argv if PROBE_ADDRESS in arg]
    assert script.count(PROBE_ADDRESS) == 1
    probe = [sys.executable, *argv[1:]]
    probe[probe.index(script)] = script.replace(PROBE_ADDRESS, address)
    completed = subprocess.run(
        probe, capture_output=True, timeout=PROBE_PROCESS_TIMEOUT_S, check=False
    )
    return completed.returncode


def test_health_probe_passes_only_while_the_server_reports_serving(
    health_server: tuple[str, Any, Any],
) -> None:
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    address, servicer, server = health_server
    argv = _dockerfile_healthcheck_argv()

    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert _run_probe(argv, address) == 0

    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _run_probe(argv, address) != 0

    server.stop(grace=None).wait()
    assert _run_probe(argv, address) != 0


# --- shard_config/*.toml ------------------------------------------------------------


def test_shard_config_holds_the_docker_map_and_the_local_example() -> None:
    names = {path.name for path in SHARD_CONFIG_PATHS}
    assert {"docker.toml", "local.toml"} <= names


@pytest.mark.parametrize("path", SHARD_CONFIG_PATHS, ids=lambda path: path.name)
def test_shard_config_has_an_epoch_and_uniquely_named_weighted_shards(path: Path) -> None:
    config = _load_shard_config(path)
    epoch = config.get("epoch")
    # bool is an int subclass in Python; `epoch = true` must not pass as 1.
    assert type(epoch) is int and epoch >= 1, f"epoch must be an integer >= 1, got {epoch!r}"
    shards = config.get("shards")
    assert isinstance(shards, list) and shards, "no [[shards]] tables"
    names = [shard.get("name") for shard in shards]
    assert all(isinstance(name, str) and name for name in names), names
    assert len(set(names)) == len(names), f"duplicate shard names: {names}"
    for shard in shards:
        weight = shard.get("weight")
        assert type(weight) is int and weight >= 1, f"{shard['name']}: weight {weight!r}"
        dsn = urlsplit(str(shard.get("dsn", "")))
        assert dsn.scheme in ("postgresql", "postgres") and dsn.hostname, shard["name"]


def test_local_example_uses_the_same_shard_names_as_the_docker_map() -> None:
    def names(path: Path) -> list[str]:
        return sorted(shard["name"] for shard in _load_shard_config(path)["shards"])

    assert names(SHARD_CONFIG_DIR / "local.toml") == names(DOCKER_CONFIG_PATH)

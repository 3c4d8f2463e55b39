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
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "Dockerfile"
SHARD_CONFIG_DIR = ROOT / "shard_config"
DOCKER_CONFIG_PATH = SHARD_CONFIG_DIR / "docker.toml"

SHARD_SERVICES = ("shard-a", "shard-b", "shard-c")
# Where RabbitMQ listens for AMQP inside its container (the image's default).
AMQP_PORT = 5672
RABBITMQ_UI_PORT = 15672
RABBITMQ_DATA_DIR = "/var/lib/rabbitmq"
# Compose's own stop_grace_period when a service sets none.
COMPOSE_DEFAULT_STOP_GRACE_S = 10.0
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


def _rabbitmq_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _services(compose).items()
        if str(service.get("image", "")).startswith("rabbitmq:")
    }


def _option(argv: list[str], option: str) -> str:
    assert option in argv, f"{option} missing from {argv}"
    return argv[argv.index(option) + 1]


def _duration_s(value: str | int | float) -> float:
    """A compose duration ("45s", "1m30s", "500ms") in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    text = str(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _named_volume_at(compose: dict[str, Any], service: dict[str, Any], container_path: str) -> str:
    """The declared named volume a service mounts at container_path."""
    mounts = [str(volume) for volume in service.get("volumes") or []]
    data_mounts = [m for m in mounts if m.split(":")[1] == container_path]
    assert len(data_mounts) == 1, f"nothing mounted at {container_path}: {mounts}"
    source = data_mounts[0].split(":")[0]
    assert source in set(compose.get("volumes") or {}), f"{source} is not a named volume"
    return source


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


def _host_port(service: dict[str, Any], container_port: int) -> int:
    """The host port `ports:` publishes container_port on (short or long syntax)."""
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if int(entry["target"]) == container_port:
                return int(entry.get("published", container_port))
            continue
        *host, target = str(entry).split("/", 1)[0].split(":")
        if int(target) == container_port:
            return int(host[-1]) if host else container_port
    raise AssertionError(f"port {container_port} is not published")


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


def test_deploy_readme_describes_the_compose_stack_as_it_is(compose: dict[str, Any]) -> None:
    """Prometheus and Grafana are in docker-compose.yml: the README must not tell a
    reader to add them. It names every service but the shards, so one added to the
    stack (as rabbitmq and publisher were) is described there too."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "Adding it to docker-compose.yml" not in readme
    assert "LEDGER_PSEUDONYM_KEY" in readme
    for name in set(_services(compose)) - set(_postgres_services(compose)):
        assert f"`{name}`" in readme, name


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


def test_compose_runs_one_rabbitmq_with_amqp_and_its_ui_published_and_a_healthcheck(
    compose: dict[str, Any],
) -> None:
    brokers = _rabbitmq_services(compose)
    assert sorted(brokers) == ["rabbitmq"]
    rabbitmq = brokers["rabbitmq"]
    # The management UI is where the README sends a reader to look at the events.
    assert rabbitmq["image"].endswith("-management"), rabbitmq["image"]
    assert {AMQP_PORT, RABBITMQ_UI_PORT} <= _container_ports(rabbitmq)
    healthcheck = rabbitmq.get("healthcheck") or {}
    assert not healthcheck.get("disable", False)
    argv = _healthcheck_argv(healthcheck["test"])
    assert argv[0] == "rabbitmq-diagnostics", argv
    assert argv[-1] in ("ping", "check_port_connectivity"), argv
    # The image's guest user may log in from localhost only, which neither the
    # publisher's container nor the host (through a published port) is.
    environment = _environment(rabbitmq)
    assert environment.get("RABBITMQ_DEFAULT_USER", "guest") != "guest"
    assert environment.get("RABBITMQ_DEFAULT_PASS")


def test_rabbitmq_keeps_its_data_in_a_named_volume_under_a_fixed_node_name(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    rabbitmq = services["rabbitmq"]
    volume = _named_volume_at(compose, rabbitmq, RABBITMQ_DATA_DIR)
    others = [
        name
        for name, service in services.items()
        if name != "rabbitmq"
        and any(str(v).split(":")[0] == volume for v in service.get("volumes") or [])
    ]
    assert not others, f"{volume} is shared with {others}"
    # The node (rabbit@HOSTNAME) keeps its data under its name; compose's default
    # hostname is the container id, new with every recreated container.
    assert rabbitmq.get("hostname"), "rabbitmq needs a fixed hostname to find its data again"


def test_publisher_runs_ledger_events_publish_from_the_ledger_image_with_the_shard_map_read_only(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    publisher, ledger = services["publisher"], services["ledger"]
    # One image, built once by the ledger service.
    assert publisher["image"] == ledger["image"]
    assert "build" not in publisher
    argv = publisher["command"]
    assert argv[:3] == ["ledger", "events", "publish"], argv
    # The same shard map as the service, from the same read-only mount.
    assert _option(argv, "--config") == _option(ledger["command"], "--config")
    assert f"./shard_config:{CONTAINER_CONFIG_DIR}:ro" in publisher["volumes"]
    # A queue bound to every event, so the stack's events can be read at once.
    assert _option(argv, "--queue")
    # The password stays out of the command line (ps shows it to every local user).
    assert "--amqp" not in argv
    assert "LEDGER_AMQP_URL" in _environment(publisher)


def test_publisher_amqp_url_names_rabbitmq_on_its_port_with_its_credentials(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    url = urlsplit(_environment(services["publisher"])["LEDGER_AMQP_URL"])
    assert url.scheme == "amqp"
    assert url.hostname in _rabbitmq_services(compose), url.hostname
    broker = services[url.hostname]
    assert (url.port or AMQP_PORT) == AMQP_PORT
    assert AMQP_PORT in _container_ports(broker)
    environment = _environment(broker)
    assert unquote(url.username or "") == environment["RABBITMQ_DEFAULT_USER"]
    assert unquote(url.password or "") == environment["RABBITMQ_DEFAULT_PASS"]
    # aiormq reads an empty path or "/" as the default vhost "/".
    assert (unquote(url.path[1:]) or "/") == environment.get("RABBITMQ_DEFAULT_VHOST", "/")


def test_publisher_starts_only_after_rabbitmq_and_the_ledger_are_healthy(
    compose: dict[str, Any],
) -> None:
    """The ledger migrates the shards at start-up and the publisher reads their event
    tables; the broker must accept connections before the queue can be declared."""
    services = _services(compose)
    depends_on = services["publisher"]["depends_on"]
    assert isinstance(depends_on, dict), "depends_on needs the long form to carry conditions"
    broker = urlsplit(_environment(services["publisher"])["LEDGER_AMQP_URL"]).hostname
    for name in (broker, "ledger"):
        assert depends_on.get(name, {}).get("condition") == "service_healthy", name
        # service_healthy on a service without a healthcheck never comes true.
        healthcheck = services[name].get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable", False), name


def test_publisher_restarts_and_has_time_to_confirm_its_batch_in_flight_when_stopped(
    compose: dict[str, Any],
) -> None:
    """SIGTERM is the publisher's clean stop: it awaits the broker's confirms for the
    batch in flight (at most the confirm timeout) and acknowledges it. Killed before,
    it publishes that batch again on the next start."""
    limits = pytest.importorskip("ledger.limits")
    publisher = _services(compose)["publisher"]
    # It exits 1 for its supervisor to restart (a broker gone for ten minutes).
    assert publisher.get("restart") in ("unless-stopped", "always", "on-failure")
    assert publisher.get("stop_signal", "SIGTERM") in ("SIGTERM", "SIGINT")
    grace_s = _duration_s(publisher.get("stop_grace_period", f"{COMPOSE_DEFAULT_STOP_GRACE_S}s"))
    assert grace_s > limits.event_publish_confirm_timeout_s


def test_publisher_does_not_inherit_the_images_grpc_health_probe(compose: dict[str, Any]) -> None:
    """The image's HEALTHCHECK asks the gRPC port, where only the service listens: the
    publisher would be unhealthy for ever."""
    assert PROBE_ADDRESS in " ".join(_dockerfile_healthcheck_argv()), "nothing to inherit"
    healthcheck = _services(compose)["publisher"].get("healthcheck")
    assert healthcheck, "the publisher inherits the Dockerfile's gRPC HEALTHCHECK"
    if not healthcheck.get("disable", False):
        assert PROBE_ADDRESS not in " ".join(_healthcheck_argv(healthcheck["test"]))


def test_readme_reads_the_compose_events_from_the_publishers_queue_with_rabbitmqs_user(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    argv = services["publisher"]["command"]
    environment = _environment(services["rabbitmq"])
    readme = (ROOT / "README.md").read_text()
    assert f'"{_option(argv, "--queue")}"' in readme
    user, password = environment["RABBITMQ_DEFAULT_USER"], environment["RABBITMQ_DEFAULT_PASS"]
    port = _host_port(services["rabbitmq"], AMQP_PORT)
    assert f"amqp://{user}:{password}@127.0.0.1:{port}/" in readme


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

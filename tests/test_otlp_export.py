"""The service as a real process exports its spans over OTLP/gRPC and serves /metrics.

The test starts an OTLP/gRPC trace receiver of its own (a grpc.aio server that
keeps every ExportTraceServiceRequest) and points the service at it with the
standard OTEL_* variables, exactly as docker compose points it at Jaeger. The
Prometheus endpoint is scraped after traffic; its metric names are the ones the
Grafana dashboard (deploy/grafana/dashboards/ledger.json) queries, and
EXPORTED_METRICS below is the list tests/test_dashboards.py checks it against.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.process_cluster import ProcessCluster
from tests.support import RPC_TIMEOUT_S, account, create_accounts, ref, transfer, uid, wait_until

SERVICE_NAME = "ledger-test"
PSEUDONYM_KEY = "otlp-test-key"
CREATE_TRANSFERS_SPAN = "ledger.v1.LedgerService/CreateTransfers"
_METRICS_LINE = re.compile(r"metrics on http://([\d.]+):(\d+)/metrics")
# One scrape of /metrics answers within this long (it is a local HTTP GET).
SCRAPE_TIMEOUT_S = 5.0

# Every sample name /metrics exports (with the Prometheus exporter's _total and
# _seconds suffixes). Dashboards may query only these; test_dashboards.py checks that.
EXPORTED_METRICS = (
    "ledger_requests_total",
    "ledger_request_duration_seconds_bucket",
    "ledger_request_duration_seconds_count",
    "ledger_request_duration_seconds_sum",
    "ledger_transfers_total",
    "ledger_sagas_finished_total",
    "ledger_saga_attempts_failed_total",
    "ledger_shard_errors_total",
    "ledger_shard_transaction_duration_seconds_bucket",
    "ledger_shard_transaction_duration_seconds_count",
    "ledger_shard_transaction_duration_seconds_sum",
    "ledger_pool_connections",
    "ledger_sagas",
    "ledger_merchants",
    "ledger_shard_reachable",
    "ledger_saga_oldest_running_age_seconds",
    "ledger_events_sequenced_total",
    "ledger_checkpoint_problems_total",
)
# The event stream's series that exist only with their subject: a subscriber
# (delivery delay), a registered consumer (lag), a retention pass every 10 s
# (outbox backlog). tests/test_event_retention.py reads the lags.
EVENT_STREAM_METRICS = (
    "ledger_event_delivery_delay_seconds_bucket",
    "ledger_event_delivery_delay_seconds_count",
    "ledger_event_delivery_delay_seconds_sum",
    "ledger_event_consumer_lag",
    "ledger_event_consumer_lag_age_seconds",
    "ledger_event_outbox_backlog",
)
# Every one appears after the traffic below: counters of failures are exported at
# zero from the start, so their panels read 0, not "No data", on a healthy system.
METRICS_AFTER_TRAFFIC = EXPORTED_METRICS
EXPORTED_METRICS += EVENT_STREAM_METRICS


# --- the OTLP receiver ----------------------------------------------------------------


@dataclass
class ExportedSpan:
    service_name: str
    span: trace_pb2.Span
    attributes: dict[str, object] = field(default_factory=dict)

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()


def _value(value: common_pb2.AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every export request, as a collector would receive it."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> Iterator[ExportedSpan]:
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        yield ExportedSpan(
                            service_name=str(resource.get("service.name", "")),
                            span=span,
                            attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        )

    def in_trace(self, trace_id: str) -> list[ExportedSpan]:
        return [s for s in self.spans() if s.trace_id == trace_id]


@dataclass
class Stack:
    receiver: TraceReceiver
    cluster: ProcessCluster

    @property
    def stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        assert self.cluster.service.stub is not None
        return self.cluster.service.stub

    def metrics_url(self) -> str:
        match = _METRICS_LINE.search(self.cluster.service.log())
        assert match, "the service did not log its metrics address"
        return f"http://{match.group(1)}:{match.group(2)}/metrics"


@contextlib.asynccontextmanager
async def exporting_cluster(
    directory: Path, env: dict[str, str]
) -> AsyncIterator[tuple[TraceReceiver, ProcessCluster]]:
    """An OTLP receiver, and a service process (on shards of its own, env added to
    its environment) exporting its spans to it."""
    receiver = TraceReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    cluster = ProcessCluster(directory)
    try:
        await asyncio.to_thread(cluster.start_shards)
        cluster.service.env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_EXPORTER": "otlp",
            # Export every 100 ms instead of every 5 s, so spans arrive quickly.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            **env,
        }
        await cluster.service.start()
        yield receiver, cluster
    finally:
        await cluster.close()
        await server.stop(grace=None)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    env = {
        "OTEL_SERVICE_NAME": SERVICE_NAME,
        "LEDGER_METRICS_LISTEN": "127.0.0.1:0",
        "LEDGER_PSEUDONYM_KEY": PSEUDONYM_KEY,
    }
    async with exporting_cluster(tmp_path_factory.mktemp("otlp"), env) as (receiver, cluster):
        yield Stack(receiver=receiver, cluster=cluster)


# --- helpers --------------------------------------------------------------------------


def new_traceparent() -> tuple[str, str, str]:
    trace_id = f"{secrets.randbits(128) | 1:032x}"
    span_id = f"{secrets.randbits(64) | 1:016x}"
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def pseudonym(merchant_id: str) -> str:
    digest = hmac.new(PSEUDONYM_KEY.encode(), merchant_id.encode(), hashlib.sha256).hexdigest()
    return "m_" + digest[:16]


async def post(
    stack: Stack, item: pb.Transfer, *, traceparent: str | None = None
) -> pb.CreateTransferResult:
    metadata = (("traceparent", traceparent),) if traceparent else None
    response = await stack.stub.CreateTransfers(
        pb.CreateTransfersRequest(transfers=[item]), timeout=RPC_TIMEOUT_S, metadata=metadata
    )
    return response.results[0]


Samples = list[tuple[str, dict[str, str], float]]


async def scrape(stack: Stack) -> Samples:
    url = stack.metrics_url()

    def get() -> str:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            return bytes(response.read()).decode()

    text = await asyncio.to_thread(get)
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def with_name(samples: Samples, name: str, **labels: str) -> Samples:
    return [s for s in samples if s[0] == name and all(s[1].get(k) == v for k, v in labels.items())]


# --- tests ------------------------------------------------------------------------------


async def test_failure_counters_are_exported_at_zero_before_any_failure(stack: Stack) -> None:
    """First in this module: nothing has failed yet, and the counters already exist."""
    samples = await scrape(stack)
    for kind in ("TRANSFER", "SETTLE", "EXPIRE"):
        assert [
            s[2] for s in with_name(samples, "ledger_saga_attempts_failed_total", kind=kind)
        ] == [0.0]
    for shard in ("shard-a", "shard-b", "shard-c"):
        for kind in ("busy", "unavailable", "error", "contention"):
            assert [
                s[2]
                for s in with_name(samples, "ledger_shard_errors_total", shard=shard, kind=kind)
            ] == [0.0]
    assert with_name(samples, "ledger_sagas_finished_total", kind="TRANSFER", state="COMPENSATED")


async def test_spans_arrive_over_otlp_with_the_service_name_and_continue_the_callers_trace(
    stack: Stack,
) -> None:
    payer = stack.cluster.merchant_on("shard-a", "payer")
    payee = stack.cluster.merchant_on("shard-a", "payee")
    await create_accounts(stack.stub, account(payer, "cash"), account(payee, "sales"))
    trace_id, client_span_id, traceparent = new_traceparent()
    transfer_id = uid("t")
    result = await post(
        stack,
        transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 99),
        traceparent=traceparent,
    )
    assert result.result == pb.TRANSFER_RESULT_OK

    async def arrived() -> bool:
        names = {s.span.name for s in stack.receiver.in_trace(trace_id)}
        return {CREATE_TRANSFERS_SPAN, "route", "shard create_transfers"} <= names

    await wait_until(arrived, what="the call's spans at the OTLP receiver")
    spans = stack.receiver.in_trace(trace_id)
    assert {s.service_name for s in spans} == {SERVICE_NAME}
    server = [s for s in spans if s.span.name == CREATE_TRANSFERS_SPAN]
    assert len(server) == 1
    assert server[0].parent_span_id == client_span_id
    assert server[0].span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert server[0].attributes["rpc.method"] == "CreateTransfers"
    assert server[0].attributes["rpc.grpc.status_code"] == 0
    writes = [s for s in spans if s.span.name == "shard create_transfers"]
    assert {s.attributes["ledger.shard"] for s in writes} == {"shard-a"}
    by_id = {s.span_id: s for s in spans}
    for write in writes:
        # server -> route -> group commit (this call ran alone) -> shard transaction.
        batch = by_id[write.parent_span_id]
        assert batch.span.name == "group commit"
        route = by_id[batch.parent_span_id]
        assert route.span.name == "route"
        assert route.parent_span_id == server[0].span_id


async def test_saga_and_statement_spans_arrive_without_merchant_ids_in_clear(
    stack: Stack,
) -> None:
    payer = stack.cluster.merchant_on("shard-a", "payer")
    payee = stack.cluster.merchant_on("shard-b", "payee")
    await create_accounts(stack.stub, account(payer, "cash"), account(payee, "sales"))
    trace_id, _, traceparent = new_traceparent()
    result = await post(
        stack,
        transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), 250),
        traceparent=traceparent,
    )
    assert result.result == pb.TRANSFER_RESULT_OK
    steps = {"saga step 1 reserve", "saga step 2 credit", "saga step 3 finish"}

    async def arrived() -> bool:
        return steps <= {s.span.name for s in stack.receiver.in_trace(trace_id)}

    await wait_until(arrived, what="the saga's spans at the OTLP receiver")
    spans = stack.receiver.in_trace(trace_id)
    # A batch of only cross-shard transfers has its route span too, holding the saga.
    by_id = {s.span_id: s for s in spans}
    (server,) = [s for s in spans if s.span.name == CREATE_TRANSFERS_SPAN]
    (route,) = [s for s in spans if s.span.name == "route"]
    assert route.parent_span_id == server.span_id
    (step1,) = [s for s in spans if s.span.name == "saga step 1 reserve"]
    ancestor = by_id.get(step1.parent_span_id)
    while ancestor is not None and ancestor.span_id != route.span_id:
        ancestor = by_id.get(ancestor.parent_span_id)
    assert ancestor is route, "saga step 1 is not under the route span"
    credit = [s for s in spans if s.span.name == "saga step 2 credit"]
    assert len(credit) == 1
    under_credit = [s for s in spans if s.parent_span_id == credit[0].span_id]
    assert {
        s.attributes.get("ledger.shard") for s in under_credit if s.span.name.startswith("shard ")
    } == {"shard-b"}
    assert credit[0].attributes["ledger.merchant"] == pseudonym(payer)
    # asyncpg statement spans: statement text, never parameters (which hold merchant ids).
    statements = [s for s in spans if "db.statement" in s.attributes]
    assert statements, "no asyncpg statement spans were exported"
    for span in stack.receiver.spans():
        for key, value in span.attributes.items():
            for merchant in (payer, payee):
                assert merchant not in str(value), f"{merchant} in clear: {span.span.name} {key}"


async def test_metrics_endpoint_exports_the_named_metrics_after_traffic(stack: Stack) -> None:
    payer = stack.cluster.merchant_on("shard-a", "payer")
    local = stack.cluster.merchant_on("shard-a", "local")
    payee = stack.cluster.merchant_on("shard-c", "payee")
    await create_accounts(
        stack.stub, account(payer, "cash"), account(local, "sales"), account(payee, "sales")
    )
    assert (
        await post(stack, transfer(uid("t"), ref(payer, "cash"), ref(local, "sales"), 10))
    ).result == pb.TRANSFER_RESULT_OK
    assert (
        await post(stack, transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), 11))
    ).result == pb.TRANSFER_RESULT_OK
    with pytest.raises(grpc.aio.AioRpcError):
        await post(stack, transfer(uid("t"), ref(payer, "cash"), ref(local, "sales"), 0))

    samples: Samples = []

    async def complete() -> bool:
        # ledger_sagas is refreshed by the recovery worker every ~2 s, not per call.
        nonlocal samples
        samples = await scrape(stack)
        return all(with_name(samples, name) for name in METRICS_AFTER_TRAFFIC)

    await wait_until(complete, what="every named metric on /metrics")
    assert with_name(samples, "ledger_requests_total", method="CreateTransfers", code="OK")
    assert with_name(
        samples, "ledger_requests_total", method="CreateTransfers", code="INVALID_ARGUMENT"
    )
    assert with_name(samples, "ledger_request_duration_seconds_count", method="CreateTransfers")
    assert with_name(samples, "ledger_transfers_total", result="OK")
    assert with_name(samples, "ledger_sagas_finished_total", kind="TRANSFER", state="COMPLETED")
    for shard in ("shard-a", "shard-c"):
        assert with_name(samples, "ledger_shard_transaction_duration_seconds_count", shard=shard)
        assert with_name(samples, "ledger_pool_connections", shard=shard, state="open")
        assert with_name(samples, "ledger_pool_connections", shard=shard, state="in_use")
    assert with_name(samples, "ledger_sagas", state="dead")
    assert with_name(samples, "ledger_merchants", state="active")
    assert with_name(samples, "ledger_sagas", state="running")
    ledger_names = {name for name, _, _ in samples if name.startswith("ledger_")}
    assert ledger_names <= set(EXPORTED_METRICS), ledger_names - set(EXPORTED_METRICS)


async def test_latency_histograms_have_buckets_below_one_second(stack: Stack) -> None:
    """p50/p99 panels need buckets at the scale of a call (milliseconds), in seconds."""
    payer = stack.cluster.merchant_on("shard-a", "payer")
    await create_accounts(stack.stub, account(payer, "cash"))
    samples = await scrape(stack)
    for name in (
        "ledger_request_duration_seconds_bucket",
        "ledger_shard_transaction_duration_seconds_bucket",
    ):
        bounds = {float(labels["le"]) for _, labels, _ in with_name(samples, name)}
        assert bounds, f"no {name} samples"
        below_a_second = sorted(b for b in bounds if 0 < b < 1)
        assert len(below_a_second) >= 4, (
            f"{name} has bucket bounds {sorted(bounds)}: every call under 5 s lands in one "
            "bucket, so histogram_quantile() reports p50 ~2.5 s whatever the real latency"
        )


async def test_idle_background_work_exports_no_spans(stack: Stack) -> None:
    """Last in this module, after seconds of sweeps and claims: every exported trace is a
    request's, or background work that found something (ledger.idle false)."""
    payer = stack.cluster.merchant_on("shard-a", "payer")
    payee = stack.cluster.merchant_on("shard-a", "payee")
    await create_accounts(stack.stub, account(payer, "cash"), account(payee, "sales"))
    # A hold that expires at once: the sweeper finds something to do, and says so.
    held = transfer(
        uid("t"),
        ref(payer, "cash"),
        ref(payee, "sales"),
        5,
        action=pb.TRANSFER_ACTION_PENDING,
        timeout_ms=1,
    )
    assert (await post(stack, held)).result == pb.TRANSFER_RESULT_OK

    def sweeps() -> list[ExportedSpan]:
        return [s for s in stack.receiver.spans() if s.span.name == "shard expire_due_pendings"]

    async def swept() -> bool:
        return bool(sweeps())

    await wait_until(swept, what="the expiry sweeper's span for the expired hold")
    assert all(s.attributes.get("ledger.idle") is False for s in sweeps())
    spans = list(stack.receiver.spans())
    roots = [s for s in spans if not s.span.parent_span_id]
    assert roots
    for root in roots:
        is_request = root.span.kind == trace_pb2.Span.SPAN_KIND_SERVER
        did_something = root.attributes.get("ledger.background") is True and (
            root.attributes.get("ledger.idle") is False
        )
        assert is_request or did_something, (root.span.name, root.attributes)
    idle = [s for s in spans if s.attributes.get("ledger.idle") is True]
    assert not idle, [s.span.name for s in idle]

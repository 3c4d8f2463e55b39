"""OpenTelemetry metrics, exposed for Prometheus scraping on an HTTP port.

Instruments are created at import against the global meter provider, so they
cost a no-op call until setup_metrics() installs the Prometheus reader.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

METER_NAME = "ledger"

_meter = metrics.get_meter(METER_NAME)


class SummedCounter:
    """A monotonic counter summed in the process and read when the exporter collects.

    The SDK's Counter.add costs 6-9 us a call (attribute hashing, a lock, views),
    and the hot path adds twice per call (requests, transfers): this is a dict
    update. Only the event loop's thread adds; the exporter's thread reads a
    copy, which CPython takes atomically.
    """

    def __init__(self, name: str, *, unit: str, description: str) -> None:
        self._totals: dict[tuple[tuple[str, str], ...], int] = {}
        _meter.create_observable_counter(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def add(self, amount: int, attributes: Mapping[str, str]) -> None:
        assert amount >= 0, "a counter only grows"
        key = tuple(attributes.items())
        self._totals[key] = self._totals.get(key, 0) + amount

    def total(self, attributes: Mapping[str, str]) -> int:
        return self._totals.get(tuple(attributes.items()), 0)

    def exported_at_zero(self, attributes: Mapping[str, str]) -> None:
        """Makes the series with these attributes exist (at 0) before its first event."""
        self.add(0, attributes)

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(total, dict(key)) for key, total in list(self._totals.items())]


class SummedHistogram:
    """A histogram kept as bucket counts in the process, exported by a Prometheus collector
    (setup_metrics) under the series the SDK's histogram had (name_unit_bucket, _count,
    _sum, with the otel_scope_* labels).

    The SDK's Histogram.record costs about 10 us a call (attribute hashing, a lock, views,
    exemplars) and every call records at least two (the call, its shard transaction):
    this is a bisect and two list updates (issue 18). Only the event loop's thread
    records; the exporter's thread reads copies.
    """

    def __init__(
        self, name: str, *, unit: str, description: str, bounds: tuple[float, ...]
    ) -> None:
        assert list(bounds) == sorted(set(bounds)), "bucket bounds ascend"
        assert unit == "s", "the exported name carries the unit: only seconds are spelled"
        self.name = f"{name}_seconds"
        self.description = description
        self.bounds = bounds
        # Attributes -> counts per bucket (the last one +Inf), then the sum.
        self._series: dict[tuple[tuple[str, str], ...], list[float]] = {}
        _histograms.append(self)

    def record(self, value: float, attributes: Mapping[str, str]) -> None:
        key = tuple(attributes.items())
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def snapshot(self) -> list[tuple[dict[str, str], list[float]]]:
        return [(dict(key), list(series)) for key, series in list(self._series.items())]


_histograms: list[SummedHistogram] = []
_collector_registered = False


class _HistogramCollector:
    """prometheus_client's view of the summed histograms."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        scope = {
            "otel_scope_name": METER_NAME,
            "otel_scope_schema_url": "",
            "otel_scope_version": "",
        }
        for histogram in _histograms:
            family: Any = None
            for attributes, series in histogram.snapshot():
                labels = attributes | scope
                if family is None:
                    family = HistogramMetricFamily(
                        histogram.name, histogram.description, labels=list(labels)
                    )
                cumulative = 0.0
                buckets = []
                for bound, count in zip((*histogram.bounds, float("inf")), series, strict=False):
                    cumulative += count
                    buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
                family.add_metric(list(labels.values()), buckets, series[-1])
            if family is not None:
                yield family


requests = SummedCounter(
    "ledger_requests", unit="1", description="gRPC calls by method and status code"
)
# Seconds, from half a millisecond to ten seconds (the SDK's default buckets
# are meant for milliseconds).
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

request_duration = SummedHistogram(
    "ledger_request_duration",
    unit="s",
    description="gRPC call latency by method",
    bounds=LATENCY_BUCKETS_S,
)
transfers = SummedCounter("ledger_transfers", unit="1", description="Transfer items by result code")
# Counters of rare events are exported at zero from the start (see exported_at_zero):
# a panel of failures then reads 0 on a healthy system, not "No data".
sagas_finished = SummedCounter(
    "ledger_sagas_finished", unit="1", description="Sagas that ended, by kind and state"
)
saga_attempts_failed = SummedCounter(
    "ledger_saga_attempts_failed", unit="1", description="Saga steps that failed and will retry"
)
shard_errors = SummedCounter(
    "ledger_shard_errors", unit="1", description="Shard calls that failed, by shard and kind"
)
events_sequenced = SummedCounter(
    "ledger_events_sequenced", unit="1", description="Events numbered into a shard's stream"
)
event_delivery_delay = SummedHistogram(
    "ledger_event_delivery_delay",
    unit="s",
    description="From an event's commit to its delivery to a subscriber",
    bounds=LATENCY_BUCKETS_S,
)
# What a checkpoint round found wrong, by shard and kind: chain_unsealable (an
# account's entries do not link up to its sealed head), export_refused (a
# checkpoint in the database the keys do not vouch for, so not exported) and
# unknown_key (the last checkpoint is signed by no key this replica holds).
checkpoint_problems = SummedCounter(
    "ledger_checkpoint_problems",
    unit="1",
    description="Checkpoint rounds that found history or a checkpoint not vouched for, by "
    "shard and kind",
)
CHECKPOINT_PROBLEM_KINDS = ("chain_unsealable", "export_refused", "unknown_key")
# Balance monitor crossings (ledger/domain/monitors.py), by monitor id and direction.
# Monitor ids are admin-chosen names of a bounded set (8 per account), no merchant ids.
monitor_crossings = SummedCounter(
    "ledger_monitor_crossings",
    unit="1",
    description="Balance monitor thresholds crossed, by monitor and direction",
)
shard_transactions = SummedHistogram(
    "ledger_shard_transaction_duration",
    unit="s",
    description="Shard transaction latency",
    bounds=LATENCY_BUCKETS_S,
)

# Values the gauges report, refreshed by whoever knows them (pools, the
# recovery worker); the callbacks only read.
_gauges: dict[str, Callable[[], Iterable[tuple[float, dict[str, str]]]]] = {}


def register_gauge_source(
    name: str, source: Callable[[], Iterable[tuple[float, dict[str, str]]]]
) -> None:
    _gauges[name] = source


def _observe(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        source = _gauges.get(name)
        if source is None:
            return []
        return [Observation(value, attributes) for value, attributes in source()]

    return callback


# The gauges: (metric name, gauge source registered above, unit, description).
_GAUGES = (
    ("ledger_pool_connections", "pool", "1", "Connections per shard pool, by state (in_use, open)"),
    (
        "ledger_merchants",
        "merchants",
        "1",
        "Merchants per shard by ownership state (active, moving, incoming, moved): "
        "rebalance progress",
    ),
    ("ledger_sagas", "sagas", "1", "Sagas not yet finished, by state (running, dead) and shard"),
    (
        "ledger_tls_certificate_expiry_timestamp",
        "tls_expiry",
        "s",
        "When the server's TLS certificate expires, in seconds since the Unix epoch "
        "(alert when it is less than two weeks from now)",
    ),
    (
        "ledger_shard_reachable",
        "shard_reachable",
        "1",
        "1 if the replica's last gauge refresh (about every 2 s) reached the shard, else 0",
    ),
    (
        "ledger_event_consumer_lag",
        "event_consumer_lag",
        "1",
        "Events a registered consumer has not acknowledged, by consumer and shard",
    ),
    (
        "ledger_event_consumer_lag_age",
        "event_consumer_lag_seconds",
        "s",
        "Age of a registered consumer's oldest unacknowledged event, by consumer and shard",
    ),
    (
        "ledger_event_outbox_backlog",
        "event_outbox_backlog",
        "1",
        "Outbox events committed but not yet numbered into the stream, by shard",
    ),
    (
        "ledger_saga_oldest_running_age",
        "saga_age",
        "s",
        "Age of the oldest running saga per debit shard (0 with none)",
    ),
)
for _name, _source, _unit, _description in _GAUGES:
    _meter.create_observable_gauge(
        _name, callbacks=[_observe(_source)], unit=_unit, description=_description
    )


def setup_metrics(*, host: str, port: int) -> int:
    """Serves /metrics for Prometheus on host:port (0 picks a port); returns the port."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import REGISTRY

    from ledger.telemetry.metrics_server import serve_metrics

    global _collector_registered
    if not _collector_registered:
        REGISTRY.register(_HistogramCollector())
        _collector_registered = True
    bound = serve_metrics(host, port)
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    return bound

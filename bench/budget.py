"""What each throughput target leaves the ledger's own work, from one run's figures.

Issue 18's ratios are reached on one machine shared by PostgreSQL, the service
and the benchmark's own client processes. The floor modes (`floor_single`,
`floor_batch`) measure the part of a call no change to the ledger can remove:
the benchmark's callers drive a bare grpc.aio server whose CreateTransfers does
no work (`bench/grpc_floor.py`), as fast as they go, as the service is driven.
For each ratio target and baseline of the run, at the rate the target asks for:

    PostgreSQL      at the service's own PostgreSQL CPU per transfer in the run
  + interrupts      likewise
  + gRPC's floor    the bare server's CPU per transfer (floor mode)
  + the callers     the client processes' CPU per transfer (floor mode)
  = cores taken; what is left of the machine's cores is all the ledger's own
    work may cost per transfer, against what it costs in the run (the
    service's CPU per transfer less the floor's).

The floor is measured at its own peak, where its CPU per transfer is lowest
(paced to a lower rate, each call wakes the server and the clients on its own:
564 against 372 us of server CPU per call at 1,063 against 2,661 calls/s), so
the budgets are the most the ledger could have. One at or below zero means the
target cannot be met on this machine whatever the service's own code costs,
unless PostgreSQL's work per transfer under the service falls (each budget
prints it beside the baseline's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The service modes whose ratio targets this reads, by the key of their target
# in the results' "targets" and the baselines they are read against.
TARGETS = {
    "single": ("single_vs_raw_single_min", ("raw_single", "pgbench_single")),
    "batch": ("batch_vs_raw_batch_min", ("raw_batch", "pgbench_batch")),
}
# The floor mode measured beside each service mode.
FLOOR_OF = {"single": "floor_single", "batch": "floor_batch"}
# Issue 20: a mode with the event stream's consumers attached (--events), the
# mode it is compared with and the key of its target.
WITH_CONSUMERS = {
    "single_events": ("single", "single_events_vs_single_min"),
    "batch_events": ("batch", "batch_events_vs_batch_min"),
}


@dataclass(frozen=True, slots=True)
class Target:
    """A ratio target at its baseline's measured rate: the rate it asks for."""

    mode: str
    baseline: str
    ratio: float
    rate_per_s: float


@dataclass(frozen=True, slots=True)
class FloorPhase:
    """The bare server under the benchmark's callers: rate and CPU per transfer."""

    mode: str
    transfers_per_s: float
    server_us_per_transfer: float
    clients_us_per_transfer: float

    @classmethod
    def of(cls, mode: str, figures: Mapping[str, Any]) -> FloorPhase:
        """From a floor mode's figures (its `service` cores are the bare server's)."""
        rate = figures["transfers_per_s"]
        cores = figures["cpu_cores"]
        return cls(mode, rate, 1e6 * cores["service"] / rate, 1e6 * cores["clients"] / rate)


@dataclass(frozen=True, slots=True)
class Budget:
    target: Target
    floor: FloorPhase
    # Cores each part takes at the target's rate.
    postgres_cores: float
    interrupts_cores: float
    cores_total: int
    # PostgreSQL's CPU per transfer, microseconds: under the service in the run
    # read, and under the baseline's own clients (the same rows with nothing else).
    postgres_us: float
    postgres_us_baseline: float
    # What the ledger's work costs per transfer in the run read (service CPU less
    # the server floor), in microseconds.
    ledger_us_today: float

    @property
    def floor_cores(self) -> float:
        return self.target.rate_per_s * self.floor.server_us_per_transfer / 1e6

    @property
    def clients_cores(self) -> float:
        return self.target.rate_per_s * self.floor.clients_us_per_transfer / 1e6

    @property
    def cores_left(self) -> float:
        taken = self.postgres_cores + self.floor_cores + self.clients_cores
        return self.cores_total - taken - self.interrupts_cores

    @property
    def ledger_us_allowed(self) -> float:
        return 1e6 * self.cores_left / self.target.rate_per_s

    def render(self) -> str:
        target = self.target
        head = (
            f"{target.mode:<6} at {target.ratio:g} of {target.baseline} "
            f"({target.rate_per_s:,.0f}/s): PostgreSQL {self.postgres_cores:.2f} + gRPC floor "
            f"{self.floor_cores:.2f} + clients {self.clients_cores:.2f} + interrupts "
            f"{self.interrupts_cores:.2f} of {self.cores_total} cores"
        )
        postgres = (
            f"; PostgreSQL per transfer {self.postgres_us:,.0f} us under the service, "
            f"{self.postgres_us_baseline:,.0f} under {target.baseline}"
        )
        if self.floor.transfers_per_s < target.rate_per_s:
            head += f" (the bare server's own peak is {self.floor.transfers_per_s:,.0f}/s)"
        if self.cores_left <= 0:
            return (
                f"{head}: nothing left for the ledger (short by {-self.cores_left:.2f} cores)"
                + postgres
            )
        return (
            f"{head}: {self.cores_left:.2f} left, {self.ledger_us_allowed:,.0f} us per transfer "
            f"for the ledger's work; it costs {self.ledger_us_today:,.0f} "
            f"({self.ledger_us_today / self.ledger_us_allowed:.1f}x)" + postgres
        )


def budgets(figures: Mapping[str, Any]) -> list[Budget]:
    """Every target of a run (a bench.run report) whose floor mode it measured."""
    modes = figures["modes"]
    return [
        budget(figures, target, FloorPhase.of(FLOOR_OF[target.mode], modes[FLOOR_OF[target.mode]]))
        for target in targets(figures)
        if modes.get(FLOOR_OF[target.mode], {}).get("transfers_per_s")
    ]


def targets(figures: Mapping[str, Any]) -> list[Target]:
    """Every ratio target of `figures` (a bench.run JSON) with a baseline it measured."""
    modes = figures["modes"]
    found: list[Target] = []
    for mode, (target_key, baselines) in TARGETS.items():
        ratio = figures["targets"].get(target_key)
        if mode not in modes or ratio is None:
            continue
        found.extend(
            Target(mode, baseline, ratio, ratio * modes[baseline]["transfers_per_s"])
            for baseline in baselines
            if baseline in modes
        )
    return found


def budget(figures: Mapping[str, Any], target: Target, floor: FloorPhase) -> Budget:
    """What `target` leaves the ledger, from the run's CPU split and the floor."""
    service = figures["modes"][target.mode]
    base = figures["modes"][target.baseline]
    per_transfer = {
        part: cores / service["transfers_per_s"] for part, cores in service["cpu_cores"].items()
    }
    return Budget(
        target=target,
        floor=floor,
        postgres_cores=target.rate_per_s * per_transfer["postgres"],
        interrupts_cores=target.rate_per_s * per_transfer["interrupts"],
        cores_total=int(figures["machine"]["cpus"]),
        postgres_us=1e6 * per_transfer["postgres"],
        postgres_us_baseline=1e6 * base["cpu_cores"]["postgres"] / base["transfers_per_s"],
        ledger_us_today=1e6 * per_transfer["service"] - floor.server_us_per_transfer,
    )


@dataclass(frozen=True, slots=True)
class DeliveryBudget:
    """Issue 20's cost target as CPU per event: at `ratio` of the mode's rate without
    consumers, what the machine has left for delivering the stream, against what
    delivering it cost in the run (everything the mode with consumers spent beyond
    the mode's own CPU per transfer: publisher, broker, subscriber, and the
    service's and PostgreSQL's reading and streaming).

    Cores to spare are necessary, not sufficient: where the service's one event
    loop bounds the mode (single transfers), the stream's share of that loop
    costs throughput even while another core idles."""

    mode: str
    base: str
    ratio: float
    rate_per_s: float
    # Cores the base mode's own work takes at rate_per_s.
    ledger_cores: float
    cores_total: int
    events_per_transfer: float
    delivery_us_today: float

    @property
    def cores_left(self) -> float:
        return self.cores_total - self.ledger_cores

    @property
    def delivery_us_allowed(self) -> float:
        return 1e6 * self.cores_left / (self.rate_per_s * self.events_per_transfer)

    def render(self) -> str:
        head = (
            f"{self.mode} at {self.ratio:g} of {self.base} ({self.rate_per_s:,.0f}/s, "
            f"{self.events_per_transfer:.2f} events per transfer): {self.base}'s own work "
            f"takes {self.ledger_cores:.2f} of {self.cores_total} cores"
        )
        if self.cores_left <= 0:
            return f"{head}: nothing left to deliver the stream"
        return (
            f"{head}: {self.cores_left:.2f} left, {self.delivery_us_allowed:,.0f} us per event "
            f"to deliver it; delivering cost {self.delivery_us_today:,.0f} "
            f"({self.delivery_us_today / self.delivery_us_allowed:.1f}x)"
        )


def delivery_budgets(figures: Mapping[str, Any]) -> list[DeliveryBudget]:
    """Issue 20's targets of a run with consumers (`--events`) beside their base modes."""
    modes = figures["modes"]
    cores_total = int(figures["machine"]["cpus"])
    found: list[DeliveryBudget] = []
    for mode, (base, target_key) in WITH_CONSUMERS.items():
        ratio = figures["targets"].get(target_key)
        subscribers = modes.get(mode, {}).get("event_subscribers")
        if base not in modes or ratio is None or not subscribers:
            continue
        with_consumers, alone = modes[mode], modes[base]
        busy_per_transfer = _busy_cores(alone, cores_total) / alone["transfers_per_s"]
        rate = ratio * alone["transfers_per_s"]
        events_per_s = subscribers["events_per_s"]
        spent_on_delivery = (
            _busy_cores(with_consumers, cores_total)
            - busy_per_transfer * with_consumers["transfers_per_s"]
        )
        found.append(
            DeliveryBudget(
                mode=mode,
                base=base,
                ratio=ratio,
                rate_per_s=rate,
                ledger_cores=busy_per_transfer * rate,
                cores_total=cores_total,
                events_per_transfer=events_per_s / with_consumers["transfers_per_s"],
                delivery_us_today=1e6 * spent_on_delivery / events_per_s,
            )
        )
    return found


def _busy_cores(mode_figures: Mapping[str, Any], cores_total: int) -> float:
    """Every core the phase kept busy, whoever used it."""
    return cores_total - float(mode_figures["cpu_cores"].get("idle", 0.0))

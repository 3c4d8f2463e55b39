"""`ledger reconcile`: proves the books balance on every shard and across the cluster.

Checks, each reported as a line:
- per shard and per currency, posted and pending balances sum to zero (every
  write, saga steps included, is balanced on its own shard via settlement
  accounts, so this holds at every moment, not only at rest);
- every account's balances equal its last entry's;
- every velocity rule's counters, over the window a check counts now, equal the
  movements its account's entries record (ledger/domain/velocity.py);
- each shard's settlement account for a peer mirrors the peer's account for it,
  for every pair where neither side is the home of a saga still running or
  dead (such a saga may credit any shard: its credit merchant may have moved);
- every finished saga has its legs: the credit shard recorded the matching
  outcome, and a completed single-phase transfer posted its debit;
- no saga has been running longer than the stuck limit without being in the
  dead-letter list;
- every account's hash chain is intact, ends at the account's head, and agrees
  with every checkpoint (no entry edited, inserted or deleted);
- no merchant is marked incoming or moving while no rebalance runs (a killed
  run left the marker; a rerun finishes the move);
- every open cross-shard hold can settle now: each shard its path needs (peers
  and relays) is routable under the config.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from ledger import limits
from ledger.domain.checkpoint_keys import CheckpointKeys
from ledger.domain.sagas import CreditAction, CreditOutcome, SagaKind, SagaState
from ledger.routing.cluster import Cluster
from ledger.storage.audit import CLAIMS_PAUSED_WARNING, SAGA_PAGE_SIZE, FinishedSaga, ShardAudit
from ledger.storage.chain import ChainStore


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    ok: bool
    detail: str


@dataclass
class ReconcileReport:
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def add(self, check: str, ok: bool, detail: str) -> None:
        self.findings.append(Finding(check, ok, detail))

    def render(self) -> str:
        lines = [f"{'ok  ' if f.ok else 'FAIL'} {f.check}: {f.detail}" for f in self.findings]
        failures = sum(not f.ok for f in self.findings)
        lines.append(
            "reconcile passed" if failures == 0 else f"reconcile FAILED: {failures} discrepancies"
        )
        return "\n".join(lines)


async def reconcile(
    cluster: Cluster,
    *,
    stuck_after_s: float = limits.saga_stuck_after_s,
    checkpoint_keys: CheckpointKeys | None = None,
) -> ReconcileReport:
    report = ReconcileReport()
    audits = {name: ShardAudit(shard) for name, shard in cluster.shards.items()}
    cluster_sums: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    settlements: dict[tuple[str, str, str], tuple[int, int]] = {}
    unsettled_homes: set[str] = set()
    routable = {spec.name for spec in cluster.config.shards if spec.routable}
    for name, audit in audits.items():
        for currency, (posted, pending) in (await audit.sums_by_currency()).items():
            cluster_sums[currency][0] += posted
            cluster_sums[currency][1] += pending
            report.add(
                f"balance {name} {currency}",
                posted == 0 and pending == 0,
                f"posted {posted}, pending {pending}",
            )
        off = await audit.accounts_off_their_entries()
        report.add(
            f"entries {name}",
            not off,
            "every account matches its last entry" if not off else f"mismatch: {off}",
        )
        counters_off = await audit.velocity_counters_off()
        report.add(
            f"velocity counters {name}",
            not counters_off,
            "every velocity rule's window agrees with its account's entries"
            if not counters_off
            else f"mismatch: {counters_off[:10]}",
        )
        for s in await audit.settlement_balances():
            # Stripes of one (peer, currency) add up to one position.
            net_posted, net_pending = settlements.get((name, s.peer_shard, s.currency), (0, 0))
            settlements[(name, s.peer_shard, s.currency)] = (
                net_posted + s.net_posted,
                net_pending + s.net_pending,
            )
        for (state, peer), count in (await audit.saga_counts()).items():
            if state in (SagaState.RUNNING, SagaState.DEAD):
                unsettled_homes.add(name)
            if state is SagaState.DEAD:
                report.add(
                    f"dead letters {name}->{peer}",
                    True,
                    f"{count} saga(s) in the dead-letter list, funds pending",
                )
        chains = await ChainStore(audit.shard).verify(keys=checkpoint_keys)
        report.add(
            f"hash chains {name}",
            not chains.violations,
            "every entry chains to its account's head and checkpoints"
            if not chains.violations
            else "; ".join(v.render() for v in chains.violations[:10]),
        )
        markers = await audit.stale_move_markers()
        report.add(
            f"move markers {name}",
            not markers,
            "none without a rebalance running"
            if not markers
            else f"no rebalance running, yet {markers}: rerun `ledger shards rebalance`",
        )
        if await audit.claims_paused_without_a_run():
            # Not a discrepancy in the books (nothing is owned twice or lost), but
            # new merchants routed here wait until a rebalance runs: say so.
            report.add(f"claims {name}", True, CLAIMS_PAUSED_WARNING)
        routes = await audit.hold_route_shards()
        unroutable = {s: n for s, n in routes.items() if s not in routable}
        report.add(
            f"open holds {name}",
            not unroutable,
            f"{sum(routes.values())} route(s) of open cross-shard holds, every shard routable"
            if not unroutable
            else "cannot settle now, their path needs shards that are not routable: "
            + ", ".join(f"{s} ({n} hold route(s))" for s, n in sorted(unroutable.items())),
        )
        stuck = await audit.stuck_sagas(older_than_s=stuck_after_s)
        report.add(
            f"stuck sagas {name}",
            not stuck,
            "none" if not stuck else f"running past {stuck_after_s:.0f}s: {stuck}",
        )
    for currency, (posted, pending) in sorted(cluster_sums.items()):
        report.add(
            f"balance cluster {currency}",
            posted == 0 and pending == 0,
            f"posted {posted}, pending {pending}",
        )
    _check_mirrors(report, settlements, unsettled_homes)
    await _check_legs(report, audits)
    return report


def _check_mirrors(
    report: ReconcileReport,
    settlements: dict[tuple[str, str, str], tuple[int, int]],
    unsettled_homes: set[str],
) -> None:
    seen: set[tuple[frozenset[str], str]] = set()
    for (shard, peer, currency), (posted, pending) in sorted(settlements.items()):
        pair = frozenset((shard, peer))
        if (pair, currency) in seen:
            continue
        seen.add((pair, currency))
        other_posted, other_pending = settlements.get((peer, shard, currency), (0, 0))
        name = f"settlement {shard}<->{peer} {currency}"
        if pair & unsettled_homes:
            report.add(name, True, "skipped: sagas between them are still in flight")
            continue
        ok = posted + other_posted == 0 and pending + other_pending == 0
        report.add(name, ok, f"{shard} {posted}/{pending}, {peer} {other_posted}/{other_pending}")


async def _check_legs(report: ReconcileReport, audits: dict[str, ShardAudit]) -> None:
    for name, audit in audits.items():
        checked = missing = 0
        problems: list[str] = []
        after = None
        while True:
            page = await audit.finished_sagas(after=after)
            if not page:
                break
            after = page[-1].key
            by_peer: dict[str, list[FinishedSaga]] = defaultdict(list)
            for saga in page:
                by_peer[saga.peer_shard].append(saga)
            for peer, sagas in by_peer.items():
                peer_audit = audits.get(peer)
                if peer_audit is None:
                    problems.append(f"{len(sagas)} saga(s) name unknown shard {peer}")
                    continue
                outcomes = await peer_audit.credit_outcomes([s.key for s in sagas])
                missing_here = [s.key for s in sagas if s.key not in outcomes]
                for other_name, other in audits.items():
                    if not missing_here or other_name == peer:
                        continue
                    # The credit merchant may have moved since: its outcomes moved too.
                    found = await other.credit_outcomes(missing_here)
                    outcomes.update(found)
                    missing_here = [k for k in missing_here if k not in found]
                posted = await audit.posted_debits(
                    [
                        s.key
                        for s in sagas
                        if s.key.kind is SagaKind.TRANSFER
                        and s.credit_action == CreditAction.POST
                        and s.state is SagaState.COMPLETED
                    ]
                )
                for saga in sagas:
                    checked += 1
                    outcome = outcomes.get(saga.key)
                    expected_ok = saga.state is SagaState.COMPLETED
                    if outcome is None or (outcome == CreditOutcome.APPLIED) != expected_ok:
                        missing += 1
                        problems.append(f"{saga.key} {saga.state.name}: credit outcome {outcome}")
                    elif (
                        saga.key.kind is SagaKind.TRANSFER
                        and expected_ok
                        and saga.credit_action == CreditAction.POST
                        and (saga.key.merchant_id, saga.key.transfer_id) not in posted
                    ):
                        missing += 1
                        problems.append(f"{saga.key}: completed without a posted debit")
            if len(page) < SAGA_PAGE_SIZE:
                break
        report.add(
            f"saga legs {name}",
            missing == 0,
            f"{checked} finished saga(s) checked" + (f"; {problems[:5]}" if problems else ""),
        )

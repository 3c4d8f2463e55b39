"""The chaos bank workload: `python -m chaos.run --seed N --duration-s S [options]`.

1. Plan from the seed: accounts, the fault schedule, every client's operations.
2. Start three shards (a PostgreSQL server each) behind proxies, and two service
   replicas as processes; create and fund the accounts.
3. For --duration-s, run the clients and inject the faults on schedule.
4. Heal everything, wait until no saga runs, and check the books (chaos/checker.py).
5. Print a summary (and write it as JSON with --json). Exit 0 when every check
   passed, 1 on any violation, 2 when the harness itself failed.
"""

from __future__ import annotations

import os

# The runner forks pg_ctl while gRPC threads run; gRPC's fork handlers can crash
# such a child, and nothing here needs gRPC after a fork. Set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc

from chaos.checker import CheckReport, check_all
from chaos.checkpoints import ROTATION_AT_FRACTION, check_checkpoints
from chaos.clients import Caller, OpRecord, run_client, send_operation
from chaos.cluster import UNFINISHED_MARK, ChaosCluster, HarnessError
from chaos.events import CONSUMER, EventSubscriber, check_event_stream
from chaos.nemesis import FaultRecord, Nemesis
from chaos.plan import (
    PLAN_DIGEST_OPS_PER_CLIENT,
    SHARD_NAMES,
    ClientPlanner,
    FaultKind,
    Layout,
    RunPlan,
    plan_run,
)
from chaos.publisher import ChaosPublisher, check_published
from chaos.velocity import limited_accounts, limits_request
from ledger import limits
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

# Setting the velocity rules before the clients start: the replicas have just
# answered the funding, so a few quick attempts are plenty.
SETUP_ATTEMPTS_MAX = 5
SETUP_DEADLINE_S = 10.0
SETUP_RETRY_DELAY_S = 0.5
DEFAULT_CLIENTS = 4
# Each client is one coroutine with one call in flight; more than this on a small
# machine measures the machine, not the service.
CLIENTS_MAX = 64
# A run shorter than the first fault injects nothing; longer than a day is a mistake.
DURATION_S_MIN = 1.0
DURATION_S_MAX = 86_400.0
EXIT_OK = 0
EXIT_VIOLATIONS = 1
EXIT_HARNESS_FAILED = 2
# Violations printed per check; the JSON summary has all of them.
VIOLATIONS_PRINTED_PER_CHECK_MAX = 20


@dataclass(frozen=True, slots=True)
class Options:
    seed: int
    duration_s: float
    clients: int
    json_path: Path | None
    work_dir: Path | None
    keep: bool
    rebalances: bool = False
    drains: bool = False
    # An event subscriber follows the whole run and its events must rebuild the books.
    events: bool = True
    # The broker for `ledger events publish` (chaos/publisher.py); None: no publisher.
    amqp_url: str | None = None
    # Every settlement stripe filled first (chaos/plan.py, with_full_stripes).
    full_stripes: bool = False
    # Service processes per replica (`ledger serve --workers`).
    workers: int = 1


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.run",
        description="Seeded chaos bank workload against three shards and two replicas.",
    )
    parser.add_argument("--seed", type=int, required=True, help="drives the faults and the plan")
    parser.add_argument("--duration-s", type=float, required=True, help="seconds of workload")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="concurrent clients")
    parser.add_argument("--json", type=Path, help="also write the summary here as JSON")
    parser.add_argument(
        "--work-dir", type=Path, help="keep data and logs here (default: a temporary directory)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory even after a clean run"
    )
    parser.add_argument(
        "--rebalances",
        action="store_true",
        help="also plan rebalances (a shard's weight up, then back) among the faults",
    )
    parser.add_argument(
        "--drains",
        action="store_true",
        help="also plan drains (a shard set draining until DRAINED, retired, then active again)",
    )
    parser.add_argument(
        "--no-events",
        action="store_true",
        help="run without the event subscriber (and without its check)",
    )
    parser.add_argument(
        "--amqp",
        metavar="URL",
        help="also run `ledger events publish` to this RabbitMQ (SIGKILLed now and then) "
        "and check that its queue holds every event of the run",
    )
    parser.add_argument(
        "--full-stripes",
        action="store_true",
        help="fill every settlement stripe between the shards first (one transfer of "
        "2^63-1 each), so every leg goes to a settlement account of its own",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="service processes per replica (`ledger serve --workers`, as in production "
        "where it defaults to the cores); a kill takes them all",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= limits.workers_max:
        parser.error(f"--workers must be 1 to {limits.workers_max}")
    if args.amqp and args.no_events:
        parser.error("--amqp is checked against the event subscriber: drop --no-events")
    if not DURATION_S_MIN <= args.duration_s <= DURATION_S_MAX:
        parser.error(f"--duration-s must be {DURATION_S_MIN} to {DURATION_S_MAX}")
    if not 1 <= args.clients <= CLIENTS_MAX:
        parser.error(f"--clients must be 1 to {CLIENTS_MAX}")
    return Options(
        args.seed,
        args.duration_s,
        args.clients,
        args.json,
        args.work_dir,
        args.keep,
        args.rebalances,
        args.drains,
        not args.no_events,
        args.amqp,
        args.full_stripes,
        args.workers,
    )


@dataclass
class RunResult:
    plan: RunPlan
    options: Options
    work_dir: Path
    history: list[OpRecord] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    healed: list[str] = field(default_factory=list)
    report: CheckReport | None = None
    harness_errors: list[str] = field(default_factory=list)
    # Replica starts that ended before serving (each was started again).
    failed_starts: list[str] = field(default_factory=list)
    # Each shard's state in the cluster's config when the run ended (drained shards
    # are made active again).
    shard_states: dict[str, str] = field(default_factory=dict)
    # The event subscriber's figures (chaos/events.py); empty without it.
    events: dict[str, Any] = field(default_factory=dict)
    # The AMQP publisher's figures (chaos/publisher.py); empty without it.
    published: dict[str, Any] = field(default_factory=dict)
    # Per shard, checkpoints signed before and after the key rotation, and how far
    # the export goes (chaos/checkpoints.py).
    checkpoints: dict[str, dict[str, int]] = field(default_factory=dict)
    elapsed_s: float = 0.0


async def create_accounts(caller: Caller, layout: Layout) -> None:
    request = pb.CreateAccountsRequest(
        accounts=[
            pb.Account(
                ref=pb.AccountRef(merchant_id=a.ref.merchant_id, account_id=a.ref.account_id),
                currency=a.currency,
                debits_must_not_exceed_credits=a.no_overdraft,
            )
            for a in layout.accounts
        ]
    )
    call = await caller.call("CreateAccounts", request, first_replica=0)
    created = (pb.ACCOUNT_RESULT_OK, pb.ACCOUNT_RESULT_EXISTS)
    if call.response is None or any(r.result not in created for r in call.response.results):
        raise HarnessError(f"accounts not created: {call.error or call.failures or call.response}")


async def set_velocity_limits(cluster: ChaosCluster, layout: Layout) -> None:
    """Velocity rules on a few wallets (chaos/velocity.py), after their funding."""
    assert cluster.replicas[0].admin is not None, "replicas serve before the run starts"
    # The stub is made on an aio channel: its methods are awaitable.
    admin = cast("ledger_pb2_grpc.LedgerAdminServiceAsyncStub", cluster.replicas[0].admin)
    for account in limited_accounts(layout):
        for attempt in range(1, SETUP_ATTEMPTS_MAX + 1):
            try:
                await admin.SetAccountLimits(limits_request(account), timeout=SETUP_DEADLINE_S)
                break
            except grpc.aio.AioRpcError as error:
                if attempt == SETUP_ATTEMPTS_MAX:
                    raise HarnessError(f"velocity limits not set on {account}: {error}") from None
                await asyncio.sleep(SETUP_RETRY_DELAY_S)


async def execute(options: Options, plan: RunPlan, result: RunResult) -> None:
    # SIGTERM cancels the run like Ctrl-C does, so the cleanup below still runs.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    cluster = ChaosCluster(result.work_dir, workers=options.workers)
    subscriber: EventSubscriber | None = None
    publisher: ChaosPublisher | None = None
    try:
        await cluster.start()
        if options.events:
            # From before the first account: every event of the run, from position 1.
            subscriber = EventSubscriber(
                cluster.replicas, jitter=random.Random(f"chaos/{plan.seed}/jitter/events")
            )
            subscriber.start()
        if options.amqp_url is not None:
            publisher = ChaosPublisher(
                amqp_url=options.amqp_url,
                config_path=cluster.service_config_path,
                log_path=result.work_dir / "publisher.log",
                seed=plan.seed,
                duration_s=options.duration_s,
            )
            await publisher.start()
        setup = Caller(cluster.replicas, jitter=random.Random(f"chaos/{plan.seed}/jitter/setup"))
        await create_accounts(setup, plan.layout)
        loop = asyncio.get_running_loop()
        start = loop.time()

        def now_s() -> float:
            return loop.time() - start

        for op in plan.layout.funding:
            record = await send_operation(setup, op, now_s=now_s)
            result.history.append(record)
            if record.outcome != "ok":
                raise HarnessError(f"funding {op.op_id} failed: {record}")
        await set_velocity_limits(cluster, plan.layout)
        start = loop.time()
        nemesis = Nemesis(
            cluster,
            plan.faults,
            caller=Caller(
                cluster.replicas, jitter=random.Random(f"chaos/{plan.seed}/jitter/nemesis")
            ),
        )
        result.faults = nemesis.records
        histories: list[list[OpRecord]] = [[] for _ in range(options.clients)]
        async with asyncio.TaskGroup() as group:
            group.create_task(nemesis.run(start=start))
            group.create_task(
                rotate_checkpoint_key(cluster, at=start + options.duration_s * ROTATION_AT_FRACTION)
            )
            if publisher is not None:
                group.create_task(publisher.run_kills(start=start))
            for client in range(options.clients):
                group.create_task(
                    run_client(
                        planner=ClientPlanner(seed=plan.seed, client=client, layout=plan.layout),
                        caller=Caller(
                            cluster.replicas,
                            jitter=random.Random(f"chaos/{plan.seed}/jitter/{client}"),
                        ),
                        stop_at=start + options.duration_s,
                        history=histories[client],
                        now_s=now_s,
                    )
                )
        # The settles a drain made of the holds it relayed count as client requests.
        result.history += sorted(
            (r for h in (*histories, nemesis.settles) for r in h), key=lambda r: r.started_s
        )
        result.healed = await cluster.heal()
        result.healed += await cluster.restart_with_current_keys()
        if cluster.epoch > 1:
            # Old copies of moved merchants go, as an admin removes them after a
            # rebalance; the checker then reads what each shard owns.
            result.healed.append(f"cleanup: {await cluster.cleanup()}")
        result.report = await check_all(
            dsns={name: shard.direct_dsn for name, shard in cluster.shards.items()},
            direct_config_path=cluster.direct_config_path,
            layout=plan.layout,
            history=result.history,
            caller=setup,
            now_s=now_s,
            moved=cluster.epoch > 1,
            after_settles=cluster.finish_moves if cluster.epoch > 1 else None,
        )
        result.history += result.report.final_settles
        if subscriber is not None:
            # After the final settles and the wait for quiet: the books no longer move.
            dsns = {name: shard.direct_dsn for name, shard in cluster.shards.items()}
            await check_event_stream(subscriber, dsns, result.report)
            if publisher is not None:
                result.published = await check_published(
                    publisher, subscriber.state.seen, dsns, result.report
                )
        result.checkpoints = await check_checkpoints(
            cluster.direct_config_path, cluster.keyring.export_dir, result.report
        )
        # What the faults found about the service: a drain that did not finish, a
        # hold it relayed that would not settle.
        for fault in result.faults:
            for where, detail in fault.violations:
                result.report.add("drains", where, detail)
    finally:
        if subscriber is not None:
            await subscriber.stop()
            result.events = subscriber.summary()
        if publisher is not None:
            await publisher.stop()
            await publisher.delete_topology()
        result.failed_starts = [
            f"{r.name}: {reason}" for r in cluster.replicas for reason in r.failed_starts
        ]
        result.shard_states = dict(cluster.states)
        result.harness_errors += await cluster.close()


async def rotate_checkpoint_key(cluster: ChaosCluster, *, at: float) -> None:
    """Rotates the checkpoint key at event loop time at: replicas started from then
    on sign with the new key (the rest are restarted after the run)."""
    # A scheduled step of the run, like the nemesis's faults: it waits for the time.
    await asyncio.sleep(max(0.0, at - asyncio.get_running_loop().time()))
    cluster.keyring.rotate()


# The summary.


def unfinished_rebalances(faults: Sequence[FaultRecord]) -> int:
    """Rebalances (to a fault's config and back, a drained shard's retirement and
    return) left unfinished at their deadline: moves deferred by holds are a liveness
    finding, not a violation, as the next rebalance takes them on (a retirement left
    unfinished is also a `retire` violation of its own)."""
    return sum(f.detail.count(UNFINISHED_MARK) for f in faults)


def summarize(result: RunResult) -> dict[str, Any]:
    operations: dict[str, Counter[str]] = defaultdict(Counter)
    items: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for record in result.history:
        operations[record.op.kind][record.outcome] += 1
        failures.update(record.failures)
        for answer in record.answers or ():
            items[answer.result_name.removeprefix("TRANSFER_RESULT_")] += 1
    report = result.report
    fault_errors = [f.describe() for f in result.faults if f.error or f.healed_s is None]
    drains = [f.drain for f in result.faults if f.drain is not None]
    return {
        "seed": result.plan.seed,
        "duration_s": result.options.duration_s,
        "clients": result.options.clients,
        "shards": list(SHARD_NAMES),
        "shard_states_at_end": result.shard_states,
        "plan_digest": result.plan.digest(),
        "plan_digest_ops_per_client": PLAN_DIGEST_OPS_PER_CLIENT,
        "work_dir": str(result.work_dir),
        "elapsed_s": round(result.elapsed_s, 1),
        "schedule": [{**asdict(f), "fault": f.fault.value} for f in result.plan.faults],
        "faults": [
            {
                "fault": f.fault.describe(),
                "started_s": f.started_s,
                "healed_s": f.healed_s,
                "detail": f.detail,
                "error": f.error,
            }
            for f in result.faults
        ],
        "faults_injected": sum(f.healed_s is not None for f in result.faults),
        "fault_errors": fault_errors,
        "drains": {
            "planned": sum(f.fault.fault is FaultKind.DRAIN for f in result.faults),
            "finished": sum(d.finished for d in drains),
            "not_finished": sum(not d.finished for d in drains),
            "seconds_to_drained": [round(d.elapsed_s, 1) for d in drains if d.finished],
        },
        "rebalances_unfinished": unfinished_rebalances(result.faults),
        "holds_settled_at_end": dict(
            Counter(
                f"{r.op.kind} {r.answers[0].result_name.removeprefix('TRANSFER_RESULT_')}"
                if r.answers
                else f"{r.op.kind} {r.outcome}"
                for r in (report.final_settles if report else ())
            ).most_common()
        ),
        "operations_total": len(result.history),
        "operations": {k: dict(sorted(v.items())) for k, v in sorted(operations.items())},
        "answers": dict(items.most_common()),
        "failed_attempts": dict(failures.most_common()),
        "healed_after_run": result.healed,
        # Not violations: a replica connects to every shard at start, so it cannot
        # start while one is down (it exits and is started again).
        "failed_replica_starts": dict(Counter(result.failed_starts).most_common()),
        "quiesce_s": round(report.quiesce_s, 2) if report else None,
        "sagas": report.sagas_by_state if report else {},
        "dead_sagas": report.dead_sagas if report else [],
        "checks": report.notes if report else [],
        "events": result.events,
        "published": result.published,
        "checkpoints": result.checkpoints,
        "reconcile": report.reconcile_findings if report else [],
        "violations": [asdict(v) for v in report.violations] if report else [],
        "harness_errors": result.harness_errors + fault_errors,
    }


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"chaos run: seed {summary['seed']}, {summary['duration_s']:g} s, "
        f"{summary['clients']} clients, {len(summary['shards'])} shards, 2 replicas "
        f"(plan {summary['plan_digest'][:12]}, {summary['elapsed_s']} s in all)",
        f"faults: {len(summary['schedule'])} planned, {summary['faults_injected']} injected",
    ]
    lines += [f"  {f['fault']}: " + _fault_outcome(f) for f in summary["faults"]]
    healed = ", ".join(summary["healed_after_run"]) or "nothing left to repair"
    lines.append(f"after the run: {healed}; quiet after {summary['quiesce_s']} s")
    drains = summary["drains"]
    if drains["planned"]:
        lines.append(
            f"drains: {drains['planned']} planned, {drains['finished']} DRAINED "
            f"(after {drains['seconds_to_drained']} s), {drains['not_finished']} not finished"
        )
    if summary["rebalances_unfinished"]:
        lines.append(
            f"rebalances left unfinished at their deadline: {summary['rebalances_unfinished']}"
            " (moves deferred by holds; not a violation)"
        )
    settled = summary["holds_settled_at_end"]
    lines.append(
        f"holds settled at the end: {sum(settled.values())}"
        + (" (" + ", ".join(f"{k} {n}" for k, n in settled.items()) + ")" if settled else "")
    )
    lines.append(f"operations: {summary['operations_total']}")
    outcomes = ("ok", "refused", "mixed", "in_progress", "unknown", "error")
    lines.append(f"  {'kind':28}" + "".join(f"{o:>12}" for o in outcomes))
    for kind, counts in summary["operations"].items():
        lines.append(f"  {kind:28}" + "".join(f"{counts.get(o, 0):>12}" for o in outcomes))
    lines.append(
        "answers per transfer: " + ", ".join(f"{k} {v}" for k, v in summary["answers"].items())
    )
    lines.append(
        "failed attempts (retried): "
        + (", ".join(f"{k} {v}" for k, v in summary["failed_attempts"].items()) or "none")
    )
    lines.append("sagas: " + (", ".join(f"{k} {v}" for k, v in summary["sagas"].items()) or "none"))
    failed_starts = summary["failed_replica_starts"]
    lines.append(
        f"replica starts that failed and were retried: {sum(failed_starts.values())}"
        + "".join(f"\n  {n} x {reason}" for reason, n in failed_starts.items())
    )
    lines.append(f"dead-letter list: {len(summary['dead_sagas'])}")
    lines += [f"  {d}" for d in summary["dead_sagas"]]
    events = summary["events"]
    if events:
        lines.append(
            f"event subscriber: {events['events']} events over {events['calls']} calls "
            f"(breaks: {', '.join(f'{k} {n}' for k, n in events['breaks'].items()) or 'none'}), "
            f"{events['duplicates_dropped']} duplicates dropped, {events['acks']} acknowledgements "
            f"as consumer {CONSUMER}; commit to receipt "
            f"p50 {events['delivery_delay_ms_p50']} ms, p99 {events['delivery_delay_ms_p99']} ms"
        )
    published = summary["published"]
    if published:
        lines.append(
            f"amqp publisher: {published['messages']} messages, "
            f"{published['duplicates_dropped']} duplicates dropped, "
            f"{published['kills']} SIGKILLs, {published['starts']} starts, "
            f"exit codes {published['exit_codes']}"
        )
    lines.append("checks:")
    lines += [f"  {note}" for note in summary["checks"]]
    if summary["harness_errors"]:
        lines.append(f"harness errors: {len(summary['harness_errors'])}")
        lines += [f"  {e}" for e in summary["harness_errors"]]
    violations = summary["violations"]
    lines.append(f"violations: {len(violations)}")
    by_check: dict[str, list[dict[str, str]]] = defaultdict(list)
    for v in violations:
        by_check[v["check"]].append(v)
    for check, found in by_check.items():
        for v in found[:VIOLATIONS_PRINTED_PER_CHECK_MAX]:
            lines.append(f"  [{check}] {v['where']}: {v['detail']}")
        if len(found) > VIOLATIONS_PRINTED_PER_CHECK_MAX:
            lines.append(
                f"  [{check}] ... and {len(found) - VIOLATIONS_PRINTED_PER_CHECK_MAX} more"
            )
    return "\n".join(lines)


def _fault_outcome(fault: dict[str, Any]) -> str:
    if fault["error"]:
        return f"ERROR {fault['error']}"
    if fault["healed_s"] is None:
        return "not injected"
    text = f"began {fault['started_s']:.2f}s, healed {fault['healed_s']:.2f}s"
    return f"{text}; {fault['detail']}" if fault["detail"] else text


def write_history(history: Sequence[OpRecord], path: Path) -> None:
    """Every request and its final answer, one JSON object a line (kept with the data)."""
    with path.open("w") as out:
        for record in history:
            line = {
                **asdict(record.op),
                "started_s": round(record.started_s, 3),
                "ended_s": round(record.ended_s, 3),
                "attempts": record.attempts,
                "outcome": record.outcome,
                "failures": record.failures,
                "answers": [
                    {
                        "result": a.result_name,
                        "replayed": a.replayed,
                        "differing": a.differing_field,
                    }
                    for a in record.answers or ()
                ],
                "error": record.error,
            }
            out.write(json.dumps(line) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    plan = plan_run(
        seed=options.seed,
        duration_s=options.duration_s,
        clients=options.clients,
        rebalances=options.rebalances,
        drains=options.drains,
        full_stripes=options.full_stripes,
    )
    work_dir = options.work_dir or Path(tempfile.mkdtemp(prefix=f"ledger-chaos-{options.seed}-"))
    result = RunResult(plan=plan, options=options, work_dir=work_dir)
    began = time.monotonic()
    try:
        asyncio.run(execute(options, plan, result))
    except (HarnessError, OSError, RuntimeError) as error:
        result.harness_errors.append(f"{type(error).__name__}: {error}")
    except BaseExceptionGroup as group:
        result.harness_errors += [f"{type(e).__name__}: {e}" for e in group.exceptions]
    except (KeyboardInterrupt, asyncio.CancelledError):
        result.harness_errors.append("interrupted: the run was stopped before its checks")
    result.elapsed_s = time.monotonic() - began
    if work_dir.exists():
        write_history(result.history, work_dir / "history.jsonl")
    summary = summarize(result)
    if result.report is None and not summary["harness_errors"]:
        summary["harness_errors"].append("the run ended before the checks")
    print(render(summary))
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(summary, indent=2) + "\n")
    if summary["violations"]:
        code = EXIT_VIOLATIONS
    elif summary["harness_errors"]:
        code = EXIT_HARNESS_FAILED
    else:
        code = EXIT_OK
    if code == EXIT_OK and options.work_dir is None and not options.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        print(f"data, replica logs and history.jsonl kept in {work_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""A client process: its own event loop, one gRPC channel, raw connections, C/K callers.

The orchestrator talks to each client process over a Pipe, one phase at a time:

    parent -> ("phase", Phase)     the process prepares (opens raw connections)
    child  -> ("ready", None)
    parent -> ("go", None)         every process starts its callers on this
    child  -> ("result", PhaseResult)
    parent -> ("stop", None)       or the pipe closes: the process cleans up and exits

Any exception in the child is sent back as ("error", traceback text).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import asyncpg
import grpc

from bench import raw_sql
from bench.workload import CURRENCY, Picker, TransferSpec, Workload
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

# A caller waits this long for one call (gRPC deadline, raw statement timeout).
# Longer than the service's inline saga wait (5 s) so a slow saga still answers.
CALL_TIMEOUT_S = 10.0
# Opening one raw connection to a local PostgreSQL takes milliseconds.
RAW_CONNECT_TIMEOUT_S = 10.0
# A client process waits at most this long for its next command; the
# orchestrator sends one at least every phase (warm-up + duration + set-up),
# so past this the orchestrator is gone and the process exits.
COMMAND_WAIT_S_MAX = 900.0
# A run has a handful of phases; this bounds the command loop.
PHASES_PER_PROCESS_MAX = 64
# No call completes in under 10 us, so a caller makes at most this many calls
# per second; it bounds every caller's loop.
CALLS_PER_CALLER_PER_S_MAX = 100_000
# Callers still in a call at the end of the window get this long past their
# call deadline to return before the phase is declared broken.
PHASE_END_GRACE_S = 5.0

GRPC_MODES = ("single", "batch", "cross", "single_half_peak")
RAW_MODES = ("raw_single", "raw_batch", "raw_half_peak")
# single and batch over the limited merchants (WorkerSpec.limited), by base mode.
VELOCITY_SUFFIX = "_velocity"
VELOCITY_MODES = {"single" + VELOCITY_SUFFIX: "single", "batch" + VELOCITY_SUFFIX: "batch"}


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    index: int
    callers: int
    # Global index of this process's first caller; callers are numbered across processes.
    caller_offset: int
    target: str
    workload: Workload
    seed: int
    # gRPC connections this process opens to the service, its callers spread over
    # them in turn: the kernel places connections, not calls, on the service's
    # workers (ledger/workers.py), so one connection would reach one worker.
    connections: int = 1
    # --velocity-rules: the same load over merchants whose accounts have velocity
    # rules, driven in the VELOCITY_MODES (the workload's twin, same shape).
    limited: Workload | None = None


@dataclass(frozen=True, slots=True)
class Phase:
    mode: str
    warmup_s: float
    duration_s: float
    # Calls per second this process starts, or None for as fast as callers can go.
    rate_per_s: float | None = None


@dataclass(slots=True)
class PhaseResult:
    worker: int
    mode: str
    transfers_ok: int = 0
    calls_ok: int = 0
    # Latency in ms of every successful call that finished inside the window.
    latencies_ms: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    # Item results other than OK, by TransferResult name.
    failed: Counter[str] = field(default_factory=Counter)
    # Calls that failed as a whole, by gRPC status or SQLSTATE.
    errors: Counter[str] = field(default_factory=Counter)
    calls_started: int = 0


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a client process (multiprocessing, spawn)."""
    try:
        _run(_serve(conn, spec))
    except BaseException:
        try:
            conn.send(("error", f"client process {spec.index}:\n{traceback.format_exc()}"))
        except (OSError, ValueError):
            pass
        raise
    finally:
        conn.close()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def _receive(conn: Connection) -> tuple[str, Any]:
    if not conn.poll(COMMAND_WAIT_S_MAX):
        raise TimeoutError(f"no command from the orchestrator in {COMMAND_WAIT_S_MAX}s")
    message: tuple[str, Any] = conn.recv()
    return message


class _Client:
    """One process's connections: a gRPC channel, and per caller a raw connection per shard."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        # A local subchannel pool per channel: otherwise channels to one target
        # share one connection.
        self.channels = [
            grpc.aio.insecure_channel(spec.target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(max(1, spec.connections))
        ]
        self.stubs = [ledger_pb2_grpc.LedgerServiceStub(c) for c in self.channels]
        self.raw: list[dict[str, asyncpg.Connection]] = []
        self.pickers = self._pickers(spec.workload)
        self.limited_pickers = self._pickers(spec.limited) if spec.limited is not None else []

    def _pickers(self, workload: Workload) -> list[Picker]:
        spec = self.spec
        return [
            Picker(workload, caller_global=spec.caller_offset + i, seed=spec.seed * 1000 + i)
            for i in range(spec.callers)
        ]

    async def open_raw(self) -> None:
        if self.raw:
            return
        for _ in range(self.spec.callers):
            per_shard = {}
            for name, dsn in self.spec.workload.shard_dsns:
                per_shard[name] = await asyncpg.connect(
                    dsn, timeout=RAW_CONNECT_TIMEOUT_S, command_timeout=CALL_TIMEOUT_S
                )
            self.raw.append(per_shard)

    async def close(self) -> None:
        for per_shard in self.raw:
            for connection in per_shard.values():
                await connection.close(timeout=RAW_CONNECT_TIMEOUT_S)
        for channel in self.channels:
            await channel.close(grace=None)


async def _serve(conn: Connection, spec: WorkerSpec) -> None:
    loop = asyncio.get_running_loop()
    client = _Client(spec)
    try:
        for _ in range(PHASES_PER_PROCESS_MAX):
            kind, payload = await loop.run_in_executor(None, _receive, conn)
            if kind == "stop":
                return
            if kind != "phase":
                raise RuntimeError(f"unexpected command {kind!r}")
            phase: Phase = payload
            if phase.mode in RAW_MODES:
                await client.open_raw()
            conn.send(("ready", None))
            kind, _ = await loop.run_in_executor(None, _receive, conn)
            if kind != "go":
                raise RuntimeError(f"expected go, got {kind!r}")
            conn.send(("result", await _run_phase(client, phase)))
        raise RuntimeError(f"more than {PHASES_PER_PROCESS_MAX} phases")
    finally:
        await client.close()


async def _run_phase(client: _Client, phase: Phase) -> PhaseResult:
    # time.monotonic, not loop.time(): uvloop's clock has millisecond steps.
    clock = time.monotonic
    result = PhaseResult(worker=client.spec.index, mode=phase.mode)
    t0 = clock()
    window_start = t0 + phase.warmup_s
    end = window_start + phase.duration_s
    calls_max = int(CALLS_PER_CALLER_PER_S_MAX * (phase.warmup_s + phase.duration_s)) + 1
    slots = _Slots(t0, phase.rate_per_s)

    async def caller(i: int) -> None:
        mode = VELOCITY_MODES.get(phase.mode)
        picker = client.pickers[i] if mode is None else client.limited_pickers[i]
        pick, call = _mode_functions(client, mode or phase.mode, picker, i)
        for _ in range(calls_max):
            if phase.rate_per_s is not None:
                slot = slots.take()
                if slot >= end:
                    return
                # Pacing to a schedule (open loop), not waiting for a condition.
                await asyncio.sleep(max(0.0, slot - clock()))
            started = clock()
            if started >= end:
                return
            shard, transfers = pick()
            result.calls_started += 1
            ok = await call(shard, transfers, result)
            finished = clock()
            if ok >= 0 and window_start <= finished <= end:
                result.calls_ok += 1
                result.transfers_ok += ok
                result.latencies_ms.append((finished - started) * 1000.0)

    callers = [caller(i) for i in range(client.spec.callers)]
    budget_s = phase.warmup_s + phase.duration_s + CALL_TIMEOUT_S + PHASE_END_GRACE_S
    await asyncio.wait_for(asyncio.gather(*callers), timeout=budget_s)
    return result


class _Slots:
    """Start times for a rate-limited phase, shared by one process's callers."""

    def __init__(self, t0: float, rate_per_s: float | None) -> None:
        self._t0 = t0
        self._interval_s = 1.0 / rate_per_s if rate_per_s else 0.0
        self._next = 0

    def take(self) -> float:
        slot = self._t0 + self._next * self._interval_s
        self._next += 1
        return slot


Pick = Callable[[], tuple[str, list[TransferSpec]]]
# Returns the number of transfers applied (OK), or -1 if the call failed as a whole.
Call = Callable[[str, list[TransferSpec], PhaseResult], Awaitable[int]]


def _mode_functions(client: _Client, mode: str, picker: Picker, caller: int) -> tuple[Pick, Call]:
    stub = client.stubs[caller % len(client.stubs)]
    if mode in ("single", "single_half_peak"):
        return picker.local_single, _grpc_call(stub)
    if mode == "batch":
        return picker.local_batch, _grpc_call(stub)
    if mode == "cross":
        return picker.cross_single, _grpc_call(stub)
    if mode in ("raw_single", "raw_half_peak"):
        return picker.local_single, _raw_call(client.raw[caller])
    if mode == "raw_batch":
        return picker.local_batch, _raw_call(client.raw[caller])
    raise ValueError(f"unknown mode {mode!r}")


def _grpc_call(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> Call:
    async def call(shard: str, transfers: list[TransferSpec], result: PhaseResult) -> int:
        request = pb.CreateTransfersRequest(transfers=[_to_proto(t) for t in transfers])
        try:
            response = await stub.CreateTransfers(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            result.errors[error.code().name] += 1
            return -1
        ok = 0
        for item in response.results:
            if item.result == pb.TRANSFER_RESULT_OK:
                ok += 1
            else:
                result.failed[pb.TransferResult.Name(item.result)] += 1
        return ok

    return call


def _to_proto(t: TransferSpec) -> pb.Transfer:
    return pb.Transfer(
        id=t.transfer_id,
        debit_account=pb.AccountRef(merchant_id=t.debit_merchant, account_id=t.debit_account),
        credit_account=pb.AccountRef(merchant_id=t.credit_merchant, account_id=t.credit_account),
        amount_minor=t.amount_minor,
        currency=CURRENCY,
        action=pb.TRANSFER_ACTION_POST,
    )


def _raw_call(connections: dict[str, asyncpg.Connection]) -> Call:
    async def call(shard: str, transfers: list[TransferSpec], result: PhaseResult) -> int:
        try:
            return await raw_transfer_batch(connections[shard], transfers)
        except asyncpg.PostgresError as error:
            result.errors[f"SQLSTATE {error.sqlstate}"] += 1
            return -1

    return call


async def raw_transfer_batch(
    connection: asyncpg.Connection,
    transfers: list[TransferSpec],
) -> int:
    """The service's rows for these transfers, in one transaction, straight to PostgreSQL:
    lock the accounts in a fixed order, then one statement writes transfers, entries
    (with balances after) and the new balances."""
    keys = sorted(
        {(t.debit_merchant, t.debit_account) for t in transfers}
        | {(t.credit_merchant, t.credit_account) for t in transfers}
    )
    now = dt.datetime.now(dt.UTC)
    async with connection.transaction():
        rows = await connection.fetch(
            raw_sql.LOCK_ACCOUNTS, [k[0] for k in keys], [k[1] for k in keys]
        )
        # [debits_posted, credits_posted, entry_count, head hash] per account, as locked.
        balances = {
            (r["merchant_id"], r["account_id"]): [
                r["debits_posted"],
                r["credits_posted"],
                r["entry_count"],
                r["entry_hash"],
            ]
            for r in rows
        }
        if len(balances) != len(keys):
            raise RuntimeError(f"raw accounts missing: {set(keys) - set(balances)}")
        entries: list[tuple[Any, ...]] = []
        for t in transfers:
            for key, direction in (
                ((t.debit_merchant, t.debit_account), 1),
                ((t.credit_merchant, t.credit_account), 2),
            ):
                b = balances[key]
                b[direction - 1] += t.amount_minor
                b[2] += 1
                # The same chain as the service's entries (ledger/domain/chain.py): one
                # SHA-256 over the previous hash and the entry's fields.
                b[3] = hashlib.sha256(
                    b[3] + f"{key}\x1f{b[2]}\x1f{t.transfer_id}\x1f{b[0]}\x1f{b[1]}".encode()
                ).digest()
                entries.append(
                    (
                        *key,
                        b[2],
                        t.debit_merchant,
                        t.transfer_id,
                        direction,
                        t.amount_minor,
                        b[0],
                        b[1],
                        b[3],
                    )
                )
        written = await connection.fetchrow(
            raw_sql.WRITE_BATCH,
            [
                (
                    t.debit_merchant,
                    t.transfer_id,
                    t.debit_account,
                    t.credit_merchant,
                    t.credit_account,
                    t.amount_minor,
                )
                for t in transfers
            ],
            entries,
            [(*key, *b) for key, b in balances.items()],
            now,
        )
        # Checked inside the transaction, so a short write rolls back.
        assert written is not None
        landed = (written["transfers"], written["entries"], written["accounts"])
        if landed != (len(transfers), 2 * len(transfers), len(balances)):
            raise RuntimeError(f"raw write landed {landed} for {len(transfers)} transfers")
    return len(transfers)

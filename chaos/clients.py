"""Clients: send planned operations over real gRPC channels, retry, record every answer.

A call is retried with the very same request (the same transfer ids) after a
transport or overload status, or when an item came back SHARD_UNAVAILABLE
(nothing was recorded for it), up to ATTEMPTS_MAX times, switching replica after
a status that may mean the replica is gone. The final known answer is recorded;
when every attempt failed the answer is unknown (the request may or may not
have been applied). Any other status is unexpected: recorded as an error, which
the checker reports as a violation (INTERNAL means a broken invariant, UNKNOWN an
unhandled exception in the service).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from chaos.cluster import Replica
from chaos.plan import ClientPlanner, Operation, TransferSpec
from ledger import limits
from ledger.v1 import ledger_pb2 as pb

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
# Attempts per call, the first included: with the back-off below this rides out
# several seconds of a shard or a replica being down, and then gives up (unknown).
ATTEMPTS_MAX = 8
# Deadline of each attempt: above the service's inline wait for sagas
# (limits.saga_inline_wait_s_max = 5 s plus its margin), so a cross-shard transfer
# gets its final result when the saga finishes in time.
ATTEMPT_DEADLINE_S = 6.0
# Exponential back-off between attempts, with jitter, capped.
RETRY_DELAY_S_MIN = 0.05
RETRY_DELAY_S_MAX = 1.0

if not ATTEMPT_DEADLINE_S > limits.saga_inline_wait_s_max + limits.saga_deadline_margin_s:
    raise AssertionError("an attempt must outlast the service's inline wait for sagas")
if not (ATTEMPTS_MAX >= 2 and 0 < RETRY_DELAY_S_MIN < RETRY_DELAY_S_MAX < ATTEMPT_DEADLINE_S):
    raise AssertionError("retries need attempts and a back-off shorter than an attempt")

OK = pb.TRANSFER_RESULT_OK
IN_PROGRESS = pb.TRANSFER_RESULT_IN_PROGRESS
SHARD_UNAVAILABLE = pb.TRANSFER_RESULT_SHARD_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class ItemAnswer:
    result: int
    replayed: bool
    differing_field: str = ""

    @property
    def result_name(self) -> str:
        return pb.TransferResult.Name(self.result)  # type: ignore[arg-type]


@dataclass
class OpRecord:
    op: Operation
    # Seconds since the run started.
    started_s: float
    ended_s: float = 0.0
    attempts: int = 0
    # The final answer per transfer; None when unknown (or after an unexpected status).
    answers: tuple[ItemAnswer, ...] | None = None
    # ok, refused (every item final and not OK), mixed, in_progress, unknown, error.
    outcome: str = "unknown"
    # The status (or SHARD_UNAVAILABLE) of each failed attempt, in order.
    failures: list[str] = field(default_factory=list)
    # For outcome error: the unexpected status and its details.
    error: str = ""


def to_pb(spec: TransferSpec) -> pb.Transfer:
    return pb.Transfer(
        id=spec.id,
        debit_account=pb.AccountRef(
            merchant_id=spec.debit.merchant_id, account_id=spec.debit.account_id
        ),
        credit_account=(
            pb.AccountRef(merchant_id=spec.credit.merchant_id, account_id=spec.credit.account_id)
            if spec.credit is not None
            else None
        ),
        amount_minor=spec.amount_minor,
        currency=spec.currency,
        action=int(spec.action),  # type: ignore[arg-type]
        pending_id=spec.pending_id,
        timeout_ms=spec.timeout_ms,
        linked=spec.linked,
        reversal_of=spec.reversal_of,
    )


@dataclass
class CallResult:
    response: Any = None
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    # Set for an unexpected (non-retryable) status.
    error: str = ""


class Caller:
    """Sends a request to the replicas with bounded retries."""

    def __init__(self, replicas: Sequence[Replica], *, jitter: random.Random) -> None:
        self.replicas = replicas
        # Back-off jitter only; the plan has its own Randoms, untouched by timing.
        self._jitter = jitter

    async def call(
        self,
        method: str,
        request: Any,
        *,
        first_replica: int,
        retry_if: Callable[[Any], str] | None = None,
    ) -> CallResult:
        """Calls `method` until it answers; retry_if may name a reason to retry an answer."""
        result = CallResult()
        replica = first_replica
        delay_s = RETRY_DELAY_S_MIN
        for attempt in range(1, ATTEMPTS_MAX + 1):
            result.attempts = attempt
            stub = self.replicas[replica].any_stub()
            assert stub is not None, "replicas serve before clients start"
            try:
                response = await getattr(stub, method)(request, timeout=ATTEMPT_DEADLINE_S)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code not in RETRYABLE_CODES:
                    result.error = f"{code.name}: {error.details()}"
                    return result
                result.failures.append(code.name)
                # The replica may be gone: the next attempt goes to the other one.
                replica = (replica + 1) % len(self.replicas)
            else:
                reason = retry_if(response) if retry_if is not None else ""
                result.response = response
                if not reason:
                    return result
                result.failures.append(reason)
            if attempt < ATTEMPTS_MAX:
                await asyncio.sleep(self._jitter.uniform(delay_s / 2, delay_s))
                delay_s = min(delay_s * 2, RETRY_DELAY_S_MAX)
        return result


def _chain_of_merchants(op: Operation) -> bool:
    """A linked chain (a paired one, or its replay) naming more than one merchant."""
    merchants = {t.debit.merchant_id for t in op.transfers} | {
        t.credit.merchant_id for t in op.transfers if t.credit is not None
    }
    return any(t.linked for t in op.transfers) and len(merchants) > 1


def _unavailable_items(response: pb.CreateTransfersResponse) -> str:
    unavailable = any(r.result == SHARD_UNAVAILABLE for r in response.results)
    return "SHARD_UNAVAILABLE" if unavailable else ""


async def send_operation(caller: Caller, op: Operation, *, now_s: Callable[[], float]) -> OpRecord:
    record = OpRecord(op=op, started_s=now_s())
    request = pb.CreateTransfersRequest(transfers=[to_pb(t) for t in op.transfers])
    call = await caller.call(
        "CreateTransfers", request, first_replica=op.replica, retry_if=_unavailable_items
    )
    record.ended_s = now_s()
    record.attempts = call.attempts
    record.failures = call.failures
    if call.error:
        if call.error.startswith("FAILED_PRECONDITION") and _chain_of_merchants(op):
            # Its merchants were apart (a rebalance moved one): refused whole.
            record.outcome = "refused"
            return record
        record.outcome, record.error = "error", call.error
        return record
    response = call.response
    if response is None or _unavailable_items(response):
        return record  # unknown: every attempt failed
    answers = tuple(ItemAnswer(r.result, r.replayed, r.differing_field) for r in response.results)
    record.answers = answers
    if len(answers) != len(op.transfers):
        record.outcome = "error"
        record.error = f"{len(answers)} results for {len(op.transfers)} transfers"
    elif any(a.result == IN_PROGRESS for a in answers):
        record.outcome = "in_progress"
    elif all(a.result == OK for a in answers):
        record.outcome = "ok"
    elif all(a.result != OK for a in answers):
        record.outcome = "refused"
    else:
        record.outcome = "mixed"
    return record


async def run_client(
    *,
    planner: ClientPlanner,
    caller: Caller,
    stop_at: float,
    history: list[OpRecord],
    now_s: Callable[[], float],
) -> None:
    """Sends the planner's operations one after another until stop_at (event loop time)."""
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        op = planner.next()
        history.append(await send_operation(caller, op, now_s=now_s))

"""Settling open holds through the service, as their callers would: during a drain
(the holds its shard still relays) and at the end of every run (every hold left open).

Each settle is an ordinary CreateTransfers of one POST_PENDING (the whole amount)
or VOID_PENDING, sent with the client's retries and recorded in the history like
any client operation, so the checker holds it to the same standards (stored as
answered, once, with the effect its outcome calls for: a void releases the hold,
a post moves the money). Whether a hold is posted or voided, and whether the
settle names the credit account and currency, is drawn from the hold's own id,
never from timing. Liveness is the point: a settle of a hold the service still
calls pending must succeed (or find it settled or expired just before).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from chaos.clients import IN_PROGRESS, OK, Caller, OpRecord, send_operation
from chaos.plan import Action, Operation, Ref, TransferSpec
from ledger import limits
from ledger.v1 import ledger_pb2 as pb

# The answers to a settle that leave the hold settled: applied, or (it raced a
# client's settle or its timeout) settled already. IN_PROGRESS (a settle saga
# that outlasted the call) is judged by its stored outcome once the cluster is quiet.
SETTLED_ALREADY = frozenset(
    {
        pb.TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_POSTED,
        pb.TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_VOIDED,
        pb.TRANSFER_RESULT_PENDING_TRANSFER_EXPIRED,
    }
)
SETTLE_ACCEPTED = frozenset({OK, IN_PROGRESS} | SETTLED_ALREADY)
# Share of settles that void (the rest post the whole amount), and that name the
# credit account and currency (issue 17: a named credit account once broke settles
# of holds whose parties had moved).
VOID_SHARE = 0.5
NAMED_SHARE = 0.5
LOOKUP_REFS_PER_CALL = limits.refs_per_lookup_max
# Settles in flight at once: as several callers would settle their own holds, so
# that a drain waits for the slowest settle, not for their sum (each is a saga,
# retried through the faults around it: seed 323 took 54.5 s of its 60 s drain
# deadline settling 96 holds one after another).
SETTLES_IN_FLIGHT_MAX = 8


@dataclass(frozen=True, slots=True)
class Hold:
    """An open pending transfer: its id is (debit merchant, transfer id)."""

    transfer_id: str
    debit: Ref
    credit: Ref
    currency: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.debit.merchant_id, self.transfer_id)


def settle_operation(hold: Hold, *, suffix: str, kind: str, replica: int) -> Operation:
    """The settle of one hold; suffix makes its id (and op id) unique."""
    rng = random.Random(f"chaos/settle/{hold.debit.merchant_id}/{hold.transfer_id}")
    void = rng.random() < VOID_SHARE
    named = rng.random() < NAMED_SHARE
    settle_id = f"{hold.transfer_id}.{suffix}"
    spec = TransferSpec(
        settle_id,
        hold.debit,
        hold.credit if named else None,
        0,  # a post of the whole amount; a void names none
        hold.currency if named else "",
        Action.VOID_PENDING if void else Action.POST_PENDING,
        pending_id=hold.transfer_id,
    )
    how = "void" if void else "post"
    return Operation(
        op_id=f"{hold.debit.merchant_id}/{settle_id}",
        client=-2,
        kind=f"{kind}_{how}",
        transfers=(spec,),
        replica=replica,
    )


async def settle_holds(
    caller: Caller,
    holds: Sequence[Hold],
    *,
    suffix: str,
    kind: str,
    now_s: Callable[[], float],
) -> list[OpRecord]:
    """Settles each hold, up to SETTLES_IN_FLIGHT_MAX calls at once; returns the
    records in the holds' order."""
    slots = asyncio.Semaphore(SETTLES_IN_FLIGHT_MAX)

    async def settle(index: int, hold: Hold) -> OpRecord:
        operation = settle_operation(hold, suffix=suffix, kind=kind, replica=index % 2)
        async with slots:
            return await send_operation(caller, operation, now_s=now_s)

    ordered = sorted(holds, key=lambda h: h.key)
    return list(await asyncio.gather(*(settle(i, h) for i, h in enumerate(ordered))))


def settle_failure(record: OpRecord) -> str:
    """Why a settle did not settle its hold, or "" when it did (or may have: IN_PROGRESS)."""
    if record.outcome == "error":
        return f"error: {record.error}"
    if record.answers is None:
        return f"no answer after {record.attempts} attempts: {record.failures}"
    (answer,) = record.answers
    if answer.result not in SETTLE_ACCEPTED:
        return f"answered {answer.result_name}"
    return ""


async def open_holds(caller: Caller, keys: Sequence[tuple[str, str]]) -> tuple[list[Hold], str]:
    """Of the pending transfers keys, those the service says are held (OK and pending),
    via LookupTransfers; and what could not be looked up ("" when all were)."""
    holds: list[Hold] = []
    keys = sorted(set(keys))
    for start in range(0, len(keys), LOOKUP_REFS_PER_CALL):
        chunk = keys[start : start + LOOKUP_REFS_PER_CALL]
        request = pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=m, transfer_id=t) for m, t in chunk]
        )
        call = await caller.call("LookupTransfers", request, first_replica=start % 2)
        if call.response is None:
            return holds, f"LookupTransfers: {call.error or call.failures}"
        for record in call.response.transfers:
            transfer = record.transfer
            if (
                record.result != OK
                or transfer.action != pb.TRANSFER_ACTION_PENDING
                or record.pending_state != pb.PENDING_STATE_PENDING
            ):
                continue
            holds.append(
                Hold(
                    transfer.id,
                    Ref(transfer.debit_account.merchant_id, transfer.debit_account.account_id),
                    Ref(transfer.credit_account.merchant_id, transfer.credit_account.account_id),
                    transfer.currency,
                )
            )
    return holds, ""


# The holds a shard relays (ledger/storage/migrations/0006_hold_relays.sql): once
# a draining shard's merchants have all moved, what still pins it is these (the
# rows stay after a hold settles; LookupTransfers says which are still open).
_RELAYED_SQL = "SELECT DISTINCT merchant_id, transfer_id FROM hold_relays"
SHARD_CONNECT_TIMEOUT_S = 10.0
SHARD_QUERY_TIMEOUT_S = 30.0


# A rebalance's line for a move that waits for holds whose paths would repeat a
# relay step (ledger/moves/rebalance.py, Rebalancer._holds_refused): "hold T of M"
# or "holds T1 of M1, T2 of M2 (and maybe others)"; the harness's merchant and
# transfer ids have no spaces or commas.
_WAITING_FOR_HOLDS = re.compile(
    r"^NOT MOVED \S+ (?P<source>\S+) -> \S+: deferred: "
    r"cross-shard holds? (?P<holds>\S+ of \S+?(?:, \S+ of \S+?)*)(?: \(and maybe others\))?: "
)


def holds_moves_wait_for(lines: Sequence[str], *, source: str) -> list[tuple[str, str]]:
    """The holds (debit merchant, transfer id) that a rebalance's summary says moves
    off source wait for: settling them is what lets those merchants go."""
    found = (_WAITING_FOR_HOLDS.match(line) for line in lines)
    return [
        (merchant, transfer)
        for m in found
        if m and m["source"] == source
        for transfer, merchant in (named.split(" of ") for named in m["holds"].split(", "))
    ]


async def relayed_holds(dsn: str) -> list[tuple[str, str]]:
    """The pending transfers whose holds the shard at dsn relays (or once relayed)."""
    connection = await asyncpg.connect(dsn, timeout=SHARD_CONNECT_TIMEOUT_S)
    try:
        rows = await connection.fetch(_RELAYED_SQL, timeout=SHARD_QUERY_TIMEOUT_S)
    finally:
        await connection.close()
    return [(r["merchant_id"], r["transfer_id"]) for r in rows]

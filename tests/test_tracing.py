"""Span trees of one payment journey, recorded by an in-memory exporter.

The service runs in this process (the module's `service` fixture), so its spans
land in an InMemorySpanExporter added to the process's tracer provider. The
global provider can be set only once per process and other modules share this
process, so the exporter is attached once per module (to the provider already
installed, if any) and stops collecting when the module ends. Background work
(the expiry sweeper, the recovery worker's claims) also makes spans, so every
assertion picks spans by trace id, never by position.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

import asyncpg
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from ledger.domain.accounts import AccountKey
from ledger.domain.transfers import TransferAction, TransferRequest
from ledger.storage.sagas import SagaStore
from ledger.telemetry import pseudonym
from ledger.telemetry.pseudonym import pseudonymise
from ledger.telemetry.tracing import current_traceparent, setup_tracing
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    field_violations,
    ref,
    transfer,
    uid,
    wait_until,
)

CARD = "4111 1111 1111 1111"
DEBIT_SHARD = "shard-a"
CREDIT_SHARD = "shard-b"
SERVICE = "ledger.v1.LedgerService"
CREATE_TRANSFERS_SPAN = f"{SERVICE}/CreateTransfers"
# gRPC status codes as the server span's rpc.grpc.status_code records them.
GRPC_OK = 0
GRPC_INVALID_ARGUMENT = 3
# Environment variables that would make setup_tracing() add a real OTLP exporter.
_OTLP_ENV = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)

test_tracer = trace.get_tracer("tests.test_tracing")
# Calls that queue behind a held transaction and then share one.
JOINED_CALLS = 5


# --- the exporter -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    collected = InMemorySpanExporter()
    processor = SimpleSpanProcessor(collected)
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        # Installed by an earlier module: it cannot be replaced, only extended.
        provider.add_span_processor(processor)
    else:
        with pytest.MonkeyPatch.context() as patch:
            for name in _OTLP_ENV:
                patch.delenv(name, raising=False)
            assert setup_tracing(extra_processor=processor) is not None
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    yield collected
    # The provider stays for the rest of the process; a shut-down exporter keeps nothing.
    collected.shutdown()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


# --- helpers --------------------------------------------------------------------------


def new_traceparent() -> tuple[int, int, str]:
    """A client's trace: (trace id, span id, W3C traceparent header value)."""
    trace_id = secrets.randbits(128) | 1
    span_id = secrets.randbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


def in_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, f"expected one {name!r}, got {[s.name for s in spans]}"
    return found[0]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def is_descendant(spans: Sequence[ReadableSpan], span: ReadableSpan, root: ReadableSpan) -> bool:
    by_id = {s.context.span_id: s for s in spans}
    current: ReadableSpan | None = span
    while current is not None and current.parent is not None:
        if current.parent.span_id == root.context.span_id:
            return True
        current = by_id.get(current.parent.span_id)
    return False


def attributes(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def shard_spans(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith("shard ")]


async def has_spans(exporter: InMemorySpanExporter, trace_id: int, *names: str) -> bool:
    found = {s.name for s in in_trace(exporter, trace_id)}
    return all(name in found for name in names)


async def lookup(service: Service, merchant_id: str, transfer_id: str) -> pb.TransferRecord:
    response = await service.stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=merchant_id, transfer_id=transfer_id)],
            wait_timeout_ms=5_000,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert len(response.transfers) == 1
    return response.transfers[0]


async def create_transfer(
    service: Service, item: pb.Transfer, *, traceparent: str | None = None
) -> pb.CreateTransferResult:
    metadata = (("traceparent", traceparent),) if traceparent else None
    response = await service.stub.CreateTransfers(
        pb.CreateTransfersRequest(transfers=[item]), timeout=RPC_TIMEOUT_S, metadata=metadata
    )
    return response.results[0]


async def funded_pair(service: Service, debit_shard: str, credit_shard: str) -> tuple[str, str]:
    """A payer on debit_shard and a payee on credit_shard, each with a USD account."""
    payer = service.merchant_on(debit_shard, "payer")
    payee = service.merchant_on(credit_shard, "payee")
    await create_accounts(service.stub, account(payer, "cash"), account(payee, "sales"))
    return payer, payee


def assert_server_span(span: ReadableSpan, *, code: int) -> None:
    assert span.kind is SpanKind.SERVER
    attrs = attributes(span)
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.service"] == SERVICE
    assert attrs["rpc.method"] == "CreateTransfers"
    assert attrs["rpc.grpc.status_code"] == code


def assert_absent_from_spans(spans: Sequence[ReadableSpan], forbidden: Sequence[str]) -> None:
    """No span name, attribute, status or event of spans holds any of these strings in clear."""
    for span in spans:
        texts = [span.name, span.status.description or ""]
        for key, value in attributes(span).items():
            texts.append(f"{key}={value!r}")
        for event in span.events:
            texts.append(event.name)
            texts += [f"{k}={v!r}" for k, v in (event.attributes or {}).items()]
        for text in texts:
            for secret in forbidden:
                assert secret not in text, f"{secret!r} in clear in span {span.name!r}: {text}"


# --- local transfers ---------------------------------------------------------------------


async def test_local_transfer_has_server_route_and_shard_spans_and_records_its_trace_id(
    service: Service, spans: InMemorySpanExporter
) -> None:
    payer, payee = await funded_pair(service, DEBIT_SHARD, DEBIT_SHARD)
    transfer_id = uid("t")
    result = await create_transfer(
        service, transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 125)
    )
    assert result.result == pb.TRANSFER_RESULT_OK

    record = await lookup(service, payer, transfer_id)
    assert len(record.transfer.trace_id) == 32, record.transfer.trace_id
    trace_id = int(record.transfer.trace_id, 16)
    await wait_until(
        lambda: has_spans(
            spans, trace_id, CREATE_TRANSFERS_SPAN, "route", "shard create_transfers"
        ),
        what="the local transfer's spans",
    )
    tree = in_trace(spans, trace_id)
    server = one(tree, CREATE_TRANSFERS_SPAN)
    assert server.parent is None, "a call without traceparent starts a trace of its own"
    assert_server_span(server, code=GRPC_OK)
    assert server.status.status_code is not StatusCode.ERROR

    route = one(children(tree, server), "route")
    assert attributes(route)["ledger.items"] == 1
    assert list(attributes(route)["ledger.route.shards"]) == [DEBIT_SHARD]  # type: ignore[call-overload]
    # The call ran alone, so its group-commit batch (and the shard transaction) is in its trace.
    batch = one(children(tree, route), "group commit")
    assert attributes(batch)["ledger.calls"] == 1
    writes = named(children(tree, batch), "shard create_transfers")
    assert writes, [s.name for s in children(tree, batch)]
    for write in writes:
        attrs = attributes(write)
        assert attrs["ledger.shard"] == DEBIT_SHARD
        assert attrs["ledger.operation"] == "create_transfers"
        assert attrs["db.system"] == "postgresql"
        assert attrs["ledger.transaction"] is True

    # "Which postings did trace X make": the admin API answers with this transfer.
    admin = ledger_pb2_grpc.LedgerAdminServiceStub(service.channel)
    by_trace = await admin.ListTransfersByTrace(
        pb.ListTransfersByTraceRequest(trace_id=record.transfer.trace_id), timeout=RPC_TIMEOUT_S
    )
    assert [(t.transfer.debit_account.merchant_id, t.transfer.id) for t in by_trace.transfers] == [
        (payer, transfer_id)
    ]
    assert by_trace.transfers[0].transfer.trace_id == record.transfer.trace_id


async def _queued_behind_a_lock(
    service: Service, payer: str, payee: str, *, queued: Callable[[], int]
) -> tuple[list[tuple[int, int, str]], list[str], list[pb.CreateTransferResult]]:
    """JOINED_CALLS + 1 transfers from payer to payee, each in its own trace. A row
    lock on the payer's account holds the first call's transaction until the others
    have queued behind it (queued() counts them), so they share the next one.
    Returns the traces, transfer ids and results, in order."""
    traces = [new_traceparent() for _ in range(JOINED_CALLS + 1)]
    ids = [uid("t") for _ in traces]
    calls = [
        create_transfer(
            service,
            transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 1),
            traceparent=traceparent,
        )
        for transfer_id, (_, _, traceparent) in zip(ids, traces, strict=True)
    ]
    shard = service.cluster.shards[service.ring.shard_for(payer)]
    locker = await asyncpg.connect(shard.dsn)
    try:
        hold = locker.transaction()
        await hold.start()
        await locker.execute(
            "SELECT 1 FROM accounts WHERE merchant_id = $1 AND account_id = 'cash' FOR UPDATE",
            payer,
        )
        first = asyncio.create_task(calls[0])

        async def first_waits_on_the_lock() -> bool:
            return bool(
                await locker.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )

        await wait_until(first_waits_on_the_lock, what="the first call to wait on the lock")
        others = [asyncio.create_task(call) for call in calls[1:]]

        async def others_queued() -> bool:
            return queued() == JOINED_CALLS

        await wait_until(others_queued, what="the other calls to queue behind the first")
        await hold.rollback()
        results = await asyncio.gather(first, *others)
    finally:
        await locker.close()
    return traces, ids, list(results)


async def test_every_call_of_a_shared_transaction_shows_it_in_its_own_trace(
    service: Service, spans: InMemorySpanExporter
) -> None:
    """Group commit: calls that share one shard transaction each get a span for it.

    A row lock holds the first call's transaction, so the calls sent after it queue
    and share the next transaction (one runs per shard at a time).
    """
    payer, payee = await funded_pair(service, DEBIT_SHARD, DEBIT_SHARD)
    traces, ids, results = await _queued_behind_a_lock(
        service, payer, payee, queued=service.server.ledger.batcher.queued_calls
    )
    assert {r.result for r in results} == {pb.TRANSFER_RESULT_OK}

    trace_ids = [trace_id for trace_id, _, _ in traces]
    await wait_until(
        lambda: _all(has_spans(spans, t, CREATE_TRANSFERS_SPAN) for t in trace_ids),
        what="every call's spans",
    )
    batches = {
        t: named(in_trace(spans, t), "group commit")
        + named(in_trace(spans, t), "group commit (joined)")
        for t in trace_ids
    }
    assert all(len(found) == 1 for found in batches.values()), batches
    shared = [s for found in batches.values() for s in found if s.name == "group commit"]
    joined = [s for found in batches.values() for s in found if s.name == "group commit (joined)"]
    assert len(joined) == JOINED_CALLS - 1, "one call holds the shared batch, the rest join it"
    (holder,) = [s for s in shared if attributes(s)["ledger.calls"] == JOINED_CALLS]
    for span in joined:
        assert [link.context.span_id for link in span.links] == [holder.context.span_id]
        assert attributes(span)["ledger.calls"] == JOINED_CALLS
        # It covers the shared transaction's time.
        assert span.start_time is not None and span.end_time is not None
        assert holder.start_time is not None and holder.end_time is not None
        assert span.start_time <= holder.start_time and span.end_time >= holder.end_time
    for trace_id, transfer_id in zip(trace_ids, ids, strict=True):
        stored = (await lookup(service, payer, transfer_id)).transfer.trace_id
        assert stored == f"{trace_id:032x}", "a transfer records its own call's trace"


async def _all(checks: Iterable[Awaitable[bool]]) -> bool:
    return all([await check for check in checks])


async def test_incoming_traceparent_continues_the_callers_trace(
    service: Service, spans: InMemorySpanExporter
) -> None:
    payer, payee = await funded_pair(service, DEBIT_SHARD, DEBIT_SHARD)
    trace_id, client_span_id, traceparent = new_traceparent()
    transfer_id = uid("t")
    result = await create_transfer(
        service,
        transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 7),
        traceparent=traceparent,
    )
    assert result.result == pb.TRANSFER_RESULT_OK
    await wait_until(
        lambda: has_spans(spans, trace_id, CREATE_TRANSFERS_SPAN, "shard create_transfers"),
        what="the server span in the caller's trace",
    )
    tree = in_trace(spans, trace_id)
    server = one(tree, CREATE_TRANSFERS_SPAN)
    assert server.parent is not None
    assert server.parent.span_id == client_span_id
    assert server.parent.is_remote
    assert_server_span(server, code=GRPC_OK)
    for write in named(tree, "shard create_transfers"):
        assert is_descendant(tree, write, server)
    assert (await lookup(service, payer, transfer_id)).transfer.trace_id == f"{trace_id:032x}"


# --- sagas -----------------------------------------------------------------------------------


async def test_cross_shard_transfer_traces_every_saga_step_under_the_server_span(
    service: Service, spans: InMemorySpanExporter
) -> None:
    payer, payee = await funded_pair(service, DEBIT_SHARD, CREDIT_SHARD)
    trace_id, _, traceparent = new_traceparent()
    transfer_id = uid("t")
    result = await create_transfer(
        service,
        transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 300),
        traceparent=traceparent,
    )
    assert result.result == pb.TRANSFER_RESULT_OK
    steps = ("saga step 1 reserve", "saga step 2 credit", "saga step 3 finish")
    await wait_until(
        lambda: has_spans(spans, trace_id, CREATE_TRANSFERS_SPAN, *steps),
        what="the saga's step spans",
    )
    tree = in_trace(spans, trace_id)
    server = one(tree, CREATE_TRANSFERS_SPAN)
    assert_server_span(server, code=GRPC_OK)
    reserve, credit, finish = (one(tree, name) for name in steps)
    for step in (reserve, credit, finish):
        assert step.context.trace_id == server.context.trace_id
        assert is_descendant(tree, step, server), f"{step.name} is not under the server span"
        assert attributes(step)["ledger.transfer_id"] == transfer_id
        assert attributes(step)["ledger.merchant"] == pseudonymise(payer)
    assert credit.start_time is not None and reserve.end_time is not None
    assert credit.start_time >= reserve.end_time, "step 2 starts after step 1 ended"
    for step in (credit, finish):
        attrs = attributes(step)
        assert attrs["ledger.saga.debit_shard"] == DEBIT_SHARD
        assert attrs["ledger.saga.credit_shard"] == CREDIT_SHARD
        assert attrs["ledger.amount_minor"] == 300
    assert attributes(finish)["ledger.saga.credit_outcome"] == "APPLIED"

    expected_shard = {
        reserve.name: DEBIT_SHARD,
        credit.name: CREDIT_SHARD,
        finish.name: DEBIT_SHARD,
    }
    for step in (reserve, credit, finish):
        under = shard_spans(children(tree, step))
        assert under, f"no shard span under {step.name}"
        assert {attributes(s)["ledger.shard"] for s in under} == {expected_shard[step.name]}
    assert (await lookup(service, payer, transfer_id)).transfer.trace_id == f"{trace_id:032x}"


async def test_sagas_sharing_a_step_transaction_each_keep_their_own_trace(
    service: Service, spans: InMemorySpanExporter
) -> None:
    """Group commit of saga steps: a row lock holds the first saga's step 1, so the
    sagas sent after it queue and share the next step-1 transaction. Each transfer
    records its own trace, and each trace shows the shared transaction."""
    payer, payee = await funded_pair(service, DEBIT_SHARD, CREDIT_SHARD)
    traces, ids, results = await _queued_behind_a_lock(
        service, payer, payee, queued=service.server.sagas.queued_steps
    )
    assert {r.result for r in results} == {pb.TRANSFER_RESULT_OK}

    trace_ids = [trace_id for trace_id, _, _ in traces]
    steps = ("saga step 1 reserve", "saga step 2 credit", "saga step 3 finish")
    await wait_until(
        lambda: _all(has_spans(spans, t, CREATE_TRANSFERS_SPAN, *steps) for t in trace_ids),
        what="every saga's step spans",
    )
    for trace_id, transfer_id in zip(trace_ids, ids, strict=True):
        stored = (await lookup(service, payer, transfer_id)).transfer.trace_id
        assert stored == f"{trace_id:032x}", "a transfer records its own call's trace"
    # The sagas share later steps too; step 1's shared transaction is the first.
    holder = min(
        (
            s
            for t in trace_ids
            for s in named(in_trace(spans, t), "saga group commit")
            if attributes(s)["ledger.sagas"] == JOINED_CALLS
            and attributes(s)["ledger.shard"] == DEBIT_SHARD
        ),
        key=lambda s: s.start_time or 0,
    )
    joined = [
        s
        for t in trace_ids
        for s in named(in_trace(spans, t), "saga group commit (joined)")
        if [link.context.span_id for link in s.links] == [holder.context.span_id]
    ]
    assert len(joined) == JOINED_CALLS - 1, "one saga holds the shared step 1, the rest join it"
    assert len({s.context.trace_id for s in [holder, *joined]}) == JOINED_CALLS
    assert {
        attributes(s)["ledger.shard"]
        for s in shard_spans(children(in_trace(spans, holder.context.trace_id), holder))
    } == {DEBIT_SHARD}


async def test_saga_resumed_by_the_recovery_worker_continues_the_stored_trace(
    service: Service, spans: InMemorySpanExporter
) -> None:
    """A replica that crashed after step 1: the saga row holds the trace, no one drives it."""
    payer, payee = await funded_pair(service, DEBIT_SHARD, CREDIT_SHARD)
    transfer_id = uid("t")
    request = TransferRequest(
        id=transfer_id,
        debit=AccountKey(payer, "cash"),
        credit=AccountKey(payee, "sales"),
        amount_minor=410,
        currency="USD",
        action=TransferAction.POST,
    )
    shard = service.cluster.shard_for(payer)
    assert shard.name == DEBIT_SHARD
    with test_tracer.start_as_current_span("crashed replica's request") as caller:
        traceparent = current_traceparent()
        assert traceparent
        start = await SagaStore(shard).begin_transfer(
            request,
            peer_shard=CREDIT_SHARD,
            fence=service.cluster.fence(shard, {payer}),
            trace_context=traceparent,
            lease_owner="a-replica-that-crashed",
            lease_s=0,  # the lease has already run out: the recovery worker may claim it now
        )
    assert start.saga is not None
    trace_id = caller.get_span_context().trace_id
    caller_span_id = caller.get_span_context().span_id

    # The server's own recovery worker claims the saga and finishes it.
    await wait_until(
        lambda: has_spans(
            spans, trace_id, "saga resume", "saga step 2 credit", "saga step 3 finish"
        ),
        what="the recovery worker's spans in the stored trace",
    )
    record = await lookup(service, payer, transfer_id)
    assert record.result == pb.TRANSFER_RESULT_OK
    assert record.saga.state == pb.SAGA_STATE_COMPLETED
    assert record.transfer.trace_id == f"{trace_id:032x}"

    tree = in_trace(spans, trace_id)
    resume = one(tree, "saga resume")
    assert resume.parent is not None and resume.parent.span_id == caller_span_id
    attrs = attributes(resume)
    assert attrs["ledger.transfer_id"] == transfer_id
    assert attrs["ledger.merchant"] == pseudonymise(payer)
    assert attrs["ledger.saga.credit_shard"] == CREDIT_SHARD
    assert "ledger.saga.attempts" in attrs
    credit = one(children(tree, resume), "saga step 2 credit")
    finish = one(children(tree, resume), "saga step 3 finish")
    assert {attributes(s)["ledger.shard"] for s in shard_spans(children(tree, credit))} == {
        CREDIT_SHARD
    }
    assert {attributes(s)["ledger.shard"] for s in shard_spans(children(tree, finish))} == {
        DEBIT_SHARD
    }
    assert_absent_from_spans(tree, [payer, payee])


# --- errors and privacy -------------------------------------------------------------------


async def test_invalid_amount_marks_the_server_span_as_invalid_argument_error(
    service: Service, spans: InMemorySpanExporter
) -> None:
    payer, payee = await funded_pair(service, DEBIT_SHARD, DEBIT_SHARD)
    trace_id, _, traceparent = new_traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await create_transfer(
            service,
            transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), 0),
            traceparent=traceparent,
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    await wait_until(
        lambda: has_spans(spans, trace_id, CREATE_TRANSFERS_SPAN), what="the failed call's span"
    )
    tree = in_trace(spans, trace_id)
    server = one(tree, CREATE_TRANSFERS_SPAN)
    assert_server_span(server, code=GRPC_INVALID_ARGUMENT)
    assert server.status.status_code is StatusCode.ERROR
    assert (server.status.description or "").startswith("INVALID_ARGUMENT")
    assert not named(tree, "route"), "a refused call routes nothing"
    assert_absent_from_spans(tree, [payer, payee])


async def test_spans_carry_merchants_only_as_keyed_pseudonyms(
    service: Service, spans: InMemorySpanExporter
) -> None:
    payer, payee = await funded_pair(service, DEBIT_SHARD, CREDIT_SHARD)
    local_payee = service.merchant_on(DEBIT_SHARD, "local")
    await create_accounts(service.stub, account(local_payee, "sales"))
    trace_ids = []
    calls = [
        transfer(uid("t"), ref(payer, "cash"), ref(local_payee, "sales"), 5),
        transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), 6),
        # Refused by the credit shard (no such account): the saga compensates.
        transfer(uid("t"), ref(payer, "cash"), ref(payee, "missing"), 8),
        # Refused at the edge, with the merchant in the request.
        transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), -1),
    ]
    for item in calls:
        trace_id, _, traceparent = new_traceparent()
        trace_ids.append(trace_id)
        try:
            await create_transfer(service, item, traceparent=traceparent)
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    for trace_id in trace_ids:
        await wait_until(
            lambda t=trace_id: has_spans(spans, t, CREATE_TRANSFERS_SPAN),  # type: ignore[misc]
            what="every call's server span",
        )
    await wait_until(
        lambda: has_spans(spans, trace_ids[2], "saga step 3 finish"),
        what="the compensated saga's last step",
    )
    merchants = [payer, payee, local_payee]
    traced = [s for t in trace_ids for s in in_trace(spans, t)]
    assert_absent_from_spans(traced, merchants)
    # Background spans (sweeper, recovery claims) recorded meanwhile hold none either.
    assert_absent_from_spans(spans.get_finished_spans(), merchants)
    pseudonyms = {attributes(s).get("ledger.merchant") for s in traced} - {None}
    assert pseudonyms == {pseudonymise(payer)}
    assert pseudonymise(payer) != pseudonymise(payee)
    assert pseudonymise(payer).startswith("m_") and payer not in pseudonymise(payer)


async def test_card_numbers_in_metadata_or_errors_never_reach_spans(
    service: Service, spans: InMemorySpanExporter
) -> None:
    payer, payee = await funded_pair(service, DEBIT_SHARD, DEBIT_SHARD)
    tagged_trace, _, tagged_traceparent = new_traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as tagged:
        # Card numbers in a metadata value and key: refused, never stored.
        await create_transfer(
            service,
            transfer(
                uid("t"),
                ref(payer, "cash"),
                ref(payee, "sales"),
                3,
                metadata={"pan": CARD, CARD: "x"},
            ),
            traceparent=tagged_traceparent,
        )
    assert tagged.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    refused_trace, _, refused_traceparent = new_traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        # A key over 64 bytes: the error names it, its card number truncated.
        await create_transfer(
            service,
            transfer(
                uid("t"), ref(payer, "cash"), ref(payee, "sales"), 3, metadata={CARD + "x" * 60: ""}
            ),
            traceparent=refused_traceparent,
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert any("411111******1111" in field for field in field_violations(refused.value))
    for trace_id in (tagged_trace, refused_trace):
        await wait_until(
            lambda t=trace_id: has_spans(spans, t, CREATE_TRANSFERS_SPAN),  # type: ignore[misc]
            what="both calls' server spans",
        )
    traced = in_trace(spans, tagged_trace) + in_trace(spans, refused_trace)
    assert_absent_from_spans(traced, [CARD, CARD.replace(" ", "")])


async def test_an_idle_service_exports_no_background_spans(
    service: Service, spans: InMemorySpanExporter
) -> None:
    """Sweeps and saga claims that find nothing make no span (they run several times a
    second on every shard); the test waits for rounds of both, not for time."""
    sweeper, recovery = service.server.sweeper, service.server.recovery
    sweeps_before, claims_before = sweeper.rounds, recovery._rounds
    spans.clear()

    async def rounds_done() -> bool:
        return sweeper.rounds >= sweeps_before + 3 and recovery._rounds >= claims_before + 3

    await wait_until(rounds_done, what="three rounds of the sweeper and the recovery worker")
    # Every trace starts at a server span (or continues a stored one); none at a sweep.
    roots = [s for s in spans.get_finished_spans() if s.parent is None]
    assert [s.name for s in roots if s.kind is not SpanKind.SERVER] == []
    flagged = [s.name for s in spans.get_finished_spans() if "ledger.background" in attributes(s)]
    assert flagged == []


async def test_background_work_that_found_something_makes_a_span(
    service: Service, spans: InMemorySpanExporter
) -> None:
    payer, payee = await funded_pair(service, DEBIT_SHARD, DEBIT_SHARD)
    result = await create_transfer(
        service,
        transfer(
            uid("t"),
            ref(payer, "cash"),
            ref(payee, "sales"),
            4,
            action=pb.TRANSFER_ACTION_PENDING,
            timeout_ms=1,
        ),
    )
    assert result.result == pb.TRANSFER_RESULT_OK

    async def swept() -> bool:
        return any(s.name == "shard expire_due_pendings" for s in spans.get_finished_spans())

    await wait_until(swept, what="the sweep that released the hold to make a span")
    sweep = next(s for s in spans.get_finished_spans() if s.name == "shard expire_due_pendings")
    assert sweep.parent is None
    assert attributes(sweep)["ledger.background"] is True
    assert attributes(sweep)["ledger.idle"] is False
    assert attributes(sweep)["ledger.shard"] == DEBIT_SHARD


async def test_a_batch_of_only_cross_shard_transfers_has_a_route_span(
    service: Service, spans: InMemorySpanExporter
) -> None:
    payer, payee = await funded_pair(service, DEBIT_SHARD, CREDIT_SHARD)
    trace_id, _, traceparent = new_traceparent()
    result = await create_transfer(
        service,
        transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), 5),
        traceparent=traceparent,
    )
    assert result.result == pb.TRANSFER_RESULT_OK
    await wait_until(
        lambda: has_spans(spans, trace_id, CREATE_TRANSFERS_SPAN, "route", "saga step 3 finish"),
        what="the call's route and saga spans",
    )
    tree = in_trace(spans, trace_id)
    server, route = one(tree, CREATE_TRANSFERS_SPAN), one(tree, "route")
    assert route.parent is not None and route.parent.span_id == server.context.span_id
    assert is_descendant(tree, one(tree, "saga step 1 reserve"), route)


def test_pseudonyms_are_keyed_by_the_configured_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same key, same pseudonym in every replica; another key, another pseudonym."""

    def with_key(key: str) -> str:
        monkeypatch.setenv(pseudonym.PSEUDONYM_KEY_ENV, key)
        monkeypatch.setattr(pseudonym, "_key", None)  # restored after the test
        return pseudonymise("acme")

    expected = "m_" + hmac.new(b"k1", b"acme", hashlib.sha256).hexdigest()[:16]
    assert with_key("k1") == expected
    assert with_key("k1") == expected
    assert with_key("k2") != expected

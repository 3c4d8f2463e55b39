"""LedgerAdminService: the saga list and its repairs, for admins and on-call engineers."""

from __future__ import annotations

import re
from typing import Any

import grpc

from ledger.api import decode, encode
from ledger.api.auth import require_merchants, require_unrestricted
from ledger.api.limits_servicer import LimitsMethods
from ledger.api.servicer import statuses
from ledger.api.status import failed_precondition, invalid_argument, with_reason
from ledger.core.ledger import Ledger
from ledger.domain.sagas import SagaKey, SagaKind, SagaState
from ledger.sagas.runner import SagaResolutionRefused, SagaRunner
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def _key(request: pb.GetSagaRequest | pb.ResolveSagaRequest) -> SagaKey:
    v = decode.Violations()
    v.merchant_id("ref.merchant_id", request.ref.merchant_id)
    v.id("ref.transfer_id", request.ref.transfer_id)
    if int(request.ref.kind) not in {k.value for k in SagaKind}:
        v.add("ref.kind", "must be TRANSFER, SETTLE or EXPIRE")
    v.raise_if_any()
    require_merchants([("ref.merchant_id", request.ref.merchant_id)])
    return SagaKey(request.ref.merchant_id, request.ref.transfer_id, SagaKind(request.ref.kind))


def _not_found() -> Exception:
    return with_reason(grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND", "no such saga")


class LedgerAdminServicer(LimitsMethods, ledger_pb2_grpc.LedgerAdminServiceServicer):
    def __init__(self, runner: SagaRunner, ledger: Ledger) -> None:
        self.runner = runner
        self.ledger = ledger

    @statuses
    async def ListTransfersByTrace(
        self, request: pb.ListTransfersByTraceRequest, context: Context
    ) -> pb.LookupTransfersResponse:
        v = decode.Violations()
        if not _TRACE_ID.fullmatch(request.trace_id):
            v.add("trace_id", "must be 32 lower-case hex digits")
        page_size = v.page_size("page_size", request.page_size)
        v.raise_if_any()
        require_unrestricted()
        views = await self.ledger.transfers_by_trace(request.trace_id, limit=page_size)
        return pb.LookupTransfersResponse(transfers=[encode.transfer_view(v) for v in views])

    @statuses
    async def ListSagas(
        self, request: pb.ListSagasRequest, context: Context
    ) -> pb.ListSagasResponse:
        v = decode.Violations()
        page_size = v.page_size("page_size", request.page_size)
        if int(request.state) not in {0, *(s.value for s in SagaState)}:
            v.add("state", "must be a SagaState")
        v.raise_if_any()
        require_unrestricted()
        states = (
            [SagaState(request.state)] if request.state else [SagaState.RUNNING, SagaState.DEAD]
        )
        sagas, unreachable = await self.runner.list(states, limit=page_size)
        return pb.ListSagasResponse(
            sagas=[encode.saga(s) for s in sagas], unreachable_shards=unreachable
        )

    @statuses
    async def GetSaga(self, request: pb.GetSagaRequest, context: Context) -> pb.Saga:
        found = await self.runner.get(_key(request))
        if found is None:
            raise _not_found()
        return encode.saga(*found)

    @statuses
    async def RetrySaga(self, request: pb.GetSagaRequest, context: Context) -> pb.Saga:
        key = _key(request)
        saga = await self.runner.retry(key)
        if saga is None:
            if await self.runner.get(key) is None:
                raise _not_found()
            raise failed_precondition("SAGA_FINISHED", "only RUNNING or DEAD sagas can be retried")
        found = await self.runner.get(key)
        assert found is not None
        return encode.saga(*found)

    @statuses
    async def ResolveSaga(self, request: pb.ResolveSagaRequest, context: Context) -> pb.Saga:
        key = _key(request)
        if request.outcome not in (pb.SAGA_STATE_COMPLETED, pb.SAGA_STATE_COMPENSATED):
            raise invalid_argument([("outcome", "must be COMPLETED or COMPENSATED")])
        try:
            await self.runner.resolve(key, outcome=SagaState(request.outcome))
        except KeyError:
            raise _not_found() from None
        except SagaResolutionRefused as error:
            raise failed_precondition("RESOLUTION_NOT_SAFE", str(error)) from None
        found = await self.runner.get(key)
        assert found is not None
        return encode.saga(*found)

"""The size limits of a whole call: request bytes and request metadata.

Per-field limits are in test_api_validation.py; these are the transport's,
set on the server (ledger/limits.py) and documented at the top of the proto.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger import limits
from ledger.v1 import ledger_pb2 as pb
from tests.support import RPC_TIMEOUT_S, Service, ref, transfer, uid

# Under the request limit but well over gRPC's default of 4 MiB.
NEAR_LIMIT_BYTES = limits.request_bytes_max - 64 * 1024


def _padded_request(size_bytes: int) -> pb.CreateTransfersRequest:
    """One transfer whose metadata pads the message to about size_bytes (its content is
    refused by validation, which is fine: what matters is which layer answers)."""
    item = transfer(uid("t"), ref("m", "a"), ref("m", "b"), 1)
    item.metadata["pad"] = "x" * size_bytes
    return pb.CreateTransfersRequest(transfers=[item])


async def test_a_request_over_the_size_limit_is_refused_before_it_is_parsed(
    service: Service,
) -> None:
    request = _padded_request(limits.request_bytes_max + 1024)
    assert request.ByteSize() > limits.request_bytes_max
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await service.stub.CreateTransfers(request, timeout=RPC_TIMEOUT_S)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_request_under_the_size_limit_reaches_validation(service: Service) -> None:
    request = _padded_request(NEAR_LIMIT_BYTES)
    assert 4 * 1024 * 1024 < request.ByteSize() < limits.request_bytes_max
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await service.stub.CreateTransfers(request, timeout=RPC_TIMEOUT_S)
    # The service itself answered: the metadata value is over its per-field limit.
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata" in (refused.value.details() or "")


async def test_request_metadata_over_its_limit_is_refused_and_the_server_stays_up(
    service: Service,
) -> None:
    big = (("x-padding", "y" * (limits.request_metadata_bytes_max + 1024)),)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await service.stub.GetBalance(
            pb.GetBalanceRequest(account=ref("m", "a")), timeout=RPC_TIMEOUT_S, metadata=big
        )
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    health = health_pb2_grpc.HealthStub(service.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

"""The server's standard services, and the Python client's deadlines and retries."""

from __future__ import annotations

import asyncio
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ledger.api.server import LedgerServer
from ledger.client import ClientOptions, LedgerClient
from ledger.v1 import ledger_pb2 as pb
from tests.support import RPC_TIMEOUT_S, Service, account, ref, transfer, uid


async def test_health_service_reports_serving_for_the_ledger(service: Service) -> None:
    stub = health_pb2_grpc.HealthStub(service.channel)
    for name in ("", "ledger.v1.LedgerService"):
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT_S
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_ledger_service(service: Service) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    async for response in stub.ServerReflectionInfo(requests(), timeout=RPC_TIMEOUT_S):
        names += [s.name for s in response.list_services_response.service]
    assert "ledger.v1.LedgerService" in names
    assert "grpc.health.v1.Health" in names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_client_retries_until_the_server_is_up_and_moves_money_once(service: Service) -> None:
    """The client keeps the same ids across attempts, so a retry never doubles a transfer."""
    port = _free_port()
    options = ClientOptions(
        timeout_s=2.0, attempts_max=40, retry_delay_s_min=0.05, retry_delay_s_max=0.2
    )
    m = uid("m")
    item = transfer(uid("t"), ref(m, "a"), ref(m, "b"), 77)
    async with LedgerClient(f"127.0.0.1:{port}", options=options) as client:
        accounts_call = asyncio.create_task(
            client.create_accounts([account(m, "a"), account(m, "b")])
        )
        # Nothing listens yet: the client sees UNAVAILABLE and retries.
        done, _ = await asyncio.wait({accounts_call}, timeout=0.3)
        assert not done, "the call cannot succeed before the server exists"
        server = LedgerServer(service.cluster, listen=f"127.0.0.1:{port}")
        await server.start()
        try:
            created = await asyncio.wait_for(accounts_call, RPC_TIMEOUT_S)
            assert [r.result for r in created.results] == [pb.ACCOUNT_RESULT_OK] * 2
            first = await client.create_transfers([item])
            again = await client.create_transfers([item])
            assert first.results[0].result == pb.TRANSFER_RESULT_OK
            assert again.results[0].replayed
            balance = await client.get_balance(m, "b")
            assert balance.credits_posted == 77
        finally:
            await server.stop(grace_s=1.0)


async def test_client_does_not_retry_invalid_arguments(service: Service) -> None:
    options = ClientOptions(timeout_s=2.0, attempts_max=3)
    async with LedgerClient(service.target, options=options) as client:
        try:
            await client.create_transfers([transfer("", ref("m", "a"), ref("m", "b"), 1)])
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("an empty id must be refused")

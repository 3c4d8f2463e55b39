"""Callers that send headers but never a request cannot stop the service (issue 23, item 1).

The attack from the issue: with LEDGER_CONCURRENT_RPCS_MAX=32, 64 calls on one
channel to GetBalance with a request stream that never yields and no token.
Before, they held gRPC's call limit until cancelled, so the health Check and a
valid GetBalance got RESOURCE_EXHAUSTED. Now a call is authenticated from its
headers before its body is read (a bad one is refused at once), a good one must
deliver its request within the receive deadline, and health holds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger import limits
from ledger.api.auth import Scope, TokenTable
from ledger.api.server import LedgerServer
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.cluster import Cluster
from ledger.routing.config import load_config
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.auth_support import TokenSpec, bearer, shard_config, write_token_file
from tests.support import RPC_TIMEOUT_S, account, ref, uid, wait_until

CONCURRENT_RPCS_MAX = 32
ATTACK_CALLS = 64
GET_BALANCE = "/ledger.v1.LedgerService/GetBalance"
# Short, so a test sees an idle authenticated call cut off without waiting long.
RECEIVE_TIMEOUT_S = 1.0
# Refused calls must end promptly, not when the attacker gives up.
REFUSED_WITHIN_S = 5.0
CALLER_CALLS_MAX = limits.caller_calls_max(CONCURRENT_RPCS_MAX)
REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def serving(
    pg_server: EmbeddedPostgres, directory: Path, *, receive_timeout_s: float
) -> AsyncIterator[tuple[LedgerServer, dict[str, str]]]:
    tokens = write_token_file(
        directory / "tokens.toml",
        {
            "svc": TokenSpec((Scope.READ, Scope.WRITE)),
            "other": TokenSpec((Scope.READ, Scope.WRITE)),
        },
    )
    config = shard_config(pg_server, directory)
    cluster = Cluster(load_config(config), config_path=config)
    await cluster.open()
    server = LedgerServer(
        cluster,
        listen="127.0.0.1:0",
        concurrent_rpcs_max=CONCURRENT_RPCS_MAX,
        tokens=TokenTable.load(directory / "tokens.toml"),
        request_receive_timeout_s=receive_timeout_s,
    )
    await server.start()
    try:
        yield server, tokens
    finally:
        await server.stop(grace_s=0)
        await cluster.close()


@pytest.fixture
async def exposed(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> AsyncIterator[tuple[LedgerServer, dict[str, str]]]:
    async with serving(pg_server, tmp_path, receive_timeout_s=RECEIVE_TIMEOUT_S) as running:
        yield running


async def _never(release: asyncio.Event) -> AsyncIterator[bytes]:
    await release.wait()
    yield b""


def open_silent_calls(
    channel: grpc.aio.Channel, count: int, release: asyncio.Event, metadata: Any = ()
) -> list[grpc.aio.StreamUnaryCall[bytes, bytes]]:
    """Calls that send their headers and then nothing, as the attacker's."""
    call = channel.stream_unary(GET_BALANCE, request_serializer=None, response_deserializer=None)
    return [call(_never(release), metadata=metadata) for _ in range(count)]


async def outcome(call: grpc.aio.StreamUnaryCall[bytes, bytes]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def health_and_a_valid_call(target: str, token: str) -> None:
    """On a channel of their own, as a load balancer and a calling service would."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        merchant = uid("m")
        await create_accounts_with(stub, token, merchant)
        got = await stub.GetBalance(
            pb.GetBalanceRequest(account=ref(merchant, "cash")),
            timeout=RPC_TIMEOUT_S,
            metadata=bearer(token),
        )
        assert got.currency == "USD" and got.debits_posted == 0


async def create_accounts_with(
    stub: ledger_pb2_grpc.LedgerServiceStub, token: str, merchant: str
) -> None:
    answer = await stub.CreateAccounts(
        pb.CreateAccountsRequest(accounts=[account(merchant, "cash")]),
        timeout=RPC_TIMEOUT_S,
        metadata=bearer(token),
    )
    assert [r.result for r in answer.results] == [pb.ACCOUNT_RESULT_OK]


async def test_silent_unauthenticated_calls_do_not_stop_health_or_valid_callers(
    exposed: tuple[LedgerServer, dict[str, str]],
) -> None:
    server, tokens = exposed
    target = f"127.0.0.1:{server.port}"
    release = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as attacker:
        calls = open_silent_calls(attacker, ATTACK_CALLS, release)
        try:
            await health_and_a_valid_call(target, tokens["svc"])
            started = time.monotonic()
            codes = await asyncio.wait_for(
                asyncio.gather(*(outcome(c) for c in calls)), REFUSED_WITHIN_S
            )
            assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
            assert time.monotonic() - started < REFUSED_WITHIN_S
        finally:
            release.set()
            for c in calls:
                c.cancel()


async def test_silent_calls_with_a_bad_token_are_refused_before_their_body(
    exposed: tuple[LedgerServer, dict[str, str]],
) -> None:
    server, tokens = exposed
    target = f"127.0.0.1:{server.port}"
    release = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as attacker:
        calls = open_silent_calls(attacker, ATTACK_CALLS, release, bearer("lt_" + "x" * 43))
        try:
            codes = await asyncio.wait_for(
                asyncio.gather(*(outcome(c) for c in calls)), REFUSED_WITHIN_S
            )
            assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
            await health_and_a_valid_call(target, tokens["svc"])
        finally:
            release.set()


async def test_silent_authenticated_calls_hold_no_call_slot_and_end_at_the_receive_deadline(
    exposed: tuple[LedgerServer, dict[str, str]],
) -> None:
    """Even a caller with a valid token cannot park calls: the concurrency limit
    counts only calls whose request arrived, its own share is bounded, and the
    calls end at the receive deadline."""
    server, tokens = exposed
    target = f"127.0.0.1:{server.port}"
    release = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as idle:
        calls = open_silent_calls(idle, ATTACK_CALLS, release, bearer(tokens["svc"]))
        try:
            await health_and_a_valid_call(target, tokens["other"])
            codes = await asyncio.wait_for(
                asyncio.gather(*(outcome(c) for c in calls)), RECEIVE_TIMEOUT_S + REFUSED_WITHIN_S
            )
            assert set(codes) <= {
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            }
            assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= CALLER_CALLS_MAX
        finally:
            release.set()
    assert server.admission.calls_in_progress("svc") == 0


async def test_one_token_cannot_take_every_call_slot_from_the_others(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    async with serving(pg_server, tmp_path, receive_timeout_s=RPC_TIMEOUT_S) as (server, tokens):
        target = f"127.0.0.1:{server.port}"
        release = asyncio.Event()
        async with grpc.aio.insecure_channel(target) as greedy:
            calls = open_silent_calls(greedy, CALLER_CALLS_MAX, release, bearer(tokens["svc"]))
            try:

                async def all_held() -> bool:
                    return server.admission.calls_in_progress("svc") == CALLER_CALLS_MAX

                await wait_until(all_held, what="the greedy caller's calls held")
                (one_more,) = open_silent_calls(greedy, 1, release, bearer(tokens["svc"]))
                assert await asyncio.wait_for(outcome(one_more), REFUSED_WITHIN_S) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED
                )
                await health_and_a_valid_call(target, tokens["other"])
            finally:
                release.set()
                for c in calls:
                    c.cancel()


def test_one_connection_may_not_open_more_streams_than_the_ledger_admits() -> None:
    assert limits.streams_per_connection_max <= limits.concurrent_rpcs_max
    assert limits.request_receive_timeout_s <= limits.shard_command_timeout_s


# A slow reader: a client that makes calls with large answers and then stops reading
# (SIGSTOPped: its gRPC threads stop too, so its socket fills and the server's sends
# block on flow control). Accounts with metadata make each answer about 0.5 MB.
SLOW_READER_ACCOUNTS = 200
SLOW_READER_METADATA_VALUE = "v" * 256
SLOW_READER_CALLS = 16
_SLOW_READER = r"""
import asyncio, sys
import grpc
from ledger.v1 import ledger_pb2 as pb, ledger_pb2_grpc

async def main(target, token, merchant, accounts, calls):
    channel = grpc.aio.insecure_channel(target)
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    refs = [pb.AccountRef(merchant_id=merchant, account_id=f"a{i}") for i in range(accounts)]
    pending = [
        asyncio.ensure_future(stub.LookupAccounts(
            pb.LookupAccountsRequest(refs=refs), metadata=(("authorization", f"Bearer {token}"),)
        ))
        for _ in range(calls)
    ]
    # Once the server answers, stop reading (the test SIGSTOPs this process).
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    print("sent", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
"""


async def test_slow_readers_hold_no_call_slot_and_stop_no_one(
    exposed: tuple[LedgerServer, dict[str, str]],
) -> None:
    """Answers a client does not read wait in gRPC's flow control, not in the call
    limit: once the handlers return, their slots are free for everyone else."""
    server, tokens = exposed
    target = f"127.0.0.1:{server.port}"
    merchant = uid("slow")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        metadata = {f"k{i}": SLOW_READER_METADATA_VALUE for i in range(limits.metadata_keys_max)}
        created = await stub.CreateAccounts(
            pb.CreateAccountsRequest(
                accounts=[
                    account(merchant, f"a{i}", metadata=metadata)
                    for i in range(SLOW_READER_ACCOUNTS)
                ]
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=bearer(tokens["svc"]),
        )
        assert {r.result for r in created.results} == {pb.ACCOUNT_RESULT_OK}
    reader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SLOW_READER,
        target,
        tokens["svc"],
        merchant,
        str(SLOW_READER_ACCOUNTS),
        str(SLOW_READER_CALLS),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert reader.stdout is not None
        line = await asyncio.wait_for(reader.stdout.readline(), RPC_TIMEOUT_S)
        assert line.strip() == b"sent"
        reader.send_signal(signal.SIGSTOP)

        async def served() -> bool:
            # Every call the reader made was answered by its handler (some answers
            # may still sit unsent), and none holds a slot any more.
            return server.admission.calls_in_progress("svc") == 0

        await wait_until(served, what="the slow reader's calls to leave their slots")
        await health_and_a_valid_call(target, tokens["other"])
        await health_and_a_valid_call(target, tokens["svc"])
    finally:
        reader.kill()
        await reader.wait()

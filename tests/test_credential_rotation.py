"""Rotating a caller's bearer token without downtime (docs/runbook.md).

The token file holds hashes; the service reads it at start. The runbook's
procedure, run against a real `ledger serve` process: add the new token's entry
beside the old one and restart (replicas one by one): both tokens work; move the
caller to the new token; remove the old entry and restart: the old token is
refused, the new one keeps working, and the data written under either is there.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from ledger.api.auth import Scope, new_token, token_entry
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.v1 import ledger_pb2 as pb
from tests.auth_support import bearer, child_env, shard_config
from tests.process_cluster import ServiceProcess
from tests.support import RPC_TIMEOUT_S, account, uid

SCOPES = (Scope.READ, Scope.WRITE)


def _write_tokens(path: Path, tokens: dict[str, str]) -> None:
    path.write_text("\n".join(token_entry(name, t, SCOPES, []) for name, t in tokens.items()))


async def _create(service: ServiceProcess, token: str, merchant: str, account_id: str) -> int:
    """CreateAccounts with the token; the status code's value (0 is OK)."""
    assert service.stub is not None
    try:
        response = await service.stub.CreateAccounts(
            pb.CreateAccountsRequest(accounts=[account(merchant, account_id)]),
            timeout=RPC_TIMEOUT_S,
            metadata=bearer(token),
        )
    except grpc.aio.AioRpcError as error:
        return int(error.code().value[0])
    assert response.results[0].result == pb.ACCOUNT_RESULT_OK
    return 0


async def test_a_token_is_rotated_by_adding_the_new_entry_then_removing_the_old(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens.toml"
    old, new = new_token(), new_token()
    merchant = uid("m")
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED.value[0]
    service = ServiceProcess(
        shard_config(pg_server, tmp_path),
        tmp_path / "service.log",
        env=child_env({"LEDGER_AUTH_FILE": str(token_file), "LEDGER_METRICS_LISTEN": "off"}),
    )
    try:
        _write_tokens(token_file, {"payments": old})
        await service.start()
        assert await _create(service, old, merchant, "a1") == 0
        assert await _create(service, new, merchant, "a2") == unauthenticated

        # Step 1: both entries, restart: the caller may switch at any time.
        _write_tokens(token_file, {"payments": old, "payments-next": new})
        await service.stop()
        await service.start()
        assert await _create(service, old, merchant, "a3") == 0
        assert await _create(service, new, merchant, "a4") == 0

        # Step 2: the old entry removed, restart: the old token is refused.
        _write_tokens(token_file, {"payments-next": new})
        await service.stop()
        await service.start()
        assert await _create(service, old, merchant, "a5") == unauthenticated
        assert await _create(service, new, merchant, "a6") == 0

        assert service.stub is not None
        listed = await service.stub.ListAccounts(
            pb.ListAccountsRequest(merchant_id=merchant),
            timeout=RPC_TIMEOUT_S,
            metadata=bearer(new),
        )
        assert [a.ref.account_id for a in listed.accounts] == ["a1", "a3", "a4", "a6"]
        # The token file never holds a token, only its hash.
        assert old not in token_file.read_text() and new not in token_file.read_text()
    finally:
        await service.stop()

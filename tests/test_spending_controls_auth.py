"""Who may change an account's limits, and who is recorded as having changed them:
the admin scope only, and the token's name in the limits history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from ledger.api.auth import Scope, TokenTable
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.auth_support import (
    TokenSpec,
    bearer,
    shard_config,
    start_secured_service,
    write_token_file,
)
from tests.support import RPC_TIMEOUT_S, Service, account, ref, uid


@dataclass
class Tokened:
    service: Service
    tokens: dict[str, str]


@pytest.fixture(scope="module")
async def tokened(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Tokened]:
    directory = tmp_path_factory.mktemp("limits-auth")
    config_path = shard_config(pg_server, directory)
    token_file = directory / "tokens.toml"
    tokens = write_token_file(
        token_file,
        {
            "risk-desk": TokenSpec((Scope.READ, Scope.WRITE, Scope.ADMIN)),
            "merchant-service": TokenSpec((Scope.READ, Scope.WRITE)),
        },
    )
    service = await start_secured_service(config_path, tokens=TokenTable.load(token_file))
    try:
        yield Tokened(service, tokens)
    finally:
        await service.stop()


def _request(merchant_id: str) -> pb.SetAccountLimitsRequest:
    return pb.SetAccountLimitsRequest(
        account=ref(merchant_id, "wallet"),
        change_id=uid("c"),
        reason="chargebacks",
        limits=pb.AccountLimits(
            velocity_rules=[
                pb.VelocityRule(
                    rule_id="daily",
                    direction=pb.DIRECTION_DEBIT,
                    metric=pb.VELOCITY_METRIC_AMOUNT,
                    window_s=86_400,
                    limit=1000,
                )
            ]
        ),
    )


async def test_limits_changes_need_the_admin_scope_and_record_the_tokens_name(
    tokened: Tokened,
) -> None:
    service, tokens = tokened.service, tokened.tokens
    m = uid("m")
    await service.stub.CreateAccounts(
        pb.CreateAccountsRequest(accounts=[account(m, "wallet")]),
        timeout=RPC_TIMEOUT_S,
        metadata=bearer(tokens["merchant-service"]),
    )
    admin = ledger_pb2_grpc.LedgerAdminServiceStub(service.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.SetAccountLimits(
            _request(m), timeout=RPC_TIMEOUT_S, metadata=bearer(tokens["merchant-service"])
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    changed = await admin.SetAccountLimits(
        _request(m), timeout=RPC_TIMEOUT_S, metadata=bearer(tokens["risk-desk"])
    )
    assert changed.change.changed_by == "risk-desk"
    got = await admin.GetAccountLimits(
        pb.GetAccountLimitsRequest(account=ref(m, "wallet")),
        timeout=RPC_TIMEOUT_S,
        metadata=bearer(tokens["risk-desk"]),
    )
    assert [(c.changed_by, c.reason) for c in got.history] == [("risk-desk", "chargebacks")]

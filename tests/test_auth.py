"""Bearer tokens over a real gRPC channel: authentication, scopes, merchant restriction.

The module's service runs in this process with a token table written by
token_entry() and read back by TokenTable.load(), on fresh shard databases of
the session's PostgreSQL server. The CLI tests run `python -m ledger.cli` as
child processes, against a `ledger serve` process where a service is needed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ledger.api.auth import (
    METHOD_SCOPES,
    TOKENS_MAX,
    Principal,
    Scope,
    TokenFileError,
    TokenTable,
    hash_token,
    new_token,
    token_entry,
)
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.auth_support import (
    TokenSpec,
    bearer,
    child_env,
    error_info,
    merchant_on,
    raw_call,
    raw_call_refused,
    run_cli,
    shard_config,
    start_secured_service,
    write_token_file,
)
from tests.process_cluster import ServiceProcess
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    field_violations,
    ref,
    transfer,
    uid,
)

READ, WRITE, ADMIN = Scope.READ, Scope.WRITE, Scope.ADMIN
SERVICE = "/ledger.v1.LedgerService/"
ADMIN_SERVICE = "/ledger.v1.LedgerAdminService/"
# The scope each method needs, written out here so a change to the table is a visible decision.
EXPECTED_SCOPES = {
    SERVICE + "CreateAccounts": WRITE,
    SERVICE + "LookupAccounts": READ,
    SERVICE + "ListAccounts": READ,
    SERVICE + "SetAccountsClosed": WRITE,
    SERVICE + "CreateTransfers": WRITE,
    SERVICE + "LookupTransfers": READ,
    SERVICE + "PostJournal": WRITE,
    SERVICE + "GetBalance": READ,
    SERVICE + "ListEntries": READ,
    SERVICE + "SubscribeEvents": READ,
    SERVICE + "SubscribeEventBatches": READ,
    SERVICE + "AckEvents": READ,
    ADMIN_SERVICE + "ListSagas": ADMIN,
    ADMIN_SERVICE + "GetSaga": ADMIN,
    ADMIN_SERVICE + "RetrySaga": ADMIN,
    ADMIN_SERVICE + "ResolveSaga": ADMIN,
    ADMIN_SERVICE + "ListTransfersByTrace": ADMIN,
    # Spending controls (issue 21): a merchant's own service cannot raise its limits.
    ADMIN_SERVICE + "SetAccountLimits": ADMIN,
    ADMIN_SERVICE + "GetAccountLimits": ADMIN,
    ADMIN_SERVICE + "ListMonitorCrossings": ADMIN,
}
# The unary methods, which the tests below call raw; SubscribeEvents streams (its
# authorization is tested in tests/test_events*.py).
STREAMING = {SERVICE + "SubscribeEvents", SERVICE + "SubscribeEventBatches"}
METHODS = sorted(m for m in EXPECTED_SCOPES if m not in STREAMING)
# The token with every scope but the key, and the token with only the key.
LACKING = {READ: "write_admin", WRITE: "read_admin", ADMIN: "read_write"}
ONLY = {READ: "read", WRITE: "write", ADMIN: "admin"}
# Codes that mean a call did not get past authentication.
AUTH_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
DEBIT = pb.DIRECTION_DEBIT
CREDIT = pb.DIRECTION_CREDIT


@dataclass
class Secured:
    """The module's service with tokens, its tokens by name, and three merchants on one shard."""

    service: Service
    tokens: dict[str, str]
    token_file: Path
    # only_a is limited to a; a_and_c to a and c; b is outside both.
    a: str
    b: str
    c: str

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.service.channel

    @property
    def stub(self) -> ledger_pb2_grpc.LedgerServiceAsyncStub:
        return ledger_pb2_grpc.LedgerServiceStub(self.channel)

    @property
    def admin(self) -> ledger_pb2_grpc.LedgerAdminServiceAsyncStub:
        return ledger_pb2_grpc.LedgerAdminServiceStub(self.channel)

    def auth(self, name: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.tokens[name])


@pytest.fixture(scope="module")
async def secured(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Secured]:
    directory = tmp_path_factory.mktemp("auth")
    config_path = shard_config(pg_server, directory)
    # On one shard, so a transfer between them would succeed but for the token.
    a, b, c = (merchant_on(config_path, "shard-a", prefix) for prefix in ("ma", "mb", "mc"))
    token_file = directory / "tokens.toml"
    tokens = write_token_file(
        token_file,
        {
            "read": TokenSpec((READ,)),
            "write": TokenSpec((WRITE,)),
            "admin": TokenSpec((ADMIN,)),
            "read_write": TokenSpec((READ, WRITE)),
            "read_admin": TokenSpec((READ, ADMIN)),
            "write_admin": TokenSpec((WRITE, ADMIN)),
            "all": TokenSpec((READ, WRITE, ADMIN)),
            "only_a": TokenSpec((READ, WRITE, ADMIN), (a,)),
            "a_and_c": TokenSpec((READ, WRITE), (a, c)),
        },
    )
    service = await start_secured_service(config_path, tokens=TokenTable.load(token_file))
    try:
        yield Secured(service, tokens, token_file, a, b, c)
    finally:
        await service.stop()


async def create_accounts(s: Secured, token: str, *accounts: pb.Account) -> None:
    response = await s.stub.CreateAccounts(
        pb.CreateAccountsRequest(accounts=accounts), timeout=RPC_TIMEOUT_S, metadata=s.auth(token)
    )
    assert [r.result for r in response.results] == [pb.ACCOUNT_RESULT_OK] * len(accounts)


async def create_transfers(
    s: Secured, token: str, *items: pb.Transfer
) -> list[pb.CreateTransferResult]:
    response = await s.stub.CreateTransfers(
        pb.CreateTransfersRequest(transfers=items), timeout=RPC_TIMEOUT_S, metadata=s.auth(token)
    )
    return list(response.results)


async def balances(s: Secured, *refs: pb.AccountRef) -> list[tuple[int, int, int, int]]:
    """(debits_posted, credits_posted, debits_pending, credits_pending), read by `all`."""
    response = await s.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=refs), timeout=RPC_TIMEOUT_S, metadata=s.auth("all")
    )
    assert len(response.accounts) == len(refs)
    return [
        (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)
        for a in response.accounts
    ]


async def transfers_found(s: Secured, merchant_id: str, *ids: str) -> list[str]:
    response = await s.stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=merchant_id, transfer_id=i) for i in ids]
        ),
        timeout=RPC_TIMEOUT_S,
        metadata=s.auth("all"),
    )
    return [t.transfer.id for t in response.transfers]


async def refused(s: Secured, method: str, request: Message, token: str) -> grpc.aio.AioRpcError:
    return await raw_call_refused(s.channel, method, request.SerializeToString(), s.auth(token))


def assert_refusal(
    error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str, **metadata: str
) -> None:
    assert error.code() == code, (error.code(), error.details())
    info = error_info(error)
    assert info.reason == reason
    assert info.domain == "ledger.v1"
    for key, value in metadata.items():
        assert info.metadata[key] == value, dict(info.metadata)


def assert_merchant_refused(error: grpc.aio.AioRpcError, field: str) -> None:
    assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "MERCHANT_NOT_PERMITTED", field=field)


# --- the method table -----------------------------------------------------------------


def test_every_ledger_method_needs_the_expected_scope() -> None:
    """A new method (or a changed scope) must show up here, not silently pass."""
    assert METHOD_SCOPES == EXPECTED_SCOPES


# --- authentication -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
async def test_every_method_refuses_a_call_without_a_token(secured: Secured, method: str) -> None:
    error = await raw_call_refused(secured.channel, method, b"")
    assert_refusal(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


@pytest.mark.parametrize("method", METHODS)
async def test_every_method_refuses_an_unknown_token(secured: Secured, method: str) -> None:
    error = await raw_call_refused(secured.channel, method, b"", bearer(new_token()))
    assert_refusal(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


# "{token}" stands for the valid `all` token.
MALFORMED_HEADERS = [
    "Basic x",
    "Bearer",
    "Bearer ",
    "Basic {token}",
    "{token}",
    "Bearer{token}",
    "Bearer {token}x",
    "Bearer x{token}",
    "Bearer {token_prefix}",
    "Bearer " + "a" * 300,
]


@pytest.mark.parametrize("header", MALFORMED_HEADERS)
async def test_a_malformed_authorization_header_is_unauthenticated(
    secured: Secured, header: str
) -> None:
    token = secured.tokens["all"]
    value = header.format(token=token, token_prefix=token[:-1])
    request = pb.GetBalanceRequest(account=ref(secured.a, uid("missing")))
    error = await raw_call_refused(
        secured.channel,
        SERVICE + "GetBalance",
        request.SerializeToString(),
        (("authorization", value),),
    )
    assert_refusal(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert token not in (error.details() or "")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_a_valid_bearer_token_is_accepted_whatever_the_scheme_case(
    secured: Secured, scheme: str
) -> None:
    """The control for the refusals above: the same call with a proper header passes auth."""
    request = pb.GetBalanceRequest(account=ref(secured.a, uid("missing")))
    error = await raw_call_refused(
        secured.channel,
        SERVICE + "GetBalance",
        request.SerializeToString(),
        (("authorization", f"{scheme} {secured.tokens['all']}"),),
    )
    # Past authentication, the servicer looked the account up.
    assert_refusal(error, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_health_check_needs_no_token(secured: Secured) -> None:
    stub = health_pb2_grpc.HealthStub(secured.channel)
    for name in ("", "ledger.v1.LedgerService"):
        for metadata in ((), bearer(new_token())):
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=name),
                timeout=RPC_TIMEOUT_S,
                metadata=metadata,
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_no_token(secured: Secured) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(secured.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="ledger.v1.LedgerAdminService"
        )

    names: list[str] = []
    descriptors: list[bytes] = []
    async for response in stub.ServerReflectionInfo(requests(), timeout=RPC_TIMEOUT_S):
        assert not response.HasField("error_response"), response.error_response
        names += [s.name for s in response.list_services_response.service]
        descriptors += response.file_descriptor_response.file_descriptor_proto
    assert {"ledger.v1.LedgerService", "ledger.v1.LedgerAdminService"} <= set(names)
    assert descriptors, "the admin service's file descriptor"


# --- scopes ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
async def test_a_token_without_the_methods_scope_is_denied(secured: Secured, method: str) -> None:
    scope = EXPECTED_SCOPES[method]
    error = await raw_call_refused(secured.channel, method, b"", secured.auth(LACKING[scope]))
    assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", scope=scope.value)


@pytest.mark.parametrize("method", METHODS)
async def test_a_token_with_only_the_methods_scope_gets_past_auth(
    secured: Secured, method: str
) -> None:
    """An empty request: the servicer answers (often INVALID_ARGUMENT), auth does not refuse."""
    scope = EXPECTED_SCOPES[method]
    try:
        await raw_call(secured.channel, method, b"", secured.auth(ONLY[scope]))
    except grpc.aio.AioRpcError as error:
        assert error.code() not in AUTH_REFUSALS, (error.code(), error.details())


async def test_a_read_token_reads_but_cannot_write(secured: Secured) -> None:
    m = secured.a
    cash, wallet = ref(m, uid("cash")), ref(m, uid("wallet"))
    await create_accounts(
        secured, "all", pb.Account(ref=cash, currency="USD"), pb.Account(ref=wallet, currency="USD")
    )
    first = uid("t")
    results = await create_transfers(secured, "all", transfer(first, cash, wallet, 40))
    assert results[0].result == pb.TRANSFER_RESULT_OK
    read = secured.auth("read")

    looked_up = await secured.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[wallet]), timeout=RPC_TIMEOUT_S, metadata=read
    )
    assert [a.credits_posted for a in looked_up.accounts] == [40]
    listed = await secured.stub.ListAccounts(
        pb.ListAccountsRequest(merchant_id=m, page_size=1000), timeout=RPC_TIMEOUT_S, metadata=read
    )
    assert {cash.account_id, wallet.account_id} <= {a.ref.account_id for a in listed.accounts}
    got = await secured.stub.GetBalance(
        pb.GetBalanceRequest(account=wallet), timeout=RPC_TIMEOUT_S, metadata=read
    )
    assert got.credits_posted == 40
    found = await secured.stub.LookupTransfers(
        pb.LookupTransfersRequest(refs=[pb.TransferRef(merchant_id=m, transfer_id=first)]),
        timeout=RPC_TIMEOUT_S,
        metadata=read,
    )
    assert [t.transfer.id for t in found.transfers] == [first]
    entries = await secured.stub.ListEntries(
        pb.ListEntriesRequest(account=wallet), timeout=RPC_TIMEOUT_S, metadata=read
    )
    assert len(entries.entries) == 1

    second = uid("t")
    error = await refused(
        secured,
        SERVICE + "CreateTransfers",
        pb.CreateTransfersRequest(transfers=[transfer(second, cash, wallet, 5)]),
        "read",
    )
    assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", scope="write")
    assert await transfers_found(secured, m, second) == []
    assert await balances(secured, cash, wallet) == [(40, 0, 0, 0), (0, 40, 0, 0)]
    other = ref(m, uid("other"))
    error = await refused(
        secured,
        SERVICE + "CreateAccounts",
        pb.CreateAccountsRequest(accounts=[pb.Account(ref=other, currency="USD")]),
        "read",
    )
    assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", scope="write")
    missing = await secured.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[other]), timeout=RPC_TIMEOUT_S, metadata=read
    )
    assert list(missing.accounts) == []


async def test_a_write_token_writes_but_cannot_read(secured: Secured) -> None:
    m = secured.a
    cash, wallet = ref(m, uid("cash")), ref(m, uid("wallet"))
    await create_accounts(
        secured,
        "write",
        pb.Account(ref=cash, currency="USD"),
        pb.Account(ref=wallet, currency="USD"),
    )
    t = uid("t")
    results = await create_transfers(secured, "write", transfer(t, cash, wallet, 12))
    assert results[0].result == pb.TRANSFER_RESULT_OK
    assert await balances(secured, wallet) == [(0, 12, 0, 0)]

    error = await refused(
        secured, SERVICE + "GetBalance", pb.GetBalanceRequest(account=wallet), "write"
    )
    assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", scope="read")
    error = await refused(
        secured,
        SERVICE + "LookupTransfers",
        pb.LookupTransfersRequest(refs=[pb.TransferRef(merchant_id=m, transfer_id=t)]),
        "write",
    )
    assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", scope="read")


async def test_admin_methods_need_the_admin_scope(secured: Secured) -> None:
    missing_saga = pb.GetSagaRequest(
        ref=pb.SagaRef(merchant_id=secured.a, transfer_id=uid("t"), kind=pb.SAGA_KIND_TRANSFER)
    )
    for method, request in (
        ("ListSagas", pb.ListSagasRequest()),
        ("GetSaga", missing_saga),
        ("ListTransfersByTrace", pb.ListTransfersByTraceRequest(trace_id="0" * 32)),
    ):
        error = await refused(secured, ADMIN_SERVICE + method, request, "read_write")
        assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", scope="admin")

    admin = secured.auth("admin")
    listed = await secured.admin.ListSagas(
        pb.ListSagasRequest(), timeout=RPC_TIMEOUT_S, metadata=admin
    )
    assert list(listed.unreachable_shards) == []
    by_trace = await secured.admin.ListTransfersByTrace(
        pb.ListTransfersByTraceRequest(trace_id="0" * 32), timeout=RPC_TIMEOUT_S, metadata=admin
    )
    assert list(by_trace.transfers) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured.admin.GetSaga(missing_saga, timeout=RPC_TIMEOUT_S, metadata=admin)
    assert_refusal(caught.value, grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND")


# --- merchant restriction -------------------------------------------------------------


async def test_a_merchant_token_works_within_its_merchant(secured: Secured) -> None:
    m = secured.a
    only_a = secured.auth("only_a")
    cash, wallet, fees = ref(m, uid("cash")), ref(m, uid("wallet")), ref(m, uid("fees"))
    await create_accounts(
        secured,
        "only_a",
        *(pb.Account(ref=r, currency="USD") for r in (cash, wallet, fees)),
    )
    t = uid("t")
    results = await create_transfers(secured, "only_a", transfer(t, cash, wallet, 30))
    assert results[0].result == pb.TRANSFER_RESULT_OK
    journal = await secured.stub.PostJournal(
        pb.PostJournalRequest(
            journal_id=uid("j"),
            merchant_id=m,
            postings=[
                pb.Posting(account=wallet, amount_minor=7, currency="USD", direction=DEBIT),
                pb.Posting(account=fees, amount_minor=7, currency="USD", direction=CREDIT),
            ],
        ),
        timeout=RPC_TIMEOUT_S,
        metadata=only_a,
    )
    assert journal.result == pb.TRANSFER_RESULT_OK

    got = await secured.stub.GetBalance(
        pb.GetBalanceRequest(account=wallet), timeout=RPC_TIMEOUT_S, metadata=only_a
    )
    assert (got.debits_posted, got.credits_posted) == (7, 30)
    looked_up = await secured.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[cash, fees]), timeout=RPC_TIMEOUT_S, metadata=only_a
    )
    assert [a.debits_posted - a.credits_posted for a in looked_up.accounts] == [30, -7]
    listed = await secured.stub.ListAccounts(
        pb.ListAccountsRequest(merchant_id=m, page_size=1000),
        timeout=RPC_TIMEOUT_S,
        metadata=only_a,
    )
    assert {cash.account_id, wallet.account_id, fees.account_id} <= {
        a.ref.account_id for a in listed.accounts
    }
    found = await secured.stub.LookupTransfers(
        pb.LookupTransfersRequest(refs=[pb.TransferRef(merchant_id=m, transfer_id=t)]),
        timeout=RPC_TIMEOUT_S,
        metadata=only_a,
    )
    assert [x.transfer.id for x in found.transfers] == [t]
    entries = await secured.stub.ListEntries(
        pb.ListEntriesRequest(account=wallet), timeout=RPC_TIMEOUT_S, metadata=only_a
    )
    assert len(entries.entries) == 2
    closed = await secured.stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=[fees], closed=True),
        timeout=RPC_TIMEOUT_S,
        metadata=only_a,
    )
    assert list(closed.found) == [True]
    # Its own merchant's saga: past auth, there is just no such saga.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured.admin.GetSaga(
            pb.GetSagaRequest(
                ref=pb.SagaRef(merchant_id=m, transfer_id=t, kind=pb.SAGA_KIND_TRANSFER)
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=only_a,
        )
    assert_refusal(caught.value, grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND")


async def test_a_merchant_token_cannot_credit_another_merchant_and_nothing_is_written(
    secured: Secured,
) -> None:
    cash, other = ref(secured.a, uid("cash")), ref(secured.b, uid("other"))
    await create_accounts(
        secured, "all", pb.Account(ref=cash, currency="USD"), pb.Account(ref=other, currency="USD")
    )
    t = uid("t")
    item = transfer(t, cash, other, 25)
    error = await refused(
        secured, SERVICE + "CreateTransfers", pb.CreateTransfersRequest(transfers=[item]), "only_a"
    )
    assert_merchant_refused(error, "transfers[0].credit_account.merchant_id")
    assert await balances(secured, cash, other) == [(0, 0, 0, 0), (0, 0, 0, 0)]
    assert await transfers_found(secured, secured.a, t) == []
    # Not even a failure was recorded under the id: an unrestricted token can still use it.
    results = await create_transfers(secured, "all", item)
    assert (results[0].result, results[0].replayed) == (pb.TRANSFER_RESULT_OK, False)


async def test_a_merchant_token_cannot_debit_another_merchant(secured: Secured) -> None:
    cash, other = ref(secured.a, uid("cash")), ref(secured.b, uid("other"))
    await create_accounts(
        secured, "all", pb.Account(ref=cash, currency="USD"), pb.Account(ref=other, currency="USD")
    )
    t = uid("t")
    error = await refused(
        secured,
        SERVICE + "CreateTransfers",
        pb.CreateTransfersRequest(transfers=[transfer(t, other, cash, 25)]),
        "only_a",
    )
    assert_merchant_refused(error, "transfers[0].debit_account.merchant_id")
    assert await balances(secured, cash, other) == [(0, 0, 0, 0), (0, 0, 0, 0)]
    assert await transfers_found(secured, secured.b, t) == []


async def test_a_batch_naming_another_merchant_is_refused_whole(secured: Secured) -> None:
    cash, wallet = ref(secured.a, uid("cash")), ref(secured.a, uid("wallet"))
    other = ref(secured.b, uid("other"))
    await create_accounts(
        secured, "all", *(pb.Account(ref=r, currency="USD") for r in (cash, wallet, other))
    )
    fine, bad = uid("t"), uid("t")
    error = await refused(
        secured,
        SERVICE + "CreateTransfers",
        pb.CreateTransfersRequest(
            transfers=[transfer(fine, cash, wallet, 3), transfer(bad, cash, other, 4)]
        ),
        "only_a",
    )
    assert_merchant_refused(error, "transfers[1].credit_account.merchant_id")
    assert await transfers_found(secured, secured.a, fine, bad) == []
    assert await balances(secured, cash, wallet, other) == [(0, 0, 0, 0)] * 3


async def test_a_token_for_two_merchants_moves_money_between_them_only(secured: Secured) -> None:
    a_cash, c_cash = ref(secured.a, uid("cash")), ref(secured.c, uid("cash"))
    other = ref(secured.b, uid("other"))
    await create_accounts(
        secured, "a_and_c", *(pb.Account(ref=r, currency="USD") for r in (a_cash, c_cash))
    )
    await create_accounts(secured, "all", pb.Account(ref=other, currency="USD"))
    results = await create_transfers(secured, "a_and_c", transfer(uid("t"), a_cash, c_cash, 9))
    assert results[0].result == pb.TRANSFER_RESULT_OK
    error = await refused(
        secured,
        SERVICE + "CreateTransfers",
        pb.CreateTransfersRequest(transfers=[transfer(uid("t"), c_cash, other, 1)]),
        "a_and_c",
    )
    assert_merchant_refused(error, "transfers[0].credit_account.merchant_id")
    assert await balances(secured, a_cash, c_cash, other) == [
        (9, 0, 0, 0),
        (0, 9, 0, 0),
        (0, 0, 0, 0),
    ]


async def test_a_merchant_token_cannot_post_a_journal_naming_another_merchant(
    secured: Secured,
) -> None:
    mine, theirs = ref(secured.a, uid("cash")), ref(secured.b, uid("cash"))
    theirs_too = ref(secured.b, uid("fees"))
    await create_accounts(
        secured, "all", *(pb.Account(ref=r, currency="USD") for r in (mine, theirs, theirs_too))
    )

    def journal(
        journal_id: str, merchant_id: str, debit: pb.AccountRef, credit: pb.AccountRef
    ) -> pb.PostJournalRequest:
        return pb.PostJournalRequest(
            journal_id=journal_id,
            merchant_id=merchant_id,
            postings=[
                pb.Posting(account=debit, amount_minor=5, currency="USD", direction=DEBIT),
                pb.Posting(account=credit, amount_minor=5, currency="USD", direction=CREDIT),
            ],
        )

    j1, j2 = uid("j"), uid("j")
    error = await refused(
        secured, SERVICE + "PostJournal", journal(j1, secured.a, mine, theirs), "only_a"
    )
    assert_merchant_refused(error, "postings[1].account.merchant_id")
    error = await refused(
        secured, SERVICE + "PostJournal", journal(j2, secured.b, theirs, theirs_too), "only_a"
    )
    assert_merchant_refused(error, "merchant_id")
    assert await balances(secured, mine, theirs, theirs_too) == [(0, 0, 0, 0)] * 3
    assert await transfers_found(secured, secured.a, j1) == []
    assert await transfers_found(secured, secured.b, j2) == []


# (method, request builder given merchants a and b, the field the refusal names)
OTHER_MERCHANT_CALLS: list[tuple[str, Callable[[str, str], Message], str]] = [
    (
        SERVICE + "CreateAccounts",
        lambda a, b: pb.CreateAccountsRequest(
            accounts=[account(a, uid("x")), account(b, uid("x"))]
        ),
        "accounts[1].ref.merchant_id",
    ),
    (
        SERVICE + "LookupAccounts",
        lambda a, b: pb.LookupAccountsRequest(refs=[ref(a, "x"), ref(b, "x")]),
        "refs[1].merchant_id",
    ),
    (
        SERVICE + "ListAccounts",
        lambda a, b: pb.ListAccountsRequest(merchant_id=b),
        "merchant_id",
    ),
    (
        SERVICE + "SetAccountsClosed",
        lambda a, b: pb.SetAccountsClosedRequest(refs=[ref(b, "x")], closed=True),
        "refs[0].merchant_id",
    ),
    (
        SERVICE + "LookupTransfers",
        lambda a, b: pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=b, transfer_id="t")]
        ),
        "refs[0].merchant_id",
    ),
    (
        SERVICE + "GetBalance",
        lambda a, b: pb.GetBalanceRequest(account=ref(b, "x")),
        "account.merchant_id",
    ),
    (
        SERVICE + "ListEntries",
        lambda a, b: pb.ListEntriesRequest(account=ref(b, "x")),
        "account.merchant_id",
    ),
    (
        ADMIN_SERVICE + "GetSaga",
        lambda a, b: pb.GetSagaRequest(
            ref=pb.SagaRef(merchant_id=b, transfer_id="t", kind=pb.SAGA_KIND_TRANSFER)
        ),
        "ref.merchant_id",
    ),
    (
        ADMIN_SERVICE + "RetrySaga",
        lambda a, b: pb.GetSagaRequest(
            ref=pb.SagaRef(merchant_id=b, transfer_id="t", kind=pb.SAGA_KIND_TRANSFER)
        ),
        "ref.merchant_id",
    ),
    (
        ADMIN_SERVICE + "ResolveSaga",
        lambda a, b: pb.ResolveSagaRequest(
            ref=pb.SagaRef(merchant_id=b, transfer_id="t", kind=pb.SAGA_KIND_TRANSFER),
            outcome=pb.SAGA_STATE_COMPENSATED,
        ),
        "ref.merchant_id",
    ),
]


@pytest.mark.parametrize(
    ("method", "build", "field"),
    OTHER_MERCHANT_CALLS,
    ids=[method.rpartition("/")[2] for method, _, _ in OTHER_MERCHANT_CALLS],
)
async def test_a_merchant_token_cannot_name_another_merchant(
    secured: Secured, method: str, build: Callable[[str, str], Message], field: str
) -> None:
    request = build(secured.a, secured.b)
    error = await refused(secured, method, request, "only_a")
    assert_merchant_refused(error, field)
    if method == SERVICE + "CreateAccounts":
        assert isinstance(request, pb.CreateAccountsRequest)
        response = await secured.stub.LookupAccounts(
            pb.LookupAccountsRequest(refs=[a.ref for a in request.accounts]),
            timeout=RPC_TIMEOUT_S,
            metadata=secured.auth("all"),
        )
        assert list(response.accounts) == [], "neither account of the refused batch exists"


async def test_a_merchant_token_learns_nothing_of_whether_another_merchants_account_exists(
    secured: Secured,
) -> None:
    existing = ref(secured.b, uid("real"))
    await create_accounts(secured, "all", pb.Account(ref=existing, currency="USD"))
    answers = []
    for target in (existing, ref(secured.b, uid("missing"))):
        error = await refused(
            secured, SERVICE + "GetBalance", pb.GetBalanceRequest(account=target), "only_a"
        )
        assert_merchant_refused(error, "account.merchant_id")
        answers.append((error.code(), error.details()))
    assert answers[0] == answers[1]


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("ListSagas", pb.ListSagasRequest()),
        ("ListTransfersByTrace", pb.ListTransfersByTraceRequest(trace_id="0" * 32)),
    ],
)
async def test_a_merchant_restricted_admin_token_cannot_list_every_merchant(
    secured: Secured, method: str, request_message: Message
) -> None:
    error = await refused(secured, ADMIN_SERVICE + method, request_message, "only_a")
    assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "MERCHANT_RESTRICTED_TOKEN")


# --- auth comes before parsing --------------------------------------------------------

UNPARSABLE = [
    b"\xff\xff\xff",
    # transfers[0].id holds the byte 0xff: valid on the wire, invalid UTF-8 for proto3.
    b"\x0a\x03\x0a\x01\xff",
]


@pytest.mark.parametrize("raw", UNPARSABLE, ids=["garbage", "invalid-utf8"])
async def test_unparsable_bytes_with_a_valid_token_are_invalid_argument(
    secured: Secured, raw: bytes
) -> None:
    error = await raw_call_refused(
        secured.channel, SERVICE + "CreateTransfers", raw, secured.auth("write")
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert set(field_violations(error)) == {"request"}


@pytest.mark.parametrize("raw", UNPARSABLE, ids=["garbage", "invalid-utf8"])
async def test_unparsable_bytes_are_refused_by_auth_before_they_are_parsed(
    secured: Secured, raw: bytes
) -> None:
    error = await raw_call_refused(secured.channel, SERVICE + "CreateTransfers", raw)
    assert_refusal(error, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    error = await raw_call_refused(
        secured.channel, SERVICE + "CreateTransfers", raw, secured.auth("read")
    )
    assert_refusal(error, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", scope="write")


# --- tokens are secrets ---------------------------------------------------------------


def _record_text(record: logging.LogRecord) -> str:
    parts = [record.getMessage(), repr(vars(record))]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


async def test_tokens_never_reach_the_logs(
    secured: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            caplog.set_level(logging.DEBUG, logger=name)
    # The control: a record of the auth module's logger at DEBUG reaches the capture.
    logging.getLogger("ledger.api.auth").debug("capture check")
    assert [r.getMessage() for r in caplog.records] == ["capture check"]
    good = secured.tokens["only_a"]
    wrong = new_token()
    cash = ref(secured.a, uid("cash"))
    await create_accounts(secured, "only_a", pb.Account(ref=cash, currency="USD"))
    calls: list[tuple[str, Message, tuple[tuple[str, str], ...]]] = [
        ("GetBalance", pb.GetBalanceRequest(account=cash), bearer(wrong)),
        ("GetBalance", pb.GetBalanceRequest(account=cash), (("authorization", f"Basic {good}"),)),
        ("GetBalance", pb.GetBalanceRequest(account=ref(secured.b, "x")), bearer(good)),
        ("GetBalance", pb.GetBalanceRequest(account=ref(secured.a, uid("no"))), bearer(good)),
        ("CreateTransfers", pb.CreateTransfersRequest(), bearer(good)),
    ]
    for method, request, metadata in calls:
        error = await raw_call_refused(
            secured.channel, SERVICE + method, request.SerializeToString(), metadata
        )
        assert error.code() != grpc.StatusCode.OK
        for secret in (good, wrong):
            assert secret not in (error.details() or "")
            assert secret not in repr(error.trailing_metadata())
    # The grpc-status-details of a failed call are logged nowhere with a token either.
    for record in caplog.records:
        text = _record_text(record)
        for secret in (good, wrong):
            assert secret not in text, f"a token in a log record of {record.name}: {text}"
    assert good not in caplog.text and wrong not in caplog.text


def test_the_services_token_file_holds_hashes_not_tokens(secured: Secured) -> None:
    text = secured.token_file.read_text()
    for token in secured.tokens.values():
        assert token not in text
        assert token[len("lt_") :] not in text
        assert hash_token(token) in text


def test_a_token_file_entry_holds_only_the_hash(tmp_path: Path) -> None:
    token = new_token()
    entry = token_entry("svc", token, [READ, WRITE], ["m1", "m2"])
    assert token not in entry
    assert token[len("lt_") :] not in entry
    assert hash_token(token) in entry
    parsed = tomllib.loads(entry)
    assert parsed == {
        "token": [
            {"name": "svc", "sha256": hash_token(token), "scopes": ["read", "write"],
             "merchants": ["m1", "m2"]}
        ]
    }  # fmt: skip
    path = tmp_path / "tokens.toml"
    path.write_text(entry)
    assert TokenTable.load(path).authenticate(token) == Principal(
        "svc", frozenset({READ, WRITE}), frozenset({"m1", "m2"})
    )


@pytest.mark.parametrize(
    "odd",
    ['acme "eu"', r"back\slash", r"a\u0062", "café ☕ 𝄞"],
    ids=["quote", "backslash", "toml-escape", "unicode"],
)
def test_token_entry_round_trips_names_and_merchant_ids_with_toml_metacharacters(
    tmp_path: Path, odd: str
) -> None:
    """Ids may hold quotes and backslashes (only control characters are refused).

    The entry must name the same merchant, not a broken file or, worse, another
    merchant (a\\u0062 read back as "ab").
    """
    token = new_token()
    path = tmp_path / "tokens.toml"
    path.write_text(token_entry(f"svc {odd}", token, [READ], ["m1", odd]))
    assert TokenTable.load(path).authenticate(token) == Principal(
        f"svc {odd}", frozenset({READ}), frozenset({"m1", odd})
    )


def test_new_tokens_are_long_random_and_prefixed() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert re.fullmatch(r"lt_[A-Za-z0-9_-]{43}", token), token


# --- the token table ------------------------------------------------------------------


def test_authenticate_finds_each_tokens_principal_and_nothing_else(tmp_path: Path) -> None:
    specs = {
        "reader": TokenSpec((READ,)),
        "writer": TokenSpec((WRITE, READ)),
        "ops": TokenSpec((ADMIN,)),
        "shop": TokenSpec((READ, WRITE), ("m1", "m2")),
    }
    path = tmp_path / "tokens.toml"
    tokens = write_token_file(path, specs)
    table = TokenTable.load(path)
    for name, spec in specs.items():
        expected = Principal(
            name, frozenset(spec.scopes), frozenset(spec.merchants) if spec.merchants else None
        )
        assert table.authenticate(tokens[name]) == expected
    token = tokens["writer"]
    for wrong in (
        token[:-1],
        token[:8],
        token + "x",
        " " + token,
        token.upper(),
        hash_token(token),
        "",
        new_token(),
    ):
        assert table.authenticate(wrong) is None, wrong


def _entry(name: str, sha256: str | None = None, extra: str = 'scopes = ["read"]') -> str:
    digest = sha256 if sha256 is not None else hash_token(new_token())
    return f'[[token]]\nname = "{name}"\nsha256 = "{digest}"\n{extra}\n'


BAD_TOKEN_FILES = {
    "empty-file": ("", "expected [[token]] tables"),
    "no-tokens": ("token = []\n", "holds no token"),
    "not-toml": ("[[token]\nname = 1\n", ""),
    "bad-hex": (_entry("ok") + _entry("bad", "zz" * 32), "token[1]: sha256 must be 64 hex"),
    "short-hash": (_entry("ok") + _entry("bad", "ab" * 16), "token[1]: sha256 must be 64 hex"),
    "unknown-scope": (
        _entry("ok") + _entry("bad", extra='scopes = ["read", "root"]'),
        "token[1]: scopes must be among",
    ),
    "no-scopes": (_entry("ok") + _entry("bad", extra="scopes = []"), "token[1]: scopes"),
    "empty-merchants": (
        _entry("ok") + _entry("bad", extra='scopes = ["read"]\nmerchants = []'),
        "token[1]: merchants must be a non-empty list",
    ),
    "empty-merchant-id": (
        _entry("ok") + _entry("bad", extra='scopes = ["read"]\nmerchants = ["m1", ""]'),
        "token[1]: merchants",
    ),
    "no-name": (_entry("ok") + _entry(""), "token[1]: name"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKEN_FILES))
def test_token_table_load_refuses_a_bad_file(tmp_path: Path, case: str) -> None:
    text, message = BAD_TOKEN_FILES[case]
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(TokenFileError) as caught:
        TokenTable.load(path)
    if case != "no-tokens":
        # Not for no-tokens: TokenTable() raises that one and does not know the path.
        assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_token_table_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError):
        TokenTable.load(tmp_path / "absent.toml")


def test_token_table_refuses_more_than_the_maximum(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text("".join(_entry(f"t{i}") for i in range(TOKENS_MAX + 1)))
    with pytest.raises(TokenFileError, match=str(TOKENS_MAX)):
        TokenTable.load(path)
    path.write_text("".join(_entry(f"t{i}") for i in range(TOKENS_MAX)))
    TokenTable.load(path)


# --- the CLI --------------------------------------------------------------------------

_TOKEN_LINE = re.compile(r"^# (lt_\S+)$", re.M)


async def test_cli_auth_token_prints_the_token_once_and_an_entry_with_its_hash(
    tmp_path: Path,
) -> None:
    done = await run_cli(
        ["auth", "token", "svc", "--scopes", "read,admin", "--merchants", "m1"], child_env()
    )
    assert done.returncode == 0, done.stderr
    tokens = _TOKEN_LINE.findall(done.stdout)
    assert len(tokens) == 1, done.stdout
    token = tokens[0]
    assert done.stdout.count(token) == 1, "the token is printed once, on its comment line"
    assert tomllib.loads(done.stdout) == {
        "token": [
            {"name": "svc", "sha256": hash_token(token), "scopes": ["read", "admin"],
             "merchants": ["m1"]}
        ]
    }  # fmt: skip
    path = tmp_path / "tokens.toml"
    path.write_text(done.stdout)
    assert TokenTable.load(path).authenticate(token) == Principal(
        "svc", frozenset({READ, ADMIN}), frozenset({"m1"})
    )


async def test_cli_auth_token_refuses_an_unknown_scope() -> None:
    done = await run_cli(["auth", "token", "svc", "--scopes", "read,root"], child_env())
    assert done.returncode != 0
    assert "lt_" not in done.stdout
    assert "scope" in done.stderr


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", ":0"])
async def test_cli_serve_refuses_a_public_address_without_authentication(
    pg_server: EmbeddedPostgres, tmp_path: Path, listen: str
) -> None:
    config_path = shard_config(pg_server, tmp_path)
    done = await run_cli(
        ["serve", "--listen", listen, "--config", str(config_path)],
        child_env({"LEDGER_METRICS_LISTEN": "127.0.0.1:0"}),
        timeout_s=30,
    )
    assert done.returncode != 0
    assert "without authentication" in done.stderr
    assert "LEDGER_AUTH_FILE" in done.stderr


async def test_cli_serve_refuses_a_bad_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(_entry("ok") + _entry("bad", extra='scopes = ["sudo"]'))
    done = await run_cli(
        ["serve", "--listen", "127.0.0.1:0", "--config", str(tmp_path / "unused.toml"),
         "--auth-file", str(path)],
        child_env({"LEDGER_METRICS_LISTEN": "127.0.0.1:0"}),
        timeout_s=30,
    )  # fmt: skip
    assert done.returncode != 0
    assert "token[1]" in done.stderr


@dataclass
class TokenProcess:
    process: ServiceProcess
    tokens: dict[str, str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.process.port}"


@pytest.fixture(scope="module")
async def token_process(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TokenProcess]:
    """`ledger serve` as a process, with LEDGER_AUTH_FILE."""
    directory = tmp_path_factory.mktemp("auth_process")
    config_path = shard_config(pg_server, directory)
    token_file = directory / "tokens.toml"
    tokens = write_token_file(
        token_file,
        {"rw": TokenSpec((READ, WRITE)), "read": TokenSpec((READ,)), "ops": TokenSpec((ADMIN,))},
    )
    process = ServiceProcess(
        config_path,
        directory / "service.log",
        env=child_env(
            {"LEDGER_AUTH_FILE": str(token_file), "LEDGER_METRICS_LISTEN": "127.0.0.1:0"}
        ),
    )
    await process.start()
    try:
        yield TokenProcess(process, tokens)
    finally:
        await process.stop()


async def test_cli_calls_carry_the_token_from_the_environment(token_process: TokenProcess) -> None:
    m = uid("m")
    target = ["--target", token_process.target]
    tokens = token_process.tokens
    wrong = new_token()

    done = await run_cli(
        ["accounts", "create", m, "cash", *target], child_env({"LEDGER_TOKEN": tokens["rw"]})
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ACCOUNT_RESULT_OK"), done.stderr

    for env in ({}, {"LEDGER_TOKEN": wrong}):
        done = await run_cli(["accounts", "create", m, "wallet", *target], child_env(env))
        assert done.returncode == 1
        assert done.stderr.startswith("UNAUTHENTICATED: "), done.stderr
        assert "Traceback" not in done.stderr

    done = await run_cli(
        ["accounts", "create", m, "wallet", *target], child_env({"LEDGER_TOKEN": tokens["read"]})
    )
    assert done.returncode == 1
    assert done.stderr.startswith("PERMISSION_DENIED: "), done.stderr

    done = await run_cli(
        ["accounts", "balance", m, "wallet", *target], child_env({"LEDGER_TOKEN": tokens["read"]})
    )
    assert done.returncode == 1
    assert done.stderr.startswith("NOT_FOUND: "), "no token above created the wallet"
    done = await run_cli(
        ["accounts", "balance", m, "cash", *target], child_env({"LEDGER_TOKEN": tokens["read"]})
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{m}/cash USD: debits_posted=0 credits_posted=0")

    # The admin commands take the token from the environment too.
    done = await run_cli(["sagas", "list", *target], child_env({"LEDGER_TOKEN": tokens["ops"]}))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("0 saga(s)")
    done = await run_cli(["sagas", "list", *target], child_env())
    assert done.returncode == 1
    assert done.stderr.startswith("UNAUTHENTICATED: "), done.stderr

    log = token_process.process.log()
    assert "ledger serving on" in log
    for secret in (*tokens.values(), wrong):
        assert secret not in log


async def test_subscribing_to_events_needs_a_token_and_a_restricted_one_names_its_merchant(
    secured: Secured,
) -> None:
    """SubscribeEvents and SubscribeEventBatches stream, so the raw unary calls above
    leave them out: their refusals."""
    stub = ledger_pb2_grpc.LedgerServiceStub(secured.channel)
    for (request, metadata, code, reason), subscribe in itertools.product(
        (
            (pb.SubscribeEventsRequest(), (), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
            # Every merchant's events: not for a token restricted to some.
            (
                pb.SubscribeEventsRequest(),
                secured.auth("only_a"),
                grpc.StatusCode.PERMISSION_DENIED,
                "MERCHANT_RESTRICTED_TOKEN",
            ),
            (
                pb.SubscribeEventsRequest(merchant_id=secured.b),
                secured.auth("only_a"),
                grpc.StatusCode.PERMISSION_DENIED,
                "MERCHANT_NOT_PERMITTED",
            ),
        ),
        (stub.SubscribeEvents, stub.SubscribeEventBatches),
    ):
        call = subscribe(request, metadata=metadata, timeout=RPC_TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert_refusal(caught.value, code, reason)
    # Its own merchant's events: the stream starts (a marker account's event comes).
    marker = uid("marker")
    call = stub.SubscribeEvents(
        pb.SubscribeEventsRequest(merchant_id=secured.a), metadata=secured.auth("only_a")
    )
    try:
        await create_accounts(
            secured, "only_a", pb.Account(ref=ref(secured.a, marker), currency="USD")
        )
        async with asyncio.timeout(RPC_TIMEOUT_S):
            while True:
                event = await call.read()
                assert isinstance(event, pb.Event)
                if event.account.ref.account_id == marker:
                    break
    finally:
        call.cancel()

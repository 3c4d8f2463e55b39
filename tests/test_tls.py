"""TLS and mutual TLS over real gRPC channels, with certificates made by `openssl`.

Two CAs: `ca` signs the server's certificate (for 127.0.0.1 and localhost) and
the good client certificate; `other_ca` signs a client certificate the server
must refuse, and is the wrong trust root for a client. A refused handshake
reaches the caller as UNAVAILABLE; every client here makes one attempt, so a
refusal fails fast instead of being retried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ledger.api.auth import Scope, TokenTable, new_token
from ledger.api.server import LedgerServer
from ledger.api.tls import ServerTls
from ledger.client import ClientCredentials, ClientOptions, LedgerClient
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.auth_support import (
    KeyPair,
    TokenSpec,
    bearer,
    child_env,
    error_info,
    issue,
    make_ca,
    run_cli,
    shard_config,
    start_secured_service,
    verify,
    write_token_file,
)
from tests.process_cluster import ServiceProcess
from tests.support import RPC_TIMEOUT_S, Service, account, ref, transfer, uid

# A refused handshake fails well within this (one attempt, no retries).
HANDSHAKE_TIMEOUT_S = 10.0
ONE_ATTEMPT = ClientOptions(timeout_s=HANDSHAKE_TIMEOUT_S, attempts_max=1)


@dataclass(frozen=True)
class Pki:
    ca: KeyPair
    other_ca: KeyPair
    server: KeyPair
    # A server certificate from the right CA, but for another host name.
    wrong_host_server: KeyPair
    client: KeyPair
    rogue_client: KeyPair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory / "ca", "ledger-test-ca")
    other_ca = make_ca(directory / "other", "other-test-ca")
    wrong_host = issue(ca, directory / "ca", "wrong-host", server=True, hosts="DNS:elsewhere.test")
    return Pki(
        ca=ca,
        other_ca=other_ca,
        server=issue(ca, directory / "ca", "server", server=True),
        wrong_host_server=wrong_host,
        client=issue(ca, directory / "ca", "client", server=False),
        rogue_client=issue(other_ca, directory / "other", "rogue-client", server=False),
    )


def credentials(
    ca: KeyPair, client: KeyPair | None = None, token: str | None = None
) -> ClientCredentials:
    return ClientCredentials(
        token=token,
        tls_ca_file=ca.cert,
        tls_cert_file=client.cert if client else None,
        tls_key_file=client.key if client else None,
    )


async def round_trip(target: str, creds: ClientCredentials) -> None:
    """Creates two accounts and moves money between them over one client; any failure fails."""
    m = uid("m")
    async with LedgerClient(target, options=ONE_ATTEMPT, credentials=creds) as client:
        created = await client.create_accounts([account(m, "a"), account(m, "b")])
        assert [r.result for r in created.results] == [pb.ACCOUNT_RESULT_OK] * 2
        moved = await client.create_transfers([transfer(uid("t"), ref(m, "a"), ref(m, "b"), 5)])
        assert moved.results[0].result == pb.TRANSFER_RESULT_OK
        assert (await client.get_balance(m, "b")).credits_posted == 5


async def refused_call(target: str, creds: ClientCredentials) -> tuple[grpc.aio.AioRpcError, str]:
    """Tries to create an account; returns the error and the merchant it named."""
    m = uid("m")
    async with LedgerClient(target, options=ONE_ATTEMPT, credentials=creds) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.create_accounts([account(m, "a")])
    return caught.value, m


async def account_exists(
    service: Service, merchant_id: str, metadata: tuple[tuple[str, str], ...] = ()
) -> bool:
    response = await ledger_pb2_grpc.LedgerServiceStub(service.channel).LookupAccounts(
        pb.LookupAccountsRequest(refs=[ref(merchant_id, "a")]),
        timeout=RPC_TIMEOUT_S,
        metadata=metadata,
    )
    return len(response.accounts) == 1


# --- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tls_service(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> AsyncIterator[Service]:
    """TLS with the server's certificate; no client certificates, no tokens."""
    config_path = shard_config(pg_server, tmp_path_factory.mktemp("tls"))
    service = await start_secured_service(
        config_path,
        tls=ServerTls(pki.server.cert, pki.server.key),
        channel_credentials=grpc.ssl_channel_credentials(pki.ca.cert.read_bytes()),
    )
    try:
        yield service
    finally:
        await service.stop()


async def test_a_client_trusting_the_ca_calls_over_tls(tls_service: Service, pki: Pki) -> None:
    await round_trip(tls_service.target, credentials(pki.ca))


async def test_a_client_may_present_a_certificate_the_server_does_not_ask_for(
    tls_service: Service, pki: Pki
) -> None:
    await round_trip(tls_service.target, credentials(pki.ca, pki.client))


async def test_a_plaintext_client_cannot_call_a_tls_server(tls_service: Service) -> None:
    error, m = await refused_call(tls_service.target, ClientCredentials())
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert not await account_exists(tls_service, m)


async def test_a_client_trusting_another_ca_cannot_call(tls_service: Service, pki: Pki) -> None:
    error, m = await refused_call(tls_service.target, credentials(pki.other_ca))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert not await account_exists(tls_service, m)


async def test_a_client_refuses_a_certificate_for_another_host(
    tls_service: Service, pki: Pki
) -> None:
    """Signed by the trusted CA, but not for 127.0.0.1: the client's host name check refuses it."""
    server = LedgerServer(
        tls_service.cluster,
        listen="127.0.0.1:0",
        tls=ServerTls(pki.wrong_host_server.cert, pki.wrong_host_server.key),
    )
    port = await server.start()
    try:
        error, m = await refused_call(f"127.0.0.1:{port}", credentials(pki.ca))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        assert not await account_exists(tls_service, m)
    finally:
        await server.stop(grace_s=1.0)


async def test_a_tls_server_with_a_missing_key_file_does_not_start(
    tls_service: Service, pki: Pki, tmp_path: Path
) -> None:
    server = LedgerServer(
        tls_service.cluster,
        listen="127.0.0.1:0",
        tls=ServerTls(pki.server.cert, tmp_path / "absent.key"),
    )
    try:
        with pytest.raises(FileNotFoundError):
            await server.start()
        assert server.port == 0
    finally:
        await server.stop(grace_s=0)


async def test_a_client_given_a_client_certificate_without_a_ca_never_talks_plaintext(
    tls_service: Service, pki: Pki, tmp_path: Path
) -> None:
    """A caller who set a certificate and key asked for TLS: its token must not go out in clear.

    Against a plaintext server (what a man in the middle would offer), the call
    must fail (or the credentials be refused); it must not succeed.
    """
    token_file = tmp_path / "tokens.toml"
    tokens = write_token_file(token_file, {"rw": TokenSpec((Scope.READ, Scope.WRITE))})
    plaintext = LedgerServer(
        tls_service.cluster, listen="127.0.0.1:0", tokens=TokenTable.load(token_file)
    )
    port = await plaintext.start()
    creds = ClientCredentials(
        token=tokens["rw"], tls_cert_file=pki.client.cert, tls_key_file=pki.client.key
    )
    m = uid("m")
    try:
        with pytest.raises((grpc.aio.AioRpcError, ValueError)):
            async with LedgerClient(
                f"127.0.0.1:{port}", options=ONE_ATTEMPT, credentials=creds
            ) as client:
                await client.create_accounts([account(m, "a")])
    finally:
        await plaintext.stop(grace_s=1.0)
    assert not await account_exists(tls_service, m)


# --- mutual TLS, with tokens ----------------------------------------------------------


@dataclass
class MtlsService:
    service: Service
    tokens: dict[str, str]


@pytest.fixture(scope="module")
async def mtls(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> AsyncIterator[MtlsService]:
    """Mutual TLS (clients need a certificate from `ca`) and bearer tokens."""
    directory = tmp_path_factory.mktemp("mtls")
    config_path = shard_config(pg_server, directory)
    token_file = directory / "tokens.toml"
    tokens = write_token_file(token_file, {"rw": TokenSpec((Scope.READ, Scope.WRITE))})
    service = await start_secured_service(
        config_path,
        tokens=TokenTable.load(token_file),
        tls=ServerTls(pki.server.cert, pki.server.key, client_ca_file=pki.ca.cert),
        channel_credentials=grpc.ssl_channel_credentials(
            pki.ca.cert.read_bytes(),
            private_key=pki.client.key.read_bytes(),
            certificate_chain=pki.client.cert.read_bytes(),
        ),
    )
    try:
        yield MtlsService(service, tokens)
    finally:
        await service.stop()


async def test_mtls_client_with_a_certificate_from_the_ca_and_a_token_calls(
    mtls: MtlsService, pki: Pki
) -> None:
    await round_trip(mtls.service.target, credentials(pki.ca, pki.client, mtls.tokens["rw"]))


async def test_mtls_client_without_a_certificate_is_refused(mtls: MtlsService, pki: Pki) -> None:
    error, m = await refused_call(mtls.service.target, credentials(pki.ca, token=mtls.tokens["rw"]))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert not await account_exists(mtls.service, m, bearer(mtls.tokens["rw"]))


async def test_mtls_client_with_a_certificate_from_another_ca_is_refused(
    mtls: MtlsService, pki: Pki
) -> None:
    error, m = await refused_call(
        mtls.service.target, credentials(pki.ca, pki.rogue_client, mtls.tokens["rw"])
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert not await account_exists(mtls.service, m, bearer(mtls.tokens["rw"]))


async def test_mtls_client_certificate_does_not_replace_the_token(
    mtls: MtlsService, pki: Pki
) -> None:
    for token in (None, new_token()):
        error, m = await refused_call(mtls.service.target, credentials(pki.ca, pki.client, token))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
        assert error_info(error).reason == "UNAUTHENTICATED"
        assert not await account_exists(mtls.service, m, bearer(mtls.tokens["rw"]))


# --- the CLI and environment variables ------------------------------------------------


@dataclass
class TlsProcess:
    process: ServiceProcess
    token: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.process.port}"


@pytest.fixture(scope="module")
async def tls_process(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> AsyncIterator[TlsProcess]:
    """`ledger serve` as a process with mutual TLS and tokens, all from environment variables."""
    directory = tmp_path_factory.mktemp("tls_process")
    config_path = shard_config(pg_server, directory)
    token_file = directory / "tokens.toml"
    tokens = write_token_file(token_file, {"rw": TokenSpec((Scope.READ, Scope.WRITE))})
    process = ServiceProcess(
        config_path,
        directory / "service.log",
        env=child_env(
            {
                "LEDGER_AUTH_FILE": str(token_file),
                "LEDGER_TLS_CERT_FILE": str(pki.server.cert),
                "LEDGER_TLS_KEY_FILE": str(pki.server.key),
                "LEDGER_TLS_CLIENT_CA_FILE": str(pki.ca.cert),
                "LEDGER_METRICS_LISTEN": "127.0.0.1:0",
            }
        ),
    )
    await process.start()
    try:
        yield TlsProcess(process, tokens["rw"])
    finally:
        await process.stop()


async def test_cli_calls_a_mtls_server_with_credentials_from_the_environment(
    tls_process: TlsProcess, pki: Pki
) -> None:
    m = uid("m")
    target = ["--target", tls_process.target]
    full = {
        "LEDGER_TOKEN": tls_process.token,
        "LEDGER_CLIENT_TLS_CA_FILE": str(pki.ca.cert),
        "LEDGER_CLIENT_TLS_CERT_FILE": str(pki.client.cert),
        "LEDGER_CLIENT_TLS_KEY_FILE": str(pki.client.key),
    }
    done = await run_cli(["accounts", "create", m, "cash", *target], child_env(full))
    assert (done.returncode, done.stdout.strip()) == (0, "ACCOUNT_RESULT_OK"), done.stderr

    without_cert = {
        k: v
        for k, v in full.items()
        if k not in ("LEDGER_CLIENT_TLS_CERT_FILE", "LEDGER_CLIENT_TLS_KEY_FILE")
    }
    plaintext = {"LEDGER_TOKEN": tls_process.token}
    for env in (without_cert, plaintext):
        done = await run_cli(["accounts", "create", m, "wallet", *target], child_env(env))
        assert done.returncode == 1
        assert done.stderr.startswith("UNAVAILABLE: "), done.stderr

    no_token = {k: v for k, v in full.items() if k != "LEDGER_TOKEN"}
    done = await run_cli(["accounts", "create", m, "wallet", *target], child_env(no_token))
    assert done.returncode == 1
    assert done.stderr.startswith("UNAUTHENTICATED: "), done.stderr

    done = await run_cli(["accounts", "balance", m, "wallet", *target], child_env(full))
    assert done.returncode == 1
    assert done.stderr.startswith("NOT_FOUND: "), "none of the refused calls created the wallet"
    done = await run_cli(["accounts", "balance", m, "cash", *target], child_env(full))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{m}/cash USD:")
    assert tls_process.token not in tls_process.process.log()


@pytest.mark.parametrize(
    "names",
    [
        ("LEDGER_TLS_CERT_FILE",),
        ("LEDGER_TLS_KEY_FILE",),
        ("LEDGER_TLS_CLIENT_CA_FILE",),
        ("LEDGER_TLS_KEY_FILE", "LEDGER_TLS_CLIENT_CA_FILE"),
    ],
    ids=["cert-only", "key-only", "client-ca-only", "no-cert"],
)
async def test_cli_serve_refuses_an_incomplete_tls_setting(
    pki: Pki, tmp_path: Path, names: tuple[str, ...]
) -> None:
    files = {
        "LEDGER_TLS_CERT_FILE": str(pki.server.cert),
        "LEDGER_TLS_KEY_FILE": str(pki.server.key),
        "LEDGER_TLS_CLIENT_CA_FILE": str(pki.ca.cert),
    }
    done = await run_cli(
        ["serve", "--listen", "127.0.0.1:0", "--config", str(tmp_path / "unused.toml")],
        child_env({"LEDGER_METRICS_LISTEN": "127.0.0.1:0", **{n: files[n] for n in names}}),
        timeout_s=30,
    )
    assert done.returncode != 0
    assert "LEDGER_TLS_CERT_FILE" in done.stderr
    assert "ledger serving" not in done.stderr


def test_the_certificates_are_what_the_refusals_assume(pki: Pki) -> None:
    """Each refused certificate is valid under its own CA: the refusals are about trust."""
    cases = [
        (pki.ca, pki.server, True),
        (pki.ca, pki.client, True),
        (pki.ca, pki.wrong_host_server, True),
        (pki.other_ca, pki.rogue_client, True),
        (pki.ca, pki.rogue_client, False),
        (pki.other_ca, pki.server, False),
    ]
    for ca, pair, valid in cases:
        assert verify(ca, pair) is valid, (ca.cert.name, pair.cert.name)

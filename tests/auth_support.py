"""Helpers for the auth and TLS tests: token files, a service with tokens or TLS, certificates.

Certificates are made with the `openssl` command line in a temporary directory,
so no Python dependency is needed for them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from ledger.api.auth import Scope, TokenTable, new_token, token_entry
from ledger.api.server import LedgerServer
from ledger.api.tls import ServerTls
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.cluster import Cluster
from ledger.routing.config import ShardConfig, load_config
from ledger.routing.ring import ShardRing
from ledger.v1 import ledger_pb2_grpc
from tests.process_cluster import ROOT
from tests.support import RPC_TIMEOUT_S, Service, fresh_databases, status_details, uid, write_config

SHARD_NAMES = ("shard-a", "shard-b", "shard-c")
# One `openssl` invocation (an EC key, a request or a signature) takes milliseconds.
OPENSSL_TIMEOUT_S = 30
# A CLI child process (imports, one call with its retries) finishes within this long.
CLI_TIMEOUT_S = 60.0
# Settings the tests' environment might carry that would change what a child process does.
_CHILD_ENV_DROP = (
    "LEDGER_TOKEN",
    "LEDGER_AUTH_FILE",
    "LEDGER_ALLOW_UNAUTHENTICATED",
    "LEDGER_TLS_CERT_FILE",
    "LEDGER_TLS_KEY_FILE",
    "LEDGER_TLS_CLIENT_CA_FILE",
    "LEDGER_CLIENT_TLS_CA_FILE",
    "LEDGER_CLIENT_TLS_CERT_FILE",
    "LEDGER_CLIENT_TLS_KEY_FILE",
)


# --- tokens -------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSpec:
    scopes: tuple[Scope, ...]
    merchants: tuple[str, ...] = ()


def write_token_file(path: Path, specs: Mapping[str, TokenSpec]) -> dict[str, str]:
    """Writes a token file with one fresh token per name; returns name -> token."""
    tokens = {name: new_token() for name in specs}
    path.write_text(
        "\n".join(
            token_entry(name, tokens[name], spec.scopes, spec.merchants)
            for name, spec in specs.items()
        )
    )
    return tokens


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    infos = [d for d in status_details(error) if isinstance(d, error_details_pb2.ErrorInfo)]
    assert len(infos) == 1, (error.code(), error.details(), status_details(error))
    return infos[0]


async def raw_call(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    metadata: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Calls a unary method by its full path with raw request bytes."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    response: bytes = await call(request, timeout=RPC_TIMEOUT_S, metadata=tuple(metadata))
    return response


async def raw_call_refused(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    metadata: Sequence[tuple[str, str]] = (),
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_call(channel, method, request, metadata)
    return caught.value


# --- a service with tokens or TLS ---------------------------------------------------


def shard_config(pg_server: EmbeddedPostgres, directory: Path) -> Path:
    """A config over three fresh shard databases on the session's PostgreSQL server."""
    specs = fresh_databases(pg_server, SHARD_NAMES)
    return write_config(directory / "shards.toml", ShardConfig(epoch=1, shards=tuple(specs)))


def merchant_on(config_path: Path, shard_name: str, prefix: str = "m") -> str:
    """A fresh merchant id the config's ring places on shard_name (before any server runs)."""
    ring = ShardRing(load_config(config_path))
    for _ in range(10_000):
        candidate = uid(prefix)
        if ring.shard_for(candidate) == shard_name:
            return candidate
    raise AssertionError(f"no merchant found for {shard_name}")


async def start_secured_service(
    config_path: Path,
    *,
    tokens: TokenTable | None = None,
    tls: ServerTls | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> Service:
    """As tests.support.start_service, with tokens and TLS; the channel uses channel_credentials."""
    cluster = Cluster(load_config(config_path), config_path=config_path)
    await cluster.open()
    server = LedgerServer(cluster, listen="127.0.0.1:0", tokens=tokens, tls=tls)
    try:
        await server.start()
    except BaseException:
        await server.stop(grace_s=0)
        await cluster.close()
        raise
    target = f"127.0.0.1:{server.port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if channel_credentials is None
        else grpc.aio.secure_channel(target, channel_credentials)
    )
    return Service(
        cluster=cluster,
        server=server,
        channel=channel,
        stub=ledger_pb2_grpc.LedgerServiceStub(channel),
        config_path=config_path,
    )


# --- the CLI in a child process -----------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ledger credentials, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(
    args: Iterable[str], env: Mapping[str, str], *, timeout_s: float = CLI_TIMEOUT_S
) -> CliResult:
    """Runs `python -m ledger.cli ARGS` to completion within timeout_s (killed and failed after)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger.cli",
        *args,
        cwd=ROOT,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(
            f"ledger.cli {' '.join(args)} did not finish in {timeout_s}s"
        ) from None
    assert process.returncode is not None
    return CliResult(
        process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )


# --- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str) -> KeyPair:
    """A self-signed CA certificate and key, valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *_EC_KEY,
        "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return pair


def issue(
    ca: KeyPair,
    directory: Path,
    name: str,
    *,
    server: bool,
    hosts: str = "IP:127.0.0.1,DNS:localhost",
) -> KeyPair:
    """A leaf certificate signed by ca: a server's for hosts (subjectAltName), or a client's."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    request = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature"]
    if server:
        lines += [f"subjectAltName={hosts}", "extendedKeyUsage=serverAuth"]
    else:
        lines += ["extendedKeyUsage=clientAuth"]
    extensions.write_text("\n".join(lines) + "\n")
    _openssl(
        "req", "-new", *_EC_KEY, "-keyout", str(pair.key), "-out", str(request),
        "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
        "-extfile", str(extensions), "-out", str(pair.cert),
        cwd=directory,
    )  # fmt: skip
    return pair


def verify(ca: KeyPair, pair: KeyPair) -> bool:
    """Whether `openssl verify` accepts pair's certificate under ca."""
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.cert), str(pair.cert)],
        capture_output=True,
        timeout=OPENSSL_TIMEOUT_S,
    )
    return done.returncode == 0

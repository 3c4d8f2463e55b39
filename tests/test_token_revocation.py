"""Tokens expire and can be revoked without a restart (issue 23, item 4).

A real server with a token file on disk, reached over a real channel: a token
taken out of the file stops working within seconds (the file is polled), at
once on SIGHUP (reload_tokens, which the CLI's SIGHUP handler calls), and a
token past its `expires_at` is refused.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from ledger import limits
from ledger.api.auth import Scope, TokenFileError, TokenTable, new_token, token_entry
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.v1 import ledger_pb2 as pb
from tests.auth_support import bearer, child_env, shard_config, start_secured_service
from tests.process_cluster import ServiceProcess
from tests.support import RPC_TIMEOUT_S, Service, uid, wait_until

# A revoked token must stop working within this long (one poll interval and change).
REVOKED_WITHIN_S = 5.0
assert limits.token_file_poll_interval_s * 2 < REVOKED_WITHIN_S


def write_tokens(path: Path, entries: dict[str, tuple[str, datetime | None]]) -> None:
    """name -> (token, expiry): a token file with read-scoped tokens."""
    text = "\n".join(
        token_entry(name, token, [Scope.READ], [], expires_at=expires_at)
        for name, (token, expires_at) in entries.items()
    )
    # Written beside and renamed over, as an operator's tooling would.
    staged = path.with_suffix(".new")
    staged.write_text(text)
    staged.replace(path)


@pytest.fixture
async def served(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> AsyncIterator[tuple[Service, Path, dict[str, str]]]:
    tokens = {"keep": new_token(), "revoke": new_token()}
    path = tmp_path / "tokens.toml"
    write_tokens(path, {name: (token, None) for name, token in tokens.items()})
    service = await start_secured_service(
        shard_config(pg_server, tmp_path), tokens=TokenTable.load(path)
    )
    try:
        yield service, path, tokens
    finally:
        await service.stop()


async def code_for(service: Service, token: str) -> grpc.StatusCode:
    """The status of a read call made with token (OK: authenticated and served)."""
    try:
        await service.stub.LookupTransfers(
            pb.LookupTransfersRequest(refs=[pb.TransferRef(merchant_id="m", transfer_id=uid())]),
            timeout=RPC_TIMEOUT_S,
            metadata=bearer(token),
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_token_removed_from_the_file_stops_working_within_seconds(
    served: tuple[Service, Path, dict[str, str]],
) -> None:
    service, path, tokens = served
    assert await code_for(service, tokens["revoke"]) == grpc.StatusCode.OK
    write_tokens(path, {"keep": (tokens["keep"], None)})

    async def refused() -> bool:
        return await code_for(service, tokens["revoke"]) == grpc.StatusCode.UNAUTHENTICATED

    await wait_until(refused, deadline_s=REVOKED_WITHIN_S, what="the revoked token refused")
    assert await code_for(service, tokens["keep"]) == grpc.StatusCode.OK


async def test_a_token_added_to_the_file_works_without_a_restart(
    served: tuple[Service, Path, dict[str, str]],
) -> None:
    service, path, tokens = served
    added = new_token()
    assert await code_for(service, added) == grpc.StatusCode.UNAUTHENTICATED
    write_tokens(
        path,
        {"keep": (tokens["keep"], None), "revoke": (tokens["revoke"], None), "new": (added, None)},
    )

    async def accepted() -> bool:
        return await code_for(service, added) == grpc.StatusCode.OK

    await wait_until(accepted, deadline_s=REVOKED_WITHIN_S, what="the added token accepted")


async def test_sighup_reload_revokes_at_once_without_waiting_for_the_poll(
    served: tuple[Service, Path, dict[str, str]],
) -> None:
    service, path, tokens = served
    watch = service.server.token_watch
    assert watch is not None
    await watch.stop()  # no polling: only the SIGHUP path can reload now
    write_tokens(path, {"keep": (tokens["keep"], None)})
    assert await code_for(service, tokens["revoke"]) == grpc.StatusCode.OK, "not reloaded yet"
    assert service.server.reload_tokens() is True
    assert await code_for(service, tokens["revoke"]) == grpc.StatusCode.UNAUTHENTICATED
    assert await code_for(service, tokens["keep"]) == grpc.StatusCode.OK


async def test_a_token_file_that_no_longer_parses_keeps_the_tokens_in_force(
    served: tuple[Service, Path, dict[str, str]],
) -> None:
    service, path, tokens = served
    path.write_text("[[token]]\nname = \n")
    assert service.server.reload_tokens() is False
    assert await code_for(service, tokens["keep"]) == grpc.StatusCode.OK


async def test_a_token_is_refused_from_its_expiry_on(
    served: tuple[Service, Path, dict[str, str]],
) -> None:
    service, path, tokens = served
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    expired = datetime.now(UTC) - timedelta(minutes=1)
    write_tokens(
        path,
        {
            "keep": (tokens["keep"], None),
            "revoke": (tokens["revoke"], expired),
            "soon": (soon_token := new_token(), soon),
        },
    )
    assert service.server.reload_tokens() is True
    assert await code_for(service, tokens["revoke"]) == grpc.StatusCode.UNAUTHENTICATED
    if datetime.now(UTC) < soon:
        assert await code_for(service, soon_token) == grpc.StatusCode.OK

    async def refused() -> bool:
        return await code_for(service, soon_token) == grpc.StatusCode.UNAUTHENTICATED

    await wait_until(refused, deadline_s=REVOKED_WITHIN_S, what="the token refused once expired")
    assert datetime.now(UTC) >= soon


async def test_sighup_makes_a_serving_process_reload_its_token_file(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    """`ledger serve` as a process: the file is changed so that polling cannot see it
    (same inode, size and mtime), so only the SIGHUP can make the new tokens count."""
    old, new = new_token(), new_token()
    path = tmp_path / "tokens.toml"
    path.write_text(token_entry("svc", old, [Scope.READ], []))
    process = ServiceProcess(
        shard_config(pg_server, tmp_path),
        tmp_path / "service.log",
        env=child_env({"LEDGER_AUTH_FILE": str(path), "LEDGER_METRICS_LISTEN": "off"}),
    )
    await process.start()
    try:
        assert process.stub is not None and process.process is not None
        stub = process.stub

        async def code(token: str) -> grpc.StatusCode:
            try:
                await stub.LookupTransfers(
                    pb.LookupTransfersRequest(
                        refs=[pb.TransferRef(merchant_id="m", transfer_id=uid())]
                    ),
                    timeout=RPC_TIMEOUT_S,
                    metadata=bearer(token),
                )
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        assert await code(old) == grpc.StatusCode.OK
        before = os.stat(path)
        path.write_text(token_entry("svc", new, [Scope.READ], []))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )
        assert await code(old) == grpc.StatusCode.OK, "nothing reloaded the file yet"
        process.process.send_signal(signal.SIGHUP)

        async def swapped() -> bool:
            return await code(old) == grpc.StatusCode.UNAUTHENTICATED

        await wait_until(swapped, deadline_s=REVOKED_WITHIN_S, what="SIGHUP reloading the tokens")
        assert await code(new) == grpc.StatusCode.OK
        assert "token file reloaded: 1 token(s)" in process.log()
    finally:
        await process.stop()


def test_token_entries_carry_an_expiry_that_loads_back(tmp_path: Path) -> None:
    token = new_token()
    moment = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    entry = token_entry("svc", token, [Scope.READ], [], expires_at=moment)
    assert "expires_at = 2031-05-06T07:08:09Z" in entry
    path = tmp_path / "t.toml"
    path.write_text(entry)
    table = TokenTable.load(path)
    assert table.expiring() == [("svc", moment)]
    assert table.authenticate(token, now=moment - timedelta(seconds=1)) is not None
    assert table.authenticate(token, now=moment) is None


def test_an_expiry_without_an_offset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    entry = token_entry("svc", new_token(), [Scope.READ], [])
    path.write_text(entry + "expires_at = 2031-05-06T07:08:09\n")
    with pytest.raises(TokenFileError, match="expires_at must be a TOML date-time with an offset"):
        TokenTable.load(path)

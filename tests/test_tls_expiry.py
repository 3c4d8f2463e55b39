"""The server says when its TLS certificate expired or is about to (issue 23, item 5)."""

from __future__ import annotations

import logging
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from ledger import limits
from ledger.api.cert_expiry import CertificateError, certificate_not_after, warn_if_expiring
from ledger.api.tls import ServerTls
from ledger.embedded.postgres import EmbeddedPostgres
from tests.auth_support import OPENSSL_TIMEOUT_S, KeyPair, issue, make_ca, shard_config
from tests.auth_support import start_secured_service as start_service_with


@pytest.fixture(scope="module")
def leaf(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A server certificate valid for two days (so inside the warning window)."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "expiry-test-ca")
    return issue(ca, directory, "server", server=True)


def openssl_not_after(cert: Path) -> datetime:
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-enddate", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
        timeout=OPENSSL_TIMEOUT_S,
    )
    text = done.stdout.strip().removeprefix("notAfter=")
    return datetime.strptime(text, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)


def test_the_expiry_read_from_the_pem_is_the_one_openssl_reads(leaf: KeyPair) -> None:
    assert certificate_not_after(leaf.cert.read_bytes()) == openssl_not_after(leaf.cert)


def test_a_file_without_a_certificate_is_refused(leaf: KeyPair) -> None:
    with pytest.raises(CertificateError, match="no PEM certificate"):
        certificate_not_after(leaf.key.read_bytes())


def test_an_expired_certificate_is_an_error_and_a_nearing_one_a_warning(
    leaf: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    not_after = certificate_not_after(leaf.cert.read_bytes())
    with caplog.at_level(logging.WARNING, logger="ledger.api.cert_expiry"):
        expired = warn_if_expiring(leaf.cert, not_after, now=not_after + timedelta(seconds=1))
        nearing = warn_if_expiring(leaf.cert, not_after, now=not_after - timedelta(days=3))
        far = warn_if_expiring(
            leaf.cert,
            not_after,
            now=not_after - limits.tls_certificate_expiry_warning - timedelta(days=1),
        )
    assert expired is not None and "expired at" in expired
    assert nearing is not None and "expires at" in nearing and "in 3 day(s)" in nearing
    assert far is None
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]


async def test_the_server_warns_at_start_up_and_exports_the_expiry(
    pg_server: EmbeddedPostgres,
    tmp_path: Path,
    leaf: KeyPair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ledger.api.cert_expiry"):
        service = await start_service_with(
            shard_config(pg_server, tmp_path),
            tls=ServerTls(leaf.cert, leaf.key),
            channel_credentials=grpc.ssl_channel_credentials(),
        )
    try:
        watch = service.server.cert_watch
        assert watch is not None
        expected = openssl_not_after(leaf.cert)
        assert watch.expiry_gauge() == [(expected.timestamp(), {"file": str(leaf.cert)})]
        warnings = [r.getMessage() for r in caplog.records if r.name == "ledger.api.cert_expiry"]
        assert len(warnings) == 1 and f"expires at {expected.isoformat()}" in warnings[0]
    finally:
        await service.stop()

"""The server certificate's expiry: a warning at start-up and as it nears, and a metric.

A server whose certificate expired starts and listens, and every TLS client
then refuses it; nothing in the service would say why. The expiry date is read
from the PEM file with a few lines of DER (the fields before it in an X.509
certificate are a fixed sequence), so no X.509 library is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from datetime import UTC, datetime
from pathlib import Path

from ledger import limits
from ledger.telemetry import metrics

log = logging.getLogger(__name__)

_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL)
_SEQUENCE, _UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x30, 0x17, 0x18, 0xA0


class CertificateError(ValueError):
    pass


def certificate_not_after(pem: bytes) -> datetime:
    """The notAfter time of the first certificate in a PEM file (the leaf)."""
    block = _PEM_BLOCK.search(pem.decode("ascii", errors="replace"))
    if block is None:
        raise CertificateError("no PEM certificate found")
    der = ssl.PEM_cert_to_DER_cert(block.group(0))
    try:
        tag, start, _ = _tlv(der, 0)  # Certificate
        _expect(tag, _SEQUENCE)
        tag, at, _ = _tlv(der, start)  # TBSCertificate
        _expect(tag, _SEQUENCE)
        tag, _, end = _tlv(der, at)
        if tag == _VERSION:  # optional [0] version
            tag, _, end = _tlv(der, end)
        for _field in ("signature", "issuer"):  # after the serial number
            tag, _, end = _tlv(der, end)
            _expect(tag, _SEQUENCE)
        tag, validity, _ = _tlv(der, end)
        _expect(tag, _SEQUENCE)
        _, _, after_not_before = _tlv(der, validity)
        tag, value_start, value_end = _tlv(der, after_not_before)
        return _time(tag, der[value_start:value_end].decode("ascii"))
    except (IndexError, ValueError) as error:
        raise CertificateError(f"not an X.509 certificate: {error}") from None


def _tlv(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at offset."""
    tag, length = der[offset], der[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[offset : offset + count], "big")
        offset += count
    if offset + length > len(der):
        raise ValueError("DER element runs past the end")
    return tag, offset, offset + length


def _expect(tag: int, wanted: int) -> None:
    if tag != wanted:
        raise ValueError(f"DER tag {tag:#x} where {wanted:#x} was expected")


def _time(tag: int, text: str) -> datetime:
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280)
        moment = datetime.strptime(text, "%y%m%d%H%M%SZ")
        if moment.year >= 2050:
            moment = moment.replace(year=moment.year - 100)
    elif tag == _GENERALIZED_TIME:  # YYYYMMDDHHMMSSZ
        moment = datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError(f"DER tag {tag:#x} is not a time")
    return moment.replace(tzinfo=UTC)


def warn_if_expiring(cert_file: Path, not_after: datetime, *, now: datetime) -> str | None:
    """Logs (and returns) a warning when the certificate expired or expires soon."""
    left = not_after - now
    if left.total_seconds() <= 0:
        message = (
            f"the TLS certificate {cert_file} expired at {not_after.isoformat()}: "
            "TLS clients will refuse this server; replace it and restart"
        )
        log.error(message)
        return message
    if left <= limits.tls_certificate_expiry_warning:
        message = (
            f"the TLS certificate {cert_file} expires at {not_after.isoformat()} "
            f"(in {left.days} day(s) {left.seconds // 3600} hour(s)); replace it and restart"
        )
        log.warning(message)
        return message
    return None


class CertificateExpiryWatch:
    """Warns at start-up and then every check interval; exports the expiry as a gauge."""

    def __init__(self, cert_file: Path) -> None:
        self.cert_file = cert_file
        self.not_after = certificate_not_after(cert_file.read_bytes())
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        metrics.register_gauge_source("tls_expiry", self.expiry_gauge)
        warn_if_expiring(self.cert_file, self.not_after, now=datetime.now(UTC))
        self._task = asyncio.create_task(self._run(), name="tls-expiry-watch")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def expiry_gauge(self) -> list[tuple[float, dict[str, str]]]:
        """The notAfter as a Unix time, for the ledger_tls_certificate_expiry gauge."""
        return [(self.not_after.timestamp(), {"file": str(self.cert_file)})]

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), limits.tls_certificate_check_interval_s)
            if not self._stop.is_set():
                warn_if_expiring(self.cert_file, self.not_after, now=datetime.now(UTC))

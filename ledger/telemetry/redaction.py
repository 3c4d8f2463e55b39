"""Removes card numbers and secrets from text bound for logs and spans.

Card numbers are found by the same detector the API uses to refuse them
(ledger.telemetry.card_numbers), so the two cannot disagree.
"""

from __future__ import annotations

import re

from ledger.telemetry.card_numbers import luhn_valid, replace_card_numbers

_DSN_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^/\s:@]*):(?P<secret>[^@\s/]+)@", re.I)
# Also compound and quoted keys: access_token=, client_secret=, PGPASSWORD=, 'password': '...'.
_KEY_VALUE_SECRET = re.compile(
    r"(?P<key>(?:password|passwd|pwd|secret|token|api[_-]?key|authorization)[\"']?\s*[=:]\s*[\"']?)"
    r"(?P<value>(?:bearer\s+)?[^\s,;&\"']+)",
    re.I,
)
_BEARER = re.compile(r"(?P<key>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.I)

CARD_MASK = "[REDACTED-PAN]"
SECRET_MASK = "***"

__all__ = ["CARD_MASK", "SECRET_MASK", "luhn_valid", "redact", "redact_card_numbers"]


def _card_mask(_written: str) -> str:
    return CARD_MASK


def redact_card_numbers(text: str) -> str:
    """Masks card numbers only (the detector of ledger.telemetry.card_numbers)."""
    return replace_card_numbers(text, _card_mask)


def redact(text: str) -> str:
    """Masks Luhn-valid card numbers, DSN passwords, tokens and passwords."""
    if not text:
        return text
    text = redact_card_numbers(text)
    text = _DSN_PASSWORD.sub(lambda m: f"{m.group('scheme')}:{SECRET_MASK}@", text)
    text = _KEY_VALUE_SECRET.sub(lambda m: f"{m.group('key')}{SECRET_MASK}", text)
    return _BEARER.sub(lambda m: f"{m.group('key')}{SECRET_MASK}", text)

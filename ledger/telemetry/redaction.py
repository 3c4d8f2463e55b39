"""Removes card numbers and secrets from text bound for logs and spans."""

from __future__ import annotations

import re

# 13 to 19 digits, optionally grouped by single spaces or dashes.
_CARD_CANDIDATE = re.compile(r"(?<![\d])\d(?:[ -]?\d){12,18}(?![\d])")
_DSN_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^/\s:@]*):(?P<secret>[^@\s/]+)@", re.I)
_KEY_VALUE_SECRET = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|api[_-]?key|authorization)\b\s*[=:]\s*)"
    r"(?P<value>(?:bearer\s+)?[^\s,;&\"']+)",
    re.I,
)
_BEARER = re.compile(r"(?P<key>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.I)

CARD_MASK = "[REDACTED-PAN]"
SECRET_MASK = "***"


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return CARD_MASK if luhn_valid(digits) else match.group(0)


def redact(text: str) -> str:
    """Masks Luhn-valid card numbers, DSN passwords, tokens and passwords."""
    if not text:
        return text
    text = _CARD_CANDIDATE.sub(_mask_card, text)
    text = _DSN_PASSWORD.sub(lambda m: f"{m.group('scheme')}:{SECRET_MASK}@", text)
    text = _KEY_VALUE_SECRET.sub(lambda m: f"{m.group('key')}{SECRET_MASK}", text)
    return _BEARER.sub(lambda m: f"{m.group('key')}{SECRET_MASK}", text)

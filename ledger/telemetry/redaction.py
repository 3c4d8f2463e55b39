"""Removes card numbers and secrets from text bound for logs and spans."""

from __future__ import annotations

import re

# Runs of at least 13 digits, optionally grouped by single spaces or dashes;
# _mask_card looks inside each run for the card number itself.
_CARD_CANDIDATE = re.compile(r"(?<![\d])\d(?:[ -]?\d){12,}(?![\d])")
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
    """Masks every window of whole digit groups that is 13-19 digits and passes Luhn.

    The run may hold more than a card number ("qty 2 4111 1111 1111 1111 12/26"),
    so each contiguous window of groups is tried, longest first.
    """
    run = match.group(0)
    groups = [(m.start(), m.end()) for m in re.finditer(r"\d+", run)]
    masked = [False] * len(run)
    for first in range(len(groups)):
        # Windows of 13-19 digits only: bounded work however long the run is.
        digits_total = 0
        longest_valid = -1
        for last in range(first, len(groups)):
            digits_total += groups[last][1] - groups[last][0]
            if digits_total > 19:
                break
            if digits_total >= 13:
                digits = re.sub(r"[ -]", "", run[groups[first][0] : groups[last][1]])
                if luhn_valid(digits):
                    longest_valid = last
        if longest_valid >= 0:
            for i in range(groups[first][0], groups[longest_valid][1]):
                masked[i] = True
    if not any(masked):
        return run
    out: list[str] = []
    i = 0
    while i < len(run):
        if masked[i]:
            while i < len(run) and masked[i]:
                i += 1
            out.append(CARD_MASK)
        else:
            out.append(run[i])
            i += 1
    return "".join(out)


def redact(text: str) -> str:
    """Masks Luhn-valid card numbers, DSN passwords, tokens and passwords."""
    if not text:
        return text
    text = _CARD_CANDIDATE.sub(_mask_card, text)
    text = _DSN_PASSWORD.sub(lambda m: f"{m.group('scheme')}:{SECRET_MASK}@", text)
    text = _KEY_VALUE_SECRET.sub(lambda m: f"{m.group('key')}{SECRET_MASK}", text)
    return _BEARER.sub(lambda m: f"{m.group('key')}{SECRET_MASK}", text)

"""The one card-number detector, shared by the API (which refuses or masks) and telemetry
(which redacts), so that what the API lets in and what telemetry lets out cannot disagree.

A card number here is what PCI DSS scanners look for: 13 to 19 digits passing the Luhn
check, written together or in groups split by common separators (one or two spaces or
tabs, a dash, a dot, a no-break space, or a dash or dot with spaces around it). A digit
run longer than 19 digits is a different kind of number, not a card with extra digits.

Split into groups, it is grouped as cards are printed: every group but the last has 4
to 6 digits and the last at most 6 (4-4-4-4, 4-4-4-4-3, 4-6-5, 4-6-4). Other groupings
of digits (a UUID's 8-4-4-4-12, "order-83-594918151400") are not card numbers: without
this rule about one random UUID-like id in 400 was refused, by chance of its digits.
"""

from __future__ import annotations

import re
from collections.abc import Callable

PAN_DIGITS_MIN = 13
PAN_DIGITS_MAX = 19
# PCI DSS allows at most the first six and the last four digits to be shown.
PAN_SHOWN_FIRST = 6
PAN_SHOWN_LAST = 4
PAN_MASK_CHAR = "*"

# Between two digit groups: at most three separator characters, so "4111 - 1111" still
# counts while a sentence with numbers in it does not become one long run.
_SEPARATOR = r"[ \t\u00a0.\-]{1,3}"
# A digit run with at least 13 digits, groups split by separators. Every repetition
# consumes a digit and separators are never digits, so matching is linear in the text.
_CANDIDATE = re.compile(rf"(?<!\d)\d(?:(?:{_SEPARATOR})?\d){{{PAN_DIGITS_MIN - 1},}}(?!\d)")
_GROUP = re.compile(r"\d+")
# Digits per group of a card number written in groups (see the module docstring).
GROUP_DIGITS_MIN = 4
GROUP_DIGITS_MAX = 6
# A quick pre-check (ids are checked on the hot path): with every separator character
# deleted, a text holding a card number has 13 digits in a row.
_SEPARATORS_DELETED = str.maketrans("", "", " \t\u00a0.-")
_THIRTEEN_DIGITS = re.compile(rf"\d{{{PAN_DIGITS_MIN}}}")
# The same pre-check for ASCII text (nearly every id), on bytes: deleting bytes and a
# bytes pattern (whose \d is [0-9], the only decimal digits ASCII has) cost a third of
# str.translate with a table and a str pattern (issue 18). U+00A0 is not ASCII.
_ASCII_SEPARATORS = b" \t.-"
_THIRTEEN_ASCII_DIGITS = re.compile(rb"[0-9]{%d}" % PAN_DIGITS_MIN)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a string of ASCII or Unicode decimal digits."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card_ranges_in_run(run: str, offset: int) -> list[tuple[int, int]]:
    """Character ranges (in the whole text) of the card numbers inside one candidate run.

    The run may hold more than a card number ("qty 2 4111 1111 1111 1111 12 26"), so
    every window of whole digit groups holding 13-19 digits is tried; from each first
    group the longest Luhn-valid window wins. Windows are at most 19 digits long, so
    the work is bounded by 19 checks per group however long the run is.
    """
    groups = [(m.start(), m.end(), m.group(0)) for m in _GROUP.finditer(run)]
    ranges: list[tuple[int, int]] = []
    for first in range(len(groups)):
        digits = ""
        longest_valid = -1
        for last in range(first, len(groups)):
            group = groups[last][2]
            if last > first and not GROUP_DIGITS_MIN <= len(groups[last - 1][2]) <= (
                GROUP_DIGITS_MAX
            ):
                break  # groups before the last are card-sized, or this is no card
            digits += group
            if len(digits) > PAN_DIGITS_MAX:
                break
            card_grouped = last == first or len(group) <= GROUP_DIGITS_MAX
            if card_grouped and len(digits) >= PAN_DIGITS_MIN and luhn_valid(digits):
                longest_valid = last
        if longest_valid >= 0:
            start, end = offset + groups[first][0], offset + groups[longest_valid][1]
            if ranges and start <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
            else:
                ranges.append((start, end))
    return ranges


def card_number_ranges(text: str) -> list[tuple[int, int]]:
    """(start, end) of every card-number-like digit run in text, in order, merged."""
    if len(text) < PAN_DIGITS_MIN:
        return []
    if text.isascii():
        if not _THIRTEEN_ASCII_DIGITS.search(text.encode().translate(None, _ASCII_SEPARATORS)):
            return []
    elif not _THIRTEEN_DIGITS.search(text.translate(_SEPARATORS_DELETED)):
        return []
    ranges: list[tuple[int, int]] = []
    for match in _CANDIDATE.finditer(text):
        ranges += _card_ranges_in_run(match.group(0), match.start())
    return ranges


def contains_card_number(text: str) -> bool:
    return bool(card_number_ranges(text))


def replace_card_numbers(text: str, replacement: Callable[[str], str]) -> str:
    """text with every card number found replaced by replacement(the number as written)."""
    ranges = card_number_ranges(text)
    if not ranges:
        return text
    out: list[str] = []
    position = 0
    for start, end in ranges:
        out.append(text[position:start])
        out.append(replacement(text[start:end]))
        position = end
    out.append(text[position:])
    return "".join(out)


def truncate_pan(written: str) -> str:
    """A card number reduced to what PCI DSS allows to be kept: the first six and last
    four digits, the rest as '*' ("4111 1111 1111 1111" -> "411111******1111")."""
    digits = "".join(_GROUP.findall(written))
    hidden = len(digits) - PAN_SHOWN_FIRST - PAN_SHOWN_LAST
    assert hidden > 0, "a card number has at least 13 digits"
    return digits[:PAN_SHOWN_FIRST] + PAN_MASK_CHAR * hidden + digits[-PAN_SHOWN_LAST:]


def mask_card_numbers(text: str) -> str:
    """text with every card number truncated as PCI DSS allows (see truncate_pan)."""
    return replace_card_numbers(text, truncate_pan)


assert PAN_SHOWN_FIRST + PAN_SHOWN_LAST < PAN_DIGITS_MIN

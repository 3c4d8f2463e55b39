"""Protobuf requests -> domain values, collecting every field violation on the way.

Validation is at the edge: anything malformed is refused here, whole, with the
field path and the reason, before any shard is touched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ledger import limits
from ledger.api.status import invalid_argument
from ledger.domain.accounts import AccountKey, AccountSpec
from ledger.domain.money import is_known_currency
from ledger.domain.sagas import RESERVED_ID_PREFIX
from ledger.domain.transfers import (
    Direction,
    JournalRequest,
    Posting,
    TransferAction,
    TransferKey,
    TransferRequest,
)
from ledger.limits import AMOUNT_MINOR_MAX
from ledger.telemetry.card_numbers import contains_card_number
from ledger.telemetry.card_numbers import mask_card_numbers as truncate_card_numbers
from ledger.v1 import ledger_pb2 as pb

_PENDING_TIMEOUT_MS_MAX = int(limits.pending_timeout_max.total_seconds() * 1000)
_TRANSFER_ACTIONS = frozenset(a.value for a in TransferAction)
# Unicode's control characters (general category Cc) are exactly C0, DEL and C1; one
# regex search is ~20x cheaper per id than asking unicodedata about every character
# (tests/test_api_validation.py checks the two agree on every code point).
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")
# Characters that do not show as themselves: format (Cf: zero-width space U+200B,
# right-to-left override U+202E, BOM U+FEFF), private use (Co), unassigned in the
# Unicode version of this Python (Cn: U+FFFF) and surrogates (Cs). Two ids that look
# the same could name different things, so ids holding them are refused, not normalised.
_HIDDEN_CATEGORIES = {
    "Cf": "format characters",
    "Co": "private-use characters",
    "Cn": "unassigned characters",
    "Cs": "surrogate characters",
}
CARD_NUMBER_REASON = (
    "must not hold a card number (13 to 19 digits passing the Luhn check, with or "
    "without separators): card data is never stored"
)


def _hidden_character(value: str) -> str:
    """'format characters (U+200B)' for the first hidden character of value, else ''."""
    for char in value:
        kind = _HIDDEN_CATEGORIES.get(unicodedata.category(char))
        if kind is not None:
            return f"{kind} (U+{ord(char):04X})"
    return ""


class Violations:
    """Collects (field path, reason) pairs; raise_if_any() refuses the whole request."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        # Ids that passed id() in this request: a batch names the same merchants and
        # accounts on every item, and the checks depend on the value alone (issue 18).
        self._valid_ids: set[str] = set()

    def add(self, field: str, reason: str) -> None:
        self.items.append((field, reason))

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid_argument(self.items)

    def id(self, field: str, value: str) -> None:
        """Ids: 1-128 bytes of UTF-8 with no invisible or undefined characters (control,
        format, private-use, unassigned, surrogate), not starting with '$' (reserved for
        the ledger's own accounts) and holding no card number."""
        if value in self._valid_ids:
            return
        before = len(self.items)
        self._check_id(field, value)
        if len(self.items) == before:
            self._valid_ids.add(value)

    def _check_id(self, field: str, value: str) -> None:
        ascii_only = value.isascii()
        size = len(value) if ascii_only else len(value.encode("utf-8", "surrogatepass"))
        if size == 0:
            self.add(field, "must not be empty")
        elif size > limits.id_bytes_max:
            self.add(field, f"must be at most {limits.id_bytes_max} bytes")
        # Before the character checks: a card number split by tabs is named as what it is.
        elif contains_card_number(value):
            self.add(field, CARD_NUMBER_REASON)
        # In ASCII the only unprintable characters are the controls (C0 and DEL), and
        # isprintable() is a third of a regex search; ids are nearly always ASCII.
        elif not value.isprintable() if ascii_only else CONTROL_CHARACTERS.search(value):
            self.add(field, "must not contain control characters")
        elif not ascii_only and (hidden := _hidden_character(value)):
            self.add(field, f"must not contain {hidden}")
        elif value.startswith(RESERVED_ID_PREFIX):
            self.add(field, f"must not start with {RESERVED_ID_PREFIX!r} (reserved)")

    def merchant_id(self, field: str, value: str) -> None:
        # The same rules as every other id (the reserved '$' included).
        self.id(field, value)

    def currency(self, field: str, value: str) -> None:
        if not value:
            self.add(field, "is required")
        elif not is_known_currency(value):
            self.add(field, f"{value[:8]!r} is not an ISO 4217 currency code")

    def metadata(
        self, field: str, value: Mapping[str, str], *, mask_card_numbers: bool = False
    ) -> dict[str, str]:
        """The metadata to store. A key holding a card number is refused; so is a value,
        unless mask_card_numbers (LEDGER_CARD_METADATA=mask): then it is stored with the
        card number cut to its first six and last four digits."""
        if len(value) > limits.metadata_keys_max:
            self.add(field, f"must have at most {limits.metadata_keys_max} keys")
            return {}
        stored: dict[str, str] = {}
        for key, item in value.items():
            # Field paths name the key, with any card number in it truncated, never whole.
            path = f"{field}[{truncate_card_numbers(key)[:32]!r}]"
            if "\x00" in key or "\x00" in item:
                # PostgreSQL's jsonb cannot hold U+0000.
                self.add(path, "must not contain NUL characters")
                continue
            size = len(key.encode("utf-8", "surrogatepass"))
            if size == 0 or size > limits.metadata_key_bytes_max:
                self.add(path, f"key must be 1 to {limits.metadata_key_bytes_max} bytes")
            if len(item.encode("utf-8", "surrogatepass")) > limits.metadata_value_bytes_max:
                self.add(path, f"value must be at most {limits.metadata_value_bytes_max} bytes")
            if contains_card_number(key):
                self.add(path, f"key {CARD_NUMBER_REASON}")
            if contains_card_number(item):
                if mask_card_numbers:
                    item = truncate_card_numbers(item)
                else:
                    self.add(path, f"value {CARD_NUMBER_REASON}")
            stored[key] = item
        return stored

    def count(self, field: str, size: int, *, minimum: int, maximum: int) -> bool:
        if size < minimum or size > maximum:
            self.add(field, f"must have {minimum} to {maximum} items, has {size}")
            return False
        return True

    def page_size(self, field: str, value: int) -> int:
        if value < 0 or value > limits.page_size_max:
            self.add(field, f"must be 0 to {limits.page_size_max}")
            return limits.page_size_default
        return value or limits.page_size_default


def account_ref(
    v: Violations, field: str, ref: pb.AccountRef, *, required: bool = True
) -> AccountKey | None:
    if not required and not ref.merchant_id and not ref.account_id:
        return None
    v.merchant_id(f"{field}.merchant_id", ref.merchant_id)
    v.id(f"{field}.account_id", ref.account_id)
    return AccountKey(ref.merchant_id, ref.account_id)


def create_accounts(
    request: pb.CreateAccountsRequest, *, mask_card_metadata: bool = False
) -> list[AccountSpec]:
    v = Violations()
    if not v.count(
        "accounts", len(request.accounts), minimum=1, maximum=limits.accounts_per_request_max
    ):
        v.raise_if_any()
    specs: list[AccountSpec] = []
    seen: set[AccountKey] = set()
    for i, account in enumerate(request.accounts):
        field = f"accounts[{i}]"
        key = account_ref(v, f"{field}.ref", account.ref)
        assert key is not None
        if key in seen:
            v.add(f"{field}.ref", "duplicates an earlier account in this request")
        seen.add(key)
        v.currency(f"{field}.currency", account.currency)
        if account.debits_must_not_exceed_credits and account.credits_must_not_exceed_debits:
            v.add(f"{field}.credits_must_not_exceed_debits", "at most one limit flag may be set")
        metadata = v.metadata(
            f"{field}.metadata", account.metadata, mask_card_numbers=mask_card_metadata
        )
        specs.append(
            AccountSpec(
                key=key,
                currency=account.currency,
                debits_must_not_exceed_credits=account.debits_must_not_exceed_credits,
                credits_must_not_exceed_debits=account.credits_must_not_exceed_debits,
                metadata=metadata,
            )
        )
    v.raise_if_any()
    return specs


def account_refs(field: str, refs: Sequence[pb.AccountRef]) -> list[AccountKey]:
    v = Violations()
    items = list(refs)
    if not v.count(field, len(items), minimum=1, maximum=limits.refs_per_lookup_max):
        v.raise_if_any()
    keys = []
    for i, ref in enumerate(items):
        key = account_ref(v, f"{field}[{i}]", ref)
        assert key is not None
        keys.append(key)
    v.raise_if_any()
    return keys


def transfer_refs(request: pb.LookupTransfersRequest) -> list[TransferKey]:
    v = Violations()
    if not 0 <= request.wait_timeout_ms <= limits.lookup_wait_ms_max:
        v.add("wait_timeout_ms", f"must be 0 to {limits.lookup_wait_ms_max}")
    if not v.count("refs", len(request.refs), minimum=1, maximum=limits.refs_per_lookup_max):
        v.raise_if_any()
    keys = []
    for i, ref in enumerate(request.refs):
        v.merchant_id(f"refs[{i}].merchant_id", ref.merchant_id)
        v.id(f"refs[{i}].transfer_id", ref.transfer_id)
        keys.append(TransferKey(ref.merchant_id, ref.transfer_id))
    v.raise_if_any()
    return keys


def create_transfers(
    request: pb.CreateTransfersRequest, *, mask_card_metadata: bool = False
) -> list[TransferRequest]:
    v = Violations()
    if not v.count(
        "transfers", len(request.transfers), minimum=1, maximum=limits.transfers_per_request_max
    ):
        v.raise_if_any()
    decoded: list[TransferRequest] = []
    seen: set[TransferKey] = set()
    for i, transfer in enumerate(request.transfers):
        item = _transfer(v, f"transfers[{i}]", transfer, mask_card_metadata=mask_card_metadata)
        if item is not None:
            if item.key in seen:
                v.add(f"transfers[{i}].id", "duplicates an earlier transfer id in this request")
            seen.add(item.key)
            decoded.append(item)
    v.raise_if_any()
    return decoded


def _transfer(
    v: Violations, field: str, t: pb.Transfer, *, mask_card_metadata: bool
) -> TransferRequest | None:
    before = len(v.items)
    v.id(f"{field}.id", t.id)
    debit = account_ref(v, f"{field}.debit_account", t.debit_account)
    known_action = t.action in _TRANSFER_ACTIONS
    if not known_action:
        v.add(f"{field}.action", "must be POST, PENDING, POST_PENDING or VOID_PENDING")
    # An unknown action is checked as a POST so that every other bad field is reported too.
    action = TransferAction(t.action) if known_action else TransferAction.POST
    settles = action in (TransferAction.POST_PENDING, TransferAction.VOID_PENDING)
    credit = account_ref(v, f"{field}.credit_account", t.credit_account, required=not settles)
    if t.amount_minor < 0:
        v.add(f"{field}.amount_minor", "must not be negative")
    elif t.amount_minor == 0 and not settles:
        v.add(f"{field}.amount_minor", "must be positive")
    if settles:
        if t.currency:
            v.currency(f"{field}.currency", t.currency)
        v.id(f"{field}.pending_id", t.pending_id)
    else:
        v.currency(f"{field}.currency", t.currency)
        if t.pending_id:
            v.add(f"{field}.pending_id", "is only for POST_PENDING and VOID_PENDING")
    if t.timeout_ms < 0 or t.timeout_ms > _PENDING_TIMEOUT_MS_MAX:
        v.add(f"{field}.timeout_ms", f"must be 0 to {_PENDING_TIMEOUT_MS_MAX}")
    elif t.timeout_ms and action is not TransferAction.PENDING:
        v.add(f"{field}.timeout_ms", "is only for PENDING transfers")
    if t.reversal_of:
        v.id(f"{field}.reversal_of", t.reversal_of)
        if action is not TransferAction.POST:
            v.add(f"{field}.reversal_of", "a reversal is a POST transfer")
        elif t.reversal_of == t.id:
            v.add(f"{field}.reversal_of", "a transfer cannot reverse itself")
    metadata = v.metadata(f"{field}.metadata", t.metadata, mask_card_numbers=mask_card_metadata)
    if len(v.items) > before or debit is None:
        return None
    return TransferRequest(
        id=t.id,
        debit=debit,
        credit=credit,
        amount_minor=t.amount_minor,
        currency=t.currency,
        action=action,
        pending_id=t.pending_id,
        timeout_ms=t.timeout_ms,
        linked=t.linked,
        reversal_of=t.reversal_of,
        metadata=metadata,
    )


def post_journal(
    request: pb.PostJournalRequest, *, mask_card_metadata: bool = False
) -> JournalRequest:
    v = Violations()
    v.id("journal_id", request.journal_id)
    v.merchant_id("merchant_id", request.merchant_id)
    metadata = v.metadata("metadata", request.metadata, mask_card_numbers=mask_card_metadata)
    if not v.count(
        "postings", len(request.postings), minimum=2, maximum=limits.postings_per_journal_max
    ):
        v.raise_if_any()
    postings: list[Posting] = []
    totals: dict[str, int] = {}
    for i, posting in enumerate(request.postings):
        field = f"postings[{i}]"
        key = account_ref(v, f"{field}.account", posting.account)
        if posting.amount_minor <= 0:
            v.add(f"{field}.amount_minor", "must be positive")
        v.currency(f"{field}.currency", posting.currency)
        if int(posting.direction) not in {d.value for d in Direction}:
            v.add(f"{field}.direction", "must be DEBIT or CREDIT")
            continue
        direction = Direction(posting.direction)
        sign = 1 if direction is Direction.DEBIT else -1
        totals[posting.currency] = totals.get(posting.currency, 0) + sign * posting.amount_minor
        assert key is not None
        postings.append(Posting(key, posting.amount_minor, posting.currency, direction))
    v.raise_if_any()
    for currency, total in sorted(totals.items()):
        if total != 0:
            v.add("postings", f"debits and credits in {currency} differ by {abs(total)}")
    v.raise_if_any()
    return JournalRequest(
        id=request.journal_id,
        merchant_id=request.merchant_id,
        postings=tuple(postings),
        metadata=metadata,
    )


# The range google.protobuf.Timestamp allows: 0001-01-01 to 9999-12-31.
_TIMESTAMP_SECONDS_MIN = -62135596800
_TIMESTAMP_SECONDS_MAX = 253402300799
_NANOS_MAX = 999_999_999
_SEQUENCE_CURSOR = re.compile(r"[0-9]{1,19}")


def timestamp(v: Violations, field: str, value: Timestamp) -> datetime | None:
    if not (
        _TIMESTAMP_SECONDS_MIN <= value.seconds <= _TIMESTAMP_SECONDS_MAX
        and 0 <= value.nanos <= _NANOS_MAX
    ):
        v.add(field, "must be a valid timestamp between years 1 and 9999")
        return None
    return datetime.fromtimestamp(value.seconds, UTC).replace(microsecond=value.nanos // 1000)


class PageTokens:
    """Page tokens bound to the listing they page and signed by the service.

    A token carries its kind and cursor, and an HMAC-SHA256 (the service's key) over
    the kind, the listing (the merchant for ListAccounts, the account for ListEntries)
    and the cursor. A token from another listing, order or kind, or not made with this
    key, is refused with INVALID_ARGUMENT instead of silently paging the wrong thing.
    Every replica must share the key (LEDGER_PAGE_TOKEN_KEY) for a token from one to
    work on another.
    """

    VERSION = "v2"
    # 128 bits of HMAC: forging one is out of reach, and the token stays short.
    MAC_BYTES = 16

    def __init__(self, key: bytes) -> None:
        assert len(key) >= 16, "a page token key has at least 128 bits"
        self._key = key

    def _mac(self, kind: str, listing: str, cursor: str) -> bytes:
        message = "\x00".join((self.VERSION, kind, listing, cursor)).encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[: self.MAC_BYTES]

    def issue(self, *, kind: str, listing: str, cursor: str) -> str:
        raw = self._mac(kind, listing, cursor) + f"{self.VERSION}|{kind}|{cursor}".encode()
        return base64.urlsafe_b64encode(raw).decode("ascii")

    def cursor(
        self, v: Violations, field: str, token: str, *, kind: str, listing: str
    ) -> str | None:
        """The cursor of a token this service issued for this listing and kind, else a
        violation (None also when there is no token)."""
        if not token:
            return None
        if len(token) > limits.page_token_bytes_max:
            v.add(field, f"must be at most {limits.page_token_bytes_max} bytes")
            return None
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
            mac, payload = raw[: self.MAC_BYTES], raw[self.MAC_BYTES :].decode()
            version, token_kind, cursor = payload.split("|", 2)
        except (ValueError, UnicodeError, binascii.Error):
            v.add(field, "is not a page token this service issued")
            return None
        if version != self.VERSION or not hmac.compare_digest(
            mac, self._mac(token_kind, listing, cursor)
        ):
            v.add(field, "is not a page token this service issued for this listing")
            return None
        if token_kind != kind:
            v.add(field, "belongs to a different listing or order")
            return None
        return cursor


def entries_listing(key: AccountKey) -> str:
    """What an entries page token is bound to: one account (ids never hold NUL)."""
    return f"{key.merchant_id}\x00{key.account_id}"


def account_cursor(
    v: Violations, field: str, token: str, *, tokens: PageTokens, merchant_id: str
) -> str:
    cursor = tokens.cursor(v, field, token, kind="accounts", listing=merchant_id)
    if cursor is None:
        return ""
    before = len(v.items)
    v.id(field, cursor)
    if len(v.items) > before:
        del v.items[before:]
        v.add(field, "is corrupt")
        return ""
    return cursor


def sequence_cursor(
    v: Violations, field: str, token: str, kind: str, *, tokens: PageTokens, listing: str
) -> int | None:
    cursor = tokens.cursor(v, field, token, kind=kind, listing=listing)
    if cursor is None:
        return None
    if not _SEQUENCE_CURSOR.fullmatch(cursor) or int(cursor) > AMOUNT_MINOR_MAX:
        v.add(field, "is corrupt")
        return None
    return int(cursor)

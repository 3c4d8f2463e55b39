"""Malformed requests are refused whole at the edge: INVALID_ARGUMENT, exact field paths, no writes.

Every case runs against a real service whose shards hold real accounts, so a request that slipped
past validation would actually write (a transfer row, an entry, an account) and the row-count
check would catch it. The status must be INVALID_ARGUMENT exactly: never INTERNAL, UNKNOWN or a
retryable UNAVAILABLE for input that can never succeed.
"""

from __future__ import annotations

import base64
import sys
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ledger import limits
from ledger.api.decode import CONTROL_CHARACTERS, PageTokens, Violations
from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    count_rows,
    create_accounts,
    field_violations,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
)

TABLES = (
    "merchants",
    "accounts",
    "transfers",
    "entries",
    "pending_resolutions",
    "pending_expiries",
)
PENDING_TIMEOUT_MS_MAX = int(limits.pending_timeout_max.total_seconds() * 1000)

POST = pb.TRANSFER_ACTION_POST
PENDING = pb.TRANSFER_ACTION_PENDING
POST_PENDING = pb.TRANSFER_ACTION_POST_PENDING
VOID_PENDING = pb.TRANSFER_ACTION_VOID_PENDING
DEBIT = pb.DIRECTION_DEBIT
CREDIT = pb.DIRECTION_CREDIT


@dataclass(frozen=True)
class Books:
    """One merchant with real USD accounts and a little history, plus real page tokens."""

    merchant_id: str
    accounts_token: str
    entries_newest_token: str

    @property
    def cash(self) -> pb.AccountRef:
        return ref(self.merchant_id, "cash")

    @property
    def wallet(self) -> pb.AccountRef:
        return ref(self.merchant_id, "wallet")

    @property
    def fees(self) -> pb.AccountRef:
        return ref(self.merchant_id, "fees")

    def transfer(self, **fields: Any) -> pb.Transfer:
        """A valid POST of 100 USD cash -> wallet, with fields overridden (None removes one)."""
        base: dict[str, Any] = {
            "id": uid("t"),
            "debit_account": self.cash,
            "credit_account": self.wallet,
            "amount_minor": 100,
            "currency": "USD",
            "action": POST,
        }
        base.update(fields)
        return pb.Transfer(**{k: v for k, v in base.items() if v is not None})

    def settle(self, **fields: Any) -> pb.Transfer:
        """A VOID_PENDING of a pending id that does not exist (valid input, recorded failure)."""
        base: dict[str, Any] = {
            "credit_account": None,
            "amount_minor": 0,
            "currency": "",
            "action": VOID_PENDING,
            "pending_id": uid("p"),
        }
        base.update(fields)
        return self.transfer(**base)

    def account(self, **fields: Any) -> pb.Account:
        base: dict[str, Any] = {"ref": ref(self.merchant_id, uid("a")), "currency": "USD"}
        base.update(fields)
        return pb.Account(**base)

    def posting(self, **fields: Any) -> pb.Posting:
        base: dict[str, Any] = {
            "account": self.cash,
            "amount_minor": 100,
            "currency": "USD",
            "direction": DEBIT,
        }
        base.update(fields)
        return pb.Posting(**base)

    def journal(self, **fields: Any) -> pb.PostJournalRequest:
        """A balanced journal: cash debited 100, wallet credited 60, fees credited 40."""
        base: dict[str, Any] = {
            "journal_id": uid("j"),
            "merchant_id": self.merchant_id,
            "postings": [
                self.posting(),
                self.posting(account=self.wallet, amount_minor=60, direction=CREDIT),
                self.posting(account=self.fees, amount_minor=40, direction=CREDIT),
            ],
        }
        base.update(fields)
        return pb.PostJournalRequest(**base)


# A request for one RPC, built from the module's books: (method name, request).
Build = Callable[[Books], tuple[str, Message]]


@pytest.fixture(scope="module")
async def books(service: Service) -> AsyncIterator[Books]:
    m = uid("m")
    await create_accounts(
        service.stub, account(m, "cash"), account(m, "wallet"), account(m, "fees")
    )
    results = await transfers(
        service.stub,
        transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 100),
        transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 200),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"] * 2
    accounts_page = await service.stub.ListAccounts(
        pb.ListAccountsRequest(merchant_id=m, page_size=1), timeout=RPC_TIMEOUT_S
    )
    entries_page = await service.stub.ListEntries(
        pb.ListEntriesRequest(account=ref(m, "cash"), page_size=1), timeout=RPC_TIMEOUT_S
    )
    assert accounts_page.next_page_token and entries_page.next_page_token
    yield Books(
        merchant_id=m,
        accounts_token=accounts_page.next_page_token,
        entries_newest_token=entries_page.next_page_token,
    )


async def row_counts(service: Service) -> dict[str, int]:
    return {table: await count_rows(service, table) for table in TABLES}


async def refused(service: Service, method: str, request: Message) -> grpc.aio.AioRpcError:
    """Sends request; asserts INVALID_ARGUMENT and that no table on any shard gained a row."""
    before = await row_counts(service)
    error: grpc.aio.AioRpcError | None = None
    response: object = None
    try:
        response = await getattr(service.stub, method)(request, timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as caught:
        error = caught
    after = await row_counts(service)
    assert error is not None, f"{method} accepted bad input and answered {response}"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (
        f"{method}: expected INVALID_ARGUMENT, got {error.code().name}: {error.details()}"
    )
    assert error.details(), "the status message must say what is wrong"
    assert after == before, f"{method} refused the call but wrote rows: {before} -> {after}"
    return error


def _matches(field: str, expected: str) -> bool:
    # "x.metadata[*" stands for any key of that map (long keys may be abbreviated in the path).
    if expected.endswith("*"):
        return field.startswith(expected[:-1])
    return field == expected


def assert_violations(error: grpc.aio.AioRpcError, expected: Sequence[str]) -> dict[str, str]:
    """Every expected field is reported, with a description, and nothing else is."""
    violations = field_violations(error)
    assert violations, f"no google.rpc.BadRequest in the status: {error.details()}"
    for wanted in expected:
        assert any(_matches(f, wanted) for f in violations), (
            f"{wanted!r} not reported; got {violations}"
        )
    extra = [f for f in violations if not any(_matches(f, w) for w in expected)]
    assert not extra, f"unexpected violations {extra}; got {violations}"
    assert all(violations.values()), f"a violation has no description: {violations}"
    return violations


async def check(service: Service, books: Books, build: Build, expected: Sequence[str]) -> None:
    method, request = build(books)
    error = await refused(service, method, request)
    assert_violations(error, expected)


def one_transfer(**fields: Any) -> Build:
    return lambda b: (
        "CreateTransfers",
        pb.CreateTransfersRequest(transfers=[b.transfer(**fields)]),
    )


def one_settle(**fields: Any) -> Build:
    return lambda b: ("CreateTransfers", pb.CreateTransfersRequest(transfers=[b.settle(**fields)]))


def one_account(**fields: Any) -> Build:
    return lambda b: ("CreateAccounts", pb.CreateAccountsRequest(accounts=[b.account(**fields)]))


def journal(**fields: Any) -> Build:
    return lambda b: ("PostJournal", b.journal(**fields))


def token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


# Amounts.


@pytest.mark.parametrize("amount_minor", [0, -1, -(2**63)], ids=["zero", "minus-one", "int64-min"])
@pytest.mark.parametrize("action", [POST, PENDING], ids=["post", "pending"])
async def test_transfer_amount_that_is_not_positive_is_refused(
    service: Service, books: Books, amount_minor: int, action: int
) -> None:
    await check(
        service,
        books,
        one_transfer(amount_minor=amount_minor, action=action),
        ["transfers[0].amount_minor"],
    )


@pytest.mark.parametrize("action", [POST_PENDING, VOID_PENDING], ids=["post-pending", "void"])
async def test_settle_amount_that_is_negative_is_refused(
    service: Service, books: Books, action: int
) -> None:
    await check(
        service, books, one_settle(action=action, amount_minor=-5), ["transfers[0].amount_minor"]
    )


@pytest.mark.parametrize("amount_minor", [0, -7])
async def test_posting_amount_that_is_not_positive_is_refused(
    service: Service, books: Books, amount_minor: int
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "PostJournal", b.journal(
            postings=[
                b.posting(),
                b.posting(account=b.wallet, amount_minor=amount_minor, direction=CREDIT),
                b.posting(account=b.fees, amount_minor=100, direction=CREDIT),
            ]
        )

    await check(service, books, build, ["postings[1].amount_minor"])


# Currencies.

BAD_CURRENCIES = ["XYZ", "usd", "Usd", "US", "USDD", " USD", "840"]


@pytest.mark.parametrize("currency", BAD_CURRENCIES)
async def test_transfer_with_unknown_or_lower_case_currency_is_refused(
    service: Service, books: Books, currency: str
) -> None:
    await check(service, books, one_transfer(currency=currency), ["transfers[0].currency"])


@pytest.mark.parametrize("currency", ["usd", "XYZ"])
async def test_settle_with_a_bad_optional_currency_is_refused(
    service: Service, books: Books, currency: str
) -> None:
    await check(service, books, one_settle(currency=currency), ["transfers[0].currency"])


@pytest.mark.parametrize("action", [POST, PENDING], ids=["post", "pending"])
async def test_transfer_without_currency_is_refused(
    service: Service, books: Books, action: int
) -> None:
    await check(service, books, one_transfer(currency="", action=action), ["transfers[0].currency"])


@pytest.mark.parametrize("currency", ["", *BAD_CURRENCIES])
async def test_account_with_missing_unknown_or_lower_case_currency_is_refused(
    service: Service, books: Books, currency: str
) -> None:
    await check(service, books, one_account(currency=currency), ["accounts[0].currency"])


async def test_bad_currency_on_a_later_account_names_its_index_and_creates_no_account(
    service: Service, books: Books
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "CreateAccounts", pb.CreateAccountsRequest(
            accounts=[b.account(), b.account(currency="usd"), b.account()]
        )

    await check(service, books, build, ["accounts[1].currency"])


@pytest.mark.parametrize("currency", ["", "usd", "XYZ"])
async def test_posting_with_bad_currency_is_refused(
    service: Service, books: Books, currency: str
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "PostJournal", b.journal(
            postings=[
                b.posting(),
                b.posting(account=b.wallet, amount_minor=60, direction=CREDIT),
                b.posting(account=b.fees, amount_minor=40, currency=currency, direction=CREDIT),
            ]
        )

    await check(service, books, build, ["postings[2].currency"])


# Identifiers: 1 to 128 bytes of UTF-8, no control, format, private-use or unassigned
# characters, not starting with '$', no card number, wherever they appear.

BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("x" * (limits.id_bytes_max + 1), id="129-ascii-bytes"),
    pytest.param("é" * 65, id="65-chars-130-utf8-bytes"),
    pytest.param("€" * 43, id="43-chars-129-utf8-bytes"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("\x1f", id="unit-separator"),
    pytest.param("a\x7f", id="del"),
    pytest.param("a\x85b", id="c1-next-line"),
    pytest.param("a\u200bb", id="zero-width-space"),
    pytest.param("a\u202eb", id="right-to-left-override"),
    pytest.param("\ufeffab", id="byte-order-mark"),
    pytest.param("a\uffff", id="unassigned-u-ffff"),
    pytest.param("a\ue000", id="private-use"),
    pytest.param("$bz", id="reserved-dollar"),
    pytest.param("t 4111111111111111 x", id="card-number"),
]
# A Visa, Mastercard, Amex (15 digits), a 13-digit and a 19-digit test number, written as
# people and systems write them.
CARD_NUMBERS = [
    pytest.param("4111111111111111", id="visa-together"),
    pytest.param("4111 1111 1111 1111", id="visa-spaces"),
    pytest.param("4111  1111  1111  1111", id="visa-double-spaces"),
    pytest.param("4111-1111-1111-1111", id="visa-dashes"),
    pytest.param("4111.1111.1111.1111", id="visa-dots"),
    pytest.param("4111\t1111\t1111\t1111", id="visa-tabs"),
    pytest.param("4111 - 1111 - 1111 - 1111", id="visa-spaced-dashes"),
    pytest.param("5555 5555 5555 4444", id="mastercard"),
    pytest.param("3782 822463 10005", id="amex"),
    pytest.param("4222222222222", id="13-digits"),
    pytest.param("6011 0000 0000 0000 001", id="19-digits"),
]


def test_the_control_character_pattern_is_unicode_category_cc() -> None:
    """Ids are refused by one regex search; it must match exactly Unicode's Cc."""
    for code_point in range(sys.maxunicode + 1):
        char = chr(code_point)
        is_cc = unicodedata.category(char) == "Cc"
        assert bool(CONTROL_CHARACTERS.search(char)) is is_cc, hex(code_point)


def test_an_id_is_refused_for_a_control_character_exactly() -> None:
    """ASCII ids take a faster check than the regex; both must refuse exactly Cc,
    wherever in the id the character is (other hidden characters and a leading '$'
    have reasons of their own, see the tests below)."""
    for code_point in range(0x800):
        char = chr(code_point)
        category = unicodedata.category(char)
        for value in (char, f"a{char}", f"{char}b", f"ab{char}cd"):
            found = Violations()
            found.id("id", value)
            refused = [reason for _, reason in found.items]
            if category == "Cc":
                expected = ["must not contain control characters"]
            elif category in ("Cf", "Co", "Cn", "Cs"):
                expected = [reason for reason in refused if reason.startswith("must not contain")]
                assert len(expected) == 1, (hex(code_point), refused)
            elif value.startswith("$"):
                expected = ["must not start with '$' (reserved)"]
            else:
                expected = []
            assert refused == expected, (hex(code_point), value)


def _id_locations() -> list[Any]:
    """(where the id goes, the expected field path, whether empty means 'absent and fine')."""

    def at(
        build: Callable[[Books, str], tuple[str, Message]],
        field: str,
        name: str,
        *,
        empty_ok: bool = False,
    ) -> Any:
        return pytest.param(build, field, empty_ok, id=name)

    def create_transfer(**item: Callable[[Books, str], Any]) -> Callable[[Books, str], Any]:
        return lambda b, v: (
            "CreateTransfers",
            pb.CreateTransfersRequest(
                transfers=[b.transfer(**{k: make(b, v) for k, make in item.items()})]
            ),
        )

    return [
        at(create_transfer(id=lambda b, v: v), "transfers[0].id", "transfer-id"),
        at(
            create_transfer(debit_account=lambda b, v: ref(v, "cash")),
            "transfers[0].debit_account.merchant_id",
            "debit-merchant",
        ),
        at(
            create_transfer(debit_account=lambda b, v: ref(b.merchant_id, v)),
            "transfers[0].debit_account.account_id",
            "debit-account",
        ),
        at(
            create_transfer(credit_account=lambda b, v: ref(b.merchant_id, v)),
            "transfers[0].credit_account.account_id",
            "credit-account",
        ),
        at(
            lambda b, v: (
                "CreateTransfers",
                pb.CreateTransfersRequest(transfers=[b.settle(pending_id=v)]),
            ),
            "transfers[0].pending_id",
            "pending-id",
        ),
        at(
            create_transfer(reversal_of=lambda b, v: v),
            "transfers[0].reversal_of",
            "reversal-of",
            empty_ok=True,
        ),
        at(
            lambda b, v: (
                "CreateAccounts",
                pb.CreateAccountsRequest(accounts=[b.account(ref=ref(v, "cash"))]),
            ),
            "accounts[0].ref.merchant_id",
            "account-merchant",
        ),
        at(
            lambda b, v: (
                "CreateAccounts",
                pb.CreateAccountsRequest(
                    accounts=[b.account(), b.account(ref=ref(b.merchant_id, v))]
                ),
            ),
            "accounts[1].ref.account_id",
            "account-id",
        ),
        at(
            lambda b, v: (
                "LookupAccounts",
                pb.LookupAccountsRequest(refs=[b.cash, ref(b.merchant_id, v)]),
            ),
            "refs[1].account_id",
            "lookup-account",
        ),
        at(
            lambda b, v: (
                "SetAccountsClosed",
                pb.SetAccountsClosedRequest(refs=[ref(v, "cash")], closed=True),
            ),
            "refs[0].merchant_id",
            "close-merchant",
        ),
        at(
            lambda b, v: (
                "LookupTransfers",
                pb.LookupTransfersRequest(refs=[pb.TransferRef(merchant_id=v, transfer_id="t")]),
            ),
            "refs[0].merchant_id",
            "lookup-transfer-merchant",
        ),
        at(
            lambda b, v: (
                "LookupTransfers",
                pb.LookupTransfersRequest(
                    refs=[pb.TransferRef(merchant_id=b.merchant_id, transfer_id=v)]
                ),
            ),
            "refs[0].transfer_id",
            "lookup-transfer-id",
        ),
        at(
            lambda b, v: ("ListAccounts", pb.ListAccountsRequest(merchant_id=v)),
            "merchant_id",
            "list-merchant",
        ),
        at(
            lambda b, v: ("GetBalance", pb.GetBalanceRequest(account=ref(b.merchant_id, v))),
            "account.account_id",
            "balance-account",
        ),
        at(
            lambda b, v: ("ListEntries", pb.ListEntriesRequest(account=ref(v, "cash"))),
            "account.merchant_id",
            "entries-merchant",
        ),
        at(lambda b, v: ("PostJournal", b.journal(journal_id=v)), "journal_id", "journal-id"),
        at(
            lambda b, v: ("PostJournal", b.journal(merchant_id=v)),
            "merchant_id",
            "journal-merchant",
        ),
        at(
            lambda b, v: (
                "PostJournal",
                b.journal(
                    postings=[
                        b.posting(),
                        b.posting(account=ref(b.merchant_id, v), direction=CREDIT),
                    ]
                ),
            ),
            "postings[1].account.account_id",
            "posting-account",
        ),
    ]


def _bad_ids_everywhere() -> list[Any]:
    """Every bad id at every place an id goes (an empty optional id just means 'absent')."""
    cases = []
    for location in _id_locations():
        build, field, empty_ok = location.values
        for bad in BAD_IDS:
            (value,) = bad.values
            if empty_ok and value == "":
                continue
            cases.append(pytest.param(build, field, value, id=f"{location.id}-{bad.id}"))
    return cases


@pytest.mark.parametrize(("build", "field", "bad_id"), _bad_ids_everywhere())
async def test_id_that_is_empty_too_long_or_has_control_characters_is_refused(
    service: Service,
    books: Books,
    build: Callable[[Books, str], tuple[str, Message]],
    field: str,
    bad_id: str,
) -> None:
    await check(service, books, lambda b: build(b, bad_id), [field])


def _card_ids_everywhere() -> list[Any]:
    cases = []
    for location in _id_locations():
        build, field, _ = location.values
        for card in CARD_NUMBERS:
            (number,) = card.values
            cases.append(pytest.param(build, field, number, id=f"{location.id}-{card.id}"))
    return cases


@pytest.mark.parametrize(("build", "field", "number"), _card_ids_everywhere())
async def test_id_holding_a_card_number_is_refused_naming_the_field_and_why(
    service: Service,
    books: Books,
    build: Callable[[Books, str], tuple[str, Message]],
    field: str,
    number: str,
) -> None:
    method, request = build(books, f"order {number}/1")
    error = await refused(service, method, request)
    violations = assert_violations(error, [field])
    assert "card number" in violations[field]
    assert number not in error.details()


async def test_id_with_a_c1_control_character_is_refused(service: Service, books: Books) -> None:
    # U+0085 (NEXT LINE) is a Unicode control character (category Cc), like U+000A.
    await check(service, books, one_transfer(id="a\u0085b"), ["transfers[0].id"])


async def test_id_of_exactly_128_utf8_bytes_is_accepted(service: Service, books: Books) -> None:
    # The limit counts bytes, not characters, and is inclusive: 64 x "é" is 128 bytes.
    results = await transfers(service.stub, books.transfer(id="é" * 64))
    assert result_names(results) == ["TRANSFER_RESULT_OK"]


async def test_posting_without_account_is_refused(service: Service, books: Books) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "PostJournal", b.journal(
            postings=[
                pb.Posting(amount_minor=100, currency="USD", direction=DEBIT),
                b.posting(account=b.wallet, direction=CREDIT),
            ]
        )

    await check(
        service, books, build, ["postings[0].account.merchant_id", "postings[0].account.account_id"]
    )


# Metadata: at most 16 keys, keys 1 to 64 bytes, values at most 256 bytes.

BAD_METADATA = [
    pytest.param({f"k{i}": "v" for i in range(limits.metadata_keys_max + 1)}, "", id="17-keys"),
    pytest.param({"": "v"}, "['']", id="empty-key"),
    pytest.param({"k" * (limits.metadata_key_bytes_max + 1): "v"}, "[*", id="65-byte-key"),
    pytest.param({"é" * 33: "v"}, "[*", id="33-chars-66-byte-key"),
    pytest.param(
        {"note": "v" * (limits.metadata_value_bytes_max + 1)}, "['note']", id="long-value"
    ),
    pytest.param({"note": "€" * 86}, "['note']", id="86-chars-258-byte-value"),
]


BAD_METADATA += [
    pytest.param({"pan": number}, "['pan']", id=f"card-value-{card.id}")
    for card in CARD_NUMBERS
    for number in card.values
] + [
    pytest.param({f"k{number}": "v"}, "[*", id=f"card-key-{card.id}")
    for card in CARD_NUMBERS
    for number in card.values
]


def _metadata_containers() -> list[Any]:
    return [
        pytest.param(
            lambda b, md: (
                "CreateTransfers",
                pb.CreateTransfersRequest(transfers=[b.transfer(metadata=md)]),
            ),
            "transfers[0].metadata",
            id="transfer",
        ),
        pytest.param(
            lambda b, md: (
                "CreateAccounts",
                pb.CreateAccountsRequest(accounts=[b.account(), b.account(metadata=md)]),
            ),
            "accounts[1].metadata",
            id="account",
        ),
        pytest.param(
            lambda b, md: ("PostJournal", b.journal(metadata=md)), "metadata", id="journal"
        ),
    ]


@pytest.mark.parametrize(("metadata", "suffix"), BAD_METADATA)
@pytest.mark.parametrize(("build", "field"), _metadata_containers())
async def test_metadata_over_its_limits_is_refused(
    service: Service,
    books: Books,
    build: Callable[[Books, dict[str, str]], tuple[str, Message]],
    field: str,
    metadata: dict[str, str],
    suffix: str,
) -> None:
    await check(service, books, lambda b: build(b, metadata), [field + suffix])


async def test_metadata_at_its_limits_is_accepted(service: Service, books: Books) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 256 for i in range(limits.metadata_keys_max)}
    results = await transfers(service.stub, books.transfer(metadata=metadata))
    assert result_names(results) == ["TRANSFER_RESULT_OK"]


# Batch sizes.


def _batches() -> list[Any]:
    over = limits.transfers_per_request_max + 1
    over_accounts = limits.accounts_per_request_max + 1
    over_refs = limits.refs_per_lookup_max + 1
    over_postings = limits.postings_per_journal_max + 1
    return [
        pytest.param(
            lambda b: ("CreateTransfers", pb.CreateTransfersRequest()),
            "transfers",
            id="no-transfers",
        ),
        pytest.param(
            lambda b: (
                "CreateTransfers",
                pb.CreateTransfersRequest(
                    transfers=[b.transfer(amount_minor=1) for _ in range(over)]
                ),
            ),
            "transfers",
            id="too-many-transfers",
        ),
        pytest.param(
            lambda b: ("CreateAccounts", pb.CreateAccountsRequest()), "accounts", id="no-accounts"
        ),
        pytest.param(
            lambda b: (
                "CreateAccounts",
                pb.CreateAccountsRequest(accounts=[b.account() for _ in range(over_accounts)]),
            ),
            "accounts",
            id="too-many-accounts",
        ),
        pytest.param(
            lambda b: ("LookupAccounts", pb.LookupAccountsRequest()), "refs", id="no-lookup-refs"
        ),
        pytest.param(
            lambda b: ("LookupAccounts", pb.LookupAccountsRequest(refs=[b.cash] * over_refs)),
            "refs",
            id="too-many-lookup-refs",
        ),
        pytest.param(
            lambda b: ("SetAccountsClosed", pb.SetAccountsClosedRequest(closed=True)),
            "refs",
            id="no-close-refs",
        ),
        pytest.param(
            lambda b: (
                "SetAccountsClosed",
                pb.SetAccountsClosedRequest(
                    refs=[ref(b.merchant_id, uid("a")) for _ in range(over_refs)], closed=True
                ),
            ),
            "refs",
            id="too-many-close-refs",
        ),
        pytest.param(
            lambda b: ("LookupTransfers", pb.LookupTransfersRequest()),
            "refs",
            id="no-transfer-refs",
        ),
        pytest.param(
            lambda b: (
                "LookupTransfers",
                pb.LookupTransfersRequest(
                    refs=[pb.TransferRef(merchant_id=b.merchant_id, transfer_id="t")] * over_refs
                ),
            ),
            "refs",
            id="too-many-transfer-refs",
        ),
        pytest.param(
            lambda b: ("PostJournal", b.journal(postings=[])), "postings", id="no-postings"
        ),
        pytest.param(
            lambda b: ("PostJournal", b.journal(postings=[b.posting()])),
            "postings",
            id="one-posting",
        ),
        pytest.param(
            lambda b: (
                "PostJournal",
                b.journal(
                    postings=[
                        b.posting(direction=DEBIT if i % 2 else CREDIT, amount_minor=1)
                        for i in range(over_postings + 1)
                    ]
                ),
            ),
            "postings",
            id="too-many-postings",
        ),
    ]


@pytest.mark.parametrize(("build", "field"), _batches())
async def test_batch_that_is_empty_or_over_its_limit_is_refused(
    service: Service, books: Books, build: Build, field: str
) -> None:
    await check(service, books, build, [field])


async def test_bad_item_late_in_a_batch_refuses_the_whole_batch(
    service: Service, books: Books
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "CreateTransfers", pb.CreateTransfersRequest(
            transfers=[b.transfer(), b.transfer(), b.transfer(amount_minor=0)]
        )

    await check(service, books, build, ["transfers[2].amount_minor"])


# Duplicates.


async def test_duplicate_transfer_id_in_one_request_is_refused(
    service: Service, books: Books
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        same = uid("t")
        return "CreateTransfers", pb.CreateTransfersRequest(
            transfers=[b.transfer(id=same), b.transfer(), b.transfer(id=same, amount_minor=5)]
        )

    await check(service, books, build, ["transfers[2].id"])


async def test_duplicate_account_in_one_request_is_refused(service: Service, books: Books) -> None:
    def build(b: Books) -> tuple[str, Message]:
        same = ref(b.merchant_id, uid("a"))
        return "CreateAccounts", pb.CreateAccountsRequest(
            accounts=[b.account(ref=same), b.account(ref=same, currency="EUR")]
        )

    await check(service, books, build, ["accounts[1].ref"])


# Enums.


@pytest.mark.parametrize("action", [0, 5, 99, -1], ids=["unspecified", "5", "99", "minus-one"])
async def test_transfer_with_unknown_or_unspecified_action_is_refused(
    service: Service, books: Books, action: int
) -> None:
    await check(service, books, one_transfer(action=action), ["transfers[0].action"])


@pytest.mark.parametrize("direction", [0, 3, 99, -1], ids=["unspecified", "3", "99", "minus-one"])
async def test_posting_with_unknown_or_unspecified_direction_is_refused(
    service: Service, books: Books, direction: int
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "PostJournal", b.journal(
            postings=[
                b.posting(),
                b.posting(account=b.wallet, amount_minor=60, direction=CREDIT),
                b.posting(account=b.fees, amount_minor=40, direction=direction),
            ]
        )

    await check(service, books, build, ["postings[2].direction"])


@pytest.mark.parametrize("order", [3, 99, -1])
async def test_list_entries_with_unknown_order_is_refused(
    service: Service, books: Books, order: int
) -> None:
    await check(
        service,
        books,
        lambda b: ("ListEntries", pb.ListEntriesRequest(account=b.cash, order=order)),  # type: ignore[arg-type]
        ["order"],
    )


# Transfer field combinations.


@pytest.mark.parametrize("action", [POST, PENDING], ids=["post", "pending"])
async def test_transfer_without_credit_account_is_refused(
    service: Service, books: Books, action: int
) -> None:
    await check(
        service,
        books,
        one_transfer(credit_account=None, action=action),
        ["transfers[0].credit_account.merchant_id", "transfers[0].credit_account.account_id"],
    )


@pytest.mark.parametrize("action", [POST, PENDING], ids=["post", "pending"])
async def test_pending_id_on_a_transfer_that_settles_nothing_is_refused(
    service: Service, books: Books, action: int
) -> None:
    await check(
        service,
        books,
        one_transfer(action=action, pending_id=uid("p")),
        ["transfers[0].pending_id"],
    )


@pytest.mark.parametrize("action", [POST, POST_PENDING, VOID_PENDING])
async def test_timeout_on_a_transfer_that_is_not_pending_is_refused(
    service: Service, books: Books, action: int
) -> None:
    build = (
        one_transfer(timeout_ms=1000)
        if action == POST
        else one_settle(action=action, timeout_ms=1000)
    )
    await check(service, books, build, ["transfers[0].timeout_ms"])


@pytest.mark.parametrize(
    "timeout_ms",
    [-1, -(2**63), PENDING_TIMEOUT_MS_MAX + 1, 2**63 - 1],
    ids=["minus-one", "int64-min", "30-days-plus-1ms", "int64-max"],
)
async def test_pending_timeout_that_is_negative_or_over_30_days_is_refused(
    service: Service, books: Books, timeout_ms: int
) -> None:
    await check(
        service,
        books,
        one_transfer(action=PENDING, timeout_ms=timeout_ms),
        ["transfers[0].timeout_ms"],
    )


async def test_pending_timeout_of_exactly_30_days_is_accepted(
    service: Service, books: Books
) -> None:
    results = await transfers(
        service.stub, books.transfer(action=PENDING, timeout_ms=PENDING_TIMEOUT_MS_MAX)
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"]


@pytest.mark.parametrize("action", [PENDING, POST_PENDING, VOID_PENDING])
async def test_reversal_that_is_not_a_post_is_refused(
    service: Service, books: Books, action: int
) -> None:
    build = (
        one_transfer(action=PENDING, reversal_of=uid("t"))
        if action == PENDING
        else one_settle(action=action, reversal_of=uid("t"))
    )
    await check(service, books, build, ["transfers[0].reversal_of"])


async def test_transfer_reversing_itself_is_refused(service: Service, books: Books) -> None:
    same = uid("t")
    await check(
        service, books, one_transfer(id=same, reversal_of=same), ["transfers[0].reversal_of"]
    )


async def test_account_with_both_limit_flags_is_refused(service: Service, books: Books) -> None:
    await check(
        service,
        books,
        one_account(debits_must_not_exceed_credits=True, credits_must_not_exceed_debits=True),
        ["accounts[0].credits_must_not_exceed_debits"],
    )


# Journals.


async def test_unbalanced_journal_is_refused_naming_the_currency(
    service: Service, books: Books
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "PostJournal", b.journal(
            postings=[
                b.posting(amount_minor=100),
                b.posting(account=b.wallet, amount_minor=60, direction=CREDIT),
                b.posting(account=b.fees, amount_minor=39, direction=CREDIT),
            ]
        )

    method, request = build(books)
    violations = assert_violations(await refused(service, method, request), ["postings"])
    assert "USD" in violations["postings"], violations


async def test_journal_unbalanced_in_one_of_two_currencies_names_only_that_currency(
    service: Service, books: Books
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        eur = ref(b.merchant_id, "eur-a")
        eur_b = ref(b.merchant_id, "eur-b")
        return "PostJournal", b.journal(
            postings=[
                b.posting(amount_minor=100),
                b.posting(account=b.wallet, amount_minor=100, direction=CREDIT),
                b.posting(account=eur, amount_minor=50, currency="EUR"),
                b.posting(account=eur_b, amount_minor=49, currency="EUR", direction=CREDIT),
            ]
        )

    method, request = build(books)
    violations = assert_violations(await refused(service, method, request), ["postings"])
    assert "EUR" in violations["postings"] and "USD" not in violations["postings"], violations


async def test_journal_of_only_debits_is_refused(service: Service, books: Books) -> None:
    await check(
        service,
        books,
        journal(postings=[books.posting(), books.posting(account=books.wallet)]),
        ["postings"],
    )


# Paging.


@pytest.mark.parametrize(
    "page_size",
    [-1, -(2**31), limits.page_size_max + 1, 2**31 - 1],
    ids=["minus-one", "int32-min", "max-plus-one", "int32-max"],
)
@pytest.mark.parametrize("method", ["ListAccounts", "ListEntries"])
async def test_page_size_that_is_negative_or_over_the_limit_is_refused(
    service: Service, books: Books, method: str, page_size: int
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        if method == "ListAccounts":
            return method, pb.ListAccountsRequest(merchant_id=b.merchant_id, page_size=page_size)
        return method, pb.ListEntriesRequest(account=b.cash, page_size=page_size)

    await check(service, books, build, ["page_size"])


GARBAGE_TOKENS = [
    pytest.param("!!!", id="not-base64"),
    pytest.param("abc", id="bad-padding"),
    pytest.param("garbage-token", id="words"),
    pytest.param("tökën", id="non-ascii"),
    pytest.param(token(b"\xff\xfe\xfd"), id="not-utf8"),
    pytest.param(token(b"v1|accounts"), id="two-parts"),
    pytest.param(token(b"v2|accounts|x"), id="unknown-version"),
    pytest.param(token(b"v1|entries-newest|"), id="empty-cursor"),
    pytest.param(token(b"v1|entries-newest|abc"), id="cursor-not-a-number"),
    pytest.param(token(b"v1|entries-newest|-1"), id="cursor-negative"),
    pytest.param(token("v1|entries-newest|²".encode()), id="cursor-superscript-digit"),
    pytest.param(token(b"v1|entries-newest|" + b"9" * 30), id="cursor-over-int64"),
    pytest.param(token(b"v1|accounts|\x00"), id="cursor-with-nul"),
]


@pytest.mark.parametrize("page_token", GARBAGE_TOKENS)
@pytest.mark.parametrize("method", ["ListAccounts", "ListEntries"])
async def test_page_token_the_service_did_not_issue_is_refused(
    service: Service, books: Books, method: str, page_token: str
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        if method == "ListAccounts":
            return method, pb.ListAccountsRequest(merchant_id=b.merchant_id, page_token=page_token)
        return method, pb.ListEntriesRequest(account=b.cash, page_token=page_token)

    await check(service, books, build, ["page_token"])


def _foreign_tokens() -> list[Any]:
    return [
        pytest.param(
            lambda b: (
                "ListEntries",
                pb.ListEntriesRequest(account=b.cash, page_token=b.accounts_token),
            ),
            id="accounts-token-for-entries",
        ),
        pytest.param(
            lambda b: (
                "ListAccounts",
                pb.ListAccountsRequest(
                    merchant_id=b.merchant_id, page_token=b.entries_newest_token
                ),
            ),
            id="entries-token-for-accounts",
        ),
        pytest.param(
            lambda b: (
                "ListEntries",
                pb.ListEntriesRequest(
                    account=b.cash,
                    page_token=b.entries_newest_token,
                    order=pb.ORDER_OLDEST_FIRST,
                ),
            ),
            id="newest-first-token-for-oldest-first",
        ),
        pytest.param(
            lambda b: (
                "ListEntries",
                pb.ListEntriesRequest(account=b.wallet, page_token=b.entries_newest_token),
            ),
            id="entries-token-of-another-account",
        ),
        pytest.param(
            lambda b: (
                "ListAccounts",
                pb.ListAccountsRequest(merchant_id=uid("m"), page_token=b.accounts_token),
            ),
            id="accounts-token-of-another-merchant",
        ),
        pytest.param(
            lambda b: (
                "ListAccounts",
                pb.ListAccountsRequest(
                    merchant_id=b.merchant_id, page_token=_with_cursor(b.accounts_token, "a")
                ),
            ),
            id="accounts-token-with-a-changed-cursor",
        ),
        pytest.param(
            lambda b: (
                "ListEntries",
                pb.ListEntriesRequest(
                    account=b.cash, page_token=_with_cursor(b.entries_newest_token, "1")
                ),
            ),
            id="entries-token-with-a-changed-cursor",
        ),
    ]


def _with_cursor(issued: str, cursor: str) -> str:
    """An issued token with its cursor replaced and its signature kept (a forgery)."""
    raw = base64.urlsafe_b64decode(issued)
    head, _, _ = raw.rpartition(b"|")
    return token(head + b"|" + cursor.encode())


@pytest.mark.parametrize("build", _foreign_tokens())
async def test_page_token_from_another_listing_is_refused(
    service: Service, books: Books, build: Build
) -> None:
    await check(service, books, build, ["page_token"])


def test_page_tokens_are_accepted_only_with_the_key_that_signed_them() -> None:
    """Replicas sharing LEDGER_PAGE_TOKEN_KEY accept each other's tokens; others do not."""
    issued = PageTokens(b"k" * 32).issue(kind="accounts", listing="m1", cursor="acct-7")
    same_key, other_key = Violations(), Violations()
    cursor = PageTokens(b"k" * 32).cursor(
        same_key, "page_token", issued, kind="accounts", listing="m1"
    )
    assert (cursor, same_key.items) == ("acct-7", [])
    assert (
        PageTokens(b"x" * 32).cursor(other_key, "page_token", issued, kind="accounts", listing="m1")
        is None
    )
    assert [f for f, _ in other_key.items] == ["page_token"]


async def test_issued_page_tokens_are_accepted_by_their_own_listing(
    service: Service, books: Books
) -> None:
    # The control for the two tests above: the same tokens work where they belong.
    accounts = await service.stub.ListAccounts(
        pb.ListAccountsRequest(merchant_id=books.merchant_id, page_token=books.accounts_token),
        timeout=RPC_TIMEOUT_S,
    )
    entries = await service.stub.ListEntries(
        pb.ListEntriesRequest(account=books.cash, page_token=books.entries_newest_token),
        timeout=RPC_TIMEOUT_S,
    )
    assert accounts.accounts and entries.entries


# Timestamps.


@pytest.mark.parametrize(
    "as_of",
    [
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=0, nanos=1_000_000_000),
        Timestamp(seconds=-(2**62)),
        Timestamp(seconds=2**62),
        Timestamp(seconds=253_402_300_800),  # 10000-01-01T00:00:00Z, past the proto range
    ],
    ids=["negative-nanos", "nanos-over-a-second", "far-past", "far-future", "year-10000"],
)
async def test_balance_as_of_an_invalid_timestamp_is_refused(
    service: Service, books: Books, as_of: Timestamp
) -> None:
    await check(
        service,
        books,
        lambda b: ("GetBalance", pb.GetBalanceRequest(account=b.cash, as_of=as_of)),
        ["as_of"],
    )


# Several bad fields at once: every one is reported.


async def test_every_bad_field_of_every_transfer_is_reported(
    service: Service, books: Books
) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "CreateTransfers", pb.CreateTransfersRequest(
            transfers=[
                b.transfer(
                    id="",
                    amount_minor=0,
                    currency="usd",
                    pending_id="p",
                    metadata={"": "v"},
                ),
                b.transfer(),
                b.transfer(
                    credit_account=None,
                    action=PENDING,
                    timeout_ms=-1,
                    reversal_of="r",
                    debit_account=ref(b.merchant_id, "x" * 200),
                ),
            ]
        )

    await check(
        service,
        books,
        build,
        [
            "transfers[0].id",
            "transfers[0].amount_minor",
            "transfers[0].currency",
            "transfers[0].pending_id",
            "transfers[0].metadata['']",
            "transfers[2].credit_account.merchant_id",
            "transfers[2].credit_account.account_id",
            "transfers[2].timeout_ms",
            "transfers[2].reversal_of",
            "transfers[2].debit_account.account_id",
        ],
    )


async def test_bad_action_does_not_hide_the_transfers_other_bad_fields(
    service: Service, books: Books
) -> None:
    await check(
        service,
        books,
        one_transfer(action=99, id="", amount_minor=-5, currency="usd"),
        [
            "transfers[0].action",
            "transfers[0].id",
            "transfers[0].amount_minor",
            "transfers[0].currency",
        ],
    )


async def test_every_bad_field_of_every_account_is_reported(service: Service, books: Books) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "CreateAccounts", pb.CreateAccountsRequest(
            accounts=[
                b.account(ref=ref("", "a\nb"), currency="usd"),
                b.account(),
                b.account(
                    currency="",
                    debits_must_not_exceed_credits=True,
                    credits_must_not_exceed_debits=True,
                    metadata={"note": "v" * 300},
                ),
            ]
        )

    await check(
        service,
        books,
        build,
        [
            "accounts[0].ref.merchant_id",
            "accounts[0].ref.account_id",
            "accounts[0].currency",
            "accounts[2].currency",
            "accounts[2].credits_must_not_exceed_debits",
            "accounts[2].metadata['note']",
        ],
    )


async def test_every_bad_field_of_a_journal_is_reported(service: Service, books: Books) -> None:
    def build(b: Books) -> tuple[str, Message]:
        return "PostJournal", b.journal(
            journal_id="",
            merchant_id="m\x00",
            metadata={"": "x"},
            postings=[
                b.posting(amount_minor=0),
                b.posting(account=ref(b.merchant_id, ""), currency="usd", direction=CREDIT),
                b.posting(account=b.fees, direction=0),
            ],
        )

    await check(
        service,
        books,
        build,
        [
            "journal_id",
            "merchant_id",
            "metadata['']",
            "postings[0].amount_minor",
            "postings[1].account.account_id",
            "postings[1].currency",
            "postings[2].direction",
        ],
    )


async def test_every_bad_field_of_a_lookup_is_reported(service: Service, books: Books) -> None:
    await check(
        service,
        books,
        lambda b: (
            "LookupTransfers",
            pb.LookupTransfersRequest(
                refs=[
                    pb.TransferRef(merchant_id="", transfer_id="t"),
                    pb.TransferRef(merchant_id=b.merchant_id, transfer_id="t"),
                    pb.TransferRef(merchant_id=b.merchant_id, transfer_id="\x07"),
                ]
            ),
        ),
        ["refs[0].merchant_id", "refs[2].transfer_id"],
    )


async def test_every_bad_field_of_a_list_accounts_call_is_reported(
    service: Service, books: Books
) -> None:
    await check(
        service,
        books,
        lambda b: (
            "ListAccounts",
            pb.ListAccountsRequest(merchant_id="", page_size=-1, page_token="!!!"),
        ),
        ["merchant_id", "page_size", "page_token"],
    )


async def test_every_bad_field_of_a_list_entries_call_is_reported(
    service: Service, books: Books
) -> None:
    await check(
        service,
        books,
        lambda b: (
            "ListEntries",
            pb.ListEntriesRequest(
                account=ref("", ""),
                page_size=limits.page_size_max + 1,
                order=99,  # type: ignore[arg-type]
                page_token="!!!",
            ),
        ),
        ["account.merchant_id", "account.account_id", "page_size", "order", "page_token"],
    )

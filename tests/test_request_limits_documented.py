"""Every request dimension has a hard limit, documented in the proto next to its field, enforced.

Documentation: for each caller-visible limit in ledger/limits.py, the comment on the field (or on
its message, or on the field a "same limits as Message.field" comment points to) in
protos/ledger/v1/ledger.proto must state the limit's value. And every string, repeated and map
field that a request can carry must have such a limit, a bounded format (ISO 4217, 32 hex
digits) or be documented output only; a field with none is listed by name.

Enforcement: a request at a limit is accepted and one just over it is refused with
INVALID_ARGUMENT naming the field, for the dimensions tests/test_api_validation.py does not
already cover: batches of exactly the maximum size, 100 and 101 postings, the page size of every
listing (admin ones included), LookupTransfers.wait_timeout_ms, metadata at its limits on
accounts and journals, 128-byte ids where ids are created or referenced, SagaRef ids, and the
largest requests the documented limits allow together (which must fit the call size limits at
the top of the proto, as must the largest lookup answer).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ledger import limits
from ledger.client import ClientOptions, LedgerClient
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    field_violations,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
)

PROTO = Path(__file__).resolve().parent.parent / "protos" / "ledger" / "v1" / "ledger.proto"
PENDING_TIMEOUT_MS_MAX = int(limits.pending_timeout_max.total_seconds() * 1000)
Code = grpc.StatusCode


# The proto's comments.


@dataclass(frozen=True)
class ProtoDocs:
    messages: dict[str, str]
    fields: dict[tuple[str, str], str]
    text: str

    def near(self, message: str, field: str, seen: frozenset[str] = frozenset()) -> str:
        """The comment on the field and on its message, plus what "same limits as" points to."""
        assert (message, field) in self.fields, f"{message}.{field} is not in the proto"
        text = f"{self.fields[message, field]} {self.messages[message]}"
        for other, other_field in re.findall(
            r"same limits as (\w+)\.(\w+)", self.fields[message, field]
        ):
            key = f"{other}.{other_field}"
            if key not in seen:
                text += " " + self.near(other, other_field, seen | {key})
        return text


def parse_proto(text: str) -> ProtoDocs:
    messages: dict[str, str] = {}
    fields: dict[tuple[str, str], str] = {}
    blocks: list[str | None] = []  # message names; None for enums and services
    comment: list[str] = []
    field_line = re.compile(r"(?:repeated\s+)?(?:map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*;")
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("//"):
            comment.append(line[2:].strip())
            continue
        block = re.match(r"(message|enum|service)\s+(\w+)\s*\{", line)
        if block:
            kind, name = block.groups()
            if kind == "message":
                messages[name] = " ".join(comment)
            blocks.append(name if kind == "message" else None)
        elif line.startswith("}"):
            blocks.pop()
        else:
            found = field_line.match(line)
            if found and blocks and blocks[-1] is not None:
                fields[blocks[-1], found.group(1)] = " ".join(comment)
        comment = []
    return ProtoDocs(messages=messages, fields=fields, text=text)


DOCS = parse_proto(PROTO.read_text())


@dataclass(frozen=True)
class Limit:
    """A caller-visible limit of ledger/limits.py and how the proto must state it."""

    name: str
    value: int
    # Any of these spellings counts (a duration may be stated in days).
    spellings: tuple[str, ...]


BATCH_TRANSFERS = Limit(
    "transfers_per_request_max",
    limits.transfers_per_request_max,
    (str(limits.transfers_per_request_max),),
)
BATCH_ACCOUNTS = Limit(
    "accounts_per_request_max",
    limits.accounts_per_request_max,
    (str(limits.accounts_per_request_max),),
)
BATCH_REFS = Limit(
    "refs_per_lookup_max", limits.refs_per_lookup_max, (str(limits.refs_per_lookup_max),)
)
PAGE_TOKEN = Limit(
    "page_token_bytes_max",
    limits.page_token_bytes_max,
    (str(limits.page_token_bytes_max),),
)
POSTINGS = Limit(
    "postings_per_journal_max",
    limits.postings_per_journal_max,
    (str(limits.postings_per_journal_max),),
)
ID_BYTES = Limit("id_bytes_max", limits.id_bytes_max, (str(limits.id_bytes_max),))
METADATA_KEYS = Limit(
    "metadata_keys_max", limits.metadata_keys_max, (str(limits.metadata_keys_max),)
)
METADATA_KEY_BYTES = Limit(
    "metadata_key_bytes_max", limits.metadata_key_bytes_max, (str(limits.metadata_key_bytes_max),)
)
METADATA_VALUE_BYTES = Limit(
    "metadata_value_bytes_max",
    limits.metadata_value_bytes_max,
    (str(limits.metadata_value_bytes_max),),
)
PAGE_SIZE = Limit("page_size_max", limits.page_size_max, (str(limits.page_size_max),))
LOOKUP_WAIT = Limit(
    "lookup_wait_ms_max",
    limits.lookup_wait_ms_max,
    (str(limits.lookup_wait_ms_max), f"{limits.lookup_wait_ms_max:,}"),
)
PENDING_TIMEOUT = Limit(
    "pending_timeout_max",
    PENDING_TIMEOUT_MS_MAX,
    (f"{limits.pending_timeout_max.days} days", str(PENDING_TIMEOUT_MS_MAX)),
)
METADATA = (METADATA_KEYS, METADATA_KEY_BYTES, METADATA_VALUE_BYTES)
CONSUMER = Limit(
    "event_consumer_name_bytes_max",
    limits.event_consumer_name_bytes_max,
    (str(limits.event_consumer_name_bytes_max),),
)
CURSOR_SHARDS = Limit(
    "event_cursor_shards_max",
    limits.event_cursor_shards_max,
    (str(limits.event_cursor_shards_max),),
)
VELOCITY_RULES = Limit(
    "velocity_rules_per_account_max",
    limits.velocity_rules_per_account_max,
    (str(limits.velocity_rules_per_account_max),),
)
MONITORS = Limit(
    "balance_monitors_per_account_max",
    limits.balance_monitors_per_account_max,
    (str(limits.balance_monitors_per_account_max),),
)
LIMITS_REASON = Limit(
    "limits_reason_bytes_max",
    limits.limits_reason_bytes_max,
    (str(limits.limits_reason_bytes_max),),
)

# Every request field a caller-visible limit applies to: (message, field) -> limits.
LIMITED: dict[tuple[str, str], tuple[Limit, ...]] = {
    ("CreateAccountsRequest", "accounts"): (BATCH_ACCOUNTS,),
    ("CreateTransfersRequest", "transfers"): (BATCH_TRANSFERS,),
    ("LookupAccountsRequest", "refs"): (BATCH_REFS,),
    ("SetAccountsClosedRequest", "refs"): (BATCH_REFS,),
    ("LookupTransfersRequest", "refs"): (BATCH_REFS,),
    ("PostJournalRequest", "postings"): (POSTINGS,),
    ("AccountRef", "merchant_id"): (ID_BYTES,),
    ("AccountRef", "account_id"): (ID_BYTES,),
    ("Transfer", "id"): (ID_BYTES,),
    ("Transfer", "pending_id"): (ID_BYTES,),
    ("Transfer", "reversal_of"): (ID_BYTES,),
    ("TransferRef", "merchant_id"): (ID_BYTES,),
    ("TransferRef", "transfer_id"): (ID_BYTES,),
    ("PostJournalRequest", "journal_id"): (ID_BYTES,),
    ("PostJournalRequest", "merchant_id"): (ID_BYTES,),
    ("ListAccountsRequest", "merchant_id"): (ID_BYTES,),
    ("ListAccountsRequest", "page_token"): (PAGE_TOKEN,),
    ("ListEntriesRequest", "page_token"): (PAGE_TOKEN,),
    ("SagaRef", "merchant_id"): (ID_BYTES,),
    ("SagaRef", "transfer_id"): (ID_BYTES,),
    ("Account", "metadata"): METADATA,
    ("Transfer", "metadata"): METADATA,
    ("PostJournalRequest", "metadata"): METADATA,
    ("ListAccountsRequest", "page_size"): (PAGE_SIZE,),
    ("ListEntriesRequest", "page_size"): (PAGE_SIZE,),
    ("ListSagasRequest", "page_size"): (PAGE_SIZE,),
    ("ListTransfersByTraceRequest", "page_size"): (PAGE_SIZE,),
    ("LookupTransfersRequest", "wait_timeout_ms"): (LOOKUP_WAIT,),
    ("Transfer", "timeout_ms"): (PENDING_TIMEOUT,),
    ("SubscribeEventsRequest", "merchant_id"): (ID_BYTES,),
    ("SubscribeEventsRequest", "consumer"): (CONSUMER,),
    ("AckEventsRequest", "consumer"): (CONSUMER,),
    ("EventCursor", "positions"): (CURSOR_SHARDS,),
    # Spending controls (issue 21).
    ("SetAccountLimitsRequest", "change_id"): (ID_BYTES,),
    ("SetAccountLimitsRequest", "reason"): (LIMITS_REASON,),
    ("AccountLimits", "velocity_rules"): (VELOCITY_RULES,),
    ("AccountLimits", "monitors"): (MONITORS,),
    ("VelocityRule", "rule_id"): (ID_BYTES,),
    ("BalanceMonitor", "monitor_id"): (ID_BYTES,),
    ("GetAccountLimitsRequest", "page_size"): (PAGE_SIZE,),
    ("ListMonitorCrossingsRequest", "merchant_id"): (ID_BYTES,),
    ("ListMonitorCrossingsRequest", "page_size"): (PAGE_SIZE,),
}
# Request strings bounded by their format instead: the proto must name the format.
FORMATTED: dict[tuple[str, str], str] = {
    ("Account", "currency"): "ISO 4217",
    ("Transfer", "currency"): "ISO 4217",
    ("Posting", "currency"): "ISO 4217",
    ("ListTransfersByTraceRequest", "trace_id"): "32 lower-case hex digits",
    ("EventCursor", "positions"): "a shard of this cluster",
}


def _limit_cases() -> list[Any]:
    return [
        pytest.param(message, field, limit, id=f"{message}.{field}-{limit.name}")
        for (message, field), field_limits in LIMITED.items()
        for limit in field_limits
    ]


def _mentions(text: str, spelling: str) -> bool:
    return re.search(rf"(?<![\w.^]){re.escape(spelling)}(?![\w])", text) is not None


@pytest.mark.parametrize(("message", "field", "limit"), _limit_cases())
def test_limit_is_documented_next_to_its_field(message: str, field: str, limit: Limit) -> None:
    text = DOCS.near(message, field)
    assert any(_mentions(text, s) for s in limit.spellings), (
        f"UNDOCUMENTED: {message}.{field} is limited by limits.{limit.name} = {limit.value}, but"
        f" the proto does not say so next to the field (looked for {limit.spellings!r} in:"
        f" {text!r})"
    )


@pytest.mark.parametrize(
    ("message", "field", "name"), [(m, f, n) for (m, f), n in FORMATTED.items()]
)
def test_bounded_format_is_documented_next_to_its_field(
    message: str, field: str, name: str
) -> None:
    assert name in DOCS.near(message, field), (message, field, DOCS.near(message, field))


def _request_types() -> dict[str, Descriptor]:
    found: dict[str, Descriptor] = {}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert method.input_type is not None
            found[method.input_type.name] = method.input_type
    return found


def _request_fields() -> Iterator[tuple[str, FieldDescriptor]]:
    """(message name, field) of every field a request can carry, nested messages included."""
    seen: set[str] = set()
    pending = list(_request_types().values())
    while pending:
        message = pending.pop()
        if message.full_name in seen or message.file is not pb.DESCRIPTOR:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            yield message.name, field
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                assert field.message_type is not None
                if not field.message_type.GetOptions().map_entry:
                    pending.append(field.message_type)


def test_every_request_field_that_can_grow_has_a_documented_hard_limit() -> None:
    """Strings, bytes, repeated fields and maps: a limit, a bounded format, or output only."""
    unbounded = []
    for message, field in _request_fields():
        grows = field.is_repeated or field.type in (
            FieldDescriptor.TYPE_STRING,
            FieldDescriptor.TYPE_BYTES,
        )
        if not grows or (message, field.name) in LIMITED or (message, field.name) in FORMATTED:
            continue
        if "Output only" in DOCS.fields[message, field.name]:
            continue
        unbounded.append(f"{message}.{field.name} ({DOCS.fields[message, field.name]!r})")
    assert not unbounded, (
        "NO HARD LIMIT in ledger/limits.py nor a documented bound in the proto for: "
        + "; ".join(sorted(unbounded))
    )


def _size(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n % size == 0:
            return f"{n // size} {unit}"
    return str(n)


# Limits of a whole call (the transport's), documented once at the top of the proto.
CALL_LIMITS = [
    ("request_bytes_max", limits.request_bytes_max, "request"),
    ("response_bytes_max", limits.response_bytes_max, "response"),
    ("request_metadata_bytes_max", limits.request_metadata_bytes_max, "metadata"),
]


@pytest.mark.parametrize(("name", "value", "word"), CALL_LIMITS, ids=[c[0] for c in CALL_LIMITS])
def test_call_size_limit_is_documented_in_the_proto(name: str, value: int, word: str) -> None:
    header = DOCS.text.split("syntax =", 1)[0]
    sentences = [s for s in re.split(r"[.;,](?:\s|$)", " ".join(header.split())) if word in s]
    assert any(_size(value) in s for s in sentences), (
        f"UNDOCUMENTED: limits.{name} = {value} ({_size(value)}) is not stated for the {word}"
        f" at the top of the proto"
    )


# Enforcement, against the live server.


@dataclass(frozen=True)
class Books:
    merchant_id: str

    @property
    def cash(self) -> pb.AccountRef:
        return ref(self.merchant_id, "cash")

    @property
    def wallet(self) -> pb.AccountRef:
        return ref(self.merchant_id, "wallet")


@pytest.fixture(scope="module")
async def books(service: Service) -> AsyncIterator[Books]:
    m = uid("lim")
    await create_accounts(service.stub, account(m, "cash"), account(m, "wallet"))
    yield Books(merchant_id=m)


async def answer(service: Service, method: str, request: Message) -> tuple[Code, Any]:
    stub: Any = service.stub
    if method in ("ListSagas", "GetSaga", "ListTransfersByTrace"):
        stub = ledger_pb2_grpc.LedgerAdminServiceStub(service.channel)
    try:
        return Code.OK, await getattr(stub, method)(request, timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return error.code(), error


async def accepted(service: Service, method: str, request: Message) -> Any:
    code, outcome = await answer(service, method, request)
    assert code is Code.OK, f"{method} refused a request at its limits: {outcome}"
    return outcome


async def refused(service: Service, method: str, request: Message, field: str) -> None:
    code, outcome = await answer(service, method, request)
    assert code is Code.INVALID_ARGUMENT, f"{method}: expected INVALID_ARGUMENT, got {outcome}"
    violations = field_violations(outcome)
    assert list(violations) == [field], violations


def _post(books: Books, transfer_id: str, **fields: Any) -> pb.Transfer:
    return transfer(transfer_id, books.cash, books.wallet, 1, **fields)


# Batches of exactly the maximum size (over the maximum: test_api_validation.py).


async def test_batches_of_exactly_the_maximum_size_are_accepted(
    service: Service, books: Books
) -> None:
    m = uid("batch")
    created = await accepted(
        service,
        "CreateAccounts",
        pb.CreateAccountsRequest(
            accounts=[account(m, f"a{i:04d}") for i in range(limits.accounts_per_request_max)]
        ),
    )
    assert [r.result for r in created.results] == [pb.ACCOUNT_RESULT_OK] * (
        limits.accounts_per_request_max
    )
    refs = [ref(m, f"a{i:04d}") for i in range(limits.refs_per_lookup_max)]
    found = await accepted(service, "LookupAccounts", pb.LookupAccountsRequest(refs=refs))
    assert len(found.accounts) == limits.refs_per_lookup_max
    closed = await accepted(
        service, "SetAccountsClosed", pb.SetAccountsClosedRequest(refs=refs, closed=False)
    )
    assert list(closed.found) == [True] * limits.refs_per_lookup_max

    ids = [uid("t") for _ in range(limits.transfers_per_request_max)]
    made = await accepted(
        service,
        "CreateTransfers",
        pb.CreateTransfersRequest(transfers=[_post(books, i) for i in ids]),
    )
    assert result_names(made.results) == ["TRANSFER_RESULT_OK"] * len(ids)
    looked_up = await accepted(
        service,
        "LookupTransfers",
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=books.merchant_id, transfer_id=i) for i in ids]
        ),
    )
    assert [t.transfer.id for t in looked_up.transfers] == ids


def _journal(books: Books, postings: int) -> pb.PostJournalRequest:
    """One debit of cash and postings - 1 credits of 1 to wallet: balanced, any size >= 2."""
    credits = postings - 1
    return pb.PostJournalRequest(
        journal_id=uid("j"),
        merchant_id=books.merchant_id,
        postings=[
            pb.Posting(
                account=books.cash,
                amount_minor=credits,
                currency="USD",
                direction=pb.DIRECTION_DEBIT,
            ),
            *[
                pb.Posting(
                    account=books.wallet,
                    amount_minor=1,
                    currency="USD",
                    direction=pb.DIRECTION_CREDIT,
                )
                for _ in range(credits)
            ],
        ],
    )


async def test_journal_of_exactly_the_maximum_postings_is_accepted(
    service: Service, books: Books
) -> None:
    response = await accepted(
        service, "PostJournal", _journal(books, limits.postings_per_journal_max)
    )
    assert response.result == pb.TRANSFER_RESULT_OK


async def test_journal_of_one_posting_over_the_maximum_is_refused(
    service: Service, books: Books
) -> None:
    await refused(
        service, "PostJournal", _journal(books, limits.postings_per_journal_max + 1), "postings"
    )


# Page sizes: every listing accepts the maximum; the admin listings refuse one more (the others
# are covered by test_api_validation.py).


def _listing(method: str, books: Books, page_size: int) -> Message:
    if method == "ListAccounts":
        return pb.ListAccountsRequest(merchant_id=books.merchant_id, page_size=page_size)
    if method == "ListEntries":
        return pb.ListEntriesRequest(account=books.cash, page_size=page_size)
    if method == "ListSagas":
        return pb.ListSagasRequest(page_size=page_size)
    return pb.ListTransfersByTraceRequest(trace_id="0" * 32, page_size=page_size)


LISTINGS = ["ListAccounts", "ListEntries", "ListSagas", "ListTransfersByTrace"]


@pytest.mark.parametrize("method", LISTINGS)
async def test_page_size_of_exactly_the_maximum_is_accepted(
    service: Service, books: Books, method: str
) -> None:
    await accepted(service, method, _listing(method, books, limits.page_size_max))


@pytest.mark.parametrize("method", ["ListSagas", "ListTransfersByTrace"])
@pytest.mark.parametrize("page_size", [limits.page_size_max + 1, -1], ids=["max-plus-one", "-1"])
async def test_admin_page_size_over_the_maximum_or_negative_is_refused(
    service: Service, books: Books, method: str, page_size: int
) -> None:
    await refused(service, method, _listing(method, books, page_size), "page_size")


# LookupTransfers.wait_timeout_ms.


async def test_lookup_wait_of_exactly_the_maximum_is_accepted(
    service: Service, books: Books
) -> None:
    # A local transfer is never IN_PROGRESS, so the call answers without waiting.
    made = await transfers(service.stub, _post(books, uid("t")))
    assert result_names(made) == ["TRANSFER_RESULT_OK"]
    found = await accepted(
        service,
        "LookupTransfers",
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=books.merchant_id, transfer_id=made[0].id)],
            wait_timeout_ms=limits.lookup_wait_ms_max,
        ),
    )
    assert [t.result for t in found.transfers] == [pb.TRANSFER_RESULT_OK]


@pytest.mark.parametrize(
    "wait_timeout_ms", [limits.lookup_wait_ms_max + 1, -1, 2**63 - 1], ids=["max+1", "-1", "int64"]
)
async def test_lookup_wait_over_the_maximum_or_negative_is_refused(
    service: Service, books: Books, wait_timeout_ms: int
) -> None:
    await refused(
        service,
        "LookupTransfers",
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=books.merchant_id, transfer_id="t")],
            wait_timeout_ms=wait_timeout_ms,
        ),
        "wait_timeout_ms",
    )


# Metadata at its limits on accounts and journals (transfers: test_api_validation.py).


def _metadata_at_limits() -> dict[str, str]:
    key_tail = "k" * (limits.metadata_key_bytes_max - 2)
    return {
        f"{i:02d}{key_tail}": "v" * limits.metadata_value_bytes_max
        for i in range(limits.metadata_keys_max)
    }


async def test_account_metadata_at_its_limits_is_accepted(service: Service) -> None:
    m = uid("md")
    metadata = _metadata_at_limits()
    await create_accounts(service.stub, account(m, "cash", metadata=metadata))
    found = await accepted(
        service, "LookupAccounts", pb.LookupAccountsRequest(refs=[ref(m, "cash")])
    )
    assert [dict(a.metadata) for a in found.accounts] == [metadata]


async def test_journal_metadata_at_its_limits_is_accepted(service: Service, books: Books) -> None:
    request = _journal(books, 2)
    request.metadata.update(_metadata_at_limits())
    response = await accepted(service, "PostJournal", request)
    assert response.result == pb.TRANSFER_RESULT_OK


# Ids of exactly 128 bytes where ids are created or referenced; SagaRef ids over the limit.

ID_AT_LIMIT = "é" * (limits.id_bytes_max // 2)  # 128 bytes of UTF-8, 64 characters
ID_OVER_LIMIT = "x" * (limits.id_bytes_max + 1)
assert len(ID_AT_LIMIT.encode()) == limits.id_bytes_max


async def test_ids_of_exactly_the_maximum_size_are_accepted_everywhere(service: Service) -> None:
    a, b = "a" * (limits.id_bytes_max - 1) + "1", "a" * (limits.id_bytes_max - 1) + "2"
    suffix = uid()
    # A fresh 128-byte merchant id per run: two-byte characters, then the uid's ASCII bytes.
    m = "é" * ((limits.id_bytes_max - len(suffix)) // 2) + suffix
    assert len(m.encode()) == limits.id_bytes_max
    await create_accounts(service.stub, account(m, a), account(m, b))
    pending_id = "p" * (limits.id_bytes_max - len(suffix)) + suffix
    post_id = "q" * (limits.id_bytes_max - len(suffix)) + suffix
    results = await transfers(
        service.stub,
        transfer(pending_id, ref(m, a), ref(m, b), 5, action=pb.TRANSFER_ACTION_PENDING),
        transfer(post_id, ref(m, a), ref(m, b), 7),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"] * 2
    results = await transfers(
        service.stub,
        transfer(
            "s" * (limits.id_bytes_max - len(suffix)) + suffix,
            ref(m, a),
            None,
            0,
            "",
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=pending_id,
        ),
        transfer(
            "r" * (limits.id_bytes_max - len(suffix)) + suffix,
            ref(m, b),
            ref(m, a),
            7,
            reversal_of=post_id,
        ),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"] * 2
    journal = await accepted(
        service,
        "PostJournal",
        pb.PostJournalRequest(
            journal_id="j" * (limits.id_bytes_max - len(suffix)) + suffix,
            merchant_id=m,
            postings=[
                pb.Posting(
                    account=ref(m, a), amount_minor=1, currency="USD", direction=pb.DIRECTION_DEBIT
                ),
                pb.Posting(
                    account=ref(m, b),
                    amount_minor=1,
                    currency="USD",
                    direction=pb.DIRECTION_CREDIT,
                ),
            ],
        ),
    )
    assert journal.result == pb.TRANSFER_RESULT_OK


@pytest.mark.parametrize(
    ("ref_fields", "field"),
    [
        pytest.param({"merchant_id": ID_OVER_LIMIT}, "ref.merchant_id", id="merchant"),
        pytest.param({"transfer_id": ID_OVER_LIMIT}, "ref.transfer_id", id="transfer"),
    ],
)
async def test_saga_ref_id_over_the_maximum_is_refused(
    service: Service, ref_fields: dict[str, str], field: str
) -> None:
    saga_ref = pb.SagaRef(merchant_id="m", transfer_id="t", kind=pb.SAGA_KIND_TRANSFER)
    for name, value in ref_fields.items():
        setattr(saga_ref, name, value)
    await refused(service, "GetSaga", pb.GetSagaRequest(ref=saga_ref), field)


async def test_saga_ref_ids_of_exactly_the_maximum_size_pass_validation(service: Service) -> None:
    saga_ref = pb.SagaRef(
        merchant_id=ID_AT_LIMIT, transfer_id=ID_AT_LIMIT, kind=pb.SAGA_KIND_TRANSFER
    )
    code, outcome = await answer(service, "GetSaga", pb.GetSagaRequest(ref=saga_ref))
    assert code is Code.NOT_FOUND, outcome


async def test_credit_merchant_id_over_the_maximum_is_refused(
    service: Service, books: Books
) -> None:
    item = transfer(uid("t"), books.cash, ref(ID_OVER_LIMIT, "wallet"), 1)
    await refused(
        service,
        "CreateTransfers",
        pb.CreateTransfersRequest(transfers=[item]),
        "transfers[0].credit_account.merchant_id",
    )


# Every limit at once: the largest legal requests, and the largest answers to lookups of what they
# created, must fit the call size limits documented at the top of the proto.


@dataclass
class LargestBatches:
    accounts: pb.CreateAccountsRequest
    transfers: pb.CreateTransfersRequest
    created: tuple[Code, Any]
    transferred: tuple[Code, Any]

    @property
    def merchant_id(self) -> str:
        return self.accounts.accounts[0].ref.merchant_id


@pytest.fixture(scope="module")
async def largest(service: Service) -> LargestBatches:
    suffix = uid()
    m = "m" * (limits.id_bytes_max - len(suffix)) + suffix
    metadata = _metadata_at_limits()
    accounts = pb.CreateAccountsRequest(
        accounts=[
            account(m, f"{i:04d}" + "a" * (limits.id_bytes_max - 4), metadata=metadata)
            for i in range(limits.accounts_per_request_max)
        ]
    )
    a, b = accounts.accounts[0].ref, accounts.accounts[1].ref
    transfers_request = pb.CreateTransfersRequest(
        transfers=[
            transfer(f"{i:04d}" + "t" * (limits.id_bytes_max - 4), a, b, 1, metadata=metadata)
            for i in range(limits.transfers_per_request_max)
        ]
    )
    return LargestBatches(
        accounts=accounts,
        transfers=transfers_request,
        created=await answer(service, "CreateAccounts", accounts),
        transferred=await answer(service, "CreateTransfers", transfers_request),
    )


def test_batches_at_every_documented_limit_at_once_are_accepted(largest: LargestBatches) -> None:
    for request, (code, outcome) in (
        (largest.accounts, largest.created),
        (largest.transfers, largest.transferred),
    ):
        assert request.ByteSize() <= limits.request_bytes_max, request.ByteSize()
        assert code is Code.OK, (
            f"a {type(request).__name__} within every documented limit"
            f" ({request.ByteSize():,} bytes) was refused with {code.name}: {outcome.details()}"
        )
    assert [r.result for r in largest.created[1].results] == [pb.ACCOUNT_RESULT_OK] * (
        limits.accounts_per_request_max
    )
    assert result_names(largest.transferred[1].results) == ["TRANSFER_RESULT_OK"] * (
        limits.transfers_per_request_max
    )


async def test_largest_lookup_answers_reach_the_ledger_client(
    service: Service, largest: LargestBatches
) -> None:
    """Looking up everything the largest batches made answers up to about 6 MB: within the
    documented response limit, so the project's own client must be able to receive it."""
    account_refs = [a.ref for a in largest.accounts.accounts]
    transfer_refs = [
        pb.TransferRef(merchant_id=largest.merchant_id, transfer_id=t.id)
        for t in largest.transfers.transfers
    ]
    # One attempt: a refusal is the answer under test, not something to retry.
    async with LedgerClient(service.target, options=ClientOptions(attempts_max=1)) as client:
        lookups: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("LookupAccounts", lambda: client.lookup_accounts(account_refs)),
            ("LookupTransfers", lambda: client.lookup_transfers(transfer_refs)),
        ]
        for name, lookup in lookups:
            try:
                found: Any = await lookup()
            except grpc.aio.AioRpcError as error:
                raise AssertionError(
                    f"{name} of {len(account_refs)} items at every documented limit: the answer"
                    f" (under limits.response_bytes_max = {limits.response_bytes_max:,}) did not"
                    f" reach LedgerClient: {error.code().name}: {error.details()}"
                ) from None
            items = found.accounts if name == "LookupAccounts" else found.transfers
            assert len(items) == len(account_refs), name
            assert found.ByteSize() <= limits.response_bytes_max, found.ByteSize()


async def test_page_token_over_its_maximum_size_is_refused_before_it_is_decoded(
    service: Service,
) -> None:
    token = "A" * (limits.page_token_bytes_max + 1)
    await refused(
        service,
        "ListAccounts",
        pb.ListAccountsRequest(merchant_id=uid("m"), page_token=token),
        "page_token",
    )
    await refused(
        service,
        "ListEntries",
        pb.ListEntriesRequest(
            account=pb.AccountRef(merchant_id=uid("m"), account_id="a"), page_token=token
        ),
        "page_token",
    )

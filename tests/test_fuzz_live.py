"""Hypothesis-generated bad input against the live server, over a real gRPC channel.

Every RPC of LedgerService and the read calls of LedgerAdminService (ListSagas, GetSaga,
ListTransfersByTrace, GetAccountLimits, ListMonitorCrossings) and its SetAccountLimits get
generated requests: int64/int32 extremes, negative and zero values,
batches over their limits, enum values no version of the proto defines (proto3 enums are open,
so any int32 goes on the wire), empty, oversized and control-character strings, non-BMP text,
metadata maps over every limit, page tokens and timestamps of every shape. For every answer:

- the status is never INTERNAL or UNKNOWN, and is one the RPC documents (ALLOWED below);
- INVALID_ARGUMENT carries a google.rpc.BadRequest with at least one described field violation;
- a refused call wrote nothing: every example names two fresh merchants, which must have no
  account, transfer or entry afterwards, and the other merchants it names keep their account
  and transfer counts (entries are not compared for those: the expiry sweeper may legitimately
  add release entries for an earlier example's pending transfer at any moment);
- the server keeps serving: the health check says SERVING after the edge cases that might
  break a connection, and after all the fuzzing the last test checks health on the old and a
  new connection and makes a normal transfer.

Raw bytes go to every method too. Bytes that do not parse as the request message, in particular
a well-formed message whose string field holds invalid UTF-8 (the wire allows any bytes in a
length-delimited field; proto3 requires string fields to be valid UTF-8), must be refused with
INVALID_ARGUMENT and a BadRequest violation on the field "request".

What the wire allows, and what never reaches the server:

- Messages: the server receives requests of up to limits.request_bytes_max (8 MiB, documented
  at the top of the proto); a larger one is refused by the transport with RESOURCE_EXHAUSTED
  before any handler runs (tests/test_message_limits.py).
- Strings: the Python client cannot build a string field that is not valid UTF-8 (it refuses
  lone surrogates), so such bytes are only reachable with a raw, hand-built payload.
- Custom metadata (HTTP/2 headers): the Python client itself refuses, before sending, keys
  that are empty or not lower-case [0-9a-z_.-], values of non-"-bin" keys with characters
  outside printable ASCII, and str values for "-bin" keys; "-bin" values are arbitrary bytes
  (sent base64-encoded). The server takes request metadata (the whole header list, each entry
  counted as key + value + 32 bytes, its own headers such as :path included) up to
  limits.request_metadata_bytes_max (16 KiB, documented in the proto; gRPC's soft and hard
  limits are both set to it, so the cut is exact rather than random) and refuses more with
  RESOURCE_EXHAUSTED, sometimes with an empty message: the transport answers, not the ledger.
"""

from __future__ import annotations

import asyncio
import base64
import operator
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from ledger import limits
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    ref,
    result_names,
    status_details,
    transfer,
    transfers,
    uid,
)

Code = grpc.StatusCode
OK, INVALID = Code.OK, Code.INVALID_ARGUMENT

# The statuses each RPC may answer with, from the proto and the servicers: whole-call rule
# failures (FAILED_PRECONDITION), missing accounts or sagas (NOT_FOUND), a journal id reused
# with other content (ALREADY_EXISTS). UNAVAILABLE is not listed: every shard is up here.
ALLOWED: dict[str, frozenset[Code]] = {
    "CreateAccounts": frozenset({OK, INVALID}),
    "LookupAccounts": frozenset({OK, INVALID}),
    "ListAccounts": frozenset({OK, INVALID}),
    "SetAccountsClosed": frozenset({OK, INVALID}),
    "CreateTransfers": frozenset({OK, INVALID, Code.FAILED_PRECONDITION}),
    "LookupTransfers": frozenset({OK, INVALID}),
    "PostJournal": frozenset({OK, INVALID, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS}),
    "GetBalance": frozenset({OK, INVALID, Code.NOT_FOUND}),
    "ListEntries": frozenset({OK, INVALID, Code.NOT_FOUND}),
    "ListSagas": frozenset({OK, INVALID}),
    "GetSaga": frozenset({OK, INVALID, Code.NOT_FOUND}),
    "ListTransfersByTrace": frozenset({OK, INVALID}),
    # Spending controls: no account (NOT_FOUND), a flag the balances break or a monitor id in
    # use (FAILED_PRECONDITION), a change id reused with other content (ALREADY_EXISTS).
    "SetAccountLimits": frozenset(
        {OK, INVALID, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS}
    ),
    "GetAccountLimits": frozenset({OK, INVALID, Code.NOT_FOUND}),
    "ListMonitorCrossings": frozenset({OK, INVALID}),
    # The event stream: a cursor before what a shard keeps (OUT_OF_RANGE), a consumer
    # that lapsed (FAILED_PRECONDITION; none here).
    "SubscribeEvents": frozenset({OK, INVALID, Code.OUT_OF_RANGE}),
    "SubscribeEventBatches": frozenset({OK, INVALID, Code.OUT_OF_RANGE}),
    "AckEvents": frozenset({OK, INVALID}),
}
ADMIN_METHODS = frozenset(
    {
        "ListSagas",
        "GetSaga",
        "ListTransfersByTrace",
        "SetAccountLimits",
        "GetAccountLimits",
        "ListMonitorCrossings",
    }
)
SERVICES = {
    name: pb.DESCRIPTOR.services_by_name[name] for name in ("LedgerService", "LedgerAdminService")
}
MESSAGE_BYTES_MAX = limits.request_bytes_max
METADATA_BYTES_MAX = limits.request_metadata_bytes_max
# The headers the client adds itself (:path, :authority, te, user-agent, grpc-timeout, ...).
METADATA_OWN_HEADERS_BYTES = 1024
PENDING_TIMEOUT_MS_MAX = int(limits.pending_timeout_max.total_seconds() * 1000)

FUZZ = settings(
    max_examples=40,
    deadline=None,
    # Shrinking finds the minimal failing request; the explain phase after it (which marks the
    # parts that do not matter) costs a minute against a live server, so it is left out.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

# Placeholders the strategies use for ids; each example replaces them (see localise): two
# merchants no earlier example has used, two with real accounts on two shards, and transfer ids
# no earlier example has used (so a batch can create a pending transfer and settle it).
FRESH_A, FRESH_B = "\ue000fresh-a", "\ue000fresh-b"
BOOKS_A, BOOKS_B = "\ue000books-a", "\ue000books-b"
FRESH_IDS = ("\ue000id-1", "\ue000id-2", "\ue000id-3")
BOOKS_ACCOUNTS = ("cash", "wallet", "jpy", "strict")
# The books' account whose limits SetAccountLimits' examples change (no other example names it).
LIMITED_ACCOUNT = "limited"


# Strategies.

# Any code point but lone surrogates (the client cannot encode those; see the docstring).
CHARS = st.characters(exclude_categories=["Cs"])
SPECIAL_STRINGS = [
    "",
    " ",
    "x",
    "x" * limits.id_bytes_max,
    "x" * (limits.id_bytes_max + 1),
    "é" * 64,
    "é" * 65,
    "€" * 43,
    "\U0001d11e" * 32,  # 128 bytes of non-BMP text
    "\U0001d11e" * 33,
    "\x00",
    "a\x00b",
    "\t",
    "\n",
    "\x1f",
    "\x7f",
    "\x85",
    "\u2028",
    "\u200b",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "\U0001f600",
    "$settlement",
    "$",
    "%s%n",
    "'; DROP TABLE accounts; --",
    "\\",
    '"',
    "USD",
    "cash",
    "x" * 20_000,
]
TEXT = st.one_of(
    st.sampled_from(SPECIAL_STRINGS),
    st.text(CHARS, max_size=12),
    st.builds(
        operator.mul,
        st.sampled_from(["x", "é", "€", "\U0001d11e", "\x00", "\n"]),
        st.integers(0, 300),
    ),
)
INT64 = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            -1,
            2**63 - 1,
            2**63 - 2,
            -(2**63),
            2**31,
            2**32,
            PENDING_TIMEOUT_MS_MAX,
            PENDING_TIMEOUT_MS_MAX + 1,
            limits.lookup_wait_ms_max,
            limits.lookup_wait_ms_max + 1,
        ]
    ),
    st.integers(-(2**63), 2**63 - 1),
)
INT32 = st.one_of(
    st.sampled_from(
        [0, 1, -1, 2**31 - 1, -(2**31), limits.page_size_max, limits.page_size_max + 1, 100]
    ),
    st.integers(-(2**31), 2**31 - 1),
)
# Enum fields are int32 on the wire: defined values, and any other.
ENUM = st.one_of(st.integers(-1, 6), st.sampled_from([2**31 - 1, -(2**31)]), INT32)
AMOUNT = st.one_of(st.integers(1, 1000), INT64)
TIMEOUT_MS = st.one_of(st.just(0), st.integers(1, 1000), INT64)


def mostly(valid: st.SearchStrategy[Any], fuzz: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """valid, or now and then fuzz, at a rate drawn once per example (FUZZ_RATE): examples of a
    low rate differ from a valid request in a field or two, so they get past validation and
    reach the shards; examples of a high rate pile up bad fields."""
    # The simplest draws (0, the first element) pick valid values and the lowest rate, so
    # Hypothesis shrinks a failing example towards a valid request.
    return FUZZ_RATE.flatmap(
        lambda one_in: st.integers(0, one_in - 1).flatmap(
            lambda n: fuzz if n == one_in - 1 else valid
        )
    )


FUZZ_RATE = st.shared(st.sampled_from([50, 12, 3]), key="fuzz-one-in")
MERCHANT = mostly(st.sampled_from([FRESH_A, FRESH_B, BOOKS_A, BOOKS_B]), TEXT)
ACCOUNT_ID = mostly(st.sampled_from([*BOOKS_ACCOUNTS, "new-1", "new-2"]), TEXT)
TRANSFER_ID = mostly(
    st.one_of(
        st.sampled_from([*FRESH_IDS, *FRESH_IDS, "t-1", "t-2", "p-1", "p-2", "j-1"]),
        st.text("abcdef0123456789-", min_size=1, max_size=8),
    ),
    TEXT,
)
OPTIONAL_ID = st.one_of(st.just(""), TRANSFER_ID)
CURRENCY = mostly(
    st.sampled_from(["USD", "USD", "USD", "JPY", "EUR"]),
    st.one_of(st.sampled_from(["BHD", "XTS", "", "usd", "XXX", "US", "USDD"]), TEXT),
)
AMOUNT = mostly(st.one_of(st.integers(1, 1000), st.sampled_from([2**63 - 1, 2**62])), INT64)
TIMEOUT_MS = mostly(st.one_of(st.just(0), st.integers(1, 5000)), INT64)
FUZZ_METADATA = st.one_of(
    st.dictionaries(TEXT, TEXT, max_size=4),
    st.builds(
        lambda n, value: {f"k{i:03d}": value for i in range(n)},
        st.integers(0, limits.metadata_keys_max + 8),
        st.sampled_from(["", "v", "v" * 256, "v" * 257, "€" * 86]),
    ),
    st.sampled_from(
        [
            {"k" * limits.metadata_key_bytes_max: "v" * limits.metadata_value_bytes_max},
            {"k" * (limits.metadata_key_bytes_max + 1): "v"},
            {"é" * 32: ""},
            {"é" * 33: ""},
            {"": ""},
        ]
    ),
)
# Valid metadata: the proto limits sizes only, so any text, control characters included.
METADATA = mostly(
    st.dictionaries(
        st.text("abcxyz", min_size=1, max_size=6),
        st.one_of(st.text(CHARS, max_size=8), st.sampled_from(["", "\x00", "a\nb", "\U0001f600"])),
        max_size=3,
    ),
    FUZZ_METADATA,
)
TIMESTAMP = st.one_of(
    st.builds(
        Timestamp,
        seconds=st.sampled_from(
            [0, -1, -62135596800, -62135596801, 253402300799, 253402300800, 1_700_000_000]
        ),
        nanos=st.sampled_from([0, 999_999_999, 1_000_000_000, -1]),
    ),
    st.builds(Timestamp, seconds=INT64, nanos=INT32),
    st.builds(Timestamp, seconds=st.integers(-62135596800, 253402300799)),
)
MAYBE_TIMESTAMP = mostly(st.none(), TIMESTAMP)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


PAGE_TOKEN = mostly(
    st.just(""),
    st.one_of(
        TEXT,
        st.binary(max_size=40).map(_b64),
        st.builds(
            lambda version, kind, cursor: _b64(f"{version}|{kind}|{cursor}".encode()),
            st.sampled_from(["v1", "v2", ""]),
            st.sampled_from(["accounts", "entries-newest", "entries-oldest", "x", ""]),
            st.one_of(
                st.sampled_from(BOOKS_ACCOUNTS),
                st.integers(-10, 2**70).map(str),
                st.text(CHARS, max_size=20),
                st.sampled_from(["0" * 19, "9" * 19, "9" * 20, "x" * 129, "\x00", "1|2"]),
            ),
        ),
    ),
)

ACCOUNT_REF = st.one_of(
    # An account of the books on shard-a (so debit and credit often both exist).
    st.builds(
        pb.AccountRef, merchant_id=st.just(BOOKS_A), account_id=st.sampled_from(BOOKS_ACCOUNTS)
    ),
    st.builds(pb.AccountRef, merchant_id=MERCHANT, account_id=ACCOUNT_ID),
)
MAYBE_ACCOUNT_REF = mostly(ACCOUNT_REF, st.none())
ENUM_FIELD = mostly(st.integers(0, 4), ENUM)
TRANSFER_REF = st.builds(pb.TransferRef, merchant_id=MERCHANT, transfer_id=TRANSFER_ID)


def batch(item: st.SearchStrategy[Any], limit: int, pad: Message) -> st.SearchStrategy[Any]:
    """A few generated items; now and then none, or a list over the limit (generated items
    padded with pad)."""
    small = st.lists(item, min_size=1, max_size=4)
    over = st.builds(
        lambda items, size: [*items, *[pad] * (size - len(items))],
        st.lists(item, max_size=3),
        st.sampled_from([limit + 1, limit + 2, 2 * limit, 10 * limit]),
    )
    return mostly(small, st.one_of(st.just([]), over))


_PAD_REF = pb.AccountRef(merchant_id=FRESH_A, account_id="pad")
_PAD_TRANSFER = pb.Transfer(
    id="pad",
    debit_account=_PAD_REF,
    credit_account=pb.AccountRef(merchant_id=FRESH_A, account_id="pad-2"),
    amount_minor=1,
    currency="USD",
    action=pb.TRANSFER_ACTION_POST,
)

ACCOUNT = st.builds(
    pb.Account,
    ref=MAYBE_ACCOUNT_REF,
    currency=CURRENCY,
    debits_must_not_exceed_credits=st.booleans(),
    credits_must_not_exceed_debits=mostly(st.just(False), st.booleans()),
    closed=st.booleans(),
    metadata=METADATA,
    debits_posted=mostly(st.just(0), INT64),
    credits_pending=mostly(st.just(0), INT64),
    created_at=mostly(st.none(), TIMESTAMP),
)


@st.composite
def _transfer(draw: st.DrawFn) -> pb.Transfer:
    """A transfer whose fields mostly fit its action, each one now and then replaced by fuzz."""
    action = draw(mostly(st.integers(1, 4), ENUM))
    settles = action in (pb.TRANSFER_ACTION_POST_PENDING, pb.TRANSFER_ACTION_VOID_PENDING)
    return pb.Transfer(
        id=draw(TRANSFER_ID),
        debit_account=draw(MAYBE_ACCOUNT_REF),
        credit_account=draw(mostly(st.none(), ACCOUNT_REF) if settles else MAYBE_ACCOUNT_REF),
        amount_minor=draw(mostly(st.just(0), AMOUNT) if settles else AMOUNT),
        currency=draw(mostly(st.just(""), CURRENCY) if settles else CURRENCY),
        action=action,
        pending_id=draw(TRANSFER_ID if settles else mostly(st.just(""), TRANSFER_ID)),
        timeout_ms=draw(
            TIMEOUT_MS if action == pb.TRANSFER_ACTION_PENDING else mostly(st.just(0), INT64)
        ),
        linked=draw(mostly(st.just(False), st.just(True))),
        reversal_of=draw(mostly(st.just(""), TRANSFER_ID)),
        metadata=draw(METADATA),
        created_at=draw(mostly(st.none(), TIMESTAMP)),
        trace_id=draw(mostly(st.just(""), TEXT)),
    )


TRANSFER = _transfer()
POSTING = st.builds(
    pb.Posting,
    account=MAYBE_ACCOUNT_REF,
    amount_minor=AMOUNT,
    currency=CURRENCY,
    direction=mostly(st.integers(1, 2), ENUM),
)


def _balanced(legs: list[tuple[pb.AccountRef, pb.AccountRef, int, str]]) -> list[pb.Posting]:
    postings = []
    for debit, credit, amount_minor, currency in legs:
        postings.append(
            pb.Posting(
                account=debit,
                amount_minor=amount_minor,
                currency=currency,
                direction=pb.DIRECTION_DEBIT,
            )
        )
        postings.append(
            pb.Posting(
                account=credit,
                amount_minor=amount_minor,
                currency=currency,
                direction=pb.DIRECTION_CREDIT,
            )
        )
    return postings


# Journals that balance (so they reach the shards), and arbitrary ones.
BALANCED_POSTINGS = st.lists(
    st.tuples(ACCOUNT_REF, ACCOUNT_REF, AMOUNT, CURRENCY), min_size=1, max_size=4
).map(_balanced)
_PAD_POSTING = pb.Posting(
    account=_PAD_REF, amount_minor=1, currency="USD", direction=pb.DIRECTION_DEBIT
)
# Balanced journals over the USD accounts of the books, which can succeed.
BOOKS_POSTINGS = st.lists(
    st.tuples(
        *[
            mostly(
                st.builds(
                    pb.AccountRef,
                    merchant_id=st.just(BOOKS_A),
                    account_id=st.sampled_from(["cash", "wallet", "strict"]),
                ),
                ACCOUNT_REF,
            )
        ]
        * 2,
        AMOUNT,
        mostly(st.just("USD"), CURRENCY),
    ),
    min_size=1,
    max_size=4,
).map(_balanced)
POSTINGS = st.one_of(
    BOOKS_POSTINGS,
    BALANCED_POSTINGS,
    batch(POSTING, limits.postings_per_journal_max, _PAD_POSTING),
)
TRACE_ID = mostly(
    st.binary(min_size=16, max_size=16).map(bytes.hex),
    st.one_of(TEXT, st.text("0123456789abcdefABCDEF")),
)
PAGE_SIZE = mostly(st.integers(0, 5), INT32)

# Shard names this cluster has, and others; positions from the start to far ahead.
EVENT_CURSOR = st.builds(
    pb.EventCursor,
    positions=st.dictionaries(
        mostly(st.sampled_from(["shard-a", "shard-b", "shard-c"]), TEXT),
        mostly(st.integers(0, 50), INT64),
        max_size=4,
    ),
)

REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "CreateAccounts": st.builds(
        pb.CreateAccountsRequest,
        accounts=batch(
            ACCOUNT,
            limits.accounts_per_request_max,
            pb.Account(ref=_PAD_REF, currency="USD"),
        ),
    ),
    "LookupAccounts": st.builds(
        pb.LookupAccountsRequest, refs=batch(ACCOUNT_REF, limits.refs_per_lookup_max, _PAD_REF)
    ),
    "ListAccounts": st.builds(
        pb.ListAccountsRequest, merchant_id=MERCHANT, page_size=PAGE_SIZE, page_token=PAGE_TOKEN
    ),
    "SetAccountsClosed": st.builds(
        pb.SetAccountsClosedRequest,
        refs=batch(ACCOUNT_REF, limits.refs_per_lookup_max, _PAD_REF),
        closed=st.booleans(),
    ),
    "CreateTransfers": st.builds(
        pb.CreateTransfersRequest,
        transfers=batch(TRANSFER, limits.transfers_per_request_max, _PAD_TRANSFER),
    ),
    "LookupTransfers": st.builds(
        pb.LookupTransfersRequest,
        refs=batch(
            TRANSFER_REF,
            limits.refs_per_lookup_max,
            pb.TransferRef(merchant_id=FRESH_A, transfer_id="pad"),
        ),
        # Positive waits only delay answers for cross-shard transfers still IN_PROGRESS.
        wait_timeout_ms=mostly(st.integers(0, 50), INT64),
    ),
    "PostJournal": st.builds(
        pb.PostJournalRequest,
        journal_id=TRANSFER_ID,
        merchant_id=mostly(st.just(BOOKS_A), MERCHANT),
        postings=POSTINGS,
        metadata=METADATA,
    ),
    "GetBalance": st.builds(pb.GetBalanceRequest, account=MAYBE_ACCOUNT_REF, as_of=MAYBE_TIMESTAMP),
    "ListEntries": st.builds(
        pb.ListEntriesRequest,
        account=MAYBE_ACCOUNT_REF,
        page_size=PAGE_SIZE,
        page_token=PAGE_TOKEN,
        order=ENUM_FIELD,
    ),
    "ListSagas": st.builds(pb.ListSagasRequest, state=ENUM_FIELD, page_size=PAGE_SIZE),
    "GetSaga": st.builds(
        pb.GetSagaRequest,
        ref=mostly(
            st.builds(pb.SagaRef, merchant_id=MERCHANT, transfer_id=TRANSFER_ID, kind=ENUM_FIELD),
            st.none(),
        ),
    ),
    "ListTransfersByTrace": st.builds(
        pb.ListTransfersByTraceRequest, trace_id=TRACE_ID, page_size=PAGE_SIZE
    ),
    "SetAccountLimits": st.builds(
        pb.SetAccountLimitsRequest,
        account=mostly(
            st.builds(
                pb.AccountRef,
                merchant_id=st.sampled_from([BOOKS_A, BOOKS_B, FRESH_A]),
                account_id=st.just(LIMITED_ACCOUNT),
            ),
            st.one_of(st.none(), st.builds(pb.AccountRef, merchant_id=TEXT, account_id=TEXT)),
        ),
        change_id=TRANSFER_ID,
        limits=st.builds(
            pb.AccountLimits,
            debits_must_not_exceed_credits=st.booleans(),
            credits_must_not_exceed_debits=st.booleans(),
            velocity_rules=st.lists(
                st.builds(
                    pb.VelocityRule,
                    rule_id=TRANSFER_ID,
                    direction=ENUM_FIELD,
                    metric=ENUM_FIELD,
                    window_s=mostly(st.integers(1, 100_000), INT64),
                    limit=mostly(st.integers(0, 1000), INT64),
                ),
                max_size=10,
            ),
            monitors=st.lists(
                st.builds(
                    pb.BalanceMonitor,
                    monitor_id=TRANSFER_ID,
                    balance=ENUM_FIELD,
                    threshold_minor=INT64,
                ),
                max_size=10,
            ),
        ),
        reason=mostly(st.just("fuzzed"), TEXT),
    ),
    "GetAccountLimits": st.builds(
        pb.GetAccountLimitsRequest, account=MAYBE_ACCOUNT_REF, page_size=PAGE_SIZE
    ),
    "ListMonitorCrossings": st.builds(
        pb.ListMonitorCrossingsRequest,
        merchant_id=MERCHANT,
        after_sequence=mostly(st.integers(0, 10), INT64),
        page_size=PAGE_SIZE,
    ),
    "SubscribeEvents": st.builds(
        pb.SubscribeEventsRequest,
        after=EVENT_CURSOR,
        from_now=st.booleans(),
        merchant_id=st.one_of(st.just(""), MERCHANT),
        account=MAYBE_ACCOUNT_REF,
        consumer=st.one_of(st.just(""), st.just("fuzz"), TEXT),
    ),
    "SubscribeEventBatches": st.builds(
        pb.SubscribeEventsRequest,
        after=EVENT_CURSOR,
        from_now=st.booleans(),
        merchant_id=st.one_of(st.just(""), MERCHANT),
        account=MAYBE_ACCOUNT_REF,
        consumer=st.one_of(st.just(""), st.just("fuzz"), TEXT),
    ),
    "AckEvents": st.builds(
        pb.AckEventsRequest,
        consumer=st.one_of(st.just("fuzz"), TEXT),
        cursor=EVENT_CURSOR,
    ),
}
assert set(REQUESTS) == set(ALLOWED)
# The server-streaming methods: called for their first message.
STREAMING = frozenset({"SubscribeEvents", "SubscribeEventBatches"})


# The books: real accounts and history on two shards, so valid-looking requests reach the shards.


@dataclass(frozen=True)
class Books:
    merchant_a: str
    merchant_b: str


@pytest.fixture(scope="module")
async def books(service: Service) -> AsyncIterator[Books]:
    a, b = service.merchant_on("shard-a", "fza"), service.merchant_on("shard-b", "fzb")
    for m in (a, b):
        await create_accounts(
            service.stub,
            account(m, "cash"),
            account(m, "wallet"),
            account(m, "jpy", "JPY"),
            account(m, "strict", no_overdraft=True),
            # Only SetAccountLimits' examples name it: limits they set stop no other test.
            account(m, LIMITED_ACCOUNT),
        )
    results = await transfers(
        service.stub,
        transfer("t-1", ref(a, "cash"), ref(a, "wallet"), 500),
        transfer("p-1", ref(a, "cash"), ref(a, "wallet"), 300, action=pb.TRANSFER_ACTION_PENDING),
        transfer("t-2", ref(a, "cash"), ref(b, "wallet"), 200),
        transfer("p-2", ref(b, "cash"), ref(a, "wallet"), 100, action=pb.TRANSFER_ACTION_PENDING),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"] * 4
    yield Books(merchant_a=a, merchant_b=b)


# Walking requests.


def _messages(message: Message) -> Iterator[Message]:
    """message and every message inside it (map entries excluded)."""
    yield message
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        assert field.message_type is not None
        if field.message_type.GetOptions().map_entry:
            continue
        for item in value if field.is_repeated else [value]:
            yield from _messages(item)


def localise(request: Message, names: Mapping[str, str]) -> Message:
    """A copy of request with every placeholder (a whole string field) replaced by its value."""
    copy = type(request)()
    copy.CopyFrom(request)
    for message in _messages(copy):
        for field, value in message.ListFields():
            if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
                if value in names:
                    setattr(message, field.name, names[value])
    return copy


def merchants_named(request: Message) -> set[str]:
    with_merchant: list[Any] = [
        m for m in _messages(request) if "merchant_id" in m.DESCRIPTOR.fields_by_name
    ]
    return {m.merchant_id for m in with_merchant if m.merchant_id}


@dataclass(frozen=True)
class Rows:
    accounts: int
    transfers: int
    entries: int


async def rows_for(service: Service, merchants: Sequence[str]) -> Rows:
    """Accounts, transfers (either side) and entries of these merchants, over every shard."""
    # PostgreSQL text cannot hold NUL, and such ids are refused before any shard is touched.
    names = sorted(m for m in merchants if "\x00" not in m)
    totals = [0, 0, 0]
    if not names:
        return Rows(0, 0, 0)
    for shard in service.cluster.shards.values():
        async with shard.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM accounts WHERE merchant_id = ANY($1::text[])),"
                " (SELECT count(*) FROM transfers WHERE merchant_id = ANY($1::text[])"
                "  OR debit_merchant_id = ANY($1::text[]) OR credit_merchant_id = ANY($1::text[])),"
                " (SELECT count(*) FROM entries WHERE merchant_id = ANY($1::text[]))",
                names,
            )
            assert row is not None
            totals = [t + int(v) for t, v in zip(totals, row, strict=True)]
    return Rows(*totals)


def recorded_failures(method: str, error: grpc.aio.AioRpcError) -> int:
    """Transfer rows a refusal may leave: a journal refused by a rule records its failure (a
    failed id stays failed, as for a failed transfer), unless this was a replay of that failure.
    Every other refusal (INVALID_ARGUMENT, ALREADY_EXISTS, a journal or chain across shards)
    writes nothing at all."""
    if method != "PostJournal" or error.code() is not Code.FAILED_PRECONDITION:
        return 0
    for detail in status_details(error):
        if isinstance(detail, error_details_pb2.ErrorInfo):
            if f"TRANSFER_RESULT_{detail.reason}" in pb.TransferResult.keys():
                return 0 if detail.metadata.get("replayed") == "true" else 1
    return 0


def admin_stub(service: Service) -> ledger_pb2_grpc.LedgerAdminServiceStub:
    return ledger_pb2_grpc.LedgerAdminServiceStub(service.channel)


async def call(service: Service, method: str, request: Message) -> tuple[Code, Any]:
    """Sends request; returns (status code, the response or the AioRpcError)."""
    stub: Any = admin_stub(service) if method in ADMIN_METHODS else service.stub
    try:
        if method in STREAMING:
            stream = getattr(stub, method)(request, timeout=RPC_TIMEOUT_S)
            return OK, await _first_event(stream)
        return OK, await getattr(stub, method)(request, timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return error.code(), error


# A subscription that is admitted and has no event yet is left after this long.
FIRST_EVENT_WAIT_S = 0.5


async def _first_event(stream: Any) -> Any:
    """The stream's first event, or None if it has none yet (a subscription from now
    waits for new events): an admitted subscription answers its first read or waits."""
    try:
        async with asyncio.timeout(FIRST_EVENT_WAIT_S):
            return await stream.read()
    except TimeoutError:
        return None
    finally:
        stream.cancel()


def assert_well_formed_refusal(method: str, error: grpc.aio.AioRpcError) -> None:
    assert error.details(), f"{method}: {error.code().name} without a message"
    if error.code() is INVALID:
        requests = [d for d in status_details(error) if isinstance(d, error_details_pb2.BadRequest)]
        assert requests, f"{method}: INVALID_ARGUMENT without BadRequest: {error.details()}"
        violations = [v for d in requests for v in d.field_violations]
        assert violations, f"{method}: BadRequest with no field violation: {error.details()}"
        assert all(v.field and v.description for v in violations), violations


def assert_response_matches(method: str, request: Any, response: Any) -> None:
    """Per-item answers line up with the request's items."""
    if method == "CreateTransfers":
        assert [r.index for r in response.results] == list(range(len(request.transfers)))
        assert [r.id for r in response.results] == [t.id for t in request.transfers]
        assert pb.TRANSFER_RESULT_UNSPECIFIED not in [r.result for r in response.results]
    elif method == "CreateAccounts":
        assert [r.index for r in response.results] == list(range(len(request.accounts)))
        assert pb.ACCOUNT_RESULT_UNSPECIFIED not in [r.result for r in response.results]
    elif method == "SetAccountsClosed":
        assert len(response.found) == len(request.refs)
    elif method in ("LookupAccounts", "LookupTransfers"):
        found = response.accounts if method == "LookupAccounts" else response.transfers
        assert len(found) <= len(request.refs)
    elif method in ("ListAccounts", "ListEntries", "ListSagas", "ListTransfersByTrace"):
        page_size = request.page_size or limits.page_size_default
        items = {
            "ListAccounts": "accounts",
            "ListEntries": "entries",
            "ListSagas": "sagas",
            "ListTransfersByTrace": "transfers",
        }[method]
        assert len(getattr(response, items)) <= page_size


async def check_answer(service: Service, books: Books, method: str, generated: Message) -> None:
    """Sends one generated request and checks every property of its answer."""
    fresh = {
        FRESH_A: service.merchant_on("shard-a", "fresh"),
        FRESH_B: service.merchant_on("shard-c", "fresh"),
    }
    names = {
        **fresh,
        BOOKS_A: books.merchant_a,
        BOOKS_B: books.merchant_b,
        **{placeholder: uid("id") for placeholder in FRESH_IDS},
    }
    request = localise(generated, names)
    named = sorted(merchants_named(request) | set(fresh.values()))
    before = await rows_for(service, named)
    code, outcome = await call(service, method, request)
    note(f"{method} -> {code.name}: {outcome if code is not OK else 'answered'}")
    event(code.name)
    assert code not in (Code.INTERNAL, Code.UNKNOWN), (
        f"{method} answered {code.name} to input: {outcome.details()}"
    )
    too_big = request.ByteSize() > MESSAGE_BYTES_MAX
    allowed = ALLOWED[method] | ({Code.RESOURCE_EXHAUSTED} if too_big else set())
    assert code in allowed, f"{method}: unexpected {code.name}: {outcome}"
    if code is OK:
        if method == "CreateTransfers":
            for result in outcome.results:
                event(pb.TransferResult.Name(result.result))
        assert_response_matches(method, request, outcome)
        return
    assert_well_formed_refusal(method, outcome)
    after = await rows_for(service, named)
    fresh_rows = await rows_for(service, list(fresh.values()))
    assert (after.accounts, fresh_rows.entries) == (before.accounts, 0), (
        f"{method} refused the call ({code.name}) but wrote accounts or entries"
    )
    assert after.transfers - before.transfers == recorded_failures(method, outcome), (
        f"{method} refused the call ({code.name}) but wrote transfers"
    )


async def assert_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICES["LedgerService"].full_name):
        response = await health.Check(
            health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT_S
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING, (name, response)


# Generated requests, one test per RPC.


def _rpc_test(method: str, examples: int) -> Any:
    @settings(FUZZ, max_examples=examples)
    @given(request=REQUESTS[method])
    async def test(service: Service, books: Books, request: Message) -> None:
        await check_answer(service, books, method, request)

    return test


test_create_accounts_never_fails_internally = _rpc_test("CreateAccounts", 200)
test_lookup_accounts_never_fails_internally = _rpc_test("LookupAccounts", 40)
test_list_accounts_never_fails_internally = _rpc_test("ListAccounts", 60)
test_create_transfers_never_fails_internally = _rpc_test("CreateTransfers", 200)
test_lookup_transfers_never_fails_internally = _rpc_test("LookupTransfers", 60)
test_post_journal_never_fails_internally = _rpc_test("PostJournal", 200)
test_get_balance_never_fails_internally = _rpc_test("GetBalance", 60)
test_list_entries_never_fails_internally = _rpc_test("ListEntries", 60)
# After the others: it closes and reopens the books' accounts at random.
test_set_accounts_closed_never_fails_internally = _rpc_test("SetAccountsClosed", 40)
test_admin_list_sagas_never_fails_internally = _rpc_test("ListSagas", 40)
test_admin_get_saga_never_fails_internally = _rpc_test("GetSaga", 40)
test_admin_list_transfers_by_trace_never_fails_internally = _rpc_test("ListTransfersByTrace", 40)
test_admin_get_account_limits_never_fails_internally = _rpc_test("GetAccountLimits", 40)
test_admin_list_monitor_crossings_never_fails_internally = _rpc_test("ListMonitorCrossings", 40)
test_admin_set_account_limits_never_fails_internally = _rpc_test("SetAccountLimits", 80)
test_subscribe_events_never_fails_internally = _rpc_test("SubscribeEvents", 60)
test_subscribe_event_batches_never_fails_internally = _rpc_test("SubscribeEventBatches", 40)
test_ack_events_never_fails_internally = _rpc_test("AckEvents", 40)


# Found by the fuzzing, kept as fixed cases: the proto limits metadata by size only, so text with
# a NUL character is valid input; it must be stored and read back intact, or refused with a
# violation naming the entry, never fail inside the server (PostgreSQL jsonb cannot hold NUL).
NUL_METADATA = [
    pytest.param({"note": "a\x00b"}, id="nul-in-value"),
    pytest.param({"a\x00b": "note"}, id="nul-in-key"),
]


def _assert_stored_or_refused(
    method: str, code: Code, outcome: Any, field: str, expected: Mapping[str, str]
) -> bool:
    """True if the call was accepted (so the caller should read the metadata back)."""
    assert code in (OK, INVALID), f"{method} answered {code.name} to NUL metadata: {outcome}"
    if code is INVALID:
        assert_well_formed_refusal(method, outcome)
        fields = [
            v.field
            for d in status_details(outcome)
            if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations
        ]
        assert fields and all(f.startswith(field) for f in fields), fields
        return False
    return True


@pytest.mark.parametrize("metadata", NUL_METADATA)
async def test_account_metadata_with_nul_is_stored_intact_or_refused(
    service: Service, metadata: dict[str, str]
) -> None:
    m = uid("nul")
    request = pb.CreateAccountsRequest(accounts=[account(m, "cash", metadata=metadata)])
    code, outcome = await call(service, "CreateAccounts", request)
    if _assert_stored_or_refused("CreateAccounts", code, outcome, "accounts[0].metadata", metadata):
        code, found = await call(
            service, "LookupAccounts", pb.LookupAccountsRequest(refs=[ref(m, "cash")])
        )
        assert code is OK, found
        assert [dict(a.metadata) for a in found.accounts] == [metadata]
    else:
        assert await rows_for(service, [m]) == Rows(0, 0, 0)


@pytest.mark.parametrize("metadata", NUL_METADATA)
async def test_transfer_metadata_with_nul_is_stored_intact_or_refused(
    service: Service, books: Books, metadata: dict[str, str]
) -> None:
    a = books.merchant_a
    before = await rows_for(service, [a])
    item = transfer(uid("t"), ref(a, "cash"), ref(a, "wallet"), 1, metadata=metadata)
    code, outcome = await call(
        service, "CreateTransfers", pb.CreateTransfersRequest(transfers=[item])
    )
    if _assert_stored_or_refused(
        "CreateTransfers", code, outcome, "transfers[0].metadata", metadata
    ):
        lookup = pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=a, transfer_id=item.id)]
        )
        code, found = await call(service, "LookupTransfers", lookup)
        assert code is OK, found
        assert [dict(t.transfer.metadata) for t in found.transfers] == [metadata]
    else:
        assert (await rows_for(service, [a])).transfers == before.transfers


@pytest.mark.parametrize("metadata", NUL_METADATA)
async def test_journal_metadata_with_nul_is_stored_or_refused(
    service: Service, books: Books, metadata: dict[str, str]
) -> None:
    a = books.merchant_a
    before = await rows_for(service, [a])
    request = pb.PostJournalRequest(
        journal_id=uid("j"),
        merchant_id=a,
        postings=_balanced([(ref(a, "cash"), ref(a, "wallet"), 1, "USD")]),
        metadata=metadata,
    )
    code, outcome = await call(service, "PostJournal", request)
    if not _assert_stored_or_refused("PostJournal", code, outcome, "metadata", metadata):
        assert (await rows_for(service, [a])).transfers == before.transfers


def test_every_rpc_is_fuzzed() -> None:
    # A new RPC must get a strategy (or, for an admin write call, a decision not to fuzz it).
    not_fuzzed = {"RetrySaga", "ResolveSaga"}
    methods = {m.name for s in SERVICES.values() for m in s.methods}
    assert methods - not_fuzzed == set(REQUESTS), methods ^ set(REQUESTS)


# Raw bytes.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


BAD_UTF8 = b"ok\xff\xfe\xc3("  # a lone continuation byte, a truncated two-byte sequence


def _bad_utf8_in_first_string(descriptor: Descriptor, depth: int = 0) -> bytes | None:
    """A valid message of this type except that its first string field holds invalid UTF-8."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return _length_delimited(field.number, BAD_UTF8)
    if depth > 3:
        return None
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            inner = _bad_utf8_in_first_string(field.message_type, depth + 1)
            if inner is not None:
                return _length_delimited(field.number, inner)
    return None


def _corruptions() -> dict[str, bytes]:
    """Payloads no message type parses (checked by the test before sending)."""
    return {
        "truncated-field": _varint(15 << 3 | 2) + _varint(5) + b"ab",
        "wire-type-7": _varint(1 << 3 | 7) + b"\x00",
        "wire-type-6": _varint(1 << 3 | 6) + b"\x00",
        "field-number-0": b"\x00\x00",
        "varint-of-11-bytes": _varint(1 << 3) + b"\xff" * 10 + b"\x01",
        "unmatched-end-group": _varint(1 << 3 | 4),
        "unterminated-group": _varint(1 << 3 | 3),
        "length-past-the-end": _varint(15 << 3 | 2) + _varint(2**31),
    }


METHODS = [
    (service.name, method.name, method.input_type)
    for service in SERVICES.values()
    for method in service.methods
    if method.name in ALLOWED
]


def _undecodable_cases() -> list[Any]:
    cases = []
    for service_name, method, input_type in METHODS:
        payloads = dict(_corruptions())
        bad_string = _bad_utf8_in_first_string(input_type)
        if bad_string is not None:
            payloads["invalid-utf8-string"] = bad_string
        for name, payload in payloads.items():
            cases.append(pytest.param(service_name, method, payload, id=f"{method}-{name}"))
    # A map key and a map value that are not UTF-8 (Transfer.metadata, field 11: key 1, value 2).
    for name, entry in (
        ("key", _length_delimited(1, BAD_UTF8) + _length_delimited(2, b"v")),
        ("value", _length_delimited(1, b"k") + _length_delimited(2, BAD_UTF8)),
    ):
        payload = _length_delimited(1, _length_delimited(11, entry))
        cases.append(
            pytest.param(
                "LedgerService", "CreateTransfers", payload, id=f"metadata-{name}-invalid-utf8"
            )
        )
    # Invalid UTF-8 deep inside: CreateAccountsRequest.accounts[0].ref.account_id.
    deep = _length_delimited(
        1, _length_delimited(1, _length_delimited(1, b"m") + _length_delimited(2, BAD_UTF8))
    )
    cases.append(pytest.param("LedgerService", "CreateAccounts", deep, id="nested-account-id"))
    return cases


def _input_type(service_name: str, method: str) -> Any:
    descriptor = SERVICES[service_name].methods_by_name[method].input_type
    return getattr(pb, descriptor.name)


async def raw_call(service: Service, service_name: str, method: str, payload: bytes) -> Any:
    path = f"/{SERVICES[service_name].full_name}/{method}"
    try:
        if method in STREAMING:
            stream = service.channel.unary_stream(
                path, request_serializer=None, response_deserializer=None
            )
            return OK, await _first_event(stream(payload, timeout=RPC_TIMEOUT_S))
        send = service.channel.unary_unary(
            path, request_serializer=None, response_deserializer=None
        )
        return OK, await send(payload, timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return error.code(), error


def assert_refused_as_undecodable(method: str, code: Code, outcome: Any) -> None:
    assert code is INVALID, f"{method}: undecodable bytes answered {code.name}: {outcome}"
    violations = [
        v
        for d in status_details(outcome)
        if isinstance(d, error_details_pb2.BadRequest)
        for v in d.field_violations
    ]
    assert [v.field for v in violations] == ["request"], violations
    assert violations[0].description, violations


@pytest.mark.parametrize(("service_name", "method", "payload"), _undecodable_cases())
async def test_undecodable_request_bytes_get_invalid_argument(
    service: Service, service_name: str, method: str, payload: bytes
) -> None:
    with pytest.raises(DecodeError):
        _input_type(service_name, method).FromString(payload)
    code, outcome = await raw_call(service, service_name, method, payload)
    assert_refused_as_undecodable(method, code, outcome)


def _mutate(valid: bytes, position: int, byte: int, mode: str) -> bytes:
    if not valid:
        return bytes([byte])
    i = position % (len(valid) + 1)
    if mode == "replace":
        return valid[:i] + bytes([byte]) + valid[i + 1 :]
    if mode == "insert":
        return valid[:i] + bytes([byte]) + valid[i:]
    return valid[:i]  # truncate


RAW_METHOD = st.sampled_from([(s, m) for s, m, _ in METHODS])


@FUZZ
@given(
    target=RAW_METHOD,
    payload=st.one_of(
        st.binary(max_size=64),
        st.builds(
            _mutate,
            st.sampled_from(
                [
                    pb.CreateTransfersRequest(transfers=[_PAD_TRANSFER]).SerializeToString(),
                    pb.CreateAccountsRequest(
                        accounts=[pb.Account(ref=_PAD_REF, currency="USD", metadata={"k": "v"})]
                    ).SerializeToString(),
                    pb.ListEntriesRequest(account=_PAD_REF, page_size=5).SerializeToString(),
                    pb.GetBalanceRequest(
                        account=_PAD_REF, as_of=Timestamp(seconds=5)
                    ).SerializeToString(),
                ]
            ),
            st.integers(0, 200),
            st.integers(0, 255),
            st.sampled_from(["replace", "insert", "truncate"]),
        ),
    ),
)
async def test_random_request_bytes_never_fail_internally(
    service: Service, books: Books, target: tuple[str, str], payload: bytes
) -> None:
    service_name, method = target
    try:
        parsed = _input_type(service_name, method).FromString(payload)
    except DecodeError:
        parsed = None
    code, outcome = await raw_call(service, service_name, method, payload)
    note(f"{method} -> {code.name}: {outcome}")
    if parsed is None:
        assert_refused_as_undecodable(method, code, outcome)
        return
    assert code not in (Code.INTERNAL, Code.UNKNOWN), f"{method}: {code.name}: {outcome}"
    # The bytes parse: the server must answer as it would the message itself (the placeholder
    # merchant ids of the mutated messages are plain strings here, never names of real books).
    assert code in ALLOWED[method], f"{method}: unexpected {code.name}: {outcome}"
    if code is not OK:
        assert_well_formed_refusal(method, outcome)


# Custom metadata.

_HEADER_KEY = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,40}", fullmatch=True).filter(
    lambda k: (
        not k.startswith("grpc-")
        and not k.endswith("-bin")
        and k not in ("te", "content-type", "user-agent", "host")
    )
)
_PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64)
_HEADER_VALUE = st.one_of(
    _PRINTABLE,
    st.builds(
        operator.mul,
        st.sampled_from(["v", " ", "~"]),
        st.integers(0, limits.request_metadata_bytes_max + 2048),
    ),
)
_TEXT_HEADERS = st.lists(st.tuples(_HEADER_KEY, _HEADER_VALUE), max_size=40)
_BINARY_HEADERS = st.lists(
    st.tuples(_HEADER_KEY.map(lambda k: k + "-bin"), st.binary(max_size=4096)), max_size=8
)
_MANY_HEADERS = st.builds(
    lambda n, size: [(f"x-k{i}", "v" * size) for i in range(n)],
    st.integers(0, 600),
    st.sampled_from([0, 1, 16, 100]),
)
_TRACE_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(["traceparent", "tracestate", "baggage", "authorization"]), _PRINTABLE
    ),
    max_size=4,
)


def _metadata_bytes(metadata: Sequence[tuple[str, str | bytes]], *, encoded: bool) -> int:
    """The size the server counts (key + value + 32 bytes per entry); "-bin" values counted
    base64-encoded (encoded=True, an upper bound) or raw (a lower bound)."""
    total = 0
    for key, value in metadata:
        size = len(value)
        if encoded and key.endswith("-bin"):
            size = (size + 2) // 3 * 4
        total += len(key) + size + 32
    return total


@FUZZ
@given(
    metadata=st.builds(
        lambda *parts: [item for part in parts for item in part],
        _TEXT_HEADERS,
        _BINARY_HEADERS,
        _MANY_HEADERS,
        _TRACE_HEADERS,
    )
)
async def test_custom_metadata_gets_a_clear_status(
    service: Service, books: Books, metadata: list[tuple[str, Any]]
) -> None:
    size = _metadata_bytes(metadata, encoded=True)
    request = pb.GetBalanceRequest(account=ref(books.merchant_a, "cash"))
    stub: Any = service.stub  # the generated stub types are not those of the aio channel
    try:
        await stub.GetBalance(request, metadata=metadata, timeout=RPC_TIMEOUT_S)
        code = OK
        outcome: Any = None
    except grpc.aio.AioRpcError as error:
        code, outcome = error.code(), error
    note(f"metadata of {size} bytes -> {code.name}: {outcome}")
    assert code in (OK, Code.RESOURCE_EXHAUSTED), f"{code.name}: {outcome}"
    if size + METADATA_OWN_HEADERS_BYTES <= METADATA_BYTES_MAX:
        assert code is OK, f"metadata of {size} bytes, under the limit, refused: {outcome}"
    if _metadata_bytes(metadata, encoded=False) > METADATA_BYTES_MAX:
        assert code is Code.RESOURCE_EXHAUSTED, f"metadata of {size} bytes accepted"


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param([("grpc-custom", "v")], id="reserved-grpc-prefix"),
        pytest.param(
            [("traceparent", "00-" + "f" * 32 + "-" + "f" * 16 + "-ff")], id="traceparent"
        ),
        pytest.param([("traceparent", "00-" + "0" * 32 + "-" + "0" * 16 + "-01")], id="zero-trace"),
        pytest.param([("x-bin", bytes(range(256)) * 8)], id="every-byte-bin"),
        pytest.param([("x-k", "v" * (METADATA_BYTES_MAX // 2))], id="one-value-of-half-the-limit"),
        pytest.param([(f"x-k{i}", "v") for i in range(1000)], id="1000-keys"),
    ],
)
async def test_edge_metadata_gets_a_clear_status_and_the_server_stays_up(
    service: Service, books: Books, metadata: list[tuple[str, Any]]
) -> None:
    request = pb.GetBalanceRequest(account=ref(books.merchant_a, "cash"))
    stub: Any = service.stub  # the generated stub types are not those of the aio channel
    try:
        await stub.GetBalance(request, metadata=metadata, timeout=RPC_TIMEOUT_S)
        code = OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
    assert code in (OK, Code.RESOURCE_EXHAUSTED), code
    if _metadata_bytes(metadata, encoded=False) > METADATA_BYTES_MAX:
        assert code is Code.RESOURCE_EXHAUSTED
    elif _metadata_bytes(metadata, encoded=True) + METADATA_OWN_HEADERS_BYTES <= METADATA_BYTES_MAX:
        assert code is OK
    await assert_serving(service.channel)


# After all of it (pytest runs a module's tests in order): the server still serves.


async def test_server_still_serves_after_the_fuzzing(service: Service) -> None:
    await assert_serving(service.channel)
    # A new connection too, not only the one the fuzzing used.
    async with grpc.aio.insecure_channel(service.target) as channel:
        await assert_serving(channel)
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        m = uid("after")
        await create_accounts(stub, account(m, "cash"), account(m, "wallet"))
        results = await transfers(stub, transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 42))
        assert result_names(results) == ["TRANSFER_RESULT_OK"]
        found = await stub.GetBalance(
            pb.GetBalanceRequest(account=ref(m, "wallet")), timeout=RPC_TIMEOUT_S
        )
        assert (found.currency, found.credits_posted) == ("USD", 42)

"""ledger.api.event_json renders a stored event's row as the reference does (event()
walked by json_format.MessageToDict): on every kind of
real event, read back from the shards, and on edge cases; the AMQP body it makes is
the reference's, byte for byte but for the order of a map's keys."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf import json_format

from ledger.api import amqp_publisher, event_json
from ledger.api.events import event
from ledger.domain.events import EventKind
from ledger.storage.events import EventRow, EventStore
from ledger.v1 import ledger_pb2 as pb
from tests.event_support import kinds, marked
from tests.ledger4 import Ledger4
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    balance,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    wait_until,
)
from tests.test_moves_settle_routing import away_and_back, rebalance_to
from tests.test_spending_controls import set_limits

# The map fields of Event: a pb map iterates in an order upb seeds per process.
MAP_KEYS = frozenset({"metadata", "positions"})
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def _ordered(value: Any, *, is_map: bool = False) -> Any:
    """value with every object as its list of members, in order but for a map's."""
    if isinstance(value, dict):
        members = [(k, _ordered(v, is_map=k in MAP_KEYS)) for k, v in value.items()]
        return sorted(members) if is_map else members
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


def reference(row: EventRow) -> dict[str, Any]:
    return json_format.MessageToDict(
        event(row, {row.shard: row.position}), preserving_proto_field_name=True
    )


def assert_renders_as_reference(row: EventRow) -> None:
    rendered = event_json.to_dict(row)
    expected = reference(row)
    assert _ordered(rendered) == _ordered(expected), row
    assert rendered == expected
    message = event(row, {row.shard: row.position})
    body = amqp_publisher.amqp_body(row)
    assert _ordered(json.loads(body)) == _ordered(expected)
    # What consumers parse it into is the reference's message.
    assert json_format.Parse(body, pb.Event()) == message
    if not any(len(m) > 1 for m in _maps(expected)):
        compact = json.dumps(expected, separators=(",", ":"), ensure_ascii=False)
        assert body == compact.encode()


def _maps(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, dict):
        found = [v for k, v in value.items() if k in MAP_KEYS]
        return found + [m for v in value.values() for m in _maps(v)]
    if isinstance(value, list):
        return [m for v in value for m in _maps(v)]
    return []


async def _stored_rows(service: Service) -> list[EventRow]:
    rows: list[EventRow] = []
    for shard in service.cluster.shards.values():
        store, after = EventStore(shard), 0
        while page := await store.read(after=after, limit=500, merchant_id=None):
            rows.extend(page)
            after = page[-1].position
    return rows


async def test_every_kind_of_real_event_renders_as_the_reference(service: Service) -> None:
    stub = service.stub
    a, b = service.merchant_on("shard-a"), service.merchant_on("shard-b")
    metadata = {"order": "17", "note": "café ☕", "empty": "", "a-long-key" * 6: "v" * 200}
    await create_accounts(
        stub,
        account(a, "cash", metadata=metadata),
        account(a, "wallet", no_overdraft=True),
        account(a, "owed", no_credit_overdraft=True),
        account(a, "fees", "JPY"),
        account(a, "yen", "JPY"),
        account(b, "sales"),
        account(b, "shut"),
    )
    await stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=[ref(b, "shut")], closed=True), timeout=RPC_TIMEOUT_S
    )
    await stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=[ref(b, "shut")], closed=False), timeout=RPC_TIMEOUT_S
    )
    await stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=[ref(b, "shut")], closed=True), timeout=RPC_TIMEOUT_S
    )
    cash, wallet = ref(a, "cash"), ref(a, "wallet")
    monitor = pb.BalanceMonitor(
        monitor_id=uid("mon"), balance=pb.MONITORED_BALANCE_NET_POSTED, threshold_minor=50
    )
    await set_limits(service, a, "wallet", monitors=[monitor], no_overdraft=True)
    results = await transfers(
        stub,
        transfer("ej-post", cash, wallet, INT64_MAX // 4, metadata=metadata),
        transfer("ej-hold", cash, wallet, 500, action=pb.TRANSFER_ACTION_PENDING),
        transfer("ej-void-me", cash, wallet, 70, action=pb.TRANSFER_ACTION_PENDING),
        transfer("ej-settle", cash, None, 300, action=pb.TRANSFER_ACTION_POST_PENDING,
                 pending_id="ej-hold"),
        transfer("ej-void", cash, None, 0, action=pb.TRANSFER_ACTION_VOID_PENDING,
                 pending_id="ej-void-me"),
        transfer("ej-back", wallet, cash, INT64_MAX // 4 - 10, reversal_of="ej-post"),
        transfer("ej-refused", wallet, cash, 10**15),
        transfer("ej-expires", cash, wallet, 40, action=pb.TRANSFER_ACTION_PENDING,
                 timeout_ms=1),
        transfer("ej-linked", cash, wallet, 1, linked=True),
        transfer("ej-link-end", cash, wallet, 2),
        transfer("ej-cross", cash, ref(b, "sales"), 250),
        transfer("ej-cross-refused", cash, ref(b, "shut"), 5),
    )  # fmt: skip
    names = result_names(results)
    ok, refused = "TRANSFER_RESULT_OK", "TRANSFER_RESULT_EXCEEDS_CREDITS"
    closed = "TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED"
    assert names == [ok] * 6 + [refused] + [ok] * 4 + [closed], names
    journal = await stub.PostJournal(
        pb.PostJournalRequest(
            journal_id="ej-journal",
            merchant_id=a,
            postings=[
                pb.Posting(account=ref(a, "fees"), amount_minor=9, currency="JPY",
                           direction=pb.DIRECTION_DEBIT),
                pb.Posting(account=ref(a, "yen"), amount_minor=9, currency="JPY",
                           direction=pb.DIRECTION_CREDIT),
            ],
        ),
        timeout=RPC_TIMEOUT_S,
    )  # fmt: skip
    assert journal.result == pb.TRANSFER_RESULT_OK

    async def expired() -> bool:
        return (await balance(stub, a, "cash")).debits_pending == 0

    await wait_until(expired, what="the hold with a 1 ms timeout to expire")
    # Every event of both merchants is sequenced once the markers after them are.
    delivered = await marked(stub, [a, b], pb.SubscribeEventsRequest())
    rows = await _stored_rows(service)
    ours = [r for r in rows if {a, b} & set(r.merchant_ids)]
    assert set(kinds([e for e in delivered if {a, b} & set(e.merchant_ids)])) >= {
        "ACCOUNT_CREATED", "ACCOUNT_CLOSED", "ACCOUNT_REOPENED", "TRANSFER_POSTED",
        "PENDING_CREATED", "PENDING_POSTED", "PENDING_VOIDED", "PENDING_EXPIRED",
        "TRANSFER_REVERSED", "JOURNAL_POSTED", "SAGA_STEP", "SAGA_COMPLETED",
        "SAGA_COMPENSATED", "BALANCE_MONITOR_CROSSED",
    }  # fmt: skip
    assert {r.event_id for r in ours} >= {
        e.event_id for e in delivered if {a, b} & set(e.merchant_ids)
    }
    for row in rows:  # the module's other events too
        assert_renders_as_reference(row)
    # The body is what SubscribeEvents delivers, its cursor naming its own shard only.
    by_id = {r.event_id: r for r in ours}
    for delivered_event in delivered:
        row = by_id.get(delivered_event.event_id)
        if row is None:
            continue
        expected = pb.Event()
        expected.CopyFrom(delivered_event)
        expected.cursor.Clear()
        expected.cursor.positions[row.shard] = row.position
        assert event_json.to_dict(row) == json_format.MessageToDict(
            expected, preserving_proto_field_name=True
        )


async def test_move_events_render_as_the_reference(ledger4: Ledger4) -> None:
    env, stub = ledger4, ledger4.service.stub
    mover, _, _, heavier, _ = away_and_back(env)
    await create_accounts(stub, account(mover, "cash"), account(mover, "sales"))
    results = await transfers(stub, transfer(uid("p"), ref(mover, "cash"), ref(mover, "sales"), 7))
    assert result_names(results) == ["TRANSFER_RESULT_OK"]
    await rebalance_to(env, heavier, mover)
    events = await marked(stub, [mover], pb.SubscribeEventsRequest(merchant_id=mover))
    assert {"MERCHANT_MOVED_OUT", "MERCHANT_MOVED_IN"} <= set(kinds(events))
    rows = await _stored_rows(env.service)
    moves = (EventKind.MERCHANT_MOVED_IN, EventKind.MERCHANT_MOVED_OUT)
    moved = [r for r in rows if r.kind in moves]
    assert moved and all(event_json.to_dict(r)["move"]["merchant_id"] for r in moved)
    for row in rows:
        assert_renders_as_reference(row)


# Edge cases, on rows made by hand: values at their bounds and defaults.

COMMITTED_AT = datetime(2025, 12, 5, 1, 2, 3, 123456, tzinfo=UTC)


def _row(body: Mapping[str, Any], **fields: Any) -> EventRow:
    row = EventRow(
        shard="shard-a",
        position=42,
        event_id=str(uuid.UUID(int=7)),
        kind=EventKind.TRANSFER_POSTED,
        merchant_id="m-1",
        merchant_ids=("m-1", "m-2"),
        transfer_id="t-1",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        body=body,
        committed_at=COMMITTED_AT,
    )
    return replace(row, **fields)


def _transfer(**fields: Any) -> dict[str, Any]:
    t = {
        "transfer_id": "t-1", "merchant_id": "m-1", "debit_merchant_id": "m-1",
        "debit_account_id": "cash", "credit_merchant_id": "m-2", "credit_account_id": "sales",
        "amount_minor": 1999, "currency": "USD", "action": 1, "pending_id": "",
        "timeout_ms": 0, "linked": False, "reversal_of": "", "metadata": None,
        "created_at": "2025-12-05T01:02:03.123456+00:00", "trace_id": "",
        "amount_effective_minor": 1999, "result": 1, "entry_hash": "ab",
    }  # fmt: skip
    return {**t, **fields}


def _entry(**fields: Any) -> dict[str, Any]:
    e = {
        "merchant_id": "m-1", "account_id": "cash", "sequence": 3, "direction": 1, "kind": 1,
        "amount_minor": 1999, "debits_posted": 1999, "credits_posted": 0,
        "debits_pending": 0, "credits_pending": 0,
    }  # fmt: skip
    return {**e, **fields}


def _account(**fields: Any) -> dict[str, Any]:
    a = {
        "merchant_id": "m-1", "account_id": "cash", "currency": "USD",
        "debits_must_not_exceed_credits": True, "credits_must_not_exceed_debits": False,
        "closed": False, "metadata": {"b": "2", "a": "1"}, "debits_posted": 0,
        "credits_posted": 5, "debits_pending": -1, "credits_pending": INT64_MAX,
        "created_at": "2025-12-05T01:02:03+00:00",
    }  # fmt: skip
    return {**a, **fields}


def _saga(**fields: Any) -> dict[str, Any]:
    s = {
        "merchant_id": "m-1", "transfer_id": "t-1", "kind": 1, "state": 4, "result": None,
        "peer_shard": "shard-b", "debit_account_id": "cash", "credit_merchant_id": "m-2",
        "credit_account_id": "sales", "currency": "USD", "amount_minor": 250,
        "pending_minor": 250, "pending_id": "", "attempts": 2**31 - 1,
        "last_error": "shard-b unavailable: connection refused",
    }  # fmt: skip
    return {**s, **fields}


def _crossing(**fields: Any) -> dict[str, Any]:
    c = {
        "merchant_id": "m-1", "account_id": "wallet", "monitor_id": "mon-1", "direction": 2,
        "balance_after_minor": -40, "threshold_minor": 50, "transfer_merchant_id": "m-1",
        "transfer_id": "t-1", "crossed_at": "2025-12-05T01:02:03.12+00:00", "sequence": 1,
    }  # fmt: skip
    return {**c, **fields}


EDGE_ROWS = {
    "transfer, defaults left out": _row({"transfer": _transfer(), "entries": [_entry()]}),
    "transfer, every field set": _row(
        {
            "transfer": _transfer(
                action=2,
                pending_id="p-1",
                timeout_ms=INT64_MAX,
                linked=True,
                reversal_of="t-0",
                metadata={"zeta": "", "alpha": "é", "mid": "x" * 256},
                trace_id="0af7651916cd43dd8448eb211c80319c",
                result=34,
                amount_effective_minor=INT64_MAX,
            ),
            "entries": [_entry(), _entry(direction=2, debits_pending=INT64_MIN, kind=3)],
            "detail": None,
        }
    ),
    "transfer, one metadata key": _row({"transfer": _transfer(metadata={"k": "v"})}),
    "transfer, every string empty": _row(
        {
            "transfer": _transfer(
                transfer_id="",
                debit_merchant_id="",
                debit_account_id="",
                credit_merchant_id="",
                credit_account_id="",
                currency="",
                action=0,
                amount_minor=0,
                created_at=None,
                metadata={},
                result=0,
                amount_effective_minor=0,
            ),
            "entries": [
                _entry(
                    merchant_id="",
                    account_id="",
                    sequence=0,
                    direction=0,
                    kind=0,
                    amount_minor=0,
                    debits_posted=0,
                )
            ],
        },
        event_id="",
        merchant_id="",
        merchant_ids=(),
        transfer_id="",
        trace_id="",
    ),
    "transfer, half a ref": _row(
        {"transfer": _transfer(credit_merchant_id="", credit_account_id="", debit_account_id="")}
    ),
    "transfer, null transfer": _row({"transfer": None, "entries": [], "detail": None}),
    "journal postings": _row(
        {
            "transfer": _transfer(
                postings=[
                    {
                        "merchant_id": "m-1",
                        "account_id": "fees",
                        "amount_minor": 9,
                        "currency": "JPY",
                        "direction": 1,
                    },
                    {
                        "merchant_id": "m-1",
                        "account_id": "yen",
                        "amount_minor": 9,
                        "currency": "JPY",
                        "direction": 2,
                    },
                ]
            )
        },
        kind=EventKind.JOURNAL_POSTED,
    ),
    "pending expired": _row(
        {"transfer": _transfer(action=2, timeout_ms=1), "entries": [_entry(kind=4)]},
        kind=EventKind.PENDING_EXPIRED,
    ),
    "reversal": _row({"transfer": _transfer(reversal_of="t-0")}, kind=EventKind.TRANSFER_REVERSED),
    "account": _row({"account": _account()}, kind=EventKind.ACCOUNT_CREATED, transfer_id=""),
    "account, closed, no metadata": _row(
        {"account": _account(closed=True, metadata=None, created_at=None)},
        kind=EventKind.ACCOUNT_CLOSED,
    ),
    "saga dead-lettered": _row({"saga": _saga()}, kind=EventKind.SAGA_DEAD_LETTERED),
    "saga compensated": _row(
        {"saga": _saga(state=3, result=17, attempts=0, last_error="")},
        kind=EventKind.SAGA_COMPENSATED,
    ),
    "move": _row(
        {"detail": {"merchant_id": "m-1", "epoch": 3, "from_shard": "a", "to_shard": "b"}},
        kind=EventKind.MERCHANT_MOVED_IN,
    ),
    "move, epoch 0": _row(
        {"detail": {"merchant_id": "m-1", "epoch": 0, "from_shard": "", "to_shard": "b"}},
        kind=EventKind.MERCHANT_MOVED_OUT,
    ),
    "detail without an epoch": _row({"detail": {"other": 1}}, kind=EventKind.MOVE_BOOKED),
    "monitor crossing": _row({"crossing": _crossing()}, kind=EventKind.BALANCE_MONITOR_CROSSED),
    "monitor crossing, empty transfer": _row(
        {
            "crossing": _crossing(
                transfer_merchant_id="",
                transfer_id="",
                balance_after_minor=0,
                threshold_minor=INT64_MIN,
                crossed_at=None,
                direction=0,
            )
        },
        kind=EventKind.BALANCE_MONITOR_CROSSED,
    ),
    "empty body": _row({}, kind=EventKind.SAGA_STEP),
    "position 0, empty shard name": _row({}, position=0, shard=""),
    "the largest position": _row({}, position=INT64_MAX),
    "unknown kinds and enums": _row(
        {"transfer": _transfer(action=99, result=12345), "entries": [_entry(kind=-5)]},
        kind=99,
    ),
    "unicode everywhere": _row(
        {"transfer": _transfer(transfer_id='ü-\u2028-"q"-\\', currency="€€€")},
        merchant_id="merchant-ñ",
        merchant_ids=("merchant-ñ", ""),
    ),
    # The body's bytes are json.dumps's (compact, UTF-8 as is) for every character
    # a string may hold: the controls, quotes, DEL, separators, beyond the BMP.
    "every kind of character": _row(
        {
            "transfer": _transfer(
                transfer_id="".join(map(chr, range(0x20))) + '"\\/\x7f\u2028\u2029\ufeff',
                currency="😀𝄞\U0010ffff",
            )
        },
        merchant_id="\x00\x1f\x7f\x80\u00ff\u0100\uffff\U00010000",
    ),
}

# Times with 0, 3 and 6 fractional digits (PostgreSQL keeps microseconds, so the
# 9 digits a Timestamp may have never arise), in other zones, before 1970.
MOMENTS = [
    datetime(2025, 12, 5, 1, 2, 3, tzinfo=UTC),
    datetime(2025, 12, 5, 1, 2, 3, 120000, tzinfo=UTC),
    datetime(2025, 12, 5, 1, 2, 3, 123000, tzinfo=UTC),
    datetime(2025, 12, 5, 1, 2, 3, 100, tzinfo=UTC),
    datetime(2025, 12, 5, 1, 2, 3, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=timezone(timedelta(hours=-8))),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.mark.parametrize("name", EDGE_ROWS)
def test_edge_cases_render_as_the_reference(name: str) -> None:
    assert_renders_as_reference(EDGE_ROWS[name])


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_times_render_as_the_reference(moment: datetime) -> None:
    stored = moment.isoformat()  # as PostgreSQL's JSON holds a timestamptz
    body = {
        "transfer": _transfer(created_at=stored),
        "account": _account(created_at=stored),
        "crossing": _crossing(crossed_at=stored),
    }
    assert_renders_as_reference(_row(body, committed_at=moment))


@pytest.mark.parametrize(
    "body",
    [
        {"transfer": _transfer(amount_minor=INT64_MAX + 1)},
        {"entries": [_entry(debits_posted=INT64_MIN - 1)]},
        {"account": _account(credits_posted=2**64)},
        {"saga": _saga(attempts=2**31)},
        {"crossing": _crossing(threshold_minor=-(2**70))},
        {"transfer": _transfer(amount_minor=1.5)},
    ],
    ids=["int64 max + 1", "int64 min - 1", "2^64", "int32 max + 1", "-2^70", "a float"],
)
def test_a_value_the_reference_refuses_is_refused_not_rendered(body: dict[str, Any]) -> None:
    row = _row(body)
    with pytest.raises((ValueError, TypeError)):
        reference(row)
    with pytest.raises(ValueError):
        event_json.to_dict(row)

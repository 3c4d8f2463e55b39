"""Balances now and as of a past instant, and paged account history, over the real gRPC API."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    balance,
    create_accounts,
    error_reason,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
)

PAGES_MAX = 100


@dataclass(frozen=True)
class Bal:
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0


def bal_of(message: pb.Account | pb.GetBalanceResponse | pb.Entry) -> Bal:
    return Bal(
        message.debits_posted,
        message.credits_posted,
        message.debits_pending,
        message.credits_pending,
    )


async def get_balance(
    service: Service, merchant_id: str, account_id: str, as_of: Timestamp | None = None
) -> pb.GetBalanceResponse:
    request = pb.GetBalanceRequest(account=ref(merchant_id, account_id))
    if as_of is not None:
        request.as_of.CopyFrom(as_of)
    return await service.stub.GetBalance(request, timeout=RPC_TIMEOUT_S)


async def list_pages(
    service: Service, merchant_id: str, account_id: str, *, page_size: int, order: int
) -> list[pb.ListEntriesResponse]:
    pages: list[pb.ListEntriesResponse] = []
    token = ""
    for _ in range(PAGES_MAX):
        page = await service.stub.ListEntries(
            pb.ListEntriesRequest(
                account=ref(merchant_id, account_id),
                page_size=page_size,
                page_token=token,
                order=order,  # type: ignore[arg-type]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages
    raise AssertionError("ListEntries never returned an empty next_page_token")


def shifted(stamp: Timestamp, delta: timedelta) -> Timestamp:
    moved = Timestamp()
    moved.FromDatetime(stamp.ToDatetime(tzinfo=UTC) + delta)
    return moved


def apply_entry(before: Bal, entry: pb.Entry) -> Bal:
    """The balances an entry should leave, from the balances before it."""
    debit = entry.direction == pb.DIRECTION_DEBIT
    amount = entry.amount_minor
    if entry.kind == pb.ENTRY_KIND_POSTED:
        field, sign = ("debits_posted" if debit else "credits_posted"), 1
    elif entry.kind == pb.ENTRY_KIND_PENDING:
        field, sign = ("debits_pending" if debit else "credits_pending"), 1
    else:
        assert entry.kind == pb.ENTRY_KIND_PENDING_RELEASED, entry
        field, sign = ("debits_pending" if debit else "credits_pending"), -1
    return replace(before, **{field: getattr(before, field) + sign * amount})


def check_chain(oldest_first: list[pb.Entry]) -> None:
    """Each entry's balances are the previous entry's plus its own amount."""
    previous = Bal()
    for entry in oldest_first:
        assert bal_of(entry) == apply_entry(previous, entry), entry
        previous = bal_of(entry)


async def ok(service: Service, *items: pb.Transfer) -> list[pb.CreateTransferResult]:
    results = await transfers(service.stub, *items)
    assert result_names(results) == ["TRANSFER_RESULT_OK"] * len(items)
    return results


# GetBalance.


async def test_get_balance_now_equals_lookup_balances(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a", "EUR"), account(m, "b", "EUR"))
    await ok(
        service,
        transfer(uid("t"), ref(m, "a"), ref(m, "b"), 700, "EUR"),
        transfer(uid("t"), ref(m, "b"), ref(m, "a"), 50, "EUR"),
        transfer(uid("t"), ref(m, "a"), ref(m, "b"), 33, "EUR", action=pb.TRANSFER_ACTION_PENDING),
    )
    for account_id in ("a", "b"):
        now = await get_balance(service, m, account_id)
        looked_up = await balance(service.stub, m, account_id)
        assert now.currency == "EUR"
        assert bal_of(now) == bal_of(looked_up)
    assert bal_of(await get_balance(service, m, "a")) == Bal(700, 50, 33, 0)


async def test_get_balance_as_of_each_transfer_equals_running_balance(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a"), account(m, "b"))
    a, b = ref(m, "a"), ref(m, "b")
    pending_1, pending_2 = uid("p"), uid("p")
    steps: list[tuple[pb.Transfer, Bal, Bal]] = [
        (transfer(uid("t"), a, b, 100), Bal(100, 0, 0, 0), Bal(0, 100, 0, 0)),
        (
            transfer(pending_1, a, b, 40, action=pb.TRANSFER_ACTION_PENDING),
            Bal(100, 0, 40, 0),
            Bal(0, 100, 0, 40),
        ),
        (transfer(uid("t"), b, a, 30), Bal(100, 30, 40, 0), Bal(30, 100, 0, 40)),
        (
            transfer(
                uid("t"),
                a,
                None,
                25,
                "",
                action=pb.TRANSFER_ACTION_POST_PENDING,
                pending_id=pending_1,
            ),
            Bal(125, 30, 0, 0),
            Bal(30, 125, 0, 0),
        ),
        (
            transfer(pending_2, a, b, 10, action=pb.TRANSFER_ACTION_PENDING),
            Bal(125, 30, 10, 0),
            Bal(30, 125, 0, 10),
        ),
        (
            transfer(
                uid("t"),
                a,
                None,
                0,
                "",
                action=pb.TRANSFER_ACTION_VOID_PENDING,
                pending_id=pending_2,
            ),
            Bal(125, 30, 0, 0),
            Bal(30, 125, 0, 0),
        ),
        (transfer(uid("t"), b, a, 5), Bal(125, 35, 0, 0), Bal(35, 125, 0, 0)),
    ]
    stamps: list[Timestamp] = []
    for item, _, _ in steps:
        (result,) = await ok(service, item)
        assert result.HasField("created_at")
        stamps.append(result.created_at)
    assert [s.ToNanoseconds() for s in stamps] == sorted({s.ToNanoseconds() for s in stamps})

    for stamp, (_, expected_a, expected_b) in zip(stamps, steps, strict=True):
        assert bal_of(await get_balance(service, m, "a", stamp)) == expected_a
        assert bal_of(await get_balance(service, m, "b", stamp)) == expected_b
    before_first = shifted(stamps[0], -timedelta(microseconds=1))
    assert bal_of(await get_balance(service, m, "a", before_first)) == Bal()
    assert bal_of(await get_balance(service, m, "b", before_first)) == Bal()
    # Between two transfers, the earlier one's balance holds.
    between = shifted(stamps[2], timedelta(microseconds=1))
    assert stamps[3].ToNanoseconds() > between.ToNanoseconds()
    assert bal_of(await get_balance(service, m, "a", between)) == steps[2][1]
    # The final balance matches the account's current balance.
    assert bal_of(await balance(service.stub, m, "a")) == steps[-1][1]


async def test_get_balance_of_missing_account_is_not_found(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "exists"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_balance(service, m, "missing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "ACCOUNT_NOT_FOUND"
    as_of = Timestamp()
    as_of.GetCurrentTime()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_balance(service, uid("nobody"), "missing", as_of)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# ListEntries.


async def make_23_entries(service: Service, m: str) -> None:
    """Gives account 'main' exactly 23 entries of every kind, over several calls."""
    main, other = ref(m, "main"), ref(m, "other")
    await create_accounts(service.stub, account(m, "main"), account(m, "other"))
    p1, p2, p3 = uid("p"), uid("p"), uid("p")
    pend = pb.TRANSFER_ACTION_PENDING
    await ok(service, *(transfer(uid("t"), other, main, 100 + i) for i in range(4)))  # 4
    await ok(service, transfer(p1, main, other, 50, action=pend))  # 5
    await ok(
        service,
        transfer(uid("t"), main, other, 7),
        transfer(p2, main, other, 20, action=pend),
        transfer(uid("t"), other, main, 9),
    )  # 8
    await ok(
        service,
        transfer(
            uid("t"), main, None, 30, "", action=pb.TRANSFER_ACTION_POST_PENDING, pending_id=p1
        ),
    )  # 10: release + posted
    await ok(service, transfer(p3, other, main, 15, action=pend))  # 11: a pending credit
    await ok(
        service,
        transfer(
            uid("t"), main, None, 0, "", action=pb.TRANSFER_ACTION_VOID_PENDING, pending_id=p2
        ),
    )  # 12: release only
    await ok(
        service,
        transfer(
            uid("t"), other, None, 0, "", action=pb.TRANSFER_ACTION_POST_PENDING, pending_id=p3
        ),
    )  # 14: release + posted of the credit
    await ok(service, *(transfer(uid("t"), main, other, 1 + i) for i in range(5)))  # 19
    await ok(service, *(transfer(uid("t"), other, main, 2 + i) for i in range(4)))  # 23


async def test_list_entries_pages_newest_first_by_default(service: Service) -> None:
    m = uid("m")
    await make_23_entries(service, m)
    for order in (pb.ORDER_UNSPECIFIED, pb.ORDER_NEWEST_FIRST):
        pages = await list_pages(service, m, "main", page_size=5, order=order)
        assert [len(p.entries) for p in pages] == [5, 5, 5, 5, 3]
        assert [bool(p.next_page_token) for p in pages] == [True, True, True, True, False]
        entries = [e for p in pages for e in p.entries]
        assert [e.sequence for e in entries] == list(range(23, 0, -1))
        check_chain(list(reversed(entries)))
    newest = entries[0]
    assert bal_of(newest) == bal_of(await balance(service.stub, m, "main"))


async def test_list_entries_pages_oldest_first(service: Service) -> None:
    m = uid("m")
    await make_23_entries(service, m)
    pages = await list_pages(service, m, "main", page_size=5, order=pb.ORDER_OLDEST_FIRST)
    assert [len(p.entries) for p in pages] == [5, 5, 5, 5, 3]
    assert pages[-1].next_page_token == ""
    entries = [e for p in pages for e in p.entries]
    assert [e.sequence for e in entries] == list(range(1, 24))
    check_chain(entries)
    kinds = {pb.EntryKind.Name(e.kind) for e in entries}
    assert kinds == {"ENTRY_KIND_POSTED", "ENTRY_KIND_PENDING", "ENTRY_KIND_PENDING_RELEASED"}
    assert bal_of(entries[-1]) == bal_of(await balance(service.stub, m, "main"))
    assert all(e.created_at.seconds > 0 for e in entries)
    stamps = [e.created_at.ToNanoseconds() for e in entries]
    assert stamps == sorted(stamps)

    newest_first = await list_pages(service, m, "main", page_size=5, order=pb.ORDER_NEWEST_FIRST)
    assert [e for p in newest_first for e in p.entries] == list(reversed(entries))


async def test_list_entries_of_account_without_history_is_empty(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "quiet"))
    pages = await list_pages(service, m, "quiet", page_size=5, order=pb.ORDER_OLDEST_FIRST)
    assert len(pages) == 1
    assert list(pages[0].entries) == []
    assert pages[0].next_page_token == ""


async def test_two_phase_transfer_shows_pending_then_release_and_posted(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "payer"), account(m, "payee"))
    pending_id, post_id = uid("p"), uid("t")
    await ok(
        service,
        transfer(
            pending_id, ref(m, "payer"), ref(m, "payee"), 80, action=pb.TRANSFER_ACTION_PENDING
        ),
    )
    await ok(
        service,
        transfer(
            post_id,
            ref(m, "payer"),
            None,
            60,
            "",
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=pending_id,
        ),
    )
    expected = {
        "payer": (
            pb.DIRECTION_DEBIT,
            [Bal(0, 0, 80, 0), Bal(0, 0, 0, 0), Bal(60, 0, 0, 0)],
        ),
        "payee": (
            pb.DIRECTION_CREDIT,
            [Bal(0, 0, 0, 80), Bal(0, 0, 0, 0), Bal(0, 60, 0, 0)],
        ),
    }
    for account_id, (direction, balances_after) in expected.items():
        (page,) = await list_pages(
            service, m, account_id, page_size=10, order=pb.ORDER_OLDEST_FIRST
        )
        entries = list(page.entries)
        assert [
            (e.sequence, e.transfer_id, e.kind, e.direction, e.amount_minor) for e in entries
        ] == [
            (1, pending_id, pb.ENTRY_KIND_PENDING, direction, 80),
            (2, post_id, pb.ENTRY_KIND_PENDING_RELEASED, direction, 80),
            (3, post_id, pb.ENTRY_KIND_POSTED, direction, 60),
        ]
        assert [bal_of(e) for e in entries] == balances_after
        check_chain(entries)


async def test_list_entries_of_missing_account_is_not_found(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "exists"))
    for merchant_id in (m, uid("nobody")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.ListEntries(
                pb.ListEntriesRequest(account=ref(merchant_id, "missing")), timeout=RPC_TIMEOUT_S
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(caught.value) == "ACCOUNT_NOT_FOUND"

"""Accounts over the real gRPC API: create, look up, list, close and reopen."""

from __future__ import annotations

import random

from ledger.v1 import ledger_pb2 as pb
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
)


async def _create(service: Service, *accounts: pb.Account) -> list[pb.CreateAccountResult]:
    response = await service.stub.CreateAccounts(
        pb.CreateAccountsRequest(accounts=accounts), timeout=RPC_TIMEOUT_S
    )
    return list(response.results)


async def _list_all(
    service: Service, merchant_id: str, page_size: int
) -> list[pb.ListAccountsResponse]:
    pages: list[pb.ListAccountsResponse] = []
    token = ""
    for _ in range(100):
        page = await service.stub.ListAccounts(
            pb.ListAccountsRequest(merchant_id=merchant_id, page_size=page_size, page_token=token),
            timeout=RPC_TIMEOUT_S,
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages
    raise AssertionError("ListAccounts never returned an empty next_page_token")


async def _set_closed(service: Service, refs: list[pb.AccountRef], *, closed: bool) -> list[bool]:
    response = await service.stub.SetAccountsClosed(
        pb.SetAccountsClosedRequest(refs=refs, closed=closed), timeout=RPC_TIMEOUT_S
    )
    return list(response.found)


# CreateAccounts.


async def test_create_accounts_reports_ok_for_each_new_account(service: Service) -> None:
    m = uid("m")
    results = await _create(service, account(m, "cash"), account(m, "wallet", "EUR"))
    assert [r.index for r in results] == [0, 1]
    assert [r.result for r in results] == [pb.ACCOUNT_RESULT_OK, pb.ACCOUNT_RESULT_OK]
    assert [r.differing_field for r in results] == ["", ""]
    found = await service.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[ref(m, "cash"), ref(m, "wallet")]), timeout=RPC_TIMEOUT_S
    )
    assert [(a.ref.account_id, a.currency) for a in found.accounts] == [
        ("cash", "USD"),
        ("wallet", "EUR"),
    ]
    assert all(not a.closed for a in found.accounts)
    assert all(a.created_at.seconds > 0 for a in found.accounts)


async def test_identical_recreate_reports_exists_and_changes_nothing(service: Service) -> None:
    m = uid("m")
    original = account(m, "cash", no_overdraft=True, metadata={"owner": "ops"})
    await create_accounts(service.stub, original)
    before = await balance(service.stub, m, "cash")
    results = await _create(service, original)
    assert [r.result for r in results] == [pb.ACCOUNT_RESULT_EXISTS]
    assert results[0].differing_field == ""
    after = await balance(service.stub, m, "cash")
    assert after == before


async def test_recreate_with_other_currency_reports_differing_currency(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "cash", "USD"))
    results = await _create(service, account(m, "cash", "EUR"))
    assert [r.result for r in results] == [pb.ACCOUNT_RESULT_EXISTS_WITH_DIFFERENT_FIELDS]
    assert results[0].differing_field == "currency"
    stored = await balance(service.stub, m, "cash")
    assert stored.currency == "USD"


async def test_recreate_with_other_overdraft_flag_reports_differing_flag(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "cash", no_overdraft=False))
    results = await _create(service, account(m, "cash", no_overdraft=True))
    assert [r.result for r in results] == [pb.ACCOUNT_RESULT_EXISTS_WITH_DIFFERENT_FIELDS]
    assert results[0].differing_field == "debits_must_not_exceed_credits"
    stored = await balance(service.stub, m, "cash")
    assert stored.debits_must_not_exceed_credits is False


async def test_recreate_with_other_metadata_reports_differing_metadata(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "cash", metadata={"tier": "gold"}))
    results = await _create(service, account(m, "cash", metadata={"tier": "silver"}))
    assert [r.result for r in results] == [pb.ACCOUNT_RESULT_EXISTS_WITH_DIFFERENT_FIELDS]
    assert results[0].differing_field == "metadata"
    stored = await balance(service.stub, m, "cash")
    assert dict(stored.metadata) == {"tier": "gold"}


async def test_batch_across_shards_gets_results_in_request_order(service: Service) -> None:
    m_a = service.merchant_on("shard-a")
    m_b = service.merchant_on("shard-b")
    m_c = service.merchant_on("shard-c")
    await create_accounts(service.stub, account(m_b, "old"), account(m_c, "old", "EUR"))
    batch = [
        account(m_c, "new"),  # OK on shard-c
        account(m_a, "new"),  # OK on shard-a
        account(m_b, "old"),  # EXISTS on shard-b
        account(m_a, "other"),  # OK on shard-a
        account(m_c, "old", "USD"),  # differs on shard-c: currency
        account(m_b, "new", metadata={"k": "v"}),  # OK on shard-b
    ]
    results = await _create(service, *batch)
    assert [r.index for r in results] == list(range(len(batch)))
    assert [r.result for r in results] == [
        pb.ACCOUNT_RESULT_OK,
        pb.ACCOUNT_RESULT_OK,
        pb.ACCOUNT_RESULT_EXISTS,
        pb.ACCOUNT_RESULT_OK,
        pb.ACCOUNT_RESULT_EXISTS_WITH_DIFFERENT_FIELDS,
        pb.ACCOUNT_RESULT_OK,
    ]
    assert [r.differing_field for r in results] == ["", "", "", "", "currency", ""]
    found = await service.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[a.ref for a in batch]), timeout=RPC_TIMEOUT_S
    )
    assert [(a.ref.merchant_id, a.ref.account_id, a.currency) for a in found.accounts] == [
        (m_c, "new", "USD"),
        (m_a, "new", "USD"),
        (m_b, "old", "USD"),
        (m_a, "other", "USD"),
        (m_c, "old", "EUR"),
        (m_b, "new", "USD"),
    ]


# LookupAccounts.


async def test_lookup_returns_found_accounts_in_request_order_and_omits_missing(
    service: Service,
) -> None:
    m_a = service.merchant_on("shard-a")
    m_c = service.merchant_on("shard-c")
    await create_accounts(
        service.stub, account(m_a, "x"), account(m_a, "y"), account(m_c, "z", "JPY")
    )
    refs = [
        ref(m_c, "z"),
        ref(m_a, "missing"),
        ref(m_a, "y"),
        ref(uid("nobody"), "x"),
        ref(m_a, "x"),
    ]
    found = await service.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=refs), timeout=RPC_TIMEOUT_S
    )
    assert [(a.ref.merchant_id, a.ref.account_id) for a in found.accounts] == [
        (m_c, "z"),
        (m_a, "y"),
        (m_a, "x"),
    ]
    assert found.accounts[0].currency == "JPY"


async def test_lookup_shows_balances_after_posted_and_pending_transfers(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "cash"), account(m, "wallet"))
    results = await transfers(
        service.stub,
        transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 500),
        transfer(uid("t"), ref(m, "wallet"), ref(m, "cash"), 120),
        transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 75, action=pb.TRANSFER_ACTION_PENDING),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"] * 3
    found = await service.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[ref(m, "wallet"), ref(m, "cash")]), timeout=RPC_TIMEOUT_S
    )
    wallet, cash = found.accounts
    assert (cash.debits_posted, cash.credits_posted, cash.debits_pending, cash.credits_pending) == (
        500,
        120,
        75,
        0,
    )
    assert (
        wallet.debits_posted,
        wallet.credits_posted,
        wallet.debits_pending,
        wallet.credits_pending,
    ) == (120, 500, 0, 75)


# ListAccounts.


async def test_list_accounts_pages_in_account_id_order_with_tokens(service: Service) -> None:
    m = service.merchant_on("shard-b")
    # A neighbour on the same shard whose ids interleave with m's must not leak in.
    neighbour = service.merchant_on("shard-b")
    ids = [f"acct-{i:02d}" for i in range(20)] + ["B-upper", "a-lower", "Z-last", "0-first", "_x"]
    assert len(ids) == 25
    shuffled = list(ids)
    random.Random(7).shuffle(shuffled)
    await create_accounts(service.stub, *(account(m, i) for i in shuffled))
    await create_accounts(
        service.stub, account(neighbour, "acct-05x"), account(neighbour, "acct-99")
    )
    pages = await _list_all(service, m, page_size=10)
    assert [len(p.accounts) for p in pages] == [10, 10, 5]
    assert [bool(p.next_page_token) for p in pages] == [True, True, False]
    listed = [a.ref.account_id for p in pages for a in p.accounts]
    # Byte-wise (code point) order of the ids.
    assert listed == sorted(ids)
    assert {a.ref.merchant_id for p in pages for a in p.accounts} == {m}


async def test_list_accounts_of_merchant_without_accounts_is_empty(service: Service) -> None:
    page = await service.stub.ListAccounts(
        pb.ListAccountsRequest(merchant_id=uid("empty"), page_size=10), timeout=RPC_TIMEOUT_S
    )
    assert list(page.accounts) == []
    assert page.next_page_token == ""


async def test_list_accounts_with_exact_multiple_ends_with_empty_token(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, *(account(m, f"a{i}") for i in range(4)))
    pages = await _list_all(service, m, page_size=2)
    assert [len(p.accounts) for p in pages] == [2, 2]
    assert pages[-1].next_page_token == ""


# SetAccountsClosed.


async def test_closed_account_refuses_transfers_both_ways_and_nothing_moves(
    service: Service,
) -> None:
    m = uid("m")
    await create_accounts(
        service.stub, account(m, "cash"), account(m, "frozen"), account(m, "other")
    )
    funded = await transfers(service.stub, transfer(uid("t"), ref(m, "cash"), ref(m, "frozen"), 40))
    assert result_names(funded) == ["TRANSFER_RESULT_OK"]
    assert await _set_closed(service, [ref(m, "frozen")], closed=True) == [True]
    assert (await balance(service.stub, m, "frozen")).closed is True

    results = await transfers(
        service.stub,
        transfer(uid("t"), ref(m, "frozen"), ref(m, "other"), 10),
        transfer(uid("t"), ref(m, "cash"), ref(m, "frozen"), 10),
    )
    assert result_names(results) == [
        "TRANSFER_RESULT_DEBIT_ACCOUNT_CLOSED",
        "TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED",
    ]
    frozen = await balance(service.stub, m, "frozen")
    cash = await balance(service.stub, m, "cash")
    other = await balance(service.stub, m, "other")
    assert (frozen.debits_posted, frozen.credits_posted) == (0, 40)
    assert (cash.debits_posted, cash.credits_posted) == (40, 0)
    assert (other.debits_posted, other.credits_posted) == (0, 0)
    assert frozen.debits_pending == frozen.credits_pending == 0


async def test_reopened_account_accepts_transfers_again(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "cash"), account(m, "wallet"))
    assert await _set_closed(service, [ref(m, "wallet")], closed=True) == [True]
    refused = await transfers(service.stub, transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 5))
    assert result_names(refused) == ["TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED"]

    assert await _set_closed(service, [ref(m, "wallet")], closed=False) == [True]
    assert (await balance(service.stub, m, "wallet")).closed is False
    accepted = await transfers(
        service.stub, transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 5)
    )
    assert result_names(accepted) == ["TRANSFER_RESULT_OK"]
    assert (await balance(service.stub, m, "wallet")).credits_posted == 5


async def test_set_closed_reports_found_false_for_missing_account(service: Service) -> None:
    m_a = service.merchant_on("shard-a")
    m_c = service.merchant_on("shard-c")
    await create_accounts(service.stub, account(m_a, "x"), account(m_c, "y"))
    found = await _set_closed(
        service,
        [ref(m_a, "x"), ref(m_a, "missing"), ref(m_c, "y"), ref(uid("nobody"), "z")],
        closed=True,
    )
    assert found == [True, False, True, False]
    looked_up = await service.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[ref(m_a, "x"), ref(m_c, "y")]), timeout=RPC_TIMEOUT_S
    )
    assert [a.closed for a in looked_up.accounts] == [True, True]


# Metadata.


async def test_account_metadata_round_trips_through_lookup_and_list(service: Service) -> None:
    m = uid("m")
    metadata = {
        "owner": "payments-team",
        "région": "Île-de-France ✓",
        "empty": "",
        "k" * 64: "v" * 256,
    }
    await create_accounts(service.stub, account(m, "tagged", metadata=metadata), account(m, "bare"))
    tagged = await balance(service.stub, m, "tagged")
    assert dict(tagged.metadata) == metadata
    bare = await balance(service.stub, m, "bare")
    assert dict(bare.metadata) == {}
    page = await service.stub.ListAccounts(
        pb.ListAccountsRequest(merchant_id=m), timeout=RPC_TIMEOUT_S
    )
    assert {a.ref.account_id: dict(a.metadata) for a in page.accounts} == {
        "bare": {},
        "tagged": metadata,
    }

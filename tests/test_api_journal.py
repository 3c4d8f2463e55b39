"""PostJournal over the real gRPC API: atomic multi-leg postings on one shard."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    balance,
    count_rows,
    create_accounts,
    error_reason,
    ref,
    result_names,
    status_details,
    transfer,
    transfers,
    uid,
)

DEBIT = pb.DIRECTION_DEBIT
CREDIT = pb.DIRECTION_CREDIT


def posting(
    merchant_id: str, account_id: str, amount_minor: int, direction: int, currency: str = "USD"
) -> pb.Posting:
    return pb.Posting(
        account=ref(merchant_id, account_id),
        amount_minor=amount_minor,
        currency=currency,
        direction=direction,  # type: ignore[arg-type]
    )


async def post(
    service: Service,
    journal_id: str,
    merchant_id: str,
    *postings: pb.Posting,
    metadata: dict[str, str] | None = None,
) -> pb.PostJournalResponse:
    return await service.stub.PostJournal(
        pb.PostJournalRequest(
            journal_id=journal_id,
            merchant_id=merchant_id,
            postings=postings,
            metadata=metadata or {},
        ),
        timeout=RPC_TIMEOUT_S,
    )


async def post_refused(
    service: Service, journal_id: str, merchant_id: str, *postings: pb.Posting
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await post(service, journal_id, merchant_id, *postings)
    return caught.value


def precondition_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    return [
        v.subject
        for d in status_details(error)
        if isinstance(d, error_details_pb2.PreconditionFailure)
        for v in d.violations
    ]


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    infos = [d for d in status_details(error) if isinstance(d, error_details_pb2.ErrorInfo)]
    assert len(infos) == 1, status_details(error)
    return infos[0]


async def balances(
    service: Service, *refs: tuple[str, str]
) -> dict[str, tuple[int, int, int, int]]:
    """(debits_posted, credits_posted, debits_pending, credits_pending) per 'merchant/account'."""
    found = {}
    for merchant_id, account_id in refs:
        a = await balance(service.stub, merchant_id, account_id)
        found[f"{merchant_id}/{account_id}"] = (
            a.debits_posted,
            a.credits_posted,
            a.debits_pending,
            a.credits_pending,
        )
    return found


async def fund(service: Service, merchant_id: str, account_id: str, amount_minor: int) -> None:
    """Credits account_id from a fresh unrestricted source account of the same merchant."""
    source = uid("src")
    await create_accounts(service.stub, account(merchant_id, source))
    results = await transfers(
        service.stub,
        transfer(uid("t"), ref(merchant_id, source), ref(merchant_id, account_id), amount_minor),
    )
    assert result_names(results) == ["TRANSFER_RESULT_OK"]


# Success and idempotency.


async def test_journal_across_two_merchants_on_one_shard_moves_every_leg(
    service: Service,
) -> None:
    home = service.merchant_on("shard-b")
    partner = service.merchant_on("shard-b")
    assert home != partner
    await create_accounts(
        service.stub,
        account(home, "cash"),
        account(home, "fees"),
        account(home, "revenue"),
        account(partner, "payable"),
    )
    response = await post(
        service,
        uid("j"),
        home,
        posting(home, "cash", 1000, DEBIT),
        posting(home, "fees", 30, CREDIT),
        posting(partner, "payable", 900, CREDIT),
        posting(home, "revenue", 70, CREDIT),
    )
    assert response.result == pb.TRANSFER_RESULT_OK
    assert response.replayed is False
    assert response.created_at.seconds > 0
    assert await balances(
        service, (home, "cash"), (home, "fees"), (home, "revenue"), (partner, "payable")
    ) == {
        f"{home}/cash": (1000, 0, 0, 0),
        f"{home}/fees": (0, 30, 0, 0),
        f"{home}/revenue": (0, 70, 0, 0),
        f"{partner}/payable": (0, 900, 0, 0),
    }


async def test_journal_balanced_per_currency_posts_both_currencies(service: Service) -> None:
    m = uid("m")
    await create_accounts(
        service.stub,
        account(m, "usd-in"),
        account(m, "usd-out"),
        account(m, "eur-in", "EUR"),
        account(m, "eur-out", "EUR"),
    )
    response = await post(
        service,
        uid("j"),
        m,
        posting(m, "usd-out", 500, DEBIT, "USD"),
        posting(m, "eur-in", 460, CREDIT, "EUR"),
        posting(m, "usd-in", 500, CREDIT, "USD"),
        posting(m, "eur-out", 460, DEBIT, "EUR"),
    )
    assert response.result == pb.TRANSFER_RESULT_OK
    assert await balances(
        service, (m, "usd-in"), (m, "usd-out"), (m, "eur-in"), (m, "eur-out")
    ) == {
        f"{m}/usd-in": (0, 500, 0, 0),
        f"{m}/usd-out": (500, 0, 0, 0),
        f"{m}/eur-in": (0, 460, 0, 0),
        f"{m}/eur-out": (460, 0, 0, 0),
    }


async def test_replayed_journal_reports_replayed_and_moves_nothing_more(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a"), account(m, "b"))
    journal_id = uid("j")
    legs = (posting(m, "a", 250, DEBIT), posting(m, "b", 250, CREDIT))
    first = await post(service, journal_id, m, *legs, metadata={"order": "42"})
    entries_before = await count_rows(service, "entries")
    again = await post(service, journal_id, m, *legs, metadata={"order": "42"})
    assert first.replayed is False
    assert again.replayed is True
    assert again.result == pb.TRANSFER_RESULT_OK
    assert again.created_at == first.created_at
    assert await count_rows(service, "entries") == entries_before
    assert await balances(service, (m, "a"), (m, "b")) == {
        f"{m}/a": (250, 0, 0, 0),
        f"{m}/b": (0, 250, 0, 0),
    }


async def test_journal_id_reused_with_other_postings_is_already_exists(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a"), account(m, "b"))
    journal_id = uid("j")
    await post(service, journal_id, m, posting(m, "a", 10, DEBIT), posting(m, "b", 10, CREDIT))
    error = await post_refused(
        service, journal_id, m, posting(m, "a", 11, DEBIT), posting(m, "b", 11, CREDIT)
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(error) == "EXISTS_WITH_DIFFERENT_FIELDS"
    assert error_info(error).metadata["field"] == "postings"
    assert await balances(service, (m, "a"), (m, "b")) == {
        f"{m}/a": (10, 0, 0, 0),
        f"{m}/b": (0, 10, 0, 0),
    }


# Balance rules.


async def test_journal_overdrawing_no_overdraft_account_fails_and_moves_nothing(
    service: Service,
) -> None:
    m = uid("m")
    await create_accounts(
        service.stub,
        account(m, "customer", no_overdraft=True),
        account(m, "shop"),
        account(m, "fees"),
    )
    await fund(service, m, "customer", 100)
    before = await balances(service, (m, "customer"), (m, "shop"), (m, "fees"))
    entries_before = await count_rows(service, "entries")
    error = await post_refused(
        service,
        uid("j"),
        m,
        posting(m, "shop", 95, CREDIT),
        posting(m, "customer", 101, DEBIT),
        posting(m, "fees", 6, CREDIT),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "EXCEEDS_CREDITS"
    assert precondition_subjects(error) == ["postings[1]"]
    assert await balances(service, (m, "customer"), (m, "shop"), (m, "fees")) == before
    assert await count_rows(service, "entries") == entries_before


async def test_journal_limits_are_checked_on_final_balances(service: Service) -> None:
    m = uid("m")
    await create_accounts(
        service.stub, account(m, "customer", no_overdraft=True), account(m, "shop")
    )
    await fund(service, m, "customer", 100)
    # The debit alone would overdraw the customer; the later credit covers it.
    response = await post(
        service,
        uid("j"),
        m,
        posting(m, "customer", 150, DEBIT),
        posting(m, "shop", 150, CREDIT),
        posting(m, "shop", 60, DEBIT),
        posting(m, "customer", 60, CREDIT),
    )
    assert response.result == pb.TRANSFER_RESULT_OK
    assert await balances(service, (m, "customer"), (m, "shop")) == {
        f"{m}/customer": (150, 160, 0, 0),
        f"{m}/shop": (60, 150, 0, 0),
    }


async def test_failed_journal_id_stays_failed_after_funds_arrive(service: Service) -> None:
    m = uid("m")
    await create_accounts(
        service.stub, account(m, "customer", no_overdraft=True), account(m, "shop")
    )
    journal_id = uid("j")
    legs = (posting(m, "customer", 50, DEBIT), posting(m, "shop", 50, CREDIT))
    first = await post_refused(service, journal_id, m, *legs)
    assert error_reason(first) == "EXCEEDS_CREDITS"
    await fund(service, m, "customer", 100)
    again = await post_refused(service, journal_id, m, *legs)
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(again) == "EXCEEDS_CREDITS"
    assert error_info(again).metadata["replayed"] == "true"
    assert (await balance(service.stub, m, "customer")).debits_posted == 0


async def test_journal_with_missing_debit_account_fails(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "b"))
    error = await post_refused(
        service, uid("j"), m, posting(m, "b", 5, CREDIT), posting(m, "ghost", 5, DEBIT)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "DEBIT_ACCOUNT_NOT_FOUND"
    assert precondition_subjects(error) == ["postings[1]"]
    assert (await balance(service.stub, m, "b")).credits_posted == 0


async def test_journal_with_missing_credit_account_fails(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a"))
    error = await post_refused(
        service, uid("j"), m, posting(m, "a", 5, DEBIT), posting(m, "ghost", 5, CREDIT)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "CREDIT_ACCOUNT_NOT_FOUND"
    assert precondition_subjects(error) == ["postings[1]"]
    assert (await balance(service.stub, m, "a")).debits_posted == 0


async def test_journal_posting_in_other_currency_than_account_fails(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "usd"), account(m, "eur", "EUR"))
    error = await post_refused(
        service, uid("j"), m, posting(m, "usd", 5, DEBIT), posting(m, "eur", 5, CREDIT, "USD")
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "CURRENCY_MISMATCH"
    assert precondition_subjects(error) == ["postings[1]"]
    assert await balances(service, (m, "usd"), (m, "eur")) == {
        f"{m}/usd": (0, 0, 0, 0),
        f"{m}/eur": (0, 0, 0, 0),
    }


# Routing.


async def test_journal_spanning_shards_is_refused_and_writes_nothing(service: Service) -> None:
    home = service.merchant_on("shard-a")
    away = service.merchant_on("shard-c")
    await create_accounts(service.stub, account(home, "a"), account(away, "b"))
    transfers_before = await count_rows(service, "transfers")
    entries_before = await count_rows(service, "entries")
    error = await post_refused(
        service, uid("j"), home, posting(home, "a", 5, DEBIT), posting(away, "b", 5, CREDIT)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "JOURNAL_SPANS_SHARDS"
    assert precondition_subjects(error) == ["postings[1]"]
    assert await count_rows(service, "transfers") == transfers_before
    assert await count_rows(service, "entries") == entries_before
    assert await balances(service, (home, "a"), (away, "b")) == {
        f"{home}/a": (0, 0, 0, 0),
        f"{away}/b": (0, 0, 0, 0),
    }


# One id namespace for journals and transfers.


async def test_journal_id_reused_as_transfer_id_is_exists_with_different_kind(
    service: Service,
) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a"), account(m, "b"))
    shared_id = uid("id")
    await post(service, shared_id, m, posting(m, "a", 7, DEBIT), posting(m, "b", 7, CREDIT))
    results = await transfers(service.stub, transfer(shared_id, ref(m, "a"), ref(m, "b"), 7))
    assert result_names(results) == ["TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FIELDS"]
    assert results[0].differing_field == "kind"
    assert await balances(service, (m, "a"), (m, "b")) == {
        f"{m}/a": (7, 0, 0, 0),
        f"{m}/b": (0, 7, 0, 0),
    }


async def test_transfer_id_reused_as_journal_id_is_already_exists(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a"), account(m, "b"))
    shared_id = uid("id")
    results = await transfers(service.stub, transfer(shared_id, ref(m, "a"), ref(m, "b"), 7))
    assert result_names(results) == ["TRANSFER_RESULT_OK"]
    error = await post_refused(
        service, shared_id, m, posting(m, "a", 7, DEBIT), posting(m, "b", 7, CREDIT)
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(error) == "EXISTS_WITH_DIFFERENT_FIELDS"
    assert error_info(error).metadata["field"] == "kind"
    assert (await balance(service.stub, m, "a")).debits_posted == 7


async def test_unbalanced_journal_is_invalid_argument_as_the_proto_documents(
    service: Service,
) -> None:
    """The contract and the behaviour agree: INVALID_ARGUMENT on `postings`, nothing
    written, and the proto says so where TRANSFER_RESULT_POSTINGS_UNBALANCED is declared
    (a result code the service never returns)."""
    m = uid("m")
    await create_accounts(service.stub, account(m, "cash"), account(m, "wallet"))
    before = await count_rows(service, "transfers")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await post(
            service, uid("j"), m, posting(m, "cash", 10, DEBIT), posting(m, "wallet", 9, CREDIT)
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad_requests = [
        d for d in status_details(refused.value) if isinstance(d, error_details_pb2.BadRequest)
    ]
    assert [v.field for v in bad_requests[0].field_violations] == ["postings"]
    assert await count_rows(service, "transfers") == before
    proto = (Path(__file__).parent.parent / "protos/ledger/v1/ledger.proto").read_text()
    declared = proto.index("TRANSFER_RESULT_POSTINGS_UNBALANCED = 25;")
    comment = proto[proto.rindex(";", 0, declared) : declared]
    assert "INVALID_ARGUMENT" in comment and "Never returned" in comment, comment

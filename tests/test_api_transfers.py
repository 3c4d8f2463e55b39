"""Transfers through the gRPC API on real shards: phases, chains, idempotency, concurrency."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ledger.limits import AMOUNT_MINOR_MAX
from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    balance,
    count_rows,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    wait_until,
)

OK = "TRANSFER_RESULT_OK"


async def _funded(
    service: Service, *, funding: int, no_overdraft: bool = True
) -> tuple[str, pb.AccountRef, pb.AccountRef]:
    """A merchant with a funding account and a customer account holding `funding`."""
    m = uid("m")
    await create_accounts(
        service.stub,
        account(m, "bank"),
        account(m, "customer", no_overdraft=no_overdraft),
        account(m, "shop"),
    )
    if funding:
        assert result_names(
            await transfers(
                service.stub, transfer(uid("f"), ref(m, "bank"), ref(m, "customer"), funding)
            )
        ) == [OK]
    return m, ref(m, "customer"), ref(m, "shop")


async def _lookup(service: Service, merchant_id: str, transfer_id: str) -> pb.TransferRecord:
    response = await service.stub.LookupTransfers(
        pb.LookupTransfersRequest(
            refs=[pb.TransferRef(merchant_id=merchant_id, transfer_id=transfer_id)]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert len(response.transfers) == 1
    return response.transfers[0]


async def test_single_phase_transfer_posts_on_both_accounts(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=1_000)
    results = await transfers(service.stub, transfer(uid("t"), customer, shop, 300))
    assert result_names(results) == [OK]
    assert results[0].created_at.seconds > 0
    c = await balance(service.stub, m, "customer")
    s = await balance(service.stub, m, "shop")
    assert (c.debits_posted, c.credits_posted) == (300, 1_000)
    assert (s.debits_posted, s.credits_posted) == (0, 300)


async def test_replay_returns_original_result_and_moves_money_once(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=1_000)
    item = transfer(uid("t"), customer, shop, 400, metadata={"order": "42"})
    first = await transfers(service.stub, item)
    second = await transfers(service.stub, item)
    assert result_names(first) == result_names(second) == [OK]
    assert (first[0].replayed, second[0].replayed) == (False, True)
    assert second[0].created_at == first[0].created_at
    assert (await balance(service.stub, m, "shop")).credits_posted == 400


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount_minor": 401}, "amount_minor"),
        ({"metadata": {"order": "43"}}, "metadata"),
        ({"linked": False, "action": pb.TRANSFER_ACTION_PENDING}, "action"),
    ],
)
async def test_replay_with_different_content_names_the_differing_field(
    service: Service, change: dict[str, object], field: str
) -> None:
    m, customer, shop = await _funded(service, funding=1_000)
    transfer_id = uid("t")
    original = transfer(transfer_id, customer, shop, 400, metadata={"order": "42"})
    assert result_names(await transfers(service.stub, original)) == [OK]
    fields = {"amount_minor": 400, "metadata": {"order": "42"}, "action": pb.TRANSFER_ACTION_POST}
    fields.update(change)
    changed = pb.Transfer(
        id=transfer_id,
        debit_account=customer,
        credit_account=shop,
        currency="USD",
        **{k: v for k, v in fields.items() if k != "linked"},  # type: ignore[arg-type]
    )
    results = await transfers(service.stub, changed)
    assert result_names(results) == ["TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FIELDS"]
    assert results[0].differing_field == field
    assert (await balance(service.stub, m, "shop")).credits_posted == 400


async def test_failed_transfer_id_stays_failed_after_funds_arrive(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=0)
    item = transfer(uid("t"), customer, shop, 500)
    assert result_names(await transfers(service.stub, item)) == ["TRANSFER_RESULT_EXCEEDS_CREDITS"]
    await transfers(service.stub, transfer(uid("f"), ref(m, "bank"), customer, 1_000))
    again = await transfers(service.stub, item)
    assert result_names(again) == ["TRANSFER_RESULT_EXCEEDS_CREDITS"]
    assert again[0].replayed
    assert (await balance(service.stub, m, "shop")).credits_posted == 0
    record = await _lookup(service, m, item.id)
    assert record.result == pb.TRANSFER_RESULT_EXCEEDS_CREDITS


async def test_refusals_name_the_rule_and_move_nothing(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=100)
    await create_accounts(service.stub, account(m, "euro", "EUR"))
    results = await transfers(
        service.stub,
        transfer(uid("t"), customer, shop, 101),
        transfer(uid("t"), customer, customer, 1),
        transfer(uid("t"), ref(m, "nope"), shop, 1),
        transfer(uid("t"), customer, ref(m, "nope"), 1),
        transfer(uid("t"), customer, ref(m, "euro"), 1),
        transfer(uid("t"), ref(m, "bank"), shop, 1, "EUR"),
    )
    assert result_names(results) == [
        "TRANSFER_RESULT_EXCEEDS_CREDITS",
        "TRANSFER_RESULT_ACCOUNTS_MUST_BE_DIFFERENT",
        "TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND",
        "TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND",
        "TRANSFER_RESULT_CURRENCY_MISMATCH",
        "TRANSFER_RESULT_CURRENCY_MISMATCH",
    ]
    assert (await balance(service.stub, m, "shop")).credits_posted == 0
    assert (await balance(service.stub, m, "customer")).debits_posted == 0


async def test_balance_overflow_is_refused_not_wrapped(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a"), account(m, "b"))
    results = await transfers(
        service.stub,
        transfer(uid("t"), ref(m, "a"), ref(m, "b"), AMOUNT_MINOR_MAX),
        transfer(uid("t"), ref(m, "a"), ref(m, "b"), 1),
    )
    assert result_names(results) == [OK, "TRANSFER_RESULT_OVERFLOW"]
    assert (await balance(service.stub, m, "b")).credits_posted == AMOUNT_MINOR_MAX


async def test_pending_transfer_reserves_then_partial_post_settles_and_releases_rest(
    service: Service,
) -> None:
    m, customer, shop = await _funded(service, funding=1_000)
    pending_id = uid("p")
    reserve = transfer(pending_id, customer, shop, 700, action=pb.TRANSFER_ACTION_PENDING)
    assert result_names(await transfers(service.stub, reserve)) == [OK]
    c = await balance(service.stub, m, "customer")
    assert (c.debits_pending, c.debits_posted) == (700, 0)
    # Reserved funds count against the limit.
    assert result_names(await transfers(service.stub, transfer(uid("t"), customer, shop, 301))) == [
        "TRANSFER_RESULT_EXCEEDS_CREDITS"
    ]
    post = pb.Transfer(
        id=uid("s"),
        debit_account=customer,
        amount_minor=450,
        action=pb.TRANSFER_ACTION_POST_PENDING,
        pending_id=pending_id,
    )
    assert result_names(await transfers(service.stub, post)) == [OK]
    c = await balance(service.stub, m, "customer")
    s = await balance(service.stub, m, "shop")
    assert (c.debits_pending, c.debits_posted) == (0, 450)
    assert (s.credits_pending, s.credits_posted) == (0, 450)
    record = await _lookup(service, m, pending_id)
    assert record.pending_state == pb.PENDING_STATE_POSTED
    settled = await _lookup(service, m, post.id)
    assert settled.transfer.credit_account == shop and settled.transfer.currency == "USD"


async def test_post_pending_refuses_more_than_reserved_and_second_settlement(
    service: Service,
) -> None:
    m, customer, shop = await _funded(service, funding=1_000)
    pending_id = uid("p")
    await transfers(
        service.stub, transfer(pending_id, customer, shop, 100, action=pb.TRANSFER_ACTION_PENDING)
    )

    def settle(action: int, amount: int) -> pb.Transfer:
        return pb.Transfer(
            id=uid("s"),
            debit_account=customer,
            amount_minor=amount,
            action=action,
            pending_id=pending_id,
        )  # type: ignore[arg-type]

    results = await transfers(
        service.stub,
        settle(pb.TRANSFER_ACTION_POST_PENDING, 101),
        settle(pb.TRANSFER_ACTION_VOID_PENDING, 0),
        settle(pb.TRANSFER_ACTION_POST_PENDING, 0),
        pb.Transfer(
            id=uid("s"),
            debit_account=customer,
            action=pb.TRANSFER_ACTION_VOID_PENDING,
            pending_id=uid("missing"),
        ),
        pb.Transfer(
            id=uid("s"),
            debit_account=ref(m, "bank"),
            action=pb.TRANSFER_ACTION_VOID_PENDING,
            pending_id=pending_id,
        ),
    )
    assert result_names(results) == [
        "TRANSFER_RESULT_EXCEEDS_PENDING_AMOUNT",
        OK,
        "TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_VOIDED",
        "TRANSFER_RESULT_PENDING_TRANSFER_NOT_FOUND",
        "TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_ACCOUNTS",
    ]
    c = await balance(service.stub, m, "customer")
    assert (c.debits_pending, c.debits_posted) == (0, 0)
    assert (await _lookup(service, m, pending_id)).pending_state == pb.PENDING_STATE_VOIDED


async def test_pending_transfer_expires_after_its_timeout_and_funds_return(
    service: Service,
) -> None:
    m, customer, shop = await _funded(service, funding=500)
    pending_id = uid("p")
    reserve = transfer(
        pending_id, customer, shop, 500, action=pb.TRANSFER_ACTION_PENDING, timeout_ms=200
    )
    assert result_names(await transfers(service.stub, reserve)) == [OK]
    record = await _lookup(service, m, pending_id)
    assert record.pending_state == pb.PENDING_STATE_PENDING and record.HasField("expires_at")

    async def released() -> bool:
        c = await balance(service.stub, m, "customer")
        return c.debits_pending == 0

    await wait_until(released, what="the expiry sweeper to release the reservation")
    assert (await _lookup(service, m, pending_id)).pending_state == pb.PENDING_STATE_EXPIRED
    post = pb.Transfer(
        id=uid("s"),
        debit_account=customer,
        action=pb.TRANSFER_ACTION_POST_PENDING,
        pending_id=pending_id,
    )
    assert result_names(await transfers(service.stub, post)) == [
        "TRANSFER_RESULT_PENDING_TRANSFER_EXPIRED"
    ]
    # The released funds can be spent again.
    assert result_names(await transfers(service.stub, transfer(uid("t"), customer, shop, 500))) == [
        OK
    ]


async def test_linked_chain_fails_as_a_unit_when_one_member_fails(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=100)
    results = await transfers(
        service.stub,
        transfer(uid("t"), ref(m, "bank"), shop, 10),
        transfer(uid("t"), customer, shop, 60, linked=True),
        transfer(uid("t"), customer, shop, 60, linked=True),
        transfer(uid("t"), ref(m, "bank"), shop, 5),
        transfer(uid("t"), ref(m, "bank"), shop, 7),
    )
    assert result_names(results) == [
        OK,
        "TRANSFER_RESULT_LINKED_EVENT_FAILED",
        "TRANSFER_RESULT_EXCEEDS_CREDITS",
        "TRANSFER_RESULT_LINKED_EVENT_FAILED",
        OK,
    ]
    assert (await balance(service.stub, m, "shop")).credits_posted == 17
    assert (await balance(service.stub, m, "customer")).debits_posted == 0


async def test_linked_chain_left_open_at_the_end_of_a_batch_is_refused(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=100)
    results = await transfers(
        service.stub,
        transfer(uid("t"), customer, shop, 10, linked=True),
        transfer(uid("t"), customer, shop, 10, linked=True),
    )
    assert result_names(results) == [
        "TRANSFER_RESULT_LINKED_EVENT_FAILED",
        "TRANSFER_RESULT_LINKED_EVENT_CHAIN_OPEN",
    ]
    assert (await balance(service.stub, m, "shop")).credits_posted == 0


async def test_linked_chain_succeeds_together(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=100)
    results = await transfers(
        service.stub,
        transfer(uid("t"), customer, shop, 60, linked=True),
        transfer(uid("t"), shop, customer, 30, linked=True),
        transfer(uid("t"), customer, shop, 70),
    )
    assert result_names(results) == [OK, OK, OK]
    assert (await balance(service.stub, m, "shop")).credits_posted == 130


async def test_reversal_is_a_new_linked_transfer_bounded_by_the_original(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=1_000)
    original = uid("t")
    await transfers(service.stub, transfer(original, customer, shop, 300))
    results = await transfers(
        service.stub,
        transfer(uid("r"), shop, customer, 200, reversal_of=original),
        transfer(uid("r"), shop, customer, 101, reversal_of=original),
        transfer(uid("r"), shop, customer, 100, reversal_of=original),
        transfer(uid("r"), customer, shop, 1, reversal_of=original),
        transfer(uid("r"), shop, customer, 1, reversal_of=uid("missing")),
    )
    assert result_names(results) == [
        OK,
        "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL",
        OK,
        "TRANSFER_RESULT_REVERSAL_ACCOUNTS_MISMATCH",
        "TRANSFER_RESULT_REVERSAL_TARGET_NOT_FOUND",
    ]
    s = await balance(service.stub, m, "shop")
    assert (s.credits_posted, s.debits_posted) == (300, 300)


async def test_fifty_concurrent_identical_requests_create_exactly_one_transfer(
    service: Service,
) -> None:
    m, customer, shop = await _funded(service, funding=1_000)
    item = transfer(uid("t"), customer, shop, 10)
    before = await count_rows(service, "transfers")
    outcomes = await asyncio.gather(*(transfers(service.stub, item) for _ in range(50)))
    results = [o[0] for o in outcomes]
    assert all(r.result == pb.TRANSFER_RESULT_OK for r in results)
    assert sum(not r.replayed for r in results) == 1
    assert await count_rows(service, "transfers") == before + 1
    assert (await balance(service.stub, m, "shop")).credits_posted == 10


async def test_concurrent_duplicates_of_a_failing_transfer_record_one_failure(
    service: Service,
) -> None:
    m = uid("m")
    item = transfer(uid("t"), ref(m, "ghost"), ref(m, "other"), 10)
    before = await count_rows(service, "transfers")
    outcomes = await asyncio.gather(*(transfers(service.stub, item) for _ in range(20)))
    assert {o[0].result for o in outcomes} == {pb.TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND}
    assert sum(not o[0].replayed for o in outcomes) == 1
    assert await count_rows(service, "transfers") == before + 1


async def test_two_hundred_concurrent_transfers_stop_exactly_at_the_limit(service: Service) -> None:
    m, customer, shop = await _funded(service, funding=1_234)
    calls = [transfers(service.stub, transfer(uid("t"), customer, shop, 10)) for _ in range(200)]
    outcomes = await asyncio.gather(*calls)
    names = [result_names(o)[0] for o in outcomes]
    assert names.count(OK) == 123
    assert names.count("TRANSFER_RESULT_EXCEEDS_CREDITS") == 77
    c = await balance(service.stub, m, "customer")
    assert c.credits_posted - c.debits_posted == 4
    assert c.debits_posted == 1_230


async def test_transfers_in_both_directions_concurrently_never_deadlock(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "a"), account(m, "b"), account(m, "c"))
    a, b, c = ref(m, "a"), ref(m, "b"), ref(m, "c")
    calls = []
    for i in range(60):
        pair = [(a, b), (b, a), (b, c), (c, a)][i % 4]
        calls.append(
            transfers(
                service.stub,
                transfer(uid("t"), pair[0], pair[1], 1),
                transfer(uid("t"), pair[1], pair[0], 2),
            )
        )
    outcomes = await asyncio.gather(*calls)
    assert all(result_names(o) == [OK, OK] for o in outcomes)
    totals = [await balance(service.stub, m, x) for x in ("a", "b", "c")]
    assert sum(t.credits_posted - t.debits_posted for t in totals) == 0


async def test_all_items_on_an_unreachable_path_get_a_status_not_internal(service: Service) -> None:
    # A transfer for a merchant nobody has seen is simply "not found", recorded once.
    m = uid("m")
    results = await transfers(service.stub, transfer(uid("t"), ref(m, "a"), ref(m, "b"), 1))
    assert result_names(results) == ["TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.GetBalance(
            pb.GetBalanceRequest(account=ref(m, "a")), timeout=RPC_TIMEOUT_S
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reversal_of_a_transfer_between_two_merchants_is_found_by_the_original_debit_merchant(
    service: Service,
) -> None:
    payer = service.merchant_on("shard-a", "payer")
    payee = service.merchant_on("shard-a", "payee")
    await create_accounts(service.stub, account(payer, "cash"), account(payee, "sales"))
    original = uid("t")
    assert result_names(
        await transfers(
            service.stub, transfer(original, ref(payer, "cash"), ref(payee, "sales"), 90)
        )
    ) == [OK]
    refund = transfer(uid("r"), ref(payee, "sales"), ref(payer, "cash"), 90, reversal_of=original)
    too_much = transfer(uid("r"), ref(payee, "sales"), ref(payer, "cash"), 1, reversal_of=original)
    assert result_names(await transfers(service.stub, refund, too_much)) == [
        OK,
        "TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL",
    ]
    assert (await balance(service.stub, payee, "sales")).debits_posted == 90

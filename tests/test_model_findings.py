"""Service defects found by tests/test_ledger_model.py, each reproduced on its own.

Each failed before its fix: batch order around a settle naming no credit account
(ledger/domain/batch_order.py), and a resend under a hold's id taken for a saga
making it (Ledger._cross_shard).
"""

from __future__ import annotations

from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
)

OK = "TRANSFER_RESULT_OK"
HOLD_MINOR = 100


async def _made_hold(service: Service, debit: pb.AccountRef, credit: pb.AccountRef) -> str:
    hold = uid("h")
    made = await transfers(
        service.stub,
        transfer(hold, debit, credit, HOLD_MINOR, action=pb.TRANSFER_ACTION_PENDING),
    )
    assert result_names(made) == [OK]
    return hold


def _post_whole(debit: pb.AccountRef, hold: str) -> pb.Transfer:
    """Posts the hold whole, naming no credit account."""
    return transfer(
        uid("s"), debit, None, 0, "", action=pb.TRANSFER_ACTION_POST_PENDING, pending_id=hold
    )


async def test_a_settle_naming_no_credit_account_is_applied_before_later_items_of_the_batch(
    service: Service,
) -> None:
    """CreateTransfers applies a batch's transfers in order (ledger.proto: "Creates
    transfers, in order"; CreateTransfersRequest: "applied in order"). A batch holding a
    saga runs in waves; a POST_PENDING that names no credit account waits for the
    batch's sagas, but the account its hold credits was not counted as one it touches,
    so a later item on that account ran first: the wallet was debited before the
    settle credited it, and was refused as overdrawn."""
    home = service.merchant_on("shard-a")
    away = service.merchant_on("shard-b")
    await create_accounts(
        service.stub,
        account(home, "cash"),
        account(home, "payer"),
        account(home, "sales"),
        account(home, "wallet", no_overdraft=True),
        account(away, "shop"),
    )
    hold = await _made_hold(service, ref(home, "cash"), ref(home, "wallet"))
    results = await transfers(
        service.stub,
        # A saga (its accounts have nothing to do with the rest).
        transfer(uid("x"), ref(home, "payer"), ref(away, "shop"), 1),
        # Posts the hold: credits the wallet HOLD_MINOR.
        _post_whole(ref(home, "cash"), hold),
        # Spends what the settle credited.
        transfer(uid("t"), ref(home, "wallet"), ref(home, "sales"), HOLD_MINOR),
    )
    assert result_names(results) == [OK, OK, OK]
    entries = await service.stub.ListEntries(
        pb.ListEntriesRequest(account=ref(home, "wallet"), order=pb.ORDER_OLDEST_FIRST),
        timeout=RPC_TIMEOUT_S,
    )
    assert [(e.transfer_id, pb.EntryKind.Name(e.kind)) for e in entries.entries] == [
        (hold, "ENTRY_KIND_PENDING"),
        (results[1].id, "ENTRY_KIND_PENDING_RELEASED"),
        (results[1].id, "ENTRY_KIND_POSTED"),
        (results[2].id, "ENTRY_KIND_POSTED"),
    ]


async def test_a_settle_of_a_cross_shard_hold_naming_no_credit_account_runs_after_later_items(
    service: Service,
) -> None:
    """The same defect where the hold itself crosses shards: the batch looks like one
    wave of local items, the settle's shard handed it back as a saga, and it ran only
    after the wave's other items, so the item after it found the wallet unfunded."""
    payer = service.merchant_on("shard-a")
    payee = service.merchant_on("shard-b")
    await create_accounts(
        service.stub,
        account(payer, "cash"),
        account(payee, "wallet", no_overdraft=True),
        account(payee, "sales"),
    )
    hold = await _made_hold(service, ref(payer, "cash"), ref(payee, "wallet"))
    results = await transfers(
        service.stub,
        _post_whole(ref(payer, "cash"), hold),
        transfer(uid("t"), ref(payee, "wallet"), ref(payee, "sales"), HOLD_MINOR),
    )
    assert result_names(results) == [OK, OK]


async def test_a_chain_settling_a_local_hold_is_not_refused_for_a_resend_of_its_id(
    service: Service,
) -> None:
    """A linked chain is refused whole only if it spans shards or holds a cross-shard
    transfer (CreateTransfersRequest: "A linked chain must live on one shard and may
    not contain a cross-shard transfer; otherwise the whole call fails"). Here the
    chain settles a hold that lives on one shard; an earlier item resends the hold's
    id with a credit account on another shard, which makes nothing (the id exists with
    other content). The service took that item for a saga making the hold, took the
    chain's settle for a settle of it, and refused the call."""
    home = service.merchant_on("shard-a")
    away = service.merchant_on("shard-b")
    await create_accounts(
        service.stub,
        account(home, "cash"),
        account(home, "wallet"),
        account(home, "sales"),
        account(away, "shop"),
    )
    hold = await _made_hold(service, ref(home, "cash"), ref(home, "wallet"))
    results = await transfers(
        service.stub,
        # The hold's id again, another credit account (on another shard): makes nothing.
        transfer(
            hold,
            ref(home, "cash"),
            ref(away, "shop"),
            HOLD_MINOR,
            action=pb.TRANSFER_ACTION_PENDING,
        ),
        # A chain on the home merchant's shard that posts the hold.
        transfer(uid("t"), ref(home, "cash"), ref(home, "sales"), 1, linked=True),
        transfer(
            uid("s"),
            ref(home, "cash"),
            ref(home, "wallet"),
            0,
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=hold,
        ),
    )
    assert result_names(results) == ["TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FIELDS", OK, OK]
    assert results[0].differing_field == "credit_account"

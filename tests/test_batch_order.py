"""The waves a batch holding sagas runs in (ledger/domain/batch_order.py), no database.

End to end, through the service: tests/test_routing.py and tests/test_ledger_model.py.
"""

from __future__ import annotations

from ledger.domain.accounts import AccountKey
from ledger.domain.batch_order import (
    settles_of_batch_sagas,
    settles_with_later_dependents,
    waves,
)
from ledger.domain.transfers import TransferAction, TransferRequest


def _item(
    transfer_id: str,
    debit: str,
    credit: str | None,
    *,
    action: TransferAction = TransferAction.POST,
    pending_id: str = "",
    linked: bool = False,
) -> TransferRequest:
    def key(name: str) -> AccountKey:
        merchant, account = name.split("/")
        return AccountKey(merchant, account)

    return TransferRequest(
        id=transfer_id,
        debit=key(debit),
        credit=key(credit) if credit is not None else None,
        amount_minor=1,
        currency="USD",
        action=action,
        pending_id=pending_id,
        linked=linked,
    )


def _shards(batch: list[TransferRequest]) -> list[frozenset[str]]:
    """Each merchant on a shard of its own name."""
    return [
        frozenset({r.debit.merchant_id, *([r.credit.merchant_id] if r.credit else [])})
        for r in batch
    ]


def test_a_batch_without_sagas_is_one_wave() -> None:
    batch = [_item("t1", "a/x", "a/y"), _item("t2", "a/y", "a/x"), _item("t3", "b/x", "b/y")]
    assert waves(batch, set()) == [[0, 1, 2]]


def test_items_sharing_nothing_with_a_saga_run_beside_it() -> None:
    batch = [_item("t1", "a/x", "b/y"), _item("t2", "c/x", "c/y"), _item("t3", "a/z", "d/y")]
    assert waves(batch, {0, 2}) == [[0, 1, 2]]


def test_an_item_sharing_an_account_with_an_earlier_saga_waits_for_it() -> None:
    batch = [
        _item("t1", "a/x", "a/y"),  # local, first
        _item("t2", "a/x", "b/y"),  # a saga on a/x: after t1
        _item("t3", "a/x", "a/z"),  # local on a/x: after the saga
        _item("t4", "c/x", "c/y"),  # shares nothing
    ]
    assert waves(batch, {1}) == [[0, 3], [1], [2]]


def test_a_chain_moves_whole_to_the_wave_its_latest_member_needs() -> None:
    batch = [
        _item("t1", "a/x", "b/y"),  # a saga on a/x
        _item("t2", "a/q", "a/r", linked=True),  # shares nothing with it
        _item("t3", "a/x", "a/r"),  # closes the chain, and needs the saga
    ]
    assert waves(batch, {0}) == [[0], [1, 2]]


def test_a_settle_of_a_hold_a_saga_of_the_batch_makes_is_a_saga_after_it() -> None:
    batch = [
        _item("h1", "b/cash", "a/sales", action=TransferAction.PENDING),
        _item("s1", "b/cash", None, action=TransferAction.POST_PENDING, pending_id="h1"),
    ]
    assert settles_of_batch_sagas(batch, {0}) == {1}
    assert waves(batch, {0, 1}) == [[0], [1]]


def test_a_settle_naming_no_credit_account_goes_after_every_earlier_saga() -> None:
    batch = [
        _item("t1", "a/x", "b/y"),
        _item("s1", "c/x", None, action=TransferAction.VOID_PENDING, pending_id="h9"),
    ]
    assert waves(batch, {0}) == [[0], [1]]


def test_every_later_item_goes_after_a_settle_naming_no_credit_account() -> None:
    """Found by tests/test_ledger_model.py: an item spending what such a settle credits
    (the hold's account, unknown here) ran before it, and was refused as overdrawn."""
    batch = [
        _item("t1", "a/payer", "b/shop"),  # a saga, sharing nothing with the rest
        _item("s1", "a/cash", None, action=TransferAction.POST_PENDING, pending_id="h1"),
        _item("t2", "a/wallet", "a/sales"),  # may spend what s1 credits: same wave, after
        _item("t3", "a/wallet", "c/shop"),  # a saga that may too: the wave after
    ]
    assert waves(batch, {0, 3}) == [[0], [1, 2], [3]]
    assert settles_with_later_dependents(batch, _shards(batch)) == {1}
    # When the settle is a saga itself, later local items wait for it too.
    assert waves(batch, {0, 1, 3}) == [[0], [1], [2], [3]]


def test_a_settle_naming_no_credit_account_is_looked_up_only_for_another_shard() -> None:
    """Later items on the settle's own shard run after it in its transaction, and a
    hold a saga carries credits an account elsewhere: no look-up for them."""
    settle = _item("s1", "a/cash", None, action=TransferAction.POST_PENDING, pending_id="h1")
    batch = [settle, _item("t1", "a/wallet", "a/sales")]
    assert settles_with_later_dependents(batch, _shards(batch)) == set()
    batch = [settle, _item("t1", "b/wallet", "b/sales")]
    assert settles_with_later_dependents(batch, _shards(batch)) == {0}


def test_settles_that_a_later_item_depends_on_are_looked_up_first() -> None:
    batch = [
        _item("s1", "a/x", None, action=TransferAction.VOID_PENDING, pending_id="h1"),
        _item("t1", "a/x", "a/y"),  # spends what the void may release
        _item("s2", "c/x", None, action=TransferAction.VOID_PENDING, pending_id="h2"),
    ]
    assert settles_with_later_dependents(batch, _shards(batch)) == {0}

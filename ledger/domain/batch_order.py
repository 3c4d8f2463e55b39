"""The order a batch of transfers is applied in, once some of its items are sagas.

A batch is applied in order (the proto's contract). Its local items keep that
order within their shard's one transaction, but a cross-shard item is a saga
that finishes later, on two shards. So a batch holding sagas runs in waves, one
after another: an item goes into a wave after every earlier item it depends on
and that is, or runs beside, a saga. Items that share nothing commute and run
at once, as before; a batch without sagas is one wave.

An item depends on an earlier one when they name the same account, or when it
settles or reverses the earlier one (its pending_id or reversal_of is the
earlier item's id). A settle that names no credit account may touch any
account its hold credits, unknown here: it goes after every earlier saga, and
every later item goes after it (a later local item may share its wave, where
its shard orders them, unless the settle is a saga; as a saga it also goes after
every earlier item).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

from ledger.domain.accounts import AccountKey
from ledger.domain.transfers import TransferKey, TransferRequest, linked_chains

# What an item touches: its accounts, and the transfer ids it is or refers to.
OrderKey: TypeAlias = AccountKey | TransferKey


def order_keys(request: TransferRequest) -> set[OrderKey]:
    """The accounts and transfers an item reads or changes, as far as its request says."""
    keys: set[OrderKey] = {request.debit, request.key}
    if request.credit is not None:
        keys.add(request.credit)
    if request.pending_id:
        keys.add(TransferKey(request.debit.merchant_id, request.pending_id))
    if request.reversal_of and request.credit is not None:
        # The original debited this reversal's credit merchant (ledger/domain/engine.py).
        keys.add(TransferKey(request.credit.merchant_id, request.reversal_of))
    return keys


def depends_on_all_sagas(request: TransferRequest) -> bool:
    """A settle naming no credit account touches its hold's, which only its shard knows."""
    return request.settles_pending and request.credit is None


def settles_with_later_dependents(
    requests: Sequence[TransferRequest], shards: Sequence[frozenset[str]]
) -> set[int]:
    """Settles that a later item of the batch depends on: whether a saga carries
    their hold decides whether they run before it, so it is looked up first.

    shards: the shards each item's named accounts live on. A settle naming no
    credit account depends on a later item only on another shard than its own: on
    its own shard they run in order in one transaction, and a hold a saga carries
    credits an account on another shard. So a batch settling many holds of one
    shard is looked up only where it must be."""
    keys = [order_keys(r) for r in requests]
    last_touch: dict[OrderKey, int] = {}
    last_open_settle = -1
    for i, request in enumerate(requests):
        last_touch.update(dict.fromkeys(keys[i], i))
        if depends_on_all_sagas(request):
            last_open_settle = i
    # Per item, the shards of every item after it.
    later_shards: list[frozenset[str]] = [frozenset()] * len(requests)
    after: frozenset[str] = frozenset()
    for i in range(len(requests) - 1, -1, -1):
        later_shards[i] = after
        after = after | shards[i]
    return {
        i
        for i, r in enumerate(requests)
        if r.settles_pending
        and (
            last_open_settle > i
            or (depends_on_all_sagas(r) and bool(later_shards[i] - shards[i]))
            or any(last_touch[k] > i for k in keys[i])
        )
    }


def settles_of_batch_sagas(requests: Sequence[TransferRequest], sagas: set[int]) -> set[int]:
    """Settles of a hold that an earlier saga of the same batch makes: a saga carries it."""
    made = {requests[i].key: i for i in sagas}
    return {
        i
        for i, r in enumerate(requests)
        if r.settles_pending
        and made.get(TransferKey(r.debit.merchant_id, r.pending_id), len(requests)) < i
    }


def waves(requests: Sequence[TransferRequest], sagas: set[int]) -> list[list[int]]:
    """The batch's items (positions) in waves to run one after another.

    Within a wave, local items run in order in their shards' transactions, beside
    the wave's sagas, which share no key with anything earlier in the same wave.
    A linked chain (always local) stays in one wave.
    """
    if not sagas:
        return [list(range(len(requests)))]
    # The latest wave in which any item, and any saga, touched each key.
    touched: dict[OrderKey, int] = {}
    saga_touched: dict[OrderKey, int] = {}
    last_saga_wave = -1
    # The earliest wave a later local item, and a later saga, may take: after a
    # settle naming no credit account, which may touch any account.
    floor_local = floor_saga = 0
    latest_wave = -1
    wave_of: list[int] = [0] * len(requests)
    chains = {chain.start: chain for chain in linked_chains(requests)}
    position = 0
    while position < len(requests):
        unit = chains.get(position, range(position, position + 1))
        flat = set().union(*(order_keys(requests[i]) for i in unit))
        is_saga = position in sagas
        open_settle = any(depends_on_all_sagas(requests[i]) for i in unit)
        if is_saga:
            # A saga goes after everything earlier that shares a key with it; one
            # settling with no credit account named, after everything earlier.
            wave = max(_after(touched, flat, strictly=True), floor_saga)
            if open_settle:
                wave = max(wave, latest_wave + 1)
        else:
            # A local item may share a wave with earlier local items on its keys (its
            # shard orders them), never with a saga on them.
            wave = max(
                _after(touched, flat, strictly=False),
                _after(saga_touched, flat, strictly=True),
                floor_local,
            )
            if open_settle:
                wave = max(wave, last_saga_wave + 1)
        if open_settle:
            floor_local = max(floor_local, wave + (1 if is_saga else 0))
            floor_saga = max(floor_saga, wave + 1)
        for i in unit:
            wave_of[i] = wave
        latest_wave = max(latest_wave, wave)
        for key in flat:
            touched[key] = max(touched.get(key, 0), wave)
            if is_saga:
                saga_touched[key] = max(saga_touched.get(key, 0), wave)
        if is_saga:
            last_saga_wave = max(last_saga_wave, wave)
        position = unit.stop
    grouped: list[list[int]] = [[] for _ in range(max(wave_of) + 1)]
    for i, wave in enumerate(wave_of):
        grouped[wave].append(i)
    return [group for group in grouped if group]


def _after(latest: dict[OrderKey, int], keys: Iterable[OrderKey], *, strictly: bool) -> int:
    waves_seen = [latest[k] for k in keys if k in latest]
    if not waves_seen:
        return 0
    return max(waves_seen) + (1 if strictly else 0)

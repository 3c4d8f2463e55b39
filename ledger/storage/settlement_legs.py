"""Which settlement account holds a transfer's money on this shard (docs/sagas.md,
"Stripes that fill").

A transfer's leg towards a peer shard (a saga's reservation or credit, a hold
carried or relayed by a move) is booked on its stripe (settlement_account),
shared by every transfer whose id hashes there. An account's side may not pass
2^63-1, so one huge transfer can fill a stripe. Where a leg is first booked and
its stripe has no room for it on the side it needs, it is booked instead on an
account of the transfer's own (own_settlement_account), made then; every later
step of the transfer (a settle, a relay, an expiry, a fold) finds the leg where
it is by that account's existence: the own account if it exists, else the stripe.

So the own account must exist only if every entry of the transfer for that peer
is on it: it is made only where nothing of the transfer is on the stripe yet (a
new saga's first step, the credit of its second, a hold's move to another peer
at its third; a move carrying a hold checks the stripe's entries, since a hold's
path may come back to a peer).

And no step may resolve a leg while another makes its own account: a lock taken
before the account's row commits does not see it. A saga's first steps run
before any settle of their transfer can start (a settle waits for the saga to
finish). A move books a carried hold's new leg for the shard its merchant
leaves or joins: a settle step on that merchant waits for the move's lock on
it, and a relay pass here passes between the path's neighbours of this shard,
which are the shard the merchant comes from only when the move folds the step
instead (a release, not a new leg).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ledger.domain.accounts import Account, AccountKey
from ledger.domain.sagas import own_settlement_account, settlement_account
from ledger.domain.transfers import TransferKey
from ledger.domain.value import value
from ledger.storage import saga_statements as sql

if TYPE_CHECKING:
    from ledger.storage.shard import Connection, Shard


@value(order=True)
class Leg:
    """One transfer's money on this shard's settlement account for peer_shard."""

    peer_shard: str
    currency: str
    key: TransferKey

    @property
    def stripe(self) -> AccountKey:
        return settlement_account(self.peer_shard, self.currency, self.key.transfer_id)

    @property
    def own(self) -> AccountKey:
        return own_settlement_account(self.peer_shard, self.currency, self.key)


@value
class NewLeg:
    """A leg booked for the first time: amount_minor more on the side it takes."""

    leg: Leg
    debit: bool
    amount_minor: int


def candidates(legs: Iterable[Leg]) -> set[AccountKey]:
    """The accounts to lock for legs: each one's stripe and its own account (locking
    a key with no row locks nothing, and tells that it does not exist)."""
    return {k for leg in legs for k in (leg.stripe, leg.own)}


def resolved(leg: Leg, locked: Iterable[AccountKey]) -> AccountKey:
    """Where a leg already booked is, among the accounts locked with candidates."""
    return leg.own if leg.own in locked else leg.stripe


async def open_legs(
    conn: Connection,
    shard: Shard,
    accounts: dict[AccountKey, Account],
    new: Sequence[NewLeg],
    *,
    may_have_entries: bool = False,
) -> dict[Leg, AccountKey]:
    """Where each new leg is booked, in order: its own account if it exists, else its
    stripe if that has room for it and for the legs before it on the same side,
    else an own account made and locked now (added to accounts).

    accounts: the candidates locked so far. may_have_entries: a leg may have
    entries on its stripe already (a hold carried by a move); then it stays there.
    """
    booked_minor: dict[tuple[AccountKey, bool], int] = {}
    chosen: dict[Leg, AccountKey] = {}
    for n in new:
        leg = n.leg
        if leg.own in accounts:
            chosen[leg] = leg.own
            continue
        side = (leg.stripe, n.debit)
        room_minor = accounts[leg.stripe].balances.room_minor(debit=n.debit)
        before_minor = booked_minor.get(side, 0)
        if before_minor + n.amount_minor <= room_minor or (
            may_have_entries and await _has_entries(conn, leg)
        ):
            booked_minor[side] = before_minor + n.amount_minor
            chosen[leg] = leg.stripe
            continue
        await conn.execute(
            sql.ENSURE_SETTLEMENT_ACCOUNT, leg.own.merchant_id, leg.own.account_id, leg.currency
        )
        accounts.update(await shard._lock_accounts(conn, {leg.own}))
        chosen[leg] = leg.own
    return chosen


async def _has_entries(conn: Connection, leg: Leg) -> bool:
    stripe = leg.stripe
    return bool(
        await conn.fetchval(
            sql.HAS_LEG_ENTRIES,
            stripe.merchant_id,
            stripe.account_id,
            leg.key.merchant_id,
            leg.key.transfer_id,
        )
    )

"""What the load is made of: merchants placed on shards, and who picks which.

Pure Python and picklable, so the orchestrator builds it once and every client
process gets the same picture.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ledger.routing.ring import ShardRing

# Every merchant gets these two accounts; a transfer moves money between them
# (or, cross-shard, from one merchant's first to another's second).
ACCOUNT_IDS = ("cash", "sales")
CURRENCY = "USD"
# Amounts are small and no account has a limit, so nothing is ever refused.
AMOUNT_MINOR_MAX = 1000
# Placing N merchants evenly draws candidate ids until every shard has its
# share; with a ketama ring a shard takes about 1/S of the candidates, so this
# many draws per merchant is far more than enough.
PLACEMENT_DRAWS_PER_MERCHANT_MAX = 200


@dataclass(frozen=True, slots=True)
class Merchant:
    merchant_id: str
    shard: str


@dataclass(frozen=True, slots=True)
class Workload:
    """Everything a client process needs to make requests; the same in every process."""

    run_id: str
    merchants: tuple[Merchant, ...]
    shard_dsns: tuple[tuple[str, str], ...]
    batch_size: int
    callers_total: int

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shard_dsns)

    def caller_slice(self, caller_global: int) -> tuple[Merchant, ...]:
        """The merchants a caller batches over: its own share, so batches of
        different callers lock different accounts (as when each caller stands for
        one upstream service batching its own merchants' payments)."""
        own = self.merchants[caller_global :: self.callers_total]
        return own if own else self.merchants


def place_merchants(
    *, run_id: str, count: int, ring: ShardRing, shards: tuple[str, ...], tag: str = ""
) -> tuple[Merchant, ...]:
    """count merchants with ids unique to this run (and tag: another set of the same
    run), spread evenly over shards."""
    quota = {
        name: count // len(shards) + (1 if i < count % len(shards) else 0)
        for i, name in enumerate(shards)
    }
    placed: list[Merchant] = []
    for draw in range(count * PLACEMENT_DRAWS_PER_MERCHANT_MAX):
        if len(placed) == count:
            break
        merchant_id = f"bench-{run_id}-{tag}{draw:06d}"
        shard = ring.shard_for(merchant_id)
        if quota[shard] > 0:
            quota[shard] -= 1
            placed.append(Merchant(merchant_id, shard))
    if len(placed) != count:
        raise RuntimeError(f"could not place {count} merchants evenly over {shards}")
    return tuple(placed)


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """One transfer as both drivers write it: the service over gRPC, the raw one in SQL."""

    transfer_id: str
    debit_merchant: str
    debit_account: str
    credit_merchant: str
    credit_account: str
    amount_minor: int


class Picker:
    """Draws transfers for one caller; ids are unique per run, caller and call."""

    def __init__(self, workload: Workload, *, caller_global: int, seed: int) -> None:
        self._workload = workload
        self._random = random.Random(seed)
        self._prefix = f"{workload.run_id}-{caller_global}"
        self._sequence = 0
        self._by_shard: dict[str, list[Merchant]] = {}
        for m in workload.merchants:
            self._by_shard.setdefault(m.shard, []).append(m)
        self._own_by_shard: dict[str, list[Merchant]] = {}
        for m in workload.caller_slice(caller_global):
            self._own_by_shard.setdefault(m.shard, []).append(m)
        self._own_shards = sorted(self._own_by_shard)
        self._next_own_shard = caller_global % len(self._own_shards)

    def _transfer(self, tag: str, debit: Merchant, credit: Merchant) -> TransferSpec:
        self._sequence += 1
        # Alternate direction so balances stay near zero over a long run.
        accounts = ACCOUNT_IDS if self._sequence % 2 else ACCOUNT_IDS[::-1]
        return TransferSpec(
            transfer_id=f"{self._prefix}-{tag}{self._sequence}",
            debit_merchant=debit.merchant_id,
            debit_account=accounts[0],
            credit_merchant=credit.merchant_id,
            credit_account=accounts[1],
            amount_minor=self._random.randint(1, AMOUNT_MINOR_MAX),
        )

    def local_single(self) -> tuple[str, list[TransferSpec]]:
        """One transfer inside a random merchant: (shard, [transfer])."""
        merchant = self._random.choice(self._workload.merchants)
        return merchant.shard, [self._transfer("s", merchant, merchant)]

    def local_batch(self) -> tuple[str, list[TransferSpec]]:
        """batch_size transfers, all on one shard, inside merchants of this caller's share."""
        shard = self._own_shards[self._next_own_shard]
        self._next_own_shard = (self._next_own_shard + 1) % len(self._own_shards)
        pool = self._own_by_shard[shard]
        transfers = []
        for _ in range(self._workload.batch_size):
            merchant = self._random.choice(pool)
            transfers.append(self._transfer("b", merchant, merchant))
        return shard, transfers

    def cross_single(self) -> tuple[str, list[TransferSpec]]:
        """One transfer from a merchant on one shard to a merchant on another."""
        payer = self._random.choice(self._workload.merchants)
        others = [s for s in self._by_shard if s != payer.shard]
        payee = self._random.choice(self._by_shard[self._random.choice(others)])
        return payer.shard, [self._transfer("x", payer, payee)]

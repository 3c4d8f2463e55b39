"""What a chaos run does, drawn from its seed before anything runs: the accounts, the
fault schedule, and every client's operations.

Pure and deterministic: the same seed gives equal objects in any process (string
seeds of random.Random are hashed with SHA-512, never with Python's per-process
hash, and nothing here iterates a set or a dict of strings). Answers never feed
back into the plan: client k's n-th operation is the same whatever the service
said before, so two runs of one seed differ only by timing.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum

from ledger.domain.sagas import SETTLEMENT_STRIPES, settlement_stripe
from ledger.limits import AMOUNT_MINOR_MAX as BALANCE_MAX
from ledger.routing.config import ShardConfig, ShardSpec
from ledger.routing.ring import ShardRing

SHARD_NAMES = ("shard-a", "shard-b", "shard-c")
REPLICA_NAMES = ("replica-0", "replica-1")
# Two currencies, so conservation is checked per currency and a transfer can name
# an account of the wrong one (a refusal on the credit shard: a compensated saga).
CURRENCIES = ("USD", "EUR")
# Two merchants per shard: local transfers between merchants, sagas between shards.
MERCHANTS_PER_SHARD = 2
# No-overdraft wallets per merchant and currency, each funded from the merchant's
# overdraft-allowed source account in that currency.
WALLETS_PER_CURRENCY = 2
WALLET_FUNDING_MINOR = 50_000
# Ordinary amounts stay well below a wallet's funding, so most transfers succeed;
# an "overdraft" amount is above any funding, so it is mostly refused.
# Ids tried per stripe for a fill transfer's id (with_full_stripes).
STRIPE_DRAWS_MAX = 10_000
AMOUNT_MINOR_MAX = 3_000
OVERDRAFT_AMOUNT_MINOR_MIN = 2 * WALLET_FUNDING_MINOR
OVERDRAFT_AMOUNT_MINOR_MAX = 20 * WALLET_FUNDING_MINOR
TOPUP_AMOUNT_MINOR_MAX = 20_000
# Share of transfers that try to overdraw, and that debit the source (a top-up).
OVERDRAFT_SHARE = 0.08
TOPUP_SHARE = 0.15
# Share of cross-shard transfers that the credit shard must refuse (an account that
# does not exist, or one in another currency): each becomes a compensated saga.
DOOMED_CROSS_SHARE = 0.12
# Pending transfers: a share carry a short timeout, so expiries (and expiry sagas)
# happen during the run and all of them are due soon after it.
PENDING_TIMEOUT_SHARE = 0.25
PENDING_TIMEOUT_MS_MIN = 1_000
PENDING_TIMEOUT_MS_MAX = 4_000
# A settled pending transfer stays a candidate with this probability, so some
# pending transfers get a second settle (which must be refused).
RESETTLE_SHARE = 0.2
# Linked chains: this many members, on one shard; a share of chains hold an
# overdraft member, so the whole chain must fail.
CHAIN_LENGTH_MIN = 2
CHAIN_LENGTH_MAX = 4
DOOMED_CHAIN_SHARE = 0.3
# A share of chains span two merchants of one shard (as the first layout places
# them): a rebalance may part the two, and then the call is refused whole
# (LINKED_CHAIN_SPANS_SHARDS), or, learned mid-call, answered SHARD_UNAVAILABLE
# whole; never applied in part.
PAIRED_CHAIN_SHARE = 0.3
# Replays pick among this many of the client's latest operations (bounded memory).
REPLAY_WINDOW_OPS = 200
PENDING_WINDOW_OPS = 100
# Reversals pick among this many of the client's latest posts, local or cross-shard
# (the reversal is then local or a saga as the merchants lie when it runs).
POSTED_WINDOW_OPS = 100
# Reversals: the whole original, a part, or one unit more than the original (which
# must be refused, as must any that together with earlier ones exceed it).
REVERSAL_PART_SHARE = 0.4
REVERSAL_EXCESS_SHARE = 0.2
# What a client does next, by weight.
OPERATION_WEIGHTS = (
    ("local", 22),
    ("cross", 18),
    ("pending", 16),
    ("settle", 16),
    ("chain", 12),
    ("replay", 10),
    ("reverse", 8),
)
# Merchant placement draws ids in order until every shard has its share; a shard
# takes about a third of the ids, so this bound is never reached in practice.
MERCHANT_DRAWS_MAX = 10_000
# The fault schedule. The first fault comes after the workload has warmed up; each
# later one starts this long after the previous start (so faults may overlap on
# different targets); a target is never hit by two faults at once.
FIRST_FAULT_S_MIN = 1.0
FIRST_FAULT_S_MAX = 3.0
FAULT_GAP_S_MIN = 1.5
FAULT_GAP_S_MAX = 4.5
FAULT_DURATION_S = {
    "kill_replica": (0.3, 3.0),
    "stop_shard": (0.5, 5.0),
    "partition_shard": (0.5, 5.0),
    "slow_shard": (1.0, 6.0),
    # How long one shard's raised weight stands before it is put back (each end
    # of it is a whole `ledger shards rebalance`, retried until it finishes).
    "rebalance": (1.0, 6.0),
    # How long a drained shard stays out of the ring once DRAINED and retired, before
    # it is made active again (the drain itself, until DRAINED, comes before and
    # takes longer).
    "drain": (1.0, 6.0),
}
# A rebalance raises one shard's weight to this (merchants move to it) and then
# back to 1 (they move back): every rebalance moves merchants, with their holds
# and sagas, while the clients write and other faults go on.
REBALANCE_WEIGHT = 3
# A share of rebalances is SIGKILLed once, this long after it started, and run again.
REBALANCE_KILL_SHARE = 0.5
REBALANCE_KILL_AFTER_MS_MIN = 50
REBALANCE_KILL_AFTER_MS_MAX = 1_500
SLOW_LATENCY_MS_MIN = 50
SLOW_LATENCY_MS_MAX = 300
# A killed replica needs a Python start-up (seconds) after its downtime before it
# serves again; the other replica is never killed before that, so one always serves.
REPLICA_RESTART_ALLOWANCE_S = 6.0
# A stopped shard replays its WAL on start; the next fault on it waits this long.
SHARD_RECOVERY_ALLOWANCE_S = 1.0
# Rebalances never overlap each other (they share this lane of the schedule); the
# next one waits this long after the planned end of the last, for its commands.
REBALANCE_LANE = "rebalance"
REBALANCE_ALLOWANCE_S = 5.0
# A drain (--drains) takes the same lane: its shard is drained until the rebalance
# says DRAINED (settling the holds it relays on the way), is retired (once the run's
# event subscriber acknowledged its stream to the end), stays so for its planned
# length, and is made active again. Emptying it takes far longer than a weight change.
DRAIN_ALLOWANCE_S = 15.0
# Operations per client that a plan digest covers (the run reports it; a test
# compares it with its own planning of the same seed in another process).
PLAN_DIGEST_OPS_PER_CLIENT = 200


def _check_limits() -> None:
    if not 0 < AMOUNT_MINOR_MAX < WALLET_FUNDING_MINOR < OVERDRAFT_AMOUNT_MINOR_MIN:
        raise AssertionError("ordinary amounts must fit a funded wallet, overdrafts must not")
    if not OVERDRAFT_AMOUNT_MINOR_MIN < OVERDRAFT_AMOUNT_MINOR_MAX:
        raise AssertionError("overdraft amounts need a range")
    if not 2 <= CHAIN_LENGTH_MIN <= CHAIN_LENGTH_MAX:
        raise AssertionError("a linked chain has at least two members")
    if MERCHANTS_PER_SHARD < 2 or WALLETS_PER_CURRENCY < 2 or len(CURRENCIES) < 2:
        raise AssertionError(
            "local transfers need two merchants per shard, two wallets, two currencies"
        )
    if not (0 < FIRST_FAULT_S_MIN <= FIRST_FAULT_S_MAX and 0 < FAULT_GAP_S_MIN <= FAULT_GAP_S_MAX):
        raise AssertionError("fault timings must be positive ranges")
    for low, high in FAULT_DURATION_S.values():
        if not 0 < low <= high:
            raise AssertionError("fault durations must be positive ranges")


_check_limits()


class Action(IntEnum):
    """TransferAction, with the values of ledger.v1 (kept apart so plans are plain data)."""

    POST = 1
    PENDING = 2
    POST_PENDING = 3
    VOID_PENDING = 4


class FaultKind(StrEnum):
    KILL_REPLICA = "kill_replica"
    STOP_SHARD = "stop_shard"
    PARTITION_SHARD = "partition_shard"
    SLOW_SHARD = "slow_shard"
    REBALANCE = "rebalance"
    # Planned only with --drains (after REBALANCE, so that plans without it draw
    # exactly as before): a shard set `state = "draining"` until DRAINED, then back.
    DRAIN = "drain"


# The faults that are whole admin workflows on the cluster's config: one at a time.
_ADMIN_KINDS = frozenset({FaultKind.REBALANCE, FaultKind.DRAIN})


def admin_lane(fault: FaultKind, target: str) -> str:
    """The lane a fault occupies: the shared admin lane, or its own target."""
    return REBALANCE_LANE if fault in _ADMIN_KINDS else target


@dataclass(frozen=True, slots=True, order=True)
class Ref:
    merchant_id: str
    account_id: str

    def __str__(self) -> str:
        return f"{self.merchant_id}/{self.account_id}"


@dataclass(frozen=True, slots=True)
class AccountSpec:
    ref: Ref
    currency: str
    no_overdraft: bool


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """One ledger.v1.Transfer as the client sends it."""

    id: str
    debit: Ref
    credit: Ref | None
    amount_minor: int
    currency: str
    action: Action
    pending_id: str = ""
    timeout_ms: int = 0
    linked: bool = False
    reversal_of: str = ""


@dataclass(frozen=True, slots=True)
class Operation:
    """One CreateTransfers call (retried with the same request until it has an answer)."""

    op_id: str
    client: int
    # fund, local, cross, pending_local, pending_cross, settle, chain, replay, ...
    kind: str
    transfers: tuple[TransferSpec, ...]
    # The replica tried first; a retry after a transport failure tries the other.
    replica: int
    # For a replay: the op_id of the operation whose request it sends again.
    replay_of: str = ""


@dataclass(frozen=True, slots=True)
class Fault:
    at_s: float
    fault: FaultKind
    target: str
    duration_s: float
    # For slow_shard: the latency the proxy adds to every chunk sent to the shard.
    latency_ms: int = 0
    # For rebalance: kill the first run of the command this long after it started.
    kill_after_ms: int = 0

    def describe(self) -> str:
        extra = f" +{self.latency_ms} ms" if self.latency_ms else ""
        if self.fault is FaultKind.REBALANCE:
            extra = f" weight {REBALANCE_WEIGHT}" + (
                f", killed after {self.kill_after_ms} ms" if self.kill_after_ms else ""
            )
        if self.fault is FaultKind.DRAIN:
            extra = " until DRAINED, kept drained"
        return (
            f"{self.at_s:7.2f}s {self.fault.value} {self.target}{extra} for {self.duration_s:.2f}s"
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """Merchants per shard (as the ring places them), their accounts, and their funding."""

    merchants: tuple[tuple[str, tuple[str, ...]], ...]
    accounts: tuple[AccountSpec, ...]
    funding: tuple[Operation, ...]
    # Merchants the clients never use (with_full_stripes), by shard; out of repr, so
    # a plan's digest is the same without them.
    whales: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def merchants_on(self, shard: str) -> tuple[str, ...]:
        for name, merchants in self.merchants:
            if name == shard:
                return merchants
        raise KeyError(shard)

    def shard_of(self, merchant_id: str) -> str:
        for name, merchants in self.merchants:
            if merchant_id in merchants:
                return name
        for name, whale in self.whales:
            if whale == merchant_id:
                return name
        raise KeyError(merchant_id)


@dataclass(frozen=True, slots=True)
class RunPlan:
    seed: int
    layout: Layout
    faults: tuple[Fault, ...]
    # The first operations of each client, in order.
    operations: tuple[tuple[Operation, ...], ...]

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()


def source_account(currency: str) -> str:
    return f"{currency.lower()}-source"


def wallet_account(currency: str, index: int) -> str:
    return f"{currency.lower()}-wallet-{index}"


def ghost_account(currency: str) -> str:
    """An account id that is never created: a credit to it is refused."""
    return f"{currency.lower()}-ghost"


def planning_ring(shard_names: tuple[str, ...] = SHARD_NAMES) -> ShardRing:
    """The ring the service builds: from shard names and weights only, never DSNs."""
    return ShardRing(
        ShardConfig(
            epoch=1,
            shards=tuple(
                ShardSpec(name=n, dsn="postgresql://unused", weight=1) for n in shard_names
            ),
        )
    )


def plan_layout(seed: int) -> Layout:
    ring = planning_ring()
    placed: dict[str, list[str]] = {name: [] for name in SHARD_NAMES}
    for index in range(MERCHANT_DRAWS_MAX):
        if all(len(placed[n]) >= MERCHANTS_PER_SHARD for n in SHARD_NAMES):
            break
        merchant_id = f"s{seed}-m{index}"
        shard = ring.shard_for(merchant_id)
        if len(placed[shard]) < MERCHANTS_PER_SHARD:
            placed[shard].append(merchant_id)
    else:
        raise AssertionError("merchant placement did not fill every shard")
    merchants = tuple((name, tuple(placed[name])) for name in SHARD_NAMES)
    accounts: list[AccountSpec] = []
    funding: list[Operation] = []
    for _, shard_merchants in merchants:
        for merchant_id in shard_merchants:
            for currency in CURRENCIES:
                source = Ref(merchant_id, source_account(currency))
                accounts.append(AccountSpec(source, currency, no_overdraft=False))
                for index in range(WALLETS_PER_CURRENCY):
                    wallet = Ref(merchant_id, wallet_account(currency, index))
                    accounts.append(AccountSpec(wallet, currency, no_overdraft=True))
                    transfer = TransferSpec(
                        id=f"fund-{wallet.account_id}",
                        debit=source,
                        credit=wallet,
                        amount_minor=WALLET_FUNDING_MINOR,
                        currency=currency,
                        action=Action.POST,
                    )
                    funding.append(
                        Operation(
                            op_id=f"fund-{merchant_id}-{wallet.account_id}",
                            client=-1,
                            kind="fund",
                            transfers=(transfer,),
                            replica=0,
                        )
                    )
    return Layout(merchants=merchants, accounts=tuple(accounts), funding=tuple(funding))


def with_full_stripes(layout: Layout, seed: int) -> Layout:
    """The layout with a whale merchant on each shard and funding that fills both
    sides of every settlement stripe between every two shards in every currency:
    for each ordered pair, currency and stripe, one transfer of 2^63-1 between
    accounts of their own. Every leg of the run's sagas, holds and moves between
    the shards then goes to a settlement account of its transfer's own
    (docs/sagas.md, "Stripes that fill"), and the whales' huge positions move on
    numbered position accounts when a rebalance moves them."""
    ring = planning_ring()
    whales = tuple(
        (
            name,
            next(
                m
                for m in (f"s{seed}-w{i}" for i in range(MERCHANT_DRAWS_MAX))
                if ring.shard_for(m) == name
            ),
        )
        for name in SHARD_NAMES
    )
    whale_on = dict(whales)
    accounts = list(layout.accounts)
    funding = list(layout.funding)
    for x in SHARD_NAMES:
        for y in SHARD_NAMES:
            if x == y:
                continue
            for currency in CURRENCIES:
                transfers = []
                for stripe in range(SETTLEMENT_STRIPES):
                    debit = Ref(whale_on[x], f"{currency.lower()}-to-{y}-{stripe}")
                    credit = Ref(whale_on[y], f"{currency.lower()}-from-{x}-{stripe}")
                    accounts += [
                        AccountSpec(debit, currency, no_overdraft=False),
                        AccountSpec(credit, currency, no_overdraft=False),
                    ]
                    transfer_id = next(
                        i
                        for i in (
                            f"fill-{x}-{y}-{currency}-{stripe}-{n}" for n in range(STRIPE_DRAWS_MAX)
                        )
                        if settlement_stripe(i) == stripe
                    )
                    transfers.append(
                        TransferSpec(
                            id=transfer_id,
                            debit=debit,
                            credit=credit,
                            amount_minor=BALANCE_MAX,
                            currency=currency,
                            action=Action.POST,
                        )
                    )
                funding.append(
                    Operation(
                        op_id=f"fill-{x}-{y}-{currency}",
                        client=-1,
                        kind="fund",
                        transfers=tuple(transfers),
                        replica=0,
                    )
                )
    return replace(layout, accounts=tuple(accounts), funding=tuple(funding), whales=whales)


class ClientPlanner:
    """Client `client`'s operations, one at a time, from its own Random."""

    def __init__(self, *, seed: int, client: int, layout: Layout) -> None:
        self.client = client
        self.layout = layout
        self._rng = random.Random(f"chaos/{seed}/client/{client}")
        self._sequence = 0
        self._recent: list[Operation] = []
        self._pendings: list[TransferSpec] = []
        self._posted: list[TransferSpec] = []
        self._kinds = [name for name, _ in OPERATION_WEIGHTS]
        self._weights = [weight for _, weight in OPERATION_WEIGHTS]

    def next(self) -> Operation:
        self._sequence += 1
        op_id = f"c{self.client}-{self._sequence}"
        choice = self._rng.choices(self._kinds, self._weights)[0]
        replica = self._rng.randrange(len(REPLICA_NAMES))
        if choice == "replay" and self._recent:
            original = self._rng.choice(self._recent)
            return Operation(
                op_id, self.client, "replay", original.transfers, replica, original.op_id
            )
        if choice == "settle" and self._pendings:
            kind, transfers = self._settle(op_id)
        elif choice == "reverse" and self._posted:
            kind, transfers = self._reverse(op_id)
        elif choice == "pending":
            kind, transfers = self._pending(op_id)
        elif choice == "cross":
            kind, transfers = self._cross(op_id)
        elif choice == "chain":
            kind, transfers = self._chain(op_id)
        else:
            kind, transfers = self._local(op_id)
        operation = Operation(op_id, self.client, kind, transfers, replica)
        self._recent.append(operation)
        del self._recent[:-REPLAY_WINDOW_OPS]
        if kind in ("local", "cross"):
            self._posted.extend(transfers)
            del self._posted[:-POSTED_WINDOW_OPS]
        return operation

    # Accounts.

    def _shard(self) -> str:
        return self._rng.choice(SHARD_NAMES)

    def _merchant(self, shard: str) -> str:
        return self._rng.choice(self.layout.merchants_on(shard))

    def _wallet(self, merchant_id: str, currency: str) -> Ref:
        return Ref(merchant_id, wallet_account(currency, self._rng.randrange(WALLETS_PER_CURRENCY)))

    def _debit(self, merchant_id: str, currency: str) -> Ref:
        if self._rng.random() < TOPUP_SHARE:
            return Ref(merchant_id, source_account(currency))
        return self._wallet(merchant_id, currency)

    def _amount(self, debit: Ref) -> int:
        if debit.account_id.endswith("-source"):
            return self._rng.randint(1, TOPUP_AMOUNT_MINOR_MAX)
        if self._rng.random() < OVERDRAFT_SHARE:
            return self._rng.randint(OVERDRAFT_AMOUNT_MINOR_MIN, OVERDRAFT_AMOUNT_MINOR_MAX)
        return self._rng.randint(1, AMOUNT_MINOR_MAX)

    def _two_accounts(self, *, cross: bool, currency: str) -> tuple[Ref, Ref]:
        """A debit and a credit account: on one shard (two merchants, or one merchant's
        two wallets), or on two different shards."""
        debit_shard = self._shard()
        debit_merchant = self._merchant(debit_shard)
        if cross:
            credit_shard = self._rng.choice([s for s in SHARD_NAMES if s != debit_shard])
            credit_merchant = self._merchant(credit_shard)
        else:
            credit_merchant = self._merchant(debit_shard)
        debit = self._debit(debit_merchant, currency)
        credit = self._wallet(credit_merchant, currency)
        return debit, _apart(credit, debit, currency)

    # Operations.

    def _local(self, op_id: str) -> tuple[str, tuple[TransferSpec, ...]]:
        currency = self._rng.choice(CURRENCIES)
        debit, credit = self._two_accounts(cross=False, currency=currency)
        amount = self._amount(debit)
        return "local", (TransferSpec(op_id, debit, credit, amount, currency, Action.POST),)

    def _cross(self, op_id: str) -> tuple[str, tuple[TransferSpec, ...]]:
        currency = self._rng.choice(CURRENCIES)
        debit, credit = self._two_accounts(cross=True, currency=currency)
        amount = self._amount(debit)
        kind = "cross"
        if self._rng.random() < DOOMED_CROSS_SHARE:
            kind = "cross_refused"
            if self._rng.random() < 0.5:
                credit = Ref(credit.merchant_id, ghost_account(currency))
            else:
                other = CURRENCIES[(CURRENCIES.index(currency) + 1) % len(CURRENCIES)]
                credit = self._wallet(credit.merchant_id, other)
        return kind, (TransferSpec(op_id, debit, credit, amount, currency, Action.POST),)

    def _pending(self, op_id: str) -> tuple[str, tuple[TransferSpec, ...]]:
        cross = self._rng.random() < 0.5
        currency = self._rng.choice(CURRENCIES)
        debit, credit = self._two_accounts(cross=cross, currency=currency)
        amount = self._amount(debit)
        timeout_ms = 0
        if self._rng.random() < PENDING_TIMEOUT_SHARE:
            timeout_ms = self._rng.randint(PENDING_TIMEOUT_MS_MIN, PENDING_TIMEOUT_MS_MAX)
        transfer = TransferSpec(
            op_id, debit, credit, amount, currency, Action.PENDING, timeout_ms=timeout_ms
        )
        self._pendings.append(transfer)
        del self._pendings[:-PENDING_WINDOW_OPS]
        return ("pending_cross" if cross else "pending_local"), (transfer,)

    def _settle(self, op_id: str) -> tuple[str, tuple[TransferSpec, ...]]:
        """Post (all or part) or void one of this client's earlier pending transfers."""
        index = self._rng.randrange(len(self._pendings))
        pending = self._pendings[index]
        if self._rng.random() >= RESETTLE_SHARE:
            del self._pendings[index]
        roll = self._rng.random()
        if roll < 0.3:
            action, amount, how = Action.POST_PENDING, 0, "post"
        elif roll < 0.45:
            action, amount, how = Action.POST_PENDING, pending.amount_minor, "post"
        elif roll < 0.7:
            amount = self._rng.randint(1, max(1, pending.amount_minor - 1))
            action, how = Action.POST_PENDING, "post_partial"
        else:
            action, amount, how = Action.VOID_PENDING, 0, "void"
        # Half the settles name the accounts and currency, half leave them to the pending.
        named = self._rng.random() < 0.5
        transfer = TransferSpec(
            op_id,
            pending.debit,
            pending.credit if named else None,
            amount,
            pending.currency if named else "",
            action,
            pending_id=pending.id,
        )
        assert pending.credit is not None
        cross = self.layout.shard_of(pending.debit.merchant_id) != self.layout.shard_of(
            pending.credit.merchant_id
        )
        return f"settle_{how}_{'cross' if cross else 'local'}", (transfer,)

    def _reverse(self, op_id: str) -> tuple[str, tuple[TransferSpec, ...]]:
        """Reverse one of this client's earlier posts (which may have been refused)."""
        original = self._rng.choice(self._posted)
        assert original.credit is not None
        roll = self._rng.random()
        if roll < REVERSAL_PART_SHARE:
            amount = self._rng.randint(1, original.amount_minor)
        elif roll < REVERSAL_PART_SHARE + REVERSAL_EXCESS_SHARE:
            amount = original.amount_minor + 1
        else:
            amount = original.amount_minor
        transfer = TransferSpec(
            op_id,
            original.credit,
            original.debit,
            amount,
            original.currency,
            Action.POST,
            reversal_of=original.id,
        )
        cross = self.layout.shard_of(original.debit.merchant_id) != self.layout.shard_of(
            original.credit.merchant_id
        )
        return f"reverse_{'cross' if cross else 'local'}", (transfer,)

    def _chain(self, op_id: str) -> tuple[str, tuple[TransferSpec, ...]]:
        """A linked chain of one merchant, or of two on one shard (paired: a member's
        debit and credit merchants are either); a doomed chain holds one overdraft
        member."""
        shard = self._shard()
        length = self._rng.randint(CHAIN_LENGTH_MIN, CHAIN_LENGTH_MAX)
        doomed_at = self._rng.randrange(length) if self._rng.random() < DOOMED_CHAIN_SHARE else -1
        merchants = [self._merchant(shard)]
        others = [m for m in self.layout.merchants_on(shard) if m != merchants[0]]
        if others and self._rng.random() < PAIRED_CHAIN_SHARE:
            merchants.append(self._rng.choice(others))
        transfers = []
        for member in range(length):
            currency = self._rng.choice(CURRENCIES)
            # A paired chain's first member runs from one merchant to the other, so
            # the chain names both (whatever the others draw).
            payer, payee = (
                (merchants[0], merchants[-1])
                if member == 0
                else (self._rng.choice(merchants), self._rng.choice(merchants))
            )
            debit = self._wallet(payer, currency)
            credit = self._wallet(payee, currency)
            credit = _apart(credit, debit, currency)
            amount = (
                self._rng.randint(OVERDRAFT_AMOUNT_MINOR_MIN, OVERDRAFT_AMOUNT_MINOR_MAX)
                if member == doomed_at
                else self._rng.randint(1, AMOUNT_MINOR_MAX)
            )
            transfers.append(
                TransferSpec(
                    f"{op_id}.{member}",
                    debit,
                    credit,
                    amount,
                    currency,
                    Action.POST,
                    linked=member < length - 1,
                )
            )
        kind = "chain_pair" if len(merchants) > 1 else "chain"
        return (f"{kind}_refused" if doomed_at >= 0 else kind), tuple(transfers)


def _apart(credit: Ref, debit: Ref, currency: str) -> Ref:
    """The credit wallet, or the merchant's next wallet when it is the debit account."""
    if credit != debit:
        return credit
    index = int(credit.account_id.rsplit("-", 1)[1])
    return Ref(credit.merchant_id, wallet_account(currency, (index + 1) % WALLETS_PER_CURRENCY))


def plan_faults(
    seed: int, duration_s: float, *, rebalances: bool = False, drains: bool = False
) -> tuple[Fault, ...]:
    """The fault schedule: every fault starts and ends within duration_s (a drain's
    and a rebalance's commands take their own time on top of the planned length).

    Without drains the kinds, and so every draw, are those of plans made before
    drains existed: a seed's schedule without --drains never changes."""
    rng = random.Random(f"chaos/{seed}/faults")
    kinds = [
        k
        for k in FaultKind
        if (rebalances or k is not FaultKind.REBALANCE) and (drains or k is not FaultKind.DRAIN)
    ]
    busy_until: dict[str, float] = {
        name: 0.0 for name in (*REPLICA_NAMES, *SHARD_NAMES, REBALANCE_LANE)
    }
    faults: list[Fault] = []
    at_s = round(rng.uniform(FIRST_FAULT_S_MIN, FIRST_FAULT_S_MAX), 2)
    while at_s < duration_s:
        kind = rng.choice(kinds)
        low, high = FAULT_DURATION_S[kind.value]
        length_s = round(rng.uniform(low, high), 2)
        latency_ms = (
            rng.randint(SLOW_LATENCY_MS_MIN, SLOW_LATENCY_MS_MAX)
            if kind is FaultKind.SLOW_SHARD
            else 0
        )
        kill_after_ms = 0
        if kind is FaultKind.KILL_REPLICA:
            # One replica at a time: the other must serve while this one restarts.
            free = [r for r in REPLICA_NAMES if max(busy_until[x] for x in REPLICA_NAMES) <= at_s]
            allowance_s = REPLICA_RESTART_ALLOWANCE_S
        elif kind is FaultKind.REBALANCE:
            # One rebalance at a time (the target is the shard whose weight rises);
            # the commands themselves take seconds on top of the planned length.
            free = list(SHARD_NAMES) if busy_until[REBALANCE_LANE] <= at_s else []
            allowance_s = REBALANCE_ALLOWANCE_S
            if rng.random() < REBALANCE_KILL_SHARE:
                kill_after_ms = rng.randint(
                    REBALANCE_KILL_AFTER_MS_MIN, REBALANCE_KILL_AFTER_MS_MAX
                )
        elif kind is FaultKind.DRAIN:
            # One drain or rebalance at a time, on the same lane; never killed (the
            # rebalance's own kill recovery is what --rebalances exercises).
            free = list(SHARD_NAMES) if busy_until[REBALANCE_LANE] <= at_s else []
            allowance_s = DRAIN_ALLOWANCE_S
        else:
            free = [s for s in SHARD_NAMES if busy_until[s] <= at_s]
            allowance_s = SHARD_RECOVERY_ALLOWANCE_S if kind is FaultKind.STOP_SHARD else 0.0
        target = rng.choice(free) if free else ""
        length_s = round(min(length_s, duration_s - at_s), 2)
        if target and length_s > 0:
            faults.append(Fault(at_s, kind, target, length_s, latency_ms, kill_after_ms))
            lane = admin_lane(kind, target)
            busy_until[lane] = at_s + length_s + allowance_s
        at_s = round(at_s + rng.uniform(FAULT_GAP_S_MIN, FAULT_GAP_S_MAX), 2)
    return tuple(faults)


def plan_run(
    *,
    seed: int,
    duration_s: float,
    clients: int,
    ops_per_client: int = PLAN_DIGEST_OPS_PER_CLIENT,
    rebalances: bool = False,
    drains: bool = False,
    full_stripes: bool = False,
) -> RunPlan:
    """The whole plan of a run: what the runner executes (it draws more operations from
    the same planners while time remains)."""
    layout = plan_layout(seed)
    if full_stripes:
        layout = with_full_stripes(layout, seed)
    operations = []
    for client in range(clients):
        planner = ClientPlanner(seed=seed, client=client, layout=layout)
        operations.append(tuple(planner.next() for _ in range(ops_per_client)))
    faults = plan_faults(seed, duration_s, rebalances=rebalances, drains=drains)
    return RunPlan(seed, layout, faults, tuple(operations))

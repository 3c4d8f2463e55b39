"""Model-based test of merchant moves and holds (issue 17).

A seeded random sequence of ring changes (adding a shard, weight changes that
move merchants away and back, draining a shard and making it active again),
each applied as an admin does (the live config, then `ledger shards rebalance`,
sometimes SIGKILLed at a random crash point and run again), interleaved with
local and cross-shard holds, full and partial posts and voids (naming the credit
account or not), reversals of posts (in parts, and one unit too many, wherever
the moves have put the two merchants), settles of cross-shard holds stopped after their credit step
(as when the replica driving one dies: its answer lost) and driven again steps
later, and holds left to time out. A simple model predicts every account's
balances. After the sequence every open hold must settle when asked,
a final rebalance must finish (every draining shard DRAINED), the balances must
be the model's and reconcile must be clean.

A seed fixes the merchants, their ring placement and the operations, so a
failing seed replays them; background work (expiry, recovery) still runs on
its own clock beside them.

Short in the suite (one seed); long on demand, for example:
    LEDGER_MOVES_MODEL_SEEDS=1-20 LEDGER_MOVES_MODEL_STEPS=40 \
        python3 -m pytest tests/test_moves_model.py
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ledger import faults
from ledger.domain.accounts import AccountKey
from ledger.domain.sagas import SagaKey, SagaState
from ledger.domain.transfers import TransferAction, TransferRequest
from ledger.routing.config import ShardConfig
from ledger.routing.ring import ShardRing
from ledger.sagas.runner import SagaRunner, SagaSettings
from ledger.storage.errors import SettleIsLocal
from ledger.storage.sagas import SagaStore
from ledger.v1 import ledger_pb2 as pb
from tests.ledger4 import ALL_SHARDS, FIRST_SHARDS, Ledger4
from tests.support import ref, transfer, wait_admin_locks_released, wait_until, write_config
from tests.test_rebalance import (
    DEFERRED_CALL_ATTEMPTS_MAX,
    REPO_ROOT,
    SUBPROCESS_TIMEOUT_S,
    all_balances,
    assert_reconciled,
    create_merchants,
    lookup_final,
    on_every_shard,
    opened,
    send_retrying,
    wait_for_balances,
)
from tests.test_settlement_capacity import fill_every_stripe


def _seeds() -> list[int]:
    spec = os.environ.get("LEDGER_MOVES_MODEL_SEEDS", "3")
    low, _, high = spec.partition("-")
    return list(range(int(low), int(high or low) + 1))


# Operations per sequence (each a hold operation or a ring change).
STEPS = int(os.environ.get("LEDGER_MOVES_MODEL_STEPS", "14"))
MERCHANTS = 6
# A share of steps changes the ring (and rebalances); the rest are hold operations.
RING_CHANGE_SHARE = 0.3
# A share of rebalances is SIGKILLed at a random crash point first, then run again.
REBALANCE_KILL_SHARE = 0.4
WEIGHTS = (1, 3, 6)
# A share of ring changes is a tour of up to TOUR_LEGS_MAX legs: weights found
# that move one party of an open cross-shard hold on to an active shard other
# than the one it came from, so that its hold's path comes to pass a shard
# twice (a, b, c, a, b).
TOUR_SHARE = 0.3
TOUR_LEGS_MAX = 4
TOUR_WEIGHTS_TRIED_MAX = 200
TOUR_AGAIN_SHARE = 0.8
AMOUNT_MINOR_MAX = 1_000
# Holds left to expire: long enough to outlive a few moves, short enough to end.
HOLD_TIMEOUT_MS = 6_000
# A rebalance is run again at most this often to finish after deferrals.
REBALANCE_RUNS_MAX = 4
REBALANCE_CRASH_POINTS = tuple(p for p in faults.POINTS if p.startswith(("rebalance.", "move.")))
# A share of settles of cross-shard holds stops after step 2's first hop (the
# saga's lease held, so no recovery worker drives it); a share of later steps
# drives one of them on, each at most this often, and it must complete.
INTERRUPTED_SETTLE_SHARE = 0.3
INTERRUPTED_DRIVE_SHARE = 0.3
INTERRUPTED_DRIVES_MAX = 5
INTERRUPTED_LEASE_S = 3_600.0
# A share of hold operations reverses a post made earlier, once there is one.
REVERSAL_SHARE = 0.4
# A share of reversals draws from every post, fully reversed ones included.
FULLY_REVERSED_DRAW_SHARE = 0.2
RELAYED_TWICE_BY_THIS_SHARD = """
SELECT count(*) FROM (SELECT 1 FROM hold_relays GROUP BY merchant_id, transfer_id
                      HAVING count(*) > 1) AS twice
"""
# Entries on settlement accounts of one transfer's own (docs/sagas.md, "Stripes that fill").
ENTRIES_ON_OWN_SETTLEMENT_ACCOUNTS = """
SELECT count(*) FROM entries WHERE merchant_id = '$settlement' AND account_id LIKE '%/t-%'
"""
# A move deferred for holds whose paths it would make too long names them:
# "hold T of M" or "holds T1 of M1, T2 of M2 (and maybe others)".
WAITING_FOR_HOLDS = re.compile(
    r"deferred: cross-shard holds? (?P<holds>\S+ of \S+?(?:, \S+ of \S+?)*)"
    r"(?: \(and maybe others\))?: "
)


@dataclass
class Hold:
    id: str
    debit: str
    credit: str
    amount_minor: int
    expires: bool


@dataclass
class Posted:
    """A hold's post, sent and answered: what it moved, and what reversals moved back."""

    id: str
    debit: str
    credit: str
    posted_minor: int
    reversed_minor: int = 0


@dataclass
class Model:
    """Every account's (debits_posted, credits_posted, debits_pending, credits_pending)."""

    merchants: list[str]
    balances: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    open_holds: dict[str, Hold] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in self.merchants:
            for name in ("cash", "sales"):
                self.balances[(m, name)] = [0, 0, 0, 0]

    def hold(self, hold: Hold) -> None:
        self.open_holds[hold.id] = hold
        self.balances[(hold.debit, "cash")][2] += hold.amount_minor
        self.balances[(hold.credit, "sales")][3] += hold.amount_minor

    def settle(self, hold_id: str, posted_minor: int) -> None:
        hold = self.open_holds.pop(hold_id)
        self.balances[(hold.debit, "cash")][2] -= hold.amount_minor
        self.balances[(hold.credit, "sales")][3] -= hold.amount_minor
        self.balances[(hold.debit, "cash")][0] += posted_minor
        self.balances[(hold.credit, "sales")][1] += posted_minor

    def reverse(self, posted: Posted, amount_minor: int) -> None:
        posted.reversed_minor += amount_minor
        self.balances[(posted.credit, "sales")][0] += amount_minor
        self.balances[(posted.debit, "cash")][1] += amount_minor

    def expected(self) -> dict[tuple[str, str], tuple[int, int, int, int]]:
        return {k: (v[0], v[1], v[2], v[3]) for k, v in self.balances.items()}


@dataclass
class Topology:
    """The admin's config: shards, weights and states; each change is the next epoch."""

    env: Ledger4
    epoch: int = 1
    names: list[str] = field(default_factory=lambda: list(FIRST_SHARDS))
    weights: dict[str, int] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)

    def config(self) -> ShardConfig:
        return self.env.config(self.epoch, self.names, weights=self.weights, states=self.states)

    def tour(self, rng: random.Random, merchant: str, *, avoid: set[str]) -> str | None:
        """Weights of the active shards that place merchant on an active shard
        not in avoid (the next epoch), or None, changing nothing, if none found."""
        active = [n for n in self.names if self.states.get(n, "active") == "active"]
        for _ in range(TOUR_WEIGHTS_TRIED_MAX):
            weights = {**self.weights, **{n: rng.choice(WEIGHTS) for n in active}}
            config = self.env.config(
                self.epoch + 1, self.names, weights=weights, states=self.states
            )
            destination = ShardRing(config).shard_for(merchant)
            if destination in active and destination not in avoid:
                self.epoch += 1
                self.weights = weights
                return f"tour {merchant} -> {destination}"
        return None

    def change(self, rng: random.Random) -> str:
        """One random ring change that keeps at least two shards active."""
        active = [n for n in self.names if self.states.get(n, "active") == "active"]
        draining = [n for n in self.names if self.states.get(n) == "draining"]
        choices = ["weight", "weight"]
        if len(self.names) < len(ALL_SHARDS):
            choices.append("add")
        if len(active) > 2:
            choices.append("drain")
        if draining:
            choices.append("reactivate")
        kind = rng.choice(choices)
        self.epoch += 1
        if kind == "add":
            added = next(n for n in ALL_SHARDS if n not in self.names)
            self.names.append(added)
            return f"add {added}"
        if kind == "drain":
            target = rng.choice(active)
            self.states[target] = "draining"
            return f"drain {target}"
        if kind == "reactivate":
            target = rng.choice(draining)
            del self.states[target]
            return f"reactivate {target}"
        target = rng.choice(active)
        self.weights[target] = rng.choice([w for w in WEIGHTS if w != self.weights.get(target, 1)])
        return f"weight {target}={self.weights[target]}"


async def rebalance_cli(config_path: Path, *, crash_point: str | None) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "GRPC_ENABLE_FORK_SUPPORT": "false",
        **({faults.CRASH_POINT_ENV: crash_point} if crash_point else {}),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger.cli",
        "shards",
        "rebalance",
        "--config",
        str(config_path),
        cwd=REPO_ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), SUBPROCESS_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError("a rebalance ran past its deadline") from None
    assert process.returncode is not None
    if process.returncode == -signal.SIGKILL:
        await wait_admin_locks_released(config_path)
    return process.returncode, output.decode(errors="replace")


class Run:
    def __init__(self, env: Ledger4, seed: int) -> None:
        self.env = env
        self.rng = random.Random(f"moves-model/{seed}")
        # Ids come from the seed alone (each run has fresh databases), so a seed
        # replays the same ring placement and the same operations.
        self.seed = seed
        self.merchants = [f"mm{seed}x{i}" for i in range(MERCHANTS)]
        self.ids = 0
        self.model = Model(self.merchants)
        self.topology = Topology(env)
        self.log: list[str] = []
        self.kills = 0
        self.counts: Counter[str] = Counter()
        self.runner = SagaRunner(
            env.service.cluster,
            owner="moves-model",
            settings=SagaSettings(lease_s=INTERRUPTED_LEASE_S),
        )
        self.interrupted: list[SagaKey] = []
        # The shard each merchant toured away from last, and the merchant toured
        # last (Run.tour).
        self.came_from: dict[str, str] = {}
        self.last_toured: str | None = None
        # The holds of interrupted settles (settled in the model, still open here
        # until driven), by the settle's transfer id.
        self.settling: dict[str, str] = {}
        # Posts a reversal may name (sent and answered, so their credit landed).
        self.posted: list[Posted] = []

    async def relayed_twice_by_a_shard(self) -> int:
        """Holds whose paths came to pass one shard twice as a relay (numbered
        paths, migration 0020): how often a run met what moves once waited for."""
        # Only the shards the ring has had: a shard never added is not set up.
        counts = await on_every_shard(
            self.env, RELAYED_TWICE_BY_THIS_SHARD, shards=self.topology.names
        )
        return sum(counts.values())

    def tour(self) -> str | None:
        """A ring change moving a party of an open cross-shard hold on, away from
        both its shard and the one it came from (so not folding back), or None."""
        ring = ShardRing(self.topology.config())
        parties = sorted(
            {
                m
                for h in self.model.open_holds.values()
                if ring.shard_for(h.debit) != ring.shard_for(h.credit)
                for m in (h.debit, h.credit)
            }
        )
        if not parties:
            return None
        # The same one again while it can go on: a path grows by a step per move.
        last = self.last_toured
        if last is not None and last in parties and self.rng.random() < TOUR_AGAIN_SHARE:
            merchant = last
        else:
            merchant = self.rng.choice(parties)
        here = ring.shard_for(merchant)
        change = self.topology.tour(
            self.rng, merchant, avoid={here, self.came_from.get(merchant, here)}
        )
        if change is not None:
            self.came_from[merchant] = here
            self.last_toured = merchant
        return change

    def next_id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}{self.seed}-{self.ids}"

    def describe(self) -> str:
        return "\n".join(self.log[-40:])

    async def hold(self) -> None:
        debit, credit = self.rng.sample(self.merchants, 2)
        expires = self.rng.random() < 0.2
        item = transfer(
            self.next_id("h"),
            ref(debit, "cash"),
            ref(credit, "sales"),
            self.rng.randint(1, AMOUNT_MINOR_MAX),
            action=pb.TRANSFER_ACTION_PENDING,
            timeout_ms=HOLD_TIMEOUT_MS if expires else 0,
        )
        await self.send(item, what=f"hold {item.id} {debit}->{credit} {item.amount_minor}")
        self.model.hold(Hold(item.id, debit, credit, item.amount_minor, expires))
        self.counts["holds"] += 1

    async def settle(self, hold: Hold) -> None:
        post = self.rng.random() < 0.6
        item = pb.Transfer(
            id=self.next_id("s"),
            debit_account=ref(hold.debit, "cash"),
            action=pb.TRANSFER_ACTION_POST_PENDING if post else pb.TRANSFER_ACTION_VOID_PENDING,
            pending_id=hold.id,
        )
        posted_minor = 0
        if post:
            posted_minor = self.rng.choice(
                [hold.amount_minor, self.rng.randint(1, hold.amount_minor)]
            )
            item.amount_minor = posted_minor
        if self.rng.random() < 0.5:
            item.credit_account.CopyFrom(ref(hold.credit, "sales"))
        verb = f"post {posted_minor}" if post else "void"
        if self.rng.random() < INTERRUPTED_SETTLE_SHARE and await self.interrupt(
            hold, item, what=f"{verb} {hold.id}"
        ):
            self.model.settle(hold.id, posted_minor)
            self.counts["settles interrupted"] += 1
            return
        await self.send(
            item, what=f"{verb} {hold.id} (credit named: {item.HasField('credit_account')})"
        )
        self.model.settle(hold.id, posted_minor)
        self.counts["posts" if post else "voids"] += 1
        if post:
            self.posted.append(Posted(item.id, hold.debit, hold.credit, posted_minor))

    async def reverse(self) -> None:
        """A reversal of a post: all that is left of it, a part, or one unit too many.
        Mostly of a post with something left (before, most draws came to fully
        reversed posts, and every one of them was one unit too many)."""
        with_room = [p for p in self.posted if p.reversed_minor < p.posted_minor]
        if with_room and self.rng.random() >= FULLY_REVERSED_DRAW_SHARE:
            posted = self.rng.choice(with_room)
        else:
            posted = self.rng.choice(self.posted)
        left_minor = posted.posted_minor - posted.reversed_minor
        amount_minor = max(
            1,
            self.rng.choice([left_minor, self.rng.randint(1, max(1, left_minor)), left_minor + 1]),
        )
        item = transfer(
            self.next_id("r"),
            ref(posted.credit, "sales"),
            ref(posted.debit, "cash"),
            amount_minor,
            reversal_of=posted.id,
        )
        fits = amount_minor <= left_minor
        await self.send(
            item,
            what=f"reverse {amount_minor} of {posted.id} ({left_minor} left)",
            expected=(
                pb.TRANSFER_RESULT_OK if fits else pb.TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL
            ),
        )
        if fits:
            self.model.reverse(posted, amount_minor)
        self.counts["reversals" if fits else "reversals refused"] += 1

    async def interrupt(self, hold: Hold, item: pb.Transfer, *, what: str) -> bool:
        """Runs the settle's saga to its credit step's first hop and leaves it there;
        False for a local hold (nothing written: it settles through the service)."""
        request = TransferRequest(
            id=item.id,
            debit=AccountKey(hold.debit, "cash"),
            credit=AccountKey(hold.credit, "sales"),
            amount_minor=item.amount_minor,
            currency="",
            action=TransferAction(item.action),
            pending_id=hold.id,
        )
        try:
            start = await self.runner.begin(request)
        except SettleIsLocal:
            return False
        saga = start.saga
        assert saga is not None and saga.state is SagaState.RUNNING, (what, start)
        cluster = self.env.service.cluster
        peer = cluster.shard_named(saga.peer_shard)
        assert peer is not None, saga.peer_shard
        record = await SagaStore(peer).credit(
            saga, home_shard=saga.home_shard, fence=cluster.fence(peer, {hold.credit})
        )
        onward = f", relayed to {record.relayed_to}" if record.relayed_to else ""
        self.log.append(
            f"{what}: stopped after step 2 on {peer.name} ({record.outcome.name}{onward})"
        )
        self.interrupted.append(saga.key)
        self.settling[saga.key.transfer_id] = hold.id
        return True

    async def drive_interrupted(self, key: SagaKey) -> None:
        """Drives an interrupted settle on from wherever its merchants are now: it
        completes, at most a few retryable failures later."""
        for _ in range(INTERRUPTED_DRIVES_MAX):
            found = await self.runner.get(key)
            assert found is not None, f"{key}: saga not found\n{self.describe()}"
            saga = found[0]
            if not saga.finished:
                saga = await self.runner.drive(saga)
            if saga.finished:
                break
        assert saga.state is SagaState.COMPLETED, (
            f"interrupted settle {key.transfer_id}: {saga.state.name} after "
            f"{saga.attempts} attempts, last error {saga.last_error!r}\n{self.describe()}"
        )
        del self.settling[key.transfer_id]
        self.log.append(f"interrupted settle {key.transfer_id} driven: COMPLETED")
        self.counts["interrupted settles completed"] += 1

    async def send(
        self, item: pb.Transfer, *, what: str, expected: int = pb.TRANSFER_RESULT_OK
    ) -> None:
        """Sends until answered (retryable failures again, same id); it must end with
        the expected result (OK unless told)."""
        self.log.append(what)
        answer = await send_retrying(
            self.env.service, item, self.rng, attempts_max=DEFERRED_CALL_ATTEMPTS_MAX
        )
        key = (item.debit_account.merchant_id, item.id)
        assert answer.result is not None, f"{what}: {answer.describe()}\n{self.describe()}"
        if answer.result != expected:
            final = (await lookup_final(self.env.service, [key]))[key]
            assert final.result == expected, (
                f"{what}: {pb.TransferResult.Name(final.result)}\n{self.describe()}"
            )

    async def change_ring(self) -> None:
        if self.rng.random() < TOUR_SHARE:
            # A tour of several legs, one rebalance each, while the holds stay open.
            toured = False
            for _ in range(TOUR_LEGS_MAX):
                leg = self.tour()
                if leg is None:
                    break
                await self.apply(leg)
                toured = True
            if toured:
                return
        await self.apply(self.topology.change(self.rng))

    async def apply(self, change: str) -> None:
        self.counts[f"ring {change.split()[0]}"] += 1
        config = self.topology.config()
        self.log.append(f"ring: {change} (epoch {config.epoch})")
        await self.env.switch_to(config)
        # Before the rebalance marks anything, the new ring sends reads of merchants
        # that move to shards that have never seen them: every account is found.
        await self.all_readable("config switched, nothing moved")
        await self.rebalance(config, kill=self.rng.random() < REBALANCE_KILL_SHARE)

    async def all_readable(self, when: str) -> None:
        try:
            await all_balances(self.env.service, self.merchants)
        except AssertionError as error:
            raise AssertionError(f"{when}: {error}\n{self.describe()}") from None
        self.counts["reads while moving"] += 1

    async def rebalance(self, config: ShardConfig, *, kill: bool) -> bool:
        """Rebalances to config (first killed at a random point, if kill); True when
        finished (nothing deferred, every draining shard empty)."""
        if kill:
            point = self.rng.choice(REBALANCE_CRASH_POINTS)
            path = write_config(self.env.tmp_path / f"model-{config.epoch}.toml", config)
            code, output = await rebalance_cli(path, crash_point=point)
            self.log.append(f"  rebalance killed at {point}: exit {code}")
            if code == -signal.SIGKILL:
                self.kills += 1
            else:
                assert code in (0, 1), output
            await self.all_readable(f"rebalance killed at {point}")
        for _ in range(REBALANCE_RUNS_MAX):
            async with opened(config) as rebalancer:
                summary = await rebalancer.rebalance()
            self.log.append("  " + summary.render().replace("\n", "\n  "))
            self.counts["merchants moved"] += len(summary.moved)
            self.counts["moves deferred"] += sum(
                r.outcome.startswith("deferred") for r in summary.results
            )
            for result in summary.results:
                # A move waiting for holds names ones that are still open.
                named = WAITING_FOR_HOLDS.match(result.outcome)
                if named:
                    open_here = {*self.model.open_holds, *self.settling.values()}
                    for hold in named["holds"].split(", "):
                        hold_id = hold.split(" of ")[0]
                        assert hold_id in open_here, f"{result.outcome}\n{self.describe()}"
                    self.counts["moves waiting for a named hold"] += 1
            if summary.finished:
                return True
            if any(r.outcome.startswith("failed") for r in summary.results):
                raise AssertionError(f"a move failed:\n{self.describe()}")
        return False

    async def step(self) -> None:
        if self.interrupted and self.rng.random() < INTERRUPTED_DRIVE_SHARE:
            await self.drive_interrupted(
                self.interrupted.pop(self.rng.randrange(len(self.interrupted)))
            )
            return
        if self.rng.random() < RING_CHANGE_SHARE:
            await self.change_ring()
            return
        settleable = [h for h in self.model.open_holds.values() if not h.expires]
        if settleable and self.rng.random() < 0.5:
            await self.settle(self.rng.choice(settleable))
        elif self.posted and self.rng.random() < REVERSAL_SHARE:
            await self.reverse()
        else:
            await self.hold()

    async def finish(self) -> None:
        """Every open hold settles when asked; the ones left to expire do; a final
        rebalance finishes; the books are the model's and reconcile is clean."""
        self.counts["holds relayed twice by a shard"] = await self.relayed_twice_by_a_shard()
        for hold in [h for h in self.model.open_holds.values() if not h.expires]:
            await self.settle(hold)
        while self.interrupted:
            await self.drive_interrupted(self.interrupted.pop(0))
        for hold in [h for h in self.model.open_holds.values() if h.expires]:
            self.model.settle(hold.id, 0)
            self.counts["expired"] += 1
        await wait_for_balances(
            self.env.service,
            self.model.expected(),
            what=f"the model's balances once every hold settled or expired\n{self.describe()}",
        )
        config = self.topology.config()
        assert await self.rebalance(config, kill=False), (
            f"the final rebalance did not finish\n{self.describe()}"
        )
        assert await all_balances(self.env.service, self.merchants) == self.model.expected()

        # The balances are final once a saga's step 2 has run; its step 3 (an
        # expiry's, say, retried after a fence) may finish a moment later, and
        # reconcile skips the settlement pairs of shards with a saga in flight.
        async def no_saga_running() -> bool:
            running, unreachable = await self.runner.list([SagaState.RUNNING], limit=10)
            return not running and not unreachable

        await wait_until(no_saga_running, what=f"every saga to finish\n{self.describe()}")
        await assert_reconciled(self.env, config, "model-reconcile.toml", every_mirror_checked=True)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("full_stripes", [False, True], ids=["stripes", "full-stripes"])
@pytest.mark.parametrize("seed", _seeds())
async def test_random_moves_and_holds_keep_every_hold_settleable(
    ledger4: Ledger4, seed: int, full_stripes: bool
) -> None:
    """full_stripes: every settlement stripe between the first shards is filled
    first (both sides), so their sagas', holds' and moves' legs are booked on
    accounts of their own and every step after finds them there."""
    run = Run(ledger4, seed)
    if full_stripes:
        await fill_every_stripe(ledger4, run.topology.config(), f"fw{seed}")
    await create_merchants(ledger4.service, run.merchants)
    for _ in range(STEPS):
        await run.step()
    await run.finish()
    if full_stripes:
        own = await on_every_shard(
            ledger4, ENTRIES_ON_OWN_SETTLEMENT_ACCOUNTS, shards=run.topology.names
        )
        run.counts["entries on own settlement accounts"] = sum(own.values())
        assert own, "no leg went to an account of its own past the filled stripes"
    print(
        f"\nseed {seed}{' (full stripes)' if full_stripes else ''}: {STEPS} steps, "
        f"{run.kills} rebalances killed, "
        f"epoch {run.topology.epoch}, {dict(sorted(run.counts.items()))}"
    )

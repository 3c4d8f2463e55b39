"""The Ledger: domain operations routed to shards, with redirects and per-item results."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from opentelemetry.trace import Span

from ledger import limits
from ledger.core.batcher import TransferBatcher
from ledger.core.errors import (
    JournalSpansShards,
    LinkedChainSpansShards,
)
from ledger.domain.accounts import Account, AccountKey, AccountSpec, Balances
from ledger.domain.batch_order import (
    settles_of_batch_sagas,
    settles_with_later_dependents,
    waves,
)
from ledger.domain.engine import ItemOutcome
from ledger.domain.limits import AccountLimits, LimitsChange, LimitsChangeRequest
from ledger.domain.transfers import (
    Entry,
    JournalRequest,
    TransferKey,
    TransferRequest,
    TransferResult,
    linked_chains,
)
from ledger.routing.cluster import Cluster, FenceWait
from ledger.routing.errors import ClusterUnavailable
from ledger.sagas.runner import SagaRunner
from ledger.storage.errors import (
    HoldInFlight,
    MerchantsMoving,
    MerchantsNotOwned,
    MerchantsUnknown,
    RunsLocally,
    ShardUnavailable,
    StaleEpoch,
)
from ledger.storage.limits import LimitsSetOutcome, LimitsStore, MonitorCrossingRow
from ledger.storage.shard import (
    RUN_AS_SAGA,
    AccountCreateOutcome,
    Fence,
    JournalOutcome,
    Shard,
    TransferView,
)
from ledger.telemetry import metrics
from ledger.telemetry.tracing import start_as_current_span

log = logging.getLogger(__name__)
# Marks an item that the saga path handed back: it settles a local hold.
_RUN_LOCALLY = -3
Item = TypeVar("Item")
Key = TypeVar("Key", AccountKey, TransferKey)
Found = TypeVar("Found")
Result = TypeVar("Result")


@dataclass(frozen=True, slots=True)
class AccountCreateResult:
    created: bool
    differing_field: str | None
    shard_unavailable: bool = False


class Ledger:
    """What the API layer calls. Every method resolves shards at the moment of use."""

    def __init__(self, cluster: Cluster, sagas: SagaRunner) -> None:
        self.cluster = cluster
        self.sagas = sagas
        self.batcher = TransferBatcher()
        # Told the soonest timeout (seconds) of the holds a call made, after they are
        # written, so that the expiry sweeper (which sets it) wakes for them.
        self.on_hold_timeout: Callable[[float], None] | None = None

    # Accounts.

    async def create_accounts(self, specs: Sequence[AccountSpec]) -> list[AccountCreateResult]:
        async def run(
            shard: Shard, group: list[AccountSpec], fence: Fence
        ) -> list[AccountCreateResult]:
            outcomes: list[AccountCreateOutcome] = await shard.create_accounts(group, fence)
            return [AccountCreateResult(o.created, o.differing_field) for o in outcomes]

        return await self._route(
            specs,
            home_of=lambda s: s.key.merchant_id,
            merchants_of=lambda s: {s.key.merchant_id},
            run=run,
            unavailable=lambda s: AccountCreateResult(False, None, shard_unavailable=True),
        )

    async def lookup_accounts(self, keys: Sequence[AccountKey]) -> list[Account]:
        return await self._read_per_shard(
            keys, lambda k: k.merchant_id, lambda shard, group: shard.lookup_accounts(group)
        )

    async def list_accounts(self, merchant_id: str, *, after: str, limit: int) -> list[Account]:
        async def read(shard: Shard, fence: Fence) -> list[Account]:
            return await shard.list_accounts(merchant_id, after=after, limit=limit)

        return await self.cluster.run_on_owner(merchant_id, read, unknown=list)

    async def set_accounts_closed(self, keys: Sequence[AccountKey], *, closed: bool) -> list[bool]:
        async def run(shard: Shard, group: list[AccountKey], fence: Fence) -> list[bool | None]:
            changed = await shard.set_accounts_closed(group, closed=closed, fence=fence)
            return [k in changed for k in group]

        outcomes = await self._route(
            keys,
            home_of=lambda k: k.merchant_id,
            merchants_of=lambda k: {k.merchant_id},
            run=run,
            unavailable=lambda k: None,
        )
        if any(o is None for o in outcomes):
            raise ClusterUnavailable("a shard holding some of these accounts is unavailable")
        return [bool(o) for o in outcomes]

    # Transfers.

    async def create_transfers(
        self, requests: Sequence[TransferRequest], *, wait_s: float = 0.0
    ) -> list[ItemOutcome]:
        """Applies local items per shard in one transaction each, and runs every
        cross-shard item as a saga, waiting up to wait_s for the sagas to finish.

        Whether an item is local or a saga is settled where its data is: a shard
        hands back a settle whose pending transfer a saga carries (RUN_AS_SAGA), and
        a merchant found moved apart from its partner while routing makes an item a
        saga too; the saga path hands back a settle whose hold is local after all
        (SettleIsLocal), and a transfer whose parties turn out to share a shard
        (PartiesShareShard). Each item changes path at most once each way; a topology
        still changing after that gets SHARD_UNAVAILABLE (retryable, nothing
        written), never a stored result.

        A batch is applied in order: one that holds sagas runs in waves
        (ledger/domain/batch_order.py), each item after the earlier items it
        depends on, so that a saga has finished (or the call's deadline passed)
        before an item that shares an account with it, or settles it, runs."""
        cross = await self._cross_shard(requests)
        results: dict[int, ItemOutcome] = {}

        async def run(
            shard: Shard, group: list[TransferRequest], fence: Fence
        ) -> list[ItemOutcome]:
            return await self.batcher.submit(shard, group, fence)

        async def run_local(indexes: list[int]) -> None:
            local = [requests[i] for i in indexes]
            outcomes = await self._route(
                local,
                home_of=lambda r: r.debit.merchant_id,
                merchants_of=transfer_merchants,
                run=run,
                unavailable=lambda r: ItemOutcome(-1, r.id, TransferResult.SHARD_UNAVAILABLE),
                split=lambda r: ItemOutcome(RUN_AS_SAGA, r.id, TransferResult.IN_PROGRESS),
                whole=linked_chains(local),
            )
            results.update(zip(indexes, outcomes, strict=True))

        starts = asyncio.Semaphore(limits.saga_starts_per_request_max)

        def deadline_from_now() -> float:
            # Read only by calls that run sagas: on Python 3.11 every
            # get_running_loop() is a getpid() system call.
            return asyncio.get_running_loop().time() + wait_s

        async def run_saga(index: int, deadline: float) -> None:
            request = requests[index]
            try:
                # Only step 1 is bounded per call; the waits below overlap freely.
                async with starts:
                    start = await self.sagas.begin(request)
            except (ShardUnavailable, ClusterUnavailable) as error:
                log.warning("saga for %s not started: %s", request.id, error)
                results[index] = ItemOutcome(-1, request.id, TransferResult.SHARD_UNAVAILABLE)
                return
            except RunsLocally:
                results[index] = ItemOutcome(_RUN_LOCALLY, request.id, TransferResult.IN_PROGRESS)
                return
            except HoldInFlight:
                results[index] = _retry_later(request)
                return
            results[index] = await self.sagas.outcome_by(start, deadline=deadline)

        deadline: float | None = None

        async def run_wave(wave: list[int]) -> None:
            nonlocal deadline
            local = [i for i in wave if i not in cross]
            sagas = [i for i in wave if i in cross]
            if sagas:
                if deadline is None:
                    deadline = deadline_from_now()
                # A wave of only cross-shard transfers has no local route: its sagas get
                # one route span instead (a mixed wave has one from run_local).
                route = (
                    contextlib.nullcontext()
                    if local
                    else start_as_current_span(
                        "route", attributes={"ledger.items": len(wave), "ledger.sagas": len(sagas)}
                    )
                )
                with route:
                    await asyncio.gather(
                        *([run_local(local)] if local else []),
                        *(run_saga(i, deadline) for i in sagas),
                    )
            else:
                # The common call: no task to create for a lone coroutine.
                await run_local(local)
            handed_back = [i for i in local if results[i].index == RUN_AS_SAGA]
            if handed_back:
                if deadline is None:
                    deadline = deadline_from_now()
                chained = _chained(requests)
                for i in handed_back:
                    if i in chained:
                        # A chain may hold no saga: routed whole again, it is refused.
                        results[i] = _retry_later(requests[i])
                await asyncio.gather(
                    *(run_saga(i, deadline) for i in handed_back if i not in chained)
                )
            to_local = [i for i in wave if results[i].index == _RUN_LOCALLY]
            if to_local:
                await run_local(to_local)
                for i in to_local:
                    if results[i].index == RUN_AS_SAGA:
                        results[i] = _retry_later(requests[i])

        for wave in waves(requests, cross):
            await run_wave(wave)
        for result, count in Counter(o.result.name for o in results.values()).items():
            metrics.transfers.add(count, {"result": result})
        if self.on_hold_timeout is not None:
            timeouts_ms = [r.timeout_ms for r in requests if r.timeout_ms]
            if timeouts_ms:
                self.on_hold_timeout(min(timeouts_ms) / 1000)
        return [
            o
            if o.index == i
            else ItemOutcome(
                i, o.id, o.result, o.replayed, o.differing_field, o.created_at, o.refused_by_rule
            )
            for i, o in ((i, results[i]) for i in range(len(requests)))
        ]

    async def _cross_shard(self, requests: Sequence[TransferRequest]) -> set[int]:
        """Which items start as sagas: transfers whose accounts the ring places on
        different shards.

        A settle starts where its pending transfer lives, whatever its credit
        account: only that shard knows whether a saga carries the transfer, and hands
        the settle back if one does. In a linked chain, which must live on one shard
        and hold no saga, settles are looked up first, so that such a call is refused
        whole before anything is written; so are settles that a later item of the
        batch depends on, so that they run in their place in the batch's order. A
        settle of a hold that a saga earlier in the batch makes is a saga, unless
        the hold is recorded already (that saga resends its id and makes nothing).
        """
        ring = self.cluster.ring
        homes = [ring.shard_for(r.debit.merchant_id) for r in requests]
        cross = {
            i
            for i, r in enumerate(requests)
            if r.credit is not None
            and not r.settles_pending
            and ring.shard_for(r.credit.merchant_id) != homes[i]
        }
        # An open chain at the end counts too: it is refused whole, but on one shard.
        chains = linked_chains(requests)
        placed: set[int] = set()
        of_batch_sagas: set[int] = set()
        # Only a batch with a settle and something else has a settle to place.
        if len(requests) > 1 and any(r.settles_pending for r in requests):
            of_batch_sagas = settles_of_batch_sagas(requests, cross)
            shards = [
                frozenset((homes[i], ring.shard_for(r.credit.merchant_id)))
                if r.credit is not None
                else frozenset((homes[i],))
                for i, r in enumerate(requests)
            ]
            placed = settles_with_later_dependents(requests, shards)
        settles = sorted(
            {i for chain in chains for i in chain if requests[i].settles_pending}
            | placed
            | of_batch_sagas
        )
        if settles:
            keys = [
                TransferKey(requests[i].debit.merchant_id, requests[i].pending_id) for i in settles
            ]
            found = {v.record.key: v for v in await self.lookup_transfers(keys)}
            for i, key in zip(settles, keys, strict=True):
                view = found.get(key)
                # A hold already recorded is what it was: an earlier item of the batch
                # under its id (a resend) makes nothing. Else an earlier saga makes it.
                if (view.saga is not None) if view is not None else i in of_batch_sagas:
                    cross.add(i)
        for chain in chains:
            if len({homes[j] for j in chain}) > 1 or any(j in cross for j in chain):
                raise LinkedChainSpansShards(list(chain))
        return cross

    async def lookup_transfers(
        self, keys: Sequence[TransferKey], *, wait_s: float = 0.0
    ) -> list[TransferView]:
        """Looks transfers up; with wait_s, first waits for in-progress sagas to finish."""
        loop = asyncio.get_running_loop()
        end = loop.time() + wait_s
        delay_s = 0.01
        while True:
            views = await self._lookup_transfers(keys)
            running = any(v.record.result is TransferResult.IN_PROGRESS for v in views)
            if not running or loop.time() + delay_s > end:
                return views
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.25)

    async def transfers_by_trace(self, trace_id: str, *, limit: int) -> list[TransferView]:
        """Every transfer one trace recorded, across shards."""
        found = await asyncio.gather(
            *(s.transfers_by_trace(trace_id, limit=limit) for s in self.cluster.shards.values())
        )
        keys = [key for keys in found for key in keys][:limit]
        return await self._lookup_transfers(keys)

    async def _lookup_transfers(self, keys: Sequence[TransferKey]) -> list[TransferView]:
        return await self._read_per_shard(
            keys, lambda k: k.merchant_id, lambda shard, group: shard.lookup_transfers(group)
        )

    async def _read_per_shard(
        self,
        keys: Sequence[Key],
        merchant_of: Callable[[Key], str],
        read: Callable[[Shard, list[Key]], Awaitable[Mapping[Key, Found]]],
    ) -> list[Found]:
        """Reads keys from their owners' shards at once, following redirects; found
        values in key order, missing ones left out."""
        found: dict[Key, Found] = {}
        owners: dict[str, str] = {}
        down: dict[str, ShardUnavailable] = {}
        todo = list(keys)
        for _ in range(limits.redirect_attempts_max):
            groups = self._group(todo, merchant_of, owners)
            batches = {name: [todo[i] for i in idx] for name, idx in groups.items()}
            results = await asyncio.gather(
                *(read(self.cluster.shards[name], batch) for name, batch in batches.items()),
                return_exceptions=True,
            )
            retry: list[Key] = []
            for (name, batch), result in zip(batches.items(), results, strict=True):
                if isinstance(result, MerchantsNotOwned):
                    if self._learn_owners(result, owners):
                        await self.cluster.reload()
                    retry += batch
                elif isinstance(result, MerchantsUnknown):
                    for m in result.merchant_ids:
                        if m in down:
                            # Not on its old shard: it lives on the shard that is down.
                            raise down[m] from result
                    # Where the previous config placed them (the rebalance has not
                    # marked them here yet); where that is this shard or none,
                    # their keys are not found. The others are read here again.
                    self._follow_previous(result.merchant_ids, name, owners)
                    retry += [
                        k
                        for k in batch
                        if merchant_of(k) not in result.merchant_ids
                        or owners.get(merchant_of(k), name) != name
                    ]
                elif isinstance(result, ShardUnavailable):
                    merchants = {merchant_of(k) for k in batch}
                    if not self._follow_previous_if_down(merchants, result, owners, down):
                        raise result
                    retry += batch
                elif isinstance(result, BaseException):
                    raise result
                else:
                    found.update(result)
            if not retry:
                return [found[k] for k in keys if k in found]
            todo = retry
        raise ClusterUnavailable("routing did not settle: the merchant may be moving")

    async def post_journal(self, request: JournalRequest) -> JournalOutcome:
        ring = self.cluster.ring
        home = ring.shard_for(request.merchant_id)
        away = [
            i
            for i, p in enumerate(request.postings)
            if ring.shard_for(p.account.merchant_id) != home
        ]
        if away:
            raise JournalSpansShards(away)

        async def run(
            shard: Shard, group: list[JournalRequest], fence: Fence
        ) -> list[JournalOutcome | None]:
            return [await shard.post_journal(group[0], fence)]

        outcome = (
            await self._route(
                [request],
                home_of=lambda j: j.merchant_id,
                merchants_of=lambda j: (
                    {j.merchant_id} | {p.account.merchant_id for p in j.postings}
                ),
                run=run,
                unavailable=lambda j: None,
            )
        )[0]
        if outcome is None:
            raise ClusterUnavailable("the journal's shard is unavailable")
        return outcome

    # History.

    async def balance(
        self, key: AccountKey, *, as_of: datetime | None
    ) -> tuple[Account, Balances] | None:
        async def read(shard: Shard, fence: Fence) -> tuple[Account, Balances] | None:
            account = (await shard.lookup_accounts([key])).get(key)
            if account is None:
                return None
            if as_of is None:
                return account, account.balances
            return account, await shard.balance_as_of(key, as_of)

        return await self.cluster.run_on_owner(key.merchant_id, read, unknown=lambda: None)

    async def list_entries(
        self, key: AccountKey, *, after_sequence: int | None, newest_first: bool, limit: int
    ) -> list[Entry] | None:
        async def read(shard: Shard, fence: Fence) -> list[Entry] | None:
            if not await shard.lookup_accounts([key]):
                return None
            return await shard.list_entries(
                key, after_sequence=after_sequence, newest_first=newest_first, limit=limit
            )

        return await self.cluster.run_on_owner(key.merchant_id, read, unknown=lambda: None)

    # Limits (velocity rules, overdraft flags, balance monitors).

    async def set_account_limits(self, request: LimitsChangeRequest) -> LimitsSetOutcome | None:
        """None: no such account. LimitsRefused: the change cannot be made now."""

        async def write(shard: Shard, fence: Fence) -> LimitsSetOutcome | None:
            return await LimitsStore(shard).set_limits(request, fence)

        return await self.cluster.run_on_owner(request.account.merchant_id, write)

    async def account_limits(
        self, key: AccountKey, *, history_max: int
    ) -> tuple[AccountLimits, list[LimitsChange]] | None:
        async def read(
            shard: Shard, fence: Fence
        ) -> tuple[AccountLimits, list[LimitsChange]] | None:
            return await LimitsStore(shard).get_limits(key, history_max=history_max)

        return await self.cluster.run_on_owner(key.merchant_id, read, unknown=lambda: None)

    async def monitor_crossings(
        self, merchant_id: str, *, after_sequence: int, limit: int
    ) -> list[MonitorCrossingRow]:
        async def read(shard: Shard, fence: Fence) -> list[MonitorCrossingRow]:
            return await LimitsStore(shard).crossings(
                merchant_id, after_sequence=after_sequence, limit=limit
            )

        return await self.cluster.run_on_owner(merchant_id, read, unknown=list)

    # Routing.

    def _group(
        self,
        items: Sequence[Item],
        merchant_of: Callable[[Item], str],
        owners: Mapping[str, str] | None = None,
    ) -> dict[str, list[int]]:
        """Item positions per shard: the owner a shard named for the merchant, else the ring's."""
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            merchant_id = merchant_of(item)
            shard = (owners or {}).get(merchant_id) or self.cluster.ring.shard_for(merchant_id)
            groups.setdefault(shard, []).append(index)
        return groups

    def _learn_owners(self, error: MerchantsNotOwned, owners: dict[str, str]) -> bool:
        """Records the owners a refusing shard named; True if some were unknown (reload)."""
        unknown = False
        for merchant_id, owner in error.owners.items():
            if owner is not None and owner in self.cluster.shards:
                owners[merchant_id] = owner
            else:
                unknown = True
        return unknown

    def _follow_previous(
        self, merchant_ids: Iterable[str], refused_by: str, owners: dict[str, str]
    ) -> bool:
        """Routes merchants a shard does not know yet (a rebalance has not marked their
        move) to where the previous config put them; True if any was."""
        followed = False
        for merchant_id in merchant_ids:
            previous = self.cluster.previous_owner(merchant_id, refused_by=refused_by)
            if previous is not None and owners.get(merchant_id) != previous:
                owners[merchant_id] = previous
                followed = True
        return followed

    def _follow_previous_if_down(
        self,
        merchant_ids: set[str],
        error: ShardUnavailable,
        owners: dict[str, str],
        down: dict[str, ShardUnavailable],
    ) -> bool:
        """Routes merchants whose shard is down (error) to where the previous config
        put them, under a config change (they may not have moved yet:
        Cluster.previous_owner_if_down); True if it did. All of them to one shard or
        none, so that what went to the shard together (a linked chain) stays
        together; once per merchant, recorded in down: where the old shard does not
        have one, the shard down answers."""
        previous = {self.cluster.previous_owner_if_down(m, error.shard_name) for m in merchant_ids}
        if len(previous) != 1 or any(m in down for m in merchant_ids):
            return False
        (shard_name,) = previous
        if shard_name is None:
            return False
        for m in merchant_ids:
            down[m] = error
            owners[m] = shard_name
        return True

    async def _route(
        self,
        items: Sequence[Item],
        *,
        home_of: Callable[[Item], str],
        merchants_of: Callable[[Item], set[str]],
        run: Callable[[Shard, list[Item], Fence], Awaitable[list[Result]]],
        unavailable: Callable[[Item], Result],
        split: Callable[[Item], Result] | None = None,
        whole: Sequence[Sequence[int]] = (),
    ) -> list[Result]:
        """Sends each item to its home merchant's shard, all shards at once.

        whole: positions of items that go to one shard together or not at all
        (linked chains). The ring is read as the call starts; where a refusal teaches
        routing that such items' merchants are apart now (a config reloaded, an owner
        named), they get unavailable(item), nothing written: sent again, the call
        finds them apart from the start and is refused whole.

        A group refused for routing (stale epoch, merchant not owned) is sent
        again after a config reload, at most redirect_attempts_max times; a
        group whose shard is down gets unavailable(item) per item while the
        other shards' groups go through (unless a config change is under way and
        the previous config places the item's home merchant on another shard: it
        is sent there).
        """
        with start_as_current_span("route", attributes={"ledger.items": len(items)}) as span:
            return await self._route_attempts(
                items,
                home_of=home_of,
                merchants_of=merchants_of,
                run=run,
                unavailable=unavailable,
                split=split,
                whole=whole,
                span=span,
            )

    async def _route_attempts(
        self,
        items: Sequence[Item],
        *,
        home_of: Callable[[Item], str],
        merchants_of: Callable[[Item], set[str]],
        run: Callable[[Shard, list[Item], Fence], Awaitable[list[Result]]],
        unavailable: Callable[[Item], Result],
        split: Callable[[Item], Result] | None,
        whole: Sequence[Sequence[int]],
        span: Span,
    ) -> list[Result]:
        results: dict[int, Result] = {}
        todo = list(range(len(items)))
        owners: dict[str, str] = {}
        down: dict[str, ShardUnavailable] = {}
        redirects = 0
        fenced = FenceWait()
        for attempt in itertools.count(1):
            span.set_attribute("ledger.route.attempts", attempt)
            groups = self._group([items[i] for i in todo], home_of, owners)
            parted = _parted(whole, todo, groups) if whole and len(groups) > 1 else set()
            if parted:
                results.update({i: unavailable(items[i]) for i in parted})
                todo = [i for i in todo if i not in parted]
                if not todo:
                    return [results[i] for i in range(len(items))]
                groups = self._group([items[i] for i in todo], home_of, owners)
            span.set_attribute("ledger.route.shards", sorted(groups))
            jobs = []
            for name, positions in groups.items():
                shard = self.cluster.shards[name]
                indexes = [todo[p] for p in positions]
                group = [items[i] for i in indexes]
                merchants: set[str] = set().union(*(merchants_of(it) for it in group))
                jobs.append(
                    (shard, indexes, run(shard, group, self.cluster.fence(shard, merchants)))
                )
            outcomes = await _all_settled([job for _, _, job in jobs])
            retry: list[int] = []
            reload_needed = False
            redirected = False
            for (shard, indexes, _), outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, ShardUnavailable):
                    # The shard logs its change of state once; this would log every call.
                    log.debug("shard %s unavailable: %s", shard.name, outcome)
                    homes = {home_of(items[i]) for i in indexes}
                    if self._follow_previous_if_down(homes, outcome, owners, down):
                        redirected = True
                        retry += indexes
                    else:
                        results.update({i: unavailable(items[i]) for i in indexes})
                elif isinstance(outcome, StaleEpoch):
                    # Newer shard: this replica's config is behind, so reload. Older
                    # shard: a rebalance to this config is about to start; merchants
                    # not handed over yet are where the previous config put them.
                    if outcome.shard_epoch > self.cluster.epoch:
                        reload_needed = True
                    else:
                        homes = {home_of(items[i]) for i in indexes}
                        redirected |= self._follow_previous(homes, shard.name, owners)
                    retry += indexes
                elif isinstance(outcome, MerchantsNotOwned):
                    reload_needed |= self._learn_owners(outcome, owners)
                    redirected = True
                    retry += indexes
                elif isinstance(outcome, MerchantsMoving):
                    if any(m in down for m in outcome.unknown):
                        # Not on its old shard either: it lives on the shard that is
                        # down, which answers for the group (kept whole, as above).
                        results.update({i: unavailable(items[i]) for i in indexes})
                        continue
                    redirected |= self._follow_previous(outcome.unknown, shard.name, owners)
                    retry += indexes
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    results.update(zip(indexes, outcome, strict=True))
            if split is not None and owners:
                # A merchant moved away from its partner: the item spans shards now.
                for i in list(retry):
                    shards = {
                        owners.get(m) or self.cluster.ring.shard_for(m)
                        for m in merchants_of(items[i])
                    }
                    if len(shards) > 1:
                        results[i] = split(items[i])
                        retry.remove(i)
                for kept in whole:
                    # A member split off: the rest are not sent without it.
                    waiting = [i for i in kept if i in retry]
                    if waiting and len(waiting) < len(kept):
                        results.update({i: unavailable(items[i]) for i in waiting})
                        retry = [i for i in retry if i not in waiting]
            if not retry:
                return [results[i] for i in range(len(items))]
            if reload_needed or redirected:
                redirects += 1
                if redirects >= limits.redirect_attempts_max:
                    break
                if reload_needed:
                    await self.cluster.reload()
            elif not await fenced.wait():
                # Fenced merchants or a rebalance about to start, for too long.
                break
            todo = sorted(retry)
        raise ClusterUnavailable("routing did not settle: the shard config may be behind")


def _parted(
    whole: Sequence[Sequence[int]], todo: Sequence[int], groups: Mapping[str, list[int]]
) -> set[int]:
    """The items still to send (todo) of each kept-whole set that groups part."""
    shard_of = {todo[p]: name for name, positions in groups.items() for p in positions}
    return {
        i
        for kept in whole
        if len({shard_of[j] for j in kept if j in shard_of}) > 1
        for i in kept
        if i in shard_of
    }


async def _all_settled(jobs: list[Awaitable[Result]]) -> list[Result | BaseException]:
    """gather(..., return_exceptions=True), without a task when there is one job (a call
    whose items all live on one shard, the common case)."""
    if len(jobs) != 1:
        return await asyncio.gather(*jobs, return_exceptions=True)
    try:
        return [await jobs[0]]
    except Exception as error:
        return [error]


def transfer_merchants(request: TransferRequest) -> set[str]:
    """The merchants a transfer is routed and fenced by. A settle names its credit
    account only to check it: the shard fences the pending transfer's own parties."""
    if request.credit is None or request.settles_pending:
        return {request.debit.merchant_id}
    return {request.debit.merchant_id, request.credit.merchant_id}


def _chained(requests: Sequence[TransferRequest]) -> set[int]:
    return {i for chain in linked_chains(requests) for i in chain}


def _retry_later(request: TransferRequest) -> ItemOutcome:
    """The answer while a merchant's topology is still changing: retryable, unwritten."""
    return ItemOutcome(-1, request.id, TransferResult.SHARD_UNAVAILABLE)

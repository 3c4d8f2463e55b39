"""The live cluster: the current shard config, its ring, and an open Shard per name."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ledger import limits
from ledger.routing.config import ShardConfig, ShardSpec, load_config
from ledger.routing.errors import RoutingUnsettled
from ledger.routing.ring import ShardRing
from ledger.storage.errors import (
    MerchantsMoving,
    MerchantsNotOwned,
    MerchantsUnknown,
    ShardUnavailable,
    StaleEpoch,
)
from ledger.storage.moves import MoveStore
from ledger.storage.shard import Fence, Shard

log = logging.getLogger(__name__)
T = TypeVar("T")


class FenceWait:
    """Waits out a merchant's move fence in short, growing steps, within a bounded
    total (limits.fence_wait_*): a move pauses a merchant for tens of milliseconds."""

    __slots__ = ("step_s", "waited_s")

    def __init__(self) -> None:
        self.step_s = limits.fence_wait_step_s_min
        self.waited_s = 0.0

    async def wait(self) -> bool:
        """Sleeps one step; False, without sleeping, once the total is spent."""
        if self.waited_s >= limits.fence_wait_s_max:
            return False
        await asyncio.sleep(self.step_s)
        self.waited_s += self.step_s
        self.step_s = min(self.step_s * 1.5, limits.fence_wait_step_s_max)
        return True


class Cluster:
    """Owns the shard pools. Reloading swaps the ring and opens or closes pools by name."""

    def __init__(
        self,
        config: ShardConfig,
        *,
        config_path: Path | None = None,
        audit: bool = False,
        pool_connections_max: int = limits.pool_connections_max,
    ) -> None:
        self.config = config
        # Connections per shard pool (fewer in each of several service processes).
        self.pool_connections_max = pool_connections_max
        self.config_path = config_path
        # The audit tools (reconcile, verify) open retired shards too: their
        # history and settlement positions are part of the books.
        self.audit = audit
        self.ring = ShardRing(config)
        # The ring before the last reload: until a rebalance to the new config has
        # marked its moves, a merchant the new ring places elsewhere is still where
        # this ring put it (see previous_owner).
        self.previous_ring: ShardRing | None = None
        self.shards: dict[str, Shard] = {}
        self._rebalance_pending = False
        self._reload_lock = asyncio.Lock()
        # The last reason a config reload was refused (logged once per reason).
        self._refused_reload: str | None = None
        # Run after each reload that took a new config (on_reload).
        self._reloaded: list[Callable[[], None]] = []

    def on_reload(self, callback: Callable[[], None]) -> None:
        """Runs callback after every reload that takes a new config, once the new
        pools serve and before the old ones close (for what holds a shard's
        connections outside its pool)."""
        self._reloaded.append(callback)

    @property
    def epoch(self) -> int:
        return self.config.epoch

    @property
    def retired(self) -> frozenset[str]:
        """Shards the config keeps but no longer routes, not opened here: their event
        streams have ended (a cursor may still name them)."""
        return frozenset(
            s.name for s in self.config.shards if not s.routable and s.name not in self.shards
        )

    def _opened(self, config: ShardConfig) -> list[ShardSpec]:
        return [spec for spec in config.shards if spec.routable or self.audit]

    async def open(self, *, migrate: bool = True) -> None:
        for spec in self._opened(self.config):
            shard = Shard(
                name=spec.name, dsn=spec.dsn, pool_connections_max=self.pool_connections_max
            )
            await shard.open()
            self.shards[spec.name] = shard
        if migrate:
            await self.migrate()

    async def migrate(self) -> None:
        """Applies migrations everywhere; a new shard starts at this config's epoch.

        Only a rebalance raises a shard's epoch (with claims of new merchants
        paused while it decides who moves), so that no two shards can ever take
        on the same new merchant; a replica never does it on its own.
        """
        await self._migrate(list(self.shards.values()))

    async def migrate_unreached(self) -> None:
        """Sets up the shards that could not be reached to set up at start-up, once they
        answer: they serve nothing meanwhile (Shard.set_up; their merchants get
        UNAVAILABLE)."""
        unset = [shard for shard in self.shards.values() if not shard.set_up]
        if unset:
            await self._migrate(unset)

    async def _migrate(self, shards: list[Shard]) -> None:
        # One shard down must not keep a replica from serving the others.
        recorded: dict[str, int | None] = {}
        for shard in shards:
            try:
                recorded[shard.name] = await shard.recorded_epoch()
            except ShardUnavailable as error:
                log.warning("shard %s not set up yet: %s", shard.name, error)
                shard.set_up = False
        # Shards already at an older epoch: this config awaits a rebalance, so a
        # shard set up now is one being added and starts with claims paused.
        # (A shard set up later, after being down, goes by what the others showed.)
        self._rebalance_pending |= any(e is not None and e < self.epoch for e in recorded.values())
        rebalance_pending = self._rebalance_pending
        for shard in shards:
            if shard.name not in recorded:
                continue
            recorded_epoch = recorded[shard.name]
            try:
                applied = await shard.migrate(
                    epoch=self.epoch, claims_paused_if_new=rebalance_pending
                )
            except ShardUnavailable as error:
                log.warning("shard %s not set up yet: %s", shard.name, error)
                shard.set_up = False
                continue
            shard.set_up = True
            if applied:
                log.info("shard %s: applied %s", shard.name, ", ".join(applied))
            # A shard set up just now took this config's epoch.
            shard_epoch = self.epoch if recorded_epoch is None else recorded_epoch
            if shard_epoch > self.epoch:
                raise RuntimeError(
                    f"shard {shard.name} has seen epoch {shard_epoch}, newer than this "
                    f"config's {self.epoch}: the config file is stale"
                )
            if shard_epoch < self.epoch:
                log.warning(
                    "shard %s is at epoch %d, this config at %d: writes wait until "
                    "`ledger shards rebalance` brings the shards to the new epoch",
                    shard.name,
                    shard_epoch,
                    self.epoch,
                )

    async def _leave_refused(self, config: ShardConfig) -> str | None:
        """Why config may not stop routing a shard this replica serves, or None: a
        shard leaves routing (retired, or deleted) only once nothing pins it."""
        kept = {spec.name: spec for spec in config.shards}
        for name, shard in self.shards.items():
            spec = kept.get(name)
            if spec is not None and (spec.routable or self.audit):
                continue
            try:
                refused = await MoveStore(shard).leave_refused(deleted=spec is None)
            except ShardUnavailable:
                refused = f"shard {name} cannot be reached to check that nothing pins it"
            if refused is not None:
                return refused
        return None

    async def _open_changed(self, config: ShardConfig) -> dict[str, Shard]:
        """Pools for the shards config adds or points elsewhere, set up and not yet
        routed; closed again if one of them cannot be opened."""
        opened: dict[str, Shard] = {}
        try:
            for spec in self._opened(config):
                current = self.shards.get(spec.name)
                if current is not None and current.dsn == spec.dsn:
                    continue
                shard = Shard(
                    name=spec.name, dsn=spec.dsn, pool_connections_max=self.pool_connections_max
                )
                opened[spec.name] = shard
                await shard.open()
                if current is None:
                    # A shard added by this config change: set it up with claims
                    # paused until the rebalance decides which merchants move in.
                    await shard.migrate(epoch=config.epoch, claims_paused_if_new=True)
        except BaseException:
            await asyncio.gather(*(shard.close() for shard in opened.values()))
            raise
        return opened

    async def close(self) -> None:
        shards, self.shards = list(self.shards.values()), {}
        await asyncio.gather(*(s.close() for s in shards))

    def shard_for(self, merchant_id: str) -> Shard:
        return self.shards[self.ring.shard_for(merchant_id)]

    def previous_owner(self, merchant_id: str, *, refused_by: str) -> str | None:
        """Where the config before this one placed the merchant, if it is not the
        shard that just refused it as unknown to it (the merchant has not been
        handed over yet: the old owner still serves it, fenced as ever)."""
        if self.previous_ring is None:
            return None
        name = self.previous_ring.shard_for(merchant_id)
        return name if name != refused_by and name in self.shards else None

    def previous_owner_if_down(self, merchant_id: str, down: str) -> str | None:
        """Where the previous config placed the merchant, when the shard this config
        places it on (down) cannot be reached: the merchant may not have moved yet."""
        if down != self.ring.shard_for(merchant_id):
            return None
        return self.previous_owner(merchant_id, refused_by=down)

    def fence(self, shard: Shard, merchant_ids: set[str], *, allow_moving: bool = False) -> Fence:
        claimable = frozenset(m for m in merchant_ids if self.ring.shard_for(m) == shard.name)
        return Fence(epoch=self.epoch, claimable=claimable, allow_moving=allow_moving)

    def shard_named(self, name: str | None) -> Shard | None:
        return self.shards.get(name) if name is not None else None

    async def run_on_owner(
        self,
        merchant_id: str,
        step: Callable[[Shard, Fence], Awaitable[T]],
        *,
        shard_name: str | None = None,
        allow_moving: bool = False,
        unknown: Callable[[], T] | None = None,
    ) -> T:
        """Runs step on the shard that owns the merchant, following redirects.

        Starts at shard_name if given, else where the ring says. A shard that
        does not own the merchant names the owner when it knows it (the
        merchant moved there, or is still there while being copied here);
        otherwise the config is reloaded (at most redirect_attempts_max times). A
        fenced (moving) merchant is waited out (FenceWait).

        unknown: for a read, its answer when no shard knows the merchant. A shard
        that has no record of it (MerchantsUnknown: the config changed, and the
        rebalance has not marked it there yet) sends the read where the previous
        config placed the merchant, and where that is the same shard or none, the
        answer is unknown().
        """
        target = self.shard_named(shard_name) or self.shard_for(merchant_id)
        redirects = 0
        fenced = FenceWait()
        # Set once the merchant's shard was down and its previous owner is asked.
        down: ShardUnavailable | None = None
        while redirects < limits.redirect_attempts_max:
            fence = self.fence(target, {merchant_id}, allow_moving=allow_moving)
            try:
                return await step(target, fence)
            except ShardUnavailable as error:
                # Under a config change the merchant may not be on its new shard yet:
                # while that shard is down, its old owner may still serve it (fenced
                # as ever). Asked once: where it does not, the shard down answers.
                previous = self.previous_owner_if_down(merchant_id, target.name)
                if previous is None or down is not None:
                    raise
                down = error
                target = self.shards[previous]
                redirects += 1
            except StaleEpoch as error:
                if error.shard_epoch < self.epoch:
                    # A rebalance to this config is about to start: the merchant is
                    # still where the previous config put it, or wait for the rebalance.
                    previous = self.previous_owner(merchant_id, refused_by=target.name)
                    if previous is not None:
                        target = self.shards[previous]
                        redirects += 1
                    elif down is not None:
                        raise down from error
                    elif not await fenced.wait():
                        break
                else:
                    await self.reload()
                    target = self.shard_for(merchant_id)
                    redirects += 1
            except MerchantsNotOwned as error:
                hinted = self.shard_named(error.owners.get(merchant_id))
                if hinted is None:
                    await self.reload()
                    hinted = self.shard_named(error.owners.get(merchant_id))
                target = hinted or self.shard_for(merchant_id)
                redirects += 1
            except MerchantsUnknown as error:
                if down is not None:
                    # Not on its old shard: it lives on the one that is down.
                    raise down from error
                if unknown is None:
                    raise
                previous = self.previous_owner(merchant_id, refused_by=target.name)
                if previous is None:
                    return unknown()
                target = self.shards[previous]
                redirects += 1
            except MerchantsMoving as error:
                if down is not None and merchant_id in error.unknown:
                    raise down from error
                previous = (
                    self.previous_owner(merchant_id, refused_by=target.name)
                    if merchant_id in error.unknown
                    else None
                )
                if previous is not None:
                    target = self.shards[previous]
                    redirects += 1
                elif not await fenced.wait():
                    break
        # No merchant id in the message: it ends up in logs and saga rows.
        raise RoutingUnsettled("routing did not settle: the merchant may be moving")

    async def reload(self) -> bool:
        """Re-reads the config file; returns True if the epoch changed."""
        if self.config_path is None:
            return False
        async with self._reload_lock:
            config = load_config(self.config_path)
            if config.epoch == self.config.epoch:
                return False
            if config.epoch < self.config.epoch:
                log.warning("ignoring config %s: epoch went backwards", self.config_path)
                return False
            refused = await self._leave_refused(config)
            if refused is not None:
                if refused != self._refused_reload:
                    log.error("ignoring config %s: %s", self.config_path, refused)
                self._refused_reload = refused
                return False
            self._refused_reload = None
            opened = await self._open_changed(config)
            kept = {spec.name for spec in self._opened(config)}
            closing = [s for n, s in self.shards.items() if n not in kept or n in opened]
            # No await from here until the config is swapped: a reader sees the old
            # config with its pools or the new one with its pools, never a shard that
            # is neither served nor retired (AckEvents refused a cursor naming a shard
            # whose pool was closing: chaos seed 35).
            for shard in closing:
                del self.shards[shard.name]
            self.shards.update(opened)
            self.config = config
            self.previous_ring, self.ring = self.ring, ShardRing(config)
            for callback in self._reloaded:
                callback()
            await asyncio.gather(*(shard.close() for shard in closing))
            log.info("loaded shard config epoch %d from %s", config.epoch, self.config_path)
            return True

"""Four shard databases, a live config file and a service on the first three: the
cluster of the rebalance and move tests (the fixture `ledger4` is in conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ledger.routing.config import ShardConfig, ShardSpec
from ledger.routing.ring import ShardRing
from tests.support import Service, refusing_connections, uid, wait_until, write_config

ALL_SHARDS = ("shard-a", "shard-b", "shard-c", "shard-d")
FIRST_SHARDS = ALL_SHARDS[:3]


def merchant_on(config: ShardConfig, shard: str) -> str:
    """A fresh merchant id that the config's ring places on shard."""
    ring = ShardRing(config)
    return next(m for m in (uid("m") for _ in range(3000)) if ring.shard_for(m) == shard)


@dataclass
class Ledger4:
    """Four shard databases, a live config file and a service on its first config."""

    specs: dict[str, ShardSpec]
    config_path: Path
    tmp_path: Path
    service: Service

    def config(
        self,
        epoch: int,
        names: Sequence[str],
        *,
        weights: dict[str, int] | None = None,
        states: dict[str, str] | None = None,
    ) -> ShardConfig:
        weights, states = weights or {}, states or {}
        return ShardConfig(
            epoch=epoch,
            shards=tuple(
                ShardSpec(
                    name=n,
                    dsn=self.specs[n].dsn,
                    weight=weights.get(n, 1),
                    state=states.get(n, "active"),
                )
                for n in names
            ),
        )

    def copy_of(self, config: ShardConfig, name: str) -> Path:
        """The config written to a file of its own (the admin's copy of an old config)."""
        return write_config(self.tmp_path / name, config)

    async def switch_to(self, config: ShardConfig) -> None:
        """Writes config over the live file and waits until the service has loaded it."""
        write_config(self.config_path, config)

        async def loaded() -> bool:
            return self.service.cluster.epoch == config.epoch

        await wait_until(loaded, what=f"the service to load config epoch {config.epoch}")

    def refusing_connections(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Shard name refuses connections while its server runs (tests.support)."""
        admin_dsn = urlunsplit(urlsplit(self.specs[name].dsn)._replace(path="/postgres"))
        return refusing_connections(self.service, name, admin_dsn)

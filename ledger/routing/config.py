"""Shard configuration files (shard_config/*.toml)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(ValueError):
    """The shard config is malformed; the message names the file and field."""


# A shard's state in the config, as Citus drains a node:
# - active: takes merchants (it is on the ring) and serves them;
# - draining: takes no new merchants (off the ring) but stays fully routable for
#   what it still holds, while rebalances move it all away;
# - retired: holds nothing any more; not routed or opened by the service, kept
#   in the config for the audit tools (reconcile, verify, cleanup), since its
#   settlement positions mirror the other shards'.
# A shard becomes retired, or leaves the config, only once nothing pins it
# (ledger/moves/rebalance.py checks, and so does every replica on reload).
SHARD_STATES = ("active", "draining", "retired")


@dataclass(frozen=True, slots=True)
class ShardSpec:
    name: str
    dsn: str
    weight: int
    state: str = "active"

    @property
    def placing(self) -> bool:
        """On the ring: new and moving merchants may be placed here."""
        return self.state == "active"

    @property
    def routable(self) -> bool:
        """Served: its merchants are routed to it."""
        return self.state != "retired"


@dataclass(frozen=True, slots=True)
class ShardConfig:
    epoch: int
    shards: tuple[ShardSpec, ...]

    def shard(self, name: str) -> ShardSpec:
        for spec in self.shards:
            if spec.name == name:
                return spec
        raise KeyError(name)


def parse_config(text: str, *, source: str = "<config>") -> ShardConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from error
    epoch = data.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ConfigError(f"{source}: epoch must be an integer >= 1")
    raw_shards = data.get("shards")
    if not isinstance(raw_shards, list) or not raw_shards:
        raise ConfigError(f"{source}: at least one [[shards]] table is required")
    shards: list[ShardSpec] = []
    for index, raw in enumerate(raw_shards):
        where = f"{source}: shards[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a table")
        name, dsn, weight = raw.get("name"), raw.get("dsn"), raw.get("weight", 1)
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ConfigError(f"{where}.name must match {_NAME_PATTERN.pattern}")
        if not isinstance(dsn, str) or not dsn.startswith(("postgres://", "postgresql://")):
            raise ConfigError(f"{where}.dsn must be a postgresql:// URL")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
            raise ConfigError(f"{where}.weight must be an integer from 1 to 1000")
        state = raw.get("state", "active")
        if state not in SHARD_STATES:
            raise ConfigError(f"{where}.state must be one of {', '.join(SHARD_STATES)}")
        shards.append(ShardSpec(name=name, dsn=dsn, weight=weight, state=state))
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: shard names must be unique")
    if not any(s.placing for s in shards):
        raise ConfigError(f"{source}: at least one shard must be active")
    return ShardConfig(epoch=epoch, shards=tuple(shards))


def load_config(path: Path) -> ShardConfig:
    return parse_config(path.read_text(), source=str(path))


def render_config(config: ShardConfig) -> str:
    lines = [f"epoch = {config.epoch}", ""]
    for spec in config.shards:
        lines += [
            "[[shards]]",
            f'name = "{spec.name}"',
            f'dsn = "{spec.dsn}"',
            f"weight = {spec.weight}",
            *([f'state = "{spec.state}"'] if spec.state != "active" else []),
            "",
        ]
    return "\n".join(lines)

"""Where the admin and client commands find their cluster when no flag says.

The shard config: `--config`, else `LEDGER_CONFIG`, else the file the embedded
development cluster (`ledger serve` without a config) wrote under its data
directory (`LEDGER_DATA_DIR`, `./.ledger-data` by default). The service address:
`--address`, else `LEDGER_ADDRESS`, else the address `ledger serve` listens on by
default. Each command says on stderr which one it used, so that an admin never
acts on the wrong cluster without being told.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ledger.embedded.cluster import CONFIG_FILE_NAME
from ledger.settings import Settings

DEFAULT_ADDRESS = Settings.listen
CONFIG_ENV = "LEDGER_CONFIG"
ADDRESS_ENV = "LEDGER_ADDRESS"
DATA_DIR_ENV = "LEDGER_DATA_DIR"


class NoConfigFound(Exception):
    """No --config, no LEDGER_CONFIG, and no embedded cluster config in this folder."""


@dataclass(frozen=True)
class Resolved:
    value: str
    # Which source gave the value, as the user would name it.
    source: str

    def describe(self, what: str) -> str:
        return f"{what}: {self.value} (from {self.source})"


def resolve_config(option: Path | None, env: Mapping[str, str]) -> Resolved:
    """The shard config an admin command uses; raises NoConfigFound naming every source."""
    if option is not None:
        return Resolved(str(option), "--config")
    from_env = env.get(CONFIG_ENV)
    if from_env:
        return Resolved(from_env, CONFIG_ENV)
    data_dir = Path(env.get(DATA_DIR_ENV) or Settings.data_dir)
    embedded = (data_dir / CONFIG_FILE_NAME).absolute()
    if embedded.is_file():
        source = f"the embedded cluster's config in {DATA_DIR_ENV}"
        if not env.get(DATA_DIR_ENV):
            source = "the embedded cluster's config in the current folder"
        return Resolved(str(embedded), source)
    raise NoConfigFound(
        f"no shard config: pass --config FILE, set {CONFIG_ENV}, or run this next to "
        f"`ledger serve` (the embedded cluster writes {embedded}, not found from "
        f"{Path.cwd()})"
    )


def resolve_address(option: str | None, env: Mapping[str, str]) -> Resolved:
    """The host:port a client command calls."""
    if option:
        return Resolved(option, "--address")
    from_env = env.get(ADDRESS_ENV)
    if from_env:
        return Resolved(from_env, ADDRESS_ENV)
    return Resolved(DEFAULT_ADDRESS, "the default")

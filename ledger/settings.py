"""Service settings from the environment (LEDGER_*), with command-line overrides in the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ledger import limits


@dataclass(frozen=True)
class Settings:
    # host:port the gRPC server listens on.
    listen: str = "127.0.0.1:50051"
    # A shard config file; None means the embedded development cluster.
    config_path: Path | None = None
    # Where the embedded cluster keeps its PostgreSQL data.
    data_dir: Path = Path(".ledger-data")
    concurrent_rpcs_max: int = limits.concurrent_rpcs_max

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        config = env.get("LEDGER_CONFIG")
        return cls(
            listen=env.get("LEDGER_LISTEN", cls.listen),
            config_path=Path(config) if config else None,
            data_dir=Path(env.get("LEDGER_DATA_DIR", str(cls.data_dir))),
            concurrent_rpcs_max=int(
                env.get("LEDGER_CONCURRENT_RPCS_MAX", str(limits.concurrent_rpcs_max))
            ),
        )

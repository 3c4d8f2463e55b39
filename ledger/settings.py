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
    # Saga retries: attempts before the dead-letter list, and the back-off cap.
    saga_attempts_max: int = limits.saga_attempts_max
    saga_retry_delay_s_max: float = limits.saga_retry_delay_s_max
    # Where Prometheus scrapes /metrics ("off" to disable; port 0 picks one).
    metrics_listen: str = "127.0.0.1:9464"
    # How long a replica's claim on a saga lasts before another may resume it.
    saga_lease_s: float = limits.saga_lease_s

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
            saga_attempts_max=int(
                env.get("LEDGER_SAGA_ATTEMPTS_MAX", str(limits.saga_attempts_max))
            ),
            saga_retry_delay_s_max=float(
                env.get("LEDGER_SAGA_RETRY_DELAY_S_MAX", str(limits.saga_retry_delay_s_max))
            ),
            metrics_listen=env.get("LEDGER_METRICS_LISTEN", cls.metrics_listen),
            saga_lease_s=float(env.get("LEDGER_SAGA_LEASE_S", str(limits.saga_lease_s))),
        )

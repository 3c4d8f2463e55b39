"""The development default: one embedded PostgreSQL server holding three shard databases."""

from __future__ import annotations

from pathlib import Path

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.config import ShardConfig, ShardSpec, load_config, render_config

DEFAULT_SHARD_NAMES = ("shard-a", "shard-b", "shard-c")
CONFIG_FILE_NAME = "shard_config.toml"


class EmbeddedCluster:
    """Starts (or reuses) PostgreSQL under data_dir and writes a matching shard config.

    The config file is written once and kept, so an admin can edit it like any
    other; the server's port is remembered by EmbeddedPostgres across restarts.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        shard_names: tuple[str, ...] = DEFAULT_SHARD_NAMES,
        durable: bool = True,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.shard_names = shard_names
        self.postgres = EmbeddedPostgres(data_dir=self.data_dir / "postgres", durable=durable)

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_FILE_NAME

    def start(self) -> ShardConfig:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        for name in self.shard_names:
            self.postgres.create_database(_database(name))
        if not self.config_path.exists():
            config = ShardConfig(
                epoch=1,
                shards=tuple(
                    ShardSpec(name=n, dsn=self.postgres.dsn(_database(n)), weight=1)
                    for n in self.shard_names
                ),
            )
            self.config_path.write_text(
                "# Written by the embedded development cluster; edit like any shard config.\n"
                + render_config(config)
            )
        return load_config(self.config_path)

    def stop(self) -> None:
        self.postgres.stop(mode="fast")


def _database(shard_name: str) -> str:
    return "ledger_" + shard_name.replace("-", "_")

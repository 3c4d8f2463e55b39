"""Hash-chain checkpoints under chaos: keyed, exported, and the key rotated mid-run.

Every replica checkpoints each shard every second with a checkpoint key and
appends to one export directory they share. Half-way through the workload the
key is rotated the way the runbook says: replicas started from then on (after a
kill) get the new key with the old one retired, so for a while the two replicas
sign with different keys; after the run every replica still on the old key is
restarted with the new ones. At the end `ledger verify`'s checks, with the
rotated keys, must pass on every shard: every chain, every checkpoint's MAC and
key order, and the export against the databases (after moves and cleanup).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ledger.core.checkpoints import verify_against_export
from ledger.domain.checkpoint_keys import CheckpointKeys
from ledger.routing.cluster import Cluster
from ledger.routing.config import load_config
from ledger.storage.chain import ChainStore
from ledger.storage.checkpoint_export import CheckpointExport

if TYPE_CHECKING:
    # Only for its type: the checker imports the clients, which import the cluster,
    # which imports this module.
    from chaos.checker import CheckReport

KEY_BEFORE = "chaos-checkpoint-key-before-rotation"
KEY_AFTER = "chaos-checkpoint-key-after-rotation"
ROTATED = CheckpointKeys(KEY_AFTER.encode(), (KEY_BEFORE.encode(),))
# Often enough that checkpoints race moves, kills and each other.
CHECKPOINT_INTERVAL_S = 1.0
# The key is rotated this far into the workload.
ROTATION_AT_FRACTION = 0.5


class CheckpointKeyring:
    """The checkpoint settings replicas start with; rotate() changes them for later starts."""

    def __init__(self, export_dir: Path) -> None:
        self.export_dir = export_dir
        self.rotated = False
        self.env: dict[str, str] = {}
        self._write()

    def rotate(self) -> None:
        self.rotated = True
        self._write()

    def _write(self) -> None:
        self.env.clear()
        self.env.update(
            {
                "LEDGER_CHECKPOINT_EXPORT_DIR": str(self.export_dir),
                "LEDGER_CHECKPOINT_INTERVAL_S": str(CHECKPOINT_INTERVAL_S),
                "LEDGER_CHECKPOINT_KEY": KEY_AFTER if self.rotated else KEY_BEFORE,
            }
        )
        if self.rotated:
            self.env["LEDGER_CHECKPOINT_KEYS_RETIRED"] = KEY_BEFORE


async def check_checkpoints(
    direct_config_path: Path, export_dir: Path, report: CheckReport
) -> dict[str, dict[str, int]]:
    """`ledger verify --against` with the rotated keys, as violations; returns, per
    shard, how many checkpoints each key signed (in the database)."""
    cluster = Cluster(load_config(direct_config_path), config_path=direct_config_path, audit=True)
    await cluster.open(migrate=False)
    signed: dict[str, dict[str, int]] = {}
    try:
        for name, shard in cluster.shards.items():
            chains = await ChainStore(shard).verify(keys=ROTATED)
            for violation in chains.violations:
                report.add("checkpoints", name, violation.render())
            recorded = await ChainStore(shard).recorded_checkpoints()
            by_key: Counter[str] = Counter()
            for c in recorded.values():
                rank = ROTATED.rank(
                    c.mac, shard=name, checkpoint_id=c.checkpoint_id, digest=c.digest
                )
                by_key["none" if rank is None else ("after" if rank == 0 else "before")] += 1
            signed[name] = dict(by_key)
        for check in await verify_against_export(
            cluster, CheckpointExport(export_dir), keys=ROTATED
        ):
            for violation in check.violations:
                report.add("checkpoints", f"{check.shard} export", violation.render())
            signed.setdefault(check.shard, {})["exported_through"] = check.exported_through
    finally:
        await cluster.close()
    report.notes.append(
        "checkpoints (signed before / after the key rotation, exported through): "
        + ", ".join(
            f"{name} {s.get('before', 0)} / {s.get('after', 0)}, {s.get('exported_through', 0)}"
            for name, s in sorted(signed.items())
        )
    )
    return signed

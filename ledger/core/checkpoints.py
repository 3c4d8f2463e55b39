"""Hash-chain checkpoints: made on every shard in the background, authenticated with
the service's checkpoint key and exported outside the databases as they are made;
and the check of the databases against that export."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from ledger import limits
from ledger.domain.chain import checkpoint_digest
from ledger.domain.checkpoint_keys import CheckpointKeys, KeyOrder
from ledger.routing.cluster import Cluster
from ledger.storage.chain import ChainStore, ChainViolation, Checkpoint, Head
from ledger.storage.checkpoint_export import CheckpointExport, ExportError
from ledger.storage.errors import ShardBusy, ShardUnavailable
from ledger.telemetry import metrics

log = logging.getLogger(__name__)


class ChainCheckpointer:
    """One task per service replica; shards let one checkpointer in at a time."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        interval_s: float,
        keys: CheckpointKeys | None = None,
        export: CheckpointExport | None = None,
    ) -> None:
        self.cluster = cluster
        self.interval_s = interval_s
        self.keys = keys
        self.export = export
        for name in cluster.shards:
            for kind in metrics.CHECKPOINT_PROBLEM_KINDS:
                metrics.checkpoint_problems.exported_at_zero({"shard": name, "kind": kind})
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chain-checkpointer")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def checkpoint_once(self) -> dict[str, Checkpoint]:
        made: dict[str, Checkpoint] = {}
        for name, shard in list(self.cluster.shards.items()):
            store = ChainStore(shard)
            try:
                done = await store.checkpoint_round(
                    heads_max=limits.chain_checkpoint_heads_max, keys=self.keys
                )
                if done.unsealable:
                    metrics.checkpoint_problems.add(
                        len(done.unsealable), {"shard": name, "kind": "chain_unsealable"}
                    )
                for merchant_id, account_id in done.unsealable:
                    log.error(
                        "chain of %s/%s on %s does not link up to its sealed head; "
                        "not sealed (run `ledger verify`)",
                        merchant_id,
                        account_id,
                        name,
                    )
                if done.unknown_key_at is not None:
                    metrics.checkpoint_problems.add(1, {"shard": name, "kind": "unknown_key"})
                    log.warning(
                        "chain checkpoint skipped on %s: checkpoint %d is signed by none of "
                        "this replica's checkpoint keys (a newer key: give this replica the "
                        "rotated keys; else forged: run `ledger verify`)",
                        name,
                        done.unknown_key_at,
                    )
                    continue
                if self.export is not None:
                    await self._export(name, store, done.checkpoint)
            except (ShardUnavailable, ShardBusy) as error:
                log.warning("chain checkpoint skipped: %s", error)
                continue
            checkpoint = done.checkpoint
            if checkpoint is not None:
                made[name] = checkpoint
                log.info(
                    "chain checkpoint %d on %s: %d heads, digest %s",
                    checkpoint.checkpoint_id,
                    name,
                    checkpoint.heads,
                    checkpoint.digest.hex(),
                )
        return made

    async def _export(self, name: str, store: ChainStore, made: Checkpoint | None) -> None:
        """Appends what the export lacks: earlier checkpoints (another replica's, or
        one made before a crash), then the one just made."""
        export = self.export
        assert export is not None
        last = await asyncio.to_thread(export.last_exported, name)
        last_id = last.checkpoint_id if last is not None else 0
        upto = made.checkpoint_id if made is not None else None
        pending: list[Checkpoint] = []
        if upto is None or upto > last_id + 1:
            behind = await store.checkpoints_after(
                last_id, count_max=limits.checkpoint_export_catch_up_max
            )
            pending = [c for c in behind if upto is None or c.checkpoint_id < upto]
        next_id = (pending[-1].checkpoint_id if pending else last_id) + 1
        if made is not None and made.checkpoint_id == next_id:
            pending.append(made)
        order = _export_order(self.keys, name, last)
        trusted: list[Checkpoint] = []
        for checkpoint in pending:
            # A checkpoint read back from the database is exported only if the keys
            # vouch for it: an insider's forged row must not become the anchor.
            problem = (
                order.check(checkpoint.checkpoint_id, checkpoint.mac, checkpoint.digest)
                if order is not None
                else None
            )
            if problem is not None:
                metrics.checkpoint_problems.add(1, {"shard": name, "kind": "export_refused"})
                log.error(
                    "checkpoint not exported from %s: %s (run `ledger verify`)", name, problem
                )
                break
            trusted.append(checkpoint)
        await asyncio.to_thread(export.append, name, trusted)

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            if self._stop.is_set():
                return
            try:
                await self.checkpoint_once()
            except Exception:
                log.exception("chain checkpoint failed")


def _export_order(
    keys: CheckpointKeys | None, shard: str, last: Checkpoint | None
) -> KeyOrder | None:
    """The key order an export goes on with: after its last line's key."""
    if keys is None:
        return None
    if last is None:
        return KeyOrder(keys, shard)
    rank = keys.rank(last.mac, shard=shard, checkpoint_id=last.checkpoint_id, digest=last.digest)
    return KeyOrder(keys, shard, newest_rank=rank, newest_at=last.checkpoint_id)


@dataclass
class ExportCheck:
    """One shard's history held against its exported checkpoints."""

    shard: str
    violations: list[ChainViolation] = field(default_factory=list)
    exported_through: int = 0
    # Checkpoints in the database after the last exported one (not yet anchored).
    unexported: int = 0

    def note(self, problem: str) -> None:
        self.violations.append(ChainViolation("", "", 0, problem))


async def verify_against_export(
    cluster: Cluster, export: CheckpointExport, *, keys: CheckpointKeys | None
) -> list[ExportCheck]:
    """Fails on any exported checkpoint the databases no longer match, entry by entry.

    Heads are checked on the shard that owns their merchant now, so history that
    moved with a merchant stays anchored.
    """
    checks: list[ExportCheck] = []
    heads_by_merchant: dict[str, list[tuple[str, int, Head]]] = defaultdict(list)
    for name, shard in cluster.shards.items():
        check = ExportCheck(name)
        checks.append(check)
        try:
            records = await asyncio.to_thread(export.read, name)
        except ExportError as error:
            check.note(f"export unreadable: {error}")
            continue
        recorded = await ChainStore(shard).recorded_checkpoints()
        seen: dict[int, Checkpoint] = {}
        # Which key signed each exported checkpoint: their order is checked by id, as
        # replicas sharing the export may append a line after a newer one.
        ranks: dict[int, int] = {}
        for record in records:
            c, line = record.checkpoint, record.line
            where = f"export line {line} (checkpoint {c.checkpoint_id})"
            if checkpoint_digest(c.previous_digest, c.head_list) != c.digest:
                check.note(f"{where} does not add up: the export itself was altered")
                continue
            if keys is not None:
                rank = keys.rank(c.mac, shard=name, checkpoint_id=c.checkpoint_id, digest=c.digest)
                if rank is None:
                    check.note(f"{where}: {keys.unmatched(c.checkpoint_id, c.mac)}")
                    continue
                ranks[c.checkpoint_id] = rank
            earlier = seen.get(c.checkpoint_id)
            if earlier is not None:
                if earlier.digest != c.digest:
                    check.note(f"{where} contradicts an earlier line for the same checkpoint")
                continue
            before = seen.get(c.checkpoint_id - 1)
            if before is not None and before.digest != c.previous_digest:
                check.note(f"{where} does not chain to checkpoint {c.checkpoint_id - 1}")
            seen[c.checkpoint_id] = c
            stored = recorded.get(c.checkpoint_id)
            if stored is None:
                check.note(
                    f"checkpoint {c.checkpoint_id} was exported but is missing from the database"
                )
            elif stored.digest != c.digest:
                check.note(
                    f"checkpoint {c.checkpoint_id} in the database differs from the exported "
                    "one (history before it was rewritten)"
                )
            for head in c.head_list:
                heads_by_merchant[head[0]].append((name, c.checkpoint_id, head))
        if keys is not None:
            order = KeyOrder(keys, name)
            for checkpoint_id in sorted(ranks):
                problem = order.follow(checkpoint_id, ranks[checkpoint_id])
                if problem is not None:
                    check.note(f"exported {problem}")
        check.exported_through = max(seen, default=0)
        check.unexported = sum(1 for i in recorded if i > check.exported_through)
        if not seen and recorded:
            check.note(f"none of the {len(recorded)} checkpoint(s) in the database was exported")
    await _check_heads(cluster, checks, heads_by_merchant)
    return checks


async def _check_heads(
    cluster: Cluster,
    checks: list[ExportCheck],
    heads_by_merchant: dict[str, list[tuple[str, int, Head]]],
) -> None:
    """Each exported head against its entry: on the exporting shard when it still owns
    the merchant (settlement accounts live on every shard), else where the merchant is now."""
    by_shard = {c.shard: c for c in checks}
    exported_by: dict[str, dict[str, list[tuple[int, Head]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for merchant_id, items in heads_by_merchant.items():
        for exporter, checkpoint_id, head in items:
            exported_by[exporter][merchant_id].append((checkpoint_id, head))
    for exporter, merchants in exported_by.items():
        unplaced = set(merchants)
        order = [exporter, *(n for n in cluster.shards if n != exporter)]
        for name in order:
            if not unplaced:
                break
            store = ChainStore(cluster.shards[name])
            owned = await store.owned_of(sorted(unplaced))
            unplaced -= owned
            heads = [item for m in sorted(owned) for item in merchants[m]]
            await _check_on(store, name, exporter, heads, by_shard[exporter])
        for merchant_id in sorted(unplaced):
            checkpoint_id = merchants[merchant_id][0][0]
            by_shard[exporter].note(
                f"merchant {merchant_id} (exported in checkpoint {checkpoint_id}) "
                "is owned by no shard"
            )


async def _check_on(
    store: ChainStore,
    name: str,
    exporter: str,
    heads: list[tuple[int, Head]],
    check: ExportCheck,
) -> None:
    step = limits.checkpoint_export_heads_per_query_max
    for start in range(0, len(heads), step):
        chunk = heads[start : start + step]
        origin = {(h[0], h[1], h[2]): cid for cid, h in chunk}
        for merchant_id, account_id, sequence, missing in await store.heads_differing(
            [h for _, h in chunk]
        ):
            what = "is missing" if missing else "differs from the one"
            check.violations.append(
                ChainViolation(
                    merchant_id,
                    account_id,
                    sequence,
                    f"entry {what} exported in checkpoint "
                    f"{origin[(merchant_id, account_id, sequence)]} of {exporter}"
                    + (f" (now on {name})" if name != exporter else ""),
                )
            )

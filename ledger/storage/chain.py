"""Checkpoints and verification of the entries' hash chains on one shard."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ledger import limits
from ledger.domain.chain import GENESIS_HASH, checkpoint_digest
from ledger.storage import chain_statements as sql
from ledger.storage.shard import Shard

if TYPE_CHECKING:
    from ledger.storage.shard import Connection


@dataclass(frozen=True, slots=True)
class Checkpoint:
    checkpoint_id: int
    heads: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class ChainViolation:
    """One place where the stored history is not what was written."""

    merchant_id: str
    account_id: str
    sequence: int
    problem: str

    def render(self) -> str:
        return f"{self.merchant_id}/{self.account_id} entry {self.sequence}: {self.problem}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    violations: list[ChainViolation]
    # The newest checkpoint: publish its digest elsewhere to anchor the history before it.
    last_checkpoint: Checkpoint | None


class ChainStore:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    async def checkpoint(
        self, *, heads_max: int = limits.chain_checkpoint_heads_max
    ) -> Checkpoint | None:
        """Records the heads that grew since the last checkpoint; None if nothing grew
        or another replica is checkpointing this shard right now."""

        async def run(conn: Connection) -> Checkpoint | None:
            if not await conn.fetchval(sql.TRY_CHECKPOINT_LOCK):
                return None
            heads = await conn.fetch(sql.CHANGED_HEADS, heads_max)
            if not heads:
                return None
            last = await conn.fetchrow(sql.LAST_CHECKPOINT)
            checkpoint_id = last["checkpoint_id"] + 1 if last else 1
            rows = [
                (h["merchant_id"], h["account_id"], h["sequence"], h["entry_hash"]) for h in heads
            ]
            digest = checkpoint_digest(last["digest"] if last else GENESIS_HASH, rows)
            await conn.execute(sql.INSERT_CHECKPOINT, checkpoint_id, len(rows), digest)
            await conn.execute(
                sql.INSERT_CHECKPOINT_HEADS,
                checkpoint_id,
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
            )
            return Checkpoint(checkpoint_id, len(rows), digest)

        return await self.shard._in_transaction(run)

    async def verify(self, *, violations_max: int = limits.chain_violations_max) -> ChainReport:
        """Every chain link, every head and every checkpoint, in one snapshot."""
        async with self.shard._acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await self._verify(conn, violations_max)

    async def _verify(self, conn: Connection, violations_max: int) -> ChainReport:
        found: list[ChainViolation] = []
        for r in await conn.fetch(sql.BROKEN_LINKS, violations_max, GENESIS_HASH):
            problem = (
                f"entry {r['sequence'] - 1} before it is missing (deleted)"
                if r["previous_missing"]
                else "hash does not match its fields and the previous entry "
                "(this entry, or the one before it, was changed)"
            )
            found.append(ChainViolation(r["merchant_id"], r["account_id"], r["sequence"], problem))
        for r in await conn.fetch(sql.HEAD_MISMATCHES, violations_max, GENESIS_HASH):
            found.append(
                ChainViolation(
                    r["merchant_id"],
                    r["account_id"],
                    r["last_sequence"],
                    f"the account's head (entry {r['entry_count']}) is not its last entry "
                    "(entries deleted or added at the end)",
                )
            )
        for r in await conn.fetch(sql.CHECKPOINT_MISMATCHES, violations_max):
            what = "is missing" if r["missing"] else "differs from"
            found.append(
                ChainViolation(
                    r["merchant_id"],
                    r["account_id"],
                    r["sequence"],
                    f"entry {what} the one checkpoint {r['checkpoint_id']} recorded "
                    "(history before it was rewritten)",
                )
            )
        heads_of: dict[int, list[tuple[str, str, int, bytes]]] = defaultdict(list)
        for h in await conn.fetch(sql.CHECKPOINT_HEADS):
            heads_of[h["checkpoint_id"]].append(
                (h["merchant_id"], h["account_id"], h["sequence"], h["entry_hash"])
            )
        previous = GENESIS_HASH
        last: Checkpoint | None = None
        for c in await conn.fetch(sql.CHECKPOINTS):
            heads = heads_of[c["checkpoint_id"]]
            digest = checkpoint_digest(previous, heads)
            if digest != c["digest"] or len(heads) != c["heads"]:
                found.append(
                    ChainViolation(
                        "", "", 0, f"checkpoint {c['checkpoint_id']} was altered (digest mismatch)"
                    )
                )
            previous = c["digest"]
            last = Checkpoint(c["checkpoint_id"], c["heads"], c["digest"])
        return ChainReport(found[:violations_max], last)

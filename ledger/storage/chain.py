"""Checkpoints and verification of the entries' hash chains on one shard."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from ledger import limits
from ledger.domain.chain import GENESIS_HASH, checkpoint_digest
from ledger.domain.checkpoint_keys import CheckpointKeys, KeyOrder
from ledger.storage import chain_statements as sql
from ledger.storage.shard import Shard

if TYPE_CHECKING:
    from ledger.storage.shard import Connection


Head = tuple[str, str, int, bytes]  # merchant id, account id, sequence, entry hash


@dataclass(frozen=True, slots=True)
class Checkpoint:
    checkpoint_id: int
    heads: int
    digest: bytes
    # Everything below is what an export needs to stand on its own; a checkpoint
    # is identified by the three fields above.
    created_at: datetime | None = field(default=None, compare=False)
    previous_digest: bytes = field(default=GENESIS_HASH, compare=False)
    head_list: tuple[Head, ...] = field(default=(), compare=False)
    # HMAC-SHA256 keyed with the service's checkpoint key; None without a key.
    mac: bytes | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ChainViolation:
    """One place where the stored history is not what was written."""

    merchant_id: str
    account_id: str
    sequence: int
    problem: str

    def render(self) -> str:
        if not self.merchant_id:
            return self.problem
        return f"{self.merchant_id}/{self.account_id} entry {self.sequence}: {self.problem}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    violations: list[ChainViolation]
    # The newest checkpoint: publish its digest elsewhere to anchor the history before it.
    last_checkpoint: Checkpoint | None


@dataclass(frozen=True, slots=True)
class CheckpointRound:
    """What one checkpoint attempt did: the checkpoint (if any) and the chains it refused."""

    checkpoint: Checkpoint | None
    unsealable: list[tuple[str, str]]
    # The last checkpoint's MAC matches none of the keys held: a newer key signed it
    # (a rotation not yet rolled out to this replica) or it is forged. No checkpoint
    # is made on top of it, so the keys along the chain never go back to an older one.
    unknown_key_at: int | None = None


@contextlib.asynccontextmanager
async def verification_snapshot(conn: Connection) -> AsyncIterator[None]:
    """The read-only snapshot verification reads in, planned for whole tables."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(sql.VERIFY_SCANS_WHOLE_TABLES)
        yield


class ChainStore:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    async def checkpoint(
        self,
        *,
        heads_max: int = limits.chain_checkpoint_heads_max,
        keys: CheckpointKeys | None = None,
    ) -> Checkpoint | None:
        """Seals the heads that grew since the last checkpoint; None if nothing grew
        or another replica is checkpointing this shard right now."""
        return (await self.checkpoint_round(heads_max=heads_max, keys=keys)).checkpoint

    async def checkpoint_round(
        self,
        *,
        heads_max: int = limits.chain_checkpoint_heads_max,
        keys: CheckpointKeys | None = None,
    ) -> CheckpointRound:
        """As checkpoint(), and names the chains it refused to seal.

        Heads come from the entries, and every entry since an account's sealed
        head is recomputed from it: a chain that does not link up (an entry
        edited, dropped or forged without its predecessor's hash) is left out and
        reported, never sealed as genuine.
        """

        async def run(conn: Connection) -> CheckpointRound:
            if not await conn.fetchval(sql.TRY_CHECKPOINT_LOCK):
                return CheckpointRound(None, [])
            grown = await conn.fetch(sql.CHANGED_HEADS, heads_max, GENESIS_HASH)
            if not grown:
                return CheckpointRound(None, [])
            broken = {
                (r["merchant_id"], r["account_id"])
                for r in await conn.fetch(
                    sql.UNSEALABLE,
                    [h["merchant_id"] for h in grown],
                    [h["account_id"] for h in grown],
                    [h["sealed_sequence"] for h in grown],
                    [h["sealed_hash"] for h in grown],
                    [h["sequence"] for h in grown],
                )
            }
            rows: list[Head] = [
                (h["merchant_id"], h["account_id"], h["sequence"], h["entry_hash"])
                for h in grown
                if (h["merchant_id"], h["account_id"]) not in broken
            ]
            unsealable = sorted(broken)
            if not rows:
                return CheckpointRound(None, unsealable)
            last = await conn.fetchrow(sql.LAST_CHECKPOINT)
            if (
                keys is not None
                and last is not None
                and last["mac"] is not None
                and keys.rank(
                    last["mac"],
                    shard=self.shard.name,
                    checkpoint_id=last["checkpoint_id"],
                    digest=last["digest"],
                )
                is None
            ):
                return CheckpointRound(None, unsealable, unknown_key_at=last["checkpoint_id"])
            checkpoint_id = last["checkpoint_id"] + 1 if last else 1
            previous = last["digest"] if last else GENESIS_HASH
            digest = checkpoint_digest(previous, rows)
            mac = (
                None
                if keys is None
                else keys.sign(shard=self.shard.name, checkpoint_id=checkpoint_id, digest=digest)
            )
            created_at = await conn.fetchval(
                sql.INSERT_CHECKPOINT, checkpoint_id, len(rows), digest, mac
            )
            await conn.execute(
                sql.INSERT_CHECKPOINT_HEADS,
                checkpoint_id,
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
            )
            made = Checkpoint(
                checkpoint_id, len(rows), digest, created_at, previous, tuple(rows), mac
            )
            return CheckpointRound(made, unsealable)

        return await self.shard._in_transaction(run)

    async def checkpoints_after(self, checkpoint_id: int, *, count_max: int) -> list[Checkpoint]:
        """The recorded checkpoints after checkpoint_id, oldest first, with their heads."""
        async with self.shard._acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                found = await conn.fetch(sql.CHECKPOINTS_AFTER, checkpoint_id, count_max)
                if not found:
                    return []
                heads_of: dict[int, list[Head]] = defaultdict(list)
                for h in await conn.fetch(
                    sql.HEADS_OF_CHECKPOINTS, [c["checkpoint_id"] for c in found]
                ):
                    heads_of[h["checkpoint_id"]].append(
                        (h["merchant_id"], h["account_id"], h["sequence"], h["entry_hash"])
                    )
                previous = await conn.fetchval(sql.CHECKPOINT_DIGEST, checkpoint_id)
        made: list[Checkpoint] = []
        previous_digest = previous if previous is not None else GENESIS_HASH
        for c in found:
            heads = tuple(heads_of[c["checkpoint_id"]])
            made.append(
                Checkpoint(
                    c["checkpoint_id"],
                    c["heads"],
                    c["digest"],
                    c["created_at"],
                    previous_digest,
                    heads,
                    c["mac"],
                )
            )
            previous_digest = c["digest"]
        return made

    async def owned_of(self, merchant_ids: list[str]) -> set[str]:
        async with self.shard._acquire() as conn:
            rows = await conn.fetch(sql.OWNED_OF, merchant_ids)
        return {r["merchant_id"] for r in rows}

    async def heads_differing(
        self, heads: list[Head], *, violations_max: int = limits.chain_violations_max
    ) -> list[tuple[str, str, int, bool]]:
        """Of heads exported elsewhere, those whose entry here is missing (True) or differs."""
        async with self.shard._acquire() as conn:
            rows = await conn.fetch(
                sql.EXPORTED_HEADS_DIFFERING,
                [h[0] for h in heads],
                [h[1] for h in heads],
                [h[2] for h in heads],
                [h[3] for h in heads],
                violations_max,
            )
        return [(r["merchant_id"], r["account_id"], r["sequence"], r["missing"]) for r in rows]

    async def recorded_checkpoints(self) -> dict[int, Checkpoint]:
        async with self.shard._acquire() as conn:
            rows = await conn.fetch(sql.CHECKPOINTS)
        return {
            r["checkpoint_id"]: Checkpoint(
                r["checkpoint_id"], r["heads"], r["digest"], r["created_at"], mac=r["mac"]
            )
            for r in rows
        }

    async def verify(
        self,
        *,
        violations_max: int = limits.chain_violations_max,
        keys: CheckpointKeys | None = None,
    ) -> ChainReport:
        """Every chain link, every head, every checkpoint and every account's balances
        against its entries, in one snapshot; with the checkpoint keys, every
        checkpoint's MAC too, and that no retired key signed after a newer one."""
        async with self.shard._acquire() as conn, verification_snapshot(conn):
            return await self._verify(conn, violations_max, keys)

    async def _verify(
        self, conn: Connection, violations_max: int, keys: CheckpointKeys | None
    ) -> ChainReport:
        found: list[ChainViolation] = []
        for r in await conn.fetch(sql.ACCOUNTS_OFF_THEIR_ENTRIES, violations_max):
            found.append(
                ChainViolation(
                    r["merchant_id"],
                    r["account_id"],
                    r["entry_count"],
                    "the account row's balances are not those of its last entry "
                    "(the account row was edited)",
                )
            )
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
        heads_of: dict[int, list[Head]] = defaultdict(list)
        for h in await conn.fetch(sql.CHECKPOINT_HEADS):
            heads_of[h["checkpoint_id"]].append(
                (h["merchant_id"], h["account_id"], h["sequence"], h["entry_hash"])
            )
        previous = GENESIS_HASH
        last: Checkpoint | None = None
        order = KeyOrder(keys, self.shard.name) if keys is not None else None
        for c in await conn.fetch(sql.CHECKPOINTS):
            heads = heads_of[c["checkpoint_id"]]
            digest = checkpoint_digest(previous, heads)
            if digest != c["digest"] or len(heads) != c["heads"]:
                found.append(
                    ChainViolation(
                        "", "", 0, f"checkpoint {c['checkpoint_id']} was altered (digest mismatch)"
                    )
                )
            if order is not None:
                key_problem = order.check(c["checkpoint_id"], c["mac"], c["digest"])
                if key_problem is not None:
                    found.append(ChainViolation("", "", 0, key_problem))
            previous = c["digest"]
            last = Checkpoint(c["checkpoint_id"], c["heads"], c["digest"], c["created_at"])
        return ChainReport(found[:violations_max], last)

"""Checkpoints exported as they are made, to a directory outside the shard databases.

One append-only JSON-lines file per shard (`<dir>/<shard>.jsonl`), one line per
checkpoint: its id, time, previous digest, digest, every head it sealed and,
with a checkpoint key, its HMAC. Someone who can write a shard database cannot
reach these lines; `ledger verify --against DIR` holds the database to them.
Point the directory at storage the database's administrators cannot rewrite (a
separate host, an object-store sync with versioning or retention lock).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ledger import limits
from ledger.domain.chain import HASH_BYTES
from ledger.storage.chain import Checkpoint, Head

# Shard names are config names; only these characters reach a file name.
_SHARD_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FORMAT = "ledger.v1.checkpoint"


class ExportError(ValueError):
    """An export line that cannot be read: names the file and line."""


@dataclass(frozen=True, slots=True)
class ExportedCheckpoint:
    line: int
    checkpoint: Checkpoint


class CheckpointExport:
    """Appends each shard's checkpoints to its file; reads them back for verification."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # The last checkpoint exported per shard, read from the file once, then kept.
        self._last: dict[str, Checkpoint | None] = {}

    def path_for(self, shard: str) -> Path:
        assert _SHARD_FILE_NAME.match(shard), f"shard name unsafe as a file name: {shard!r}"
        return self.directory / f"{shard}.jsonl"

    def last_exported(self, shard: str) -> Checkpoint | None:
        if shard not in self._last:
            records = self.read(shard)
            self._last[shard] = max(
                (r.checkpoint for r in records), key=lambda c: c.checkpoint_id, default=None
            )
        return self._last[shard]

    def append(self, shard: str, checkpoints: list[Checkpoint]) -> None:
        """Appends in one write and syncs it, so a line is either whole or absent."""
        if not checkpoints:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        text = "".join(encode(shard, c) + "\n" for c in checkpoints)
        fd = os.open(self.path_for(shard), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            data = text.encode()
            written = os.write(fd, data)
            assert written == len(data), "a short write to the checkpoint export"
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last[shard] = checkpoints[-1]

    def read(self, shard: str) -> list[ExportedCheckpoint]:
        path = self.path_for(shard)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return []
        if size > limits.checkpoint_export_bytes_max:
            raise ExportError(f"{path}: larger than {limits.checkpoint_export_bytes_max} bytes")
        found: list[ExportedCheckpoint] = []
        with path.open(encoding="utf-8") as lines:
            for number, text in enumerate(lines, start=1):
                if not text.strip():
                    continue
                try:
                    found.append(ExportedCheckpoint(number, decode(shard, text)))
                except (ValueError, KeyError, TypeError) as error:
                    raise ExportError(f"{path}:{number}: {error}") from None
        return found


def encode(shard: str, checkpoint: Checkpoint) -> str:
    assert checkpoint.created_at is not None, "an exported checkpoint has its time"
    return json.dumps(
        {
            "format": FORMAT,
            "shard": shard,
            "checkpoint_id": checkpoint.checkpoint_id,
            "created_at": checkpoint.created_at.isoformat(),
            "previous_digest": checkpoint.previous_digest.hex(),
            "digest": checkpoint.digest.hex(),
            "heads": [[m, a, seq, h.hex()] for m, a, seq, h in checkpoint.head_list],
            "mac": checkpoint.mac.hex() if checkpoint.mac is not None else None,
        },
        separators=(",", ":"),
        ensure_ascii=True,
    )


def decode(shard: str, text: str) -> Checkpoint:
    record: dict[str, Any] = json.loads(text)
    if record.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} line")
    if record["shard"] != shard:
        raise ValueError(f"a checkpoint of shard {record['shard']!r} in {shard!r}'s file")
    heads: list[Head] = []
    for merchant_id, account_id, sequence, head in record["heads"]:
        if not isinstance(merchant_id, str) or not isinstance(account_id, str):
            raise ValueError("head ids must be strings")
        if not isinstance(sequence, int) or sequence < 1:
            raise ValueError("head sequence must be a positive integer")
        heads.append((merchant_id, account_id, sequence, _hash(head)))
    checkpoint_id = record["checkpoint_id"]
    if not isinstance(checkpoint_id, int) or checkpoint_id < 1:
        raise ValueError("checkpoint_id must be a positive integer")
    mac = record.get("mac")
    return Checkpoint(
        checkpoint_id=checkpoint_id,
        heads=len(heads),
        digest=_hash(record["digest"]),
        created_at=datetime.fromisoformat(record["created_at"]),
        previous_digest=_hash(record["previous_digest"]),
        head_list=tuple(heads),
        mac=_hash(mac) if mac is not None else None,
    )


def _hash(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("hashes are hex strings")
    value = bytes.fromhex(text)
    if len(value) != HASH_BYTES:
        raise ValueError("hashes are 32 bytes")
    return value

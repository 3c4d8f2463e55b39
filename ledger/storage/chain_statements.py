"""The SQL of the hash chain: checkpoints and verification, as named constants.

Verification covers the merchants this shard owns (active or moving); copies of
merchants that moved away are checked on the shard that owns them now.
"""

from __future__ import annotations

# One checkpointer per shard at a time; a replica that finds it taken skips the round.
TRY_CHECKPOINT_LOCK = "SELECT pg_try_advisory_xact_lock(7305, 0)"

LAST_CHECKPOINT = """
SELECT checkpoint_id, digest FROM chain_checkpoints ORDER BY checkpoint_id DESC LIMIT 1
"""

# Heads of owned accounts whose chains grew since they were last checkpointed.
# An account row's entry_count and entry_hash are one row version, so the pair
# is consistent without a lock.
CHANGED_HEADS = """
SELECT a.merchant_id, a.account_id, a.entry_count AS sequence, a.entry_hash
FROM accounts a
JOIN merchants m ON m.merchant_id = a.merchant_id AND m.state IN ('active', 'moving')
WHERE a.entry_count > coalesce(
    (SELECT max(h.sequence) FROM chain_checkpoint_heads h
     WHERE h.merchant_id = a.merchant_id AND h.account_id = a.account_id), 0)
ORDER BY a.merchant_id COLLATE "C", a.account_id COLLATE "C"
LIMIT $1
"""

INSERT_CHECKPOINT = """
INSERT INTO chain_checkpoints (checkpoint_id, created_at, heads, digest)
VALUES ($1, clock_timestamp(), $2, $3)
"""

INSERT_CHECKPOINT_HEADS = """
INSERT INTO chain_checkpoint_heads (checkpoint_id, merchant_id, account_id, sequence, entry_hash)
SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bytea[])
"""

# Entries whose stored hash is not the hash of their fields chained to the
# previous entry: an edited entry, or one whose predecessor is gone.
BROKEN_LINKS = """
SELECT e.merchant_id, e.account_id, e.sequence,
       (e.sequence > 1 AND p.sequence IS NULL) AS previous_missing
FROM entries e
JOIN merchants m ON m.merchant_id = e.merchant_id AND m.state IN ('active', 'moving')
LEFT JOIN entries p
    ON p.merchant_id = e.merchant_id AND p.account_id = e.account_id
   AND p.sequence = e.sequence - 1
WHERE e.entry_hash IS DISTINCT FROM ledger_entry_hash(
    CASE WHEN e.sequence = 1 THEN $2::bytea ELSE p.entry_hash END, e)
ORDER BY e.merchant_id, e.account_id, e.sequence
LIMIT $1
"""

# Accounts whose head is not their last entry: entries deleted or added at the end.
HEAD_MISMATCHES = """
SELECT a.merchant_id, a.account_id, a.entry_count, coalesce(last.sequence, 0) AS last_sequence
FROM accounts a
JOIN merchants m ON m.merchant_id = a.merchant_id AND m.state IN ('active', 'moving')
LEFT JOIN LATERAL (
    SELECT e.sequence, e.entry_hash FROM entries e
    WHERE e.merchant_id = a.merchant_id AND e.account_id = a.account_id
    ORDER BY e.sequence DESC LIMIT 1
) last ON true
WHERE a.entry_count <> coalesce(last.sequence, 0)
   OR a.entry_hash <> coalesce(last.entry_hash, $2::bytea)
ORDER BY a.merchant_id, a.account_id
LIMIT $1
"""

# Checkpointed heads that no longer match the entry at their sequence: history
# before the checkpoint was rewritten (even if re-hashed consistently).
CHECKPOINT_MISMATCHES = """
SELECT h.checkpoint_id, h.merchant_id, h.account_id, h.sequence,
       e.entry_hash IS NULL AS missing
FROM chain_checkpoint_heads h
JOIN merchants m ON m.merchant_id = h.merchant_id AND m.state IN ('active', 'moving')
LEFT JOIN entries e
    ON e.merchant_id = h.merchant_id AND e.account_id = h.account_id AND e.sequence = h.sequence
WHERE e.entry_hash IS DISTINCT FROM h.entry_hash
ORDER BY h.checkpoint_id, h.merchant_id, h.account_id
LIMIT $1
"""

CHECKPOINTS = """
SELECT checkpoint_id, heads, digest FROM chain_checkpoints ORDER BY checkpoint_id
"""

# Every checkpoint's heads in one pass, in the order its digest was computed.
CHECKPOINT_HEADS = """
SELECT checkpoint_id, merchant_id, account_id, sequence, entry_hash FROM chain_checkpoint_heads
ORDER BY checkpoint_id, merchant_id COLLATE "C", account_id COLLATE "C"
"""

"""The SQL of the hash chain: checkpoints and verification, as named constants.

Verification covers the merchants this shard owns (active or moving); copies of
merchants that moved away are checked on the shard that owns them now.
"""

from __future__ import annotations

# Verification reads every entry of the shard: a sequential scan is its cheaper
# plan, which shard connections otherwise avoid (SHARD_SERVER_SETTINGS). With
# them off, BROKEN_LINKS took 1.3 s against 0.9 over 300,000 entries.
VERIFY_SCANS_WHOLE_TABLES = "SET LOCAL enable_seqscan = on"

# One checkpointer per shard at a time; a replica that finds it taken skips the round.
# Its own key: it once shared the admin lock's (7305, 0), so a rebalance or cleanup
# started during a checkpoint was refused as if another were running, and
# reconcile took a checkpoint for a move in progress (chaos seed 242).
TRY_CHECKPOINT_LOCK = "SELECT pg_try_advisory_xact_lock(7308, 0)"

LAST_CHECKPOINT = """
SELECT checkpoint_id, digest, mac FROM chain_checkpoints ORDER BY checkpoint_id DESC LIMIT 1
"""

# Heads of owned accounts whose chains grew since they were last sealed, read
# from the entries themselves (never from the account row, which anyone who can
# UPDATE it could point anywhere), with the head each chain was last sealed at.
CHANGED_HEADS = """
SELECT a.merchant_id, a.account_id, last.sequence, last.entry_hash,
       coalesce(sealed.sequence, 0) AS sealed_sequence,
       coalesce(sealed.entry_hash, $2::bytea) AS sealed_hash
FROM accounts a
JOIN merchants m ON m.merchant_id = a.merchant_id AND m.state IN ('active', 'moving')
CROSS JOIN LATERAL (
    SELECT e.sequence, e.entry_hash FROM entries e
    WHERE e.merchant_id = a.merchant_id AND e.account_id = a.account_id
    ORDER BY e.sequence DESC LIMIT 1
) last
LEFT JOIN LATERAL (
    SELECT h.sequence, h.entry_hash FROM chain_checkpoint_heads h
    WHERE h.merchant_id = a.merchant_id AND h.account_id = a.account_id
    ORDER BY h.sequence DESC LIMIT 1
) sealed ON true
WHERE last.sequence > coalesce(sealed.sequence, 0)
ORDER BY a.merchant_id COLLATE "C", a.account_id COLLATE "C"
LIMIT $1
"""

# Of those accounts, the ones whose entries since the sealed head do not chain
# from it to the new head: a checkpoint never seals a chain it cannot recompute.
# Each account's range and each predecessor is probed by key (OFFSET 0 keeps the
# probes apart): joined plainly, the generic plan hash-joined every entry of the
# shard, every checkpoint round.
UNSEALABLE = """
SELECT DISTINCT c.merchant_id, c.account_id
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[], $5::bigint[])
    AS c(merchant_id, account_id, sealed_sequence, sealed_hash, head_sequence)
CROSS JOIN LATERAL (
    SELECT e, e.sequence, e.entry_hash FROM entries e
    WHERE e.merchant_id = c.merchant_id AND e.account_id = c.account_id
      AND e.sequence > c.sealed_sequence AND e.sequence <= c.head_sequence
    OFFSET 0
) AS grown
LEFT JOIN LATERAL (
    SELECT p.entry_hash FROM entries p
    WHERE p.merchant_id = c.merchant_id AND p.account_id = c.account_id
      AND p.sequence = grown.sequence - 1 AND p.sequence > c.sealed_sequence
    OFFSET 0
) AS previous ON true
WHERE grown.entry_hash IS DISTINCT FROM ledger_entry_hash(
    CASE WHEN grown.sequence = c.sealed_sequence + 1 THEN c.sealed_hash
         ELSE previous.entry_hash END,
    grown.e)
"""

INSERT_CHECKPOINT = """
INSERT INTO chain_checkpoints (checkpoint_id, created_at, heads, digest, mac)
VALUES ($1, clock_timestamp(), $2, $3, $4)
RETURNING created_at
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
SELECT checkpoint_id, created_at, heads, digest, mac FROM chain_checkpoints
ORDER BY checkpoint_id
"""

# Checkpoints after the given one, with their heads, for the export to catch up.
CHECKPOINTS_AFTER = """
SELECT checkpoint_id, created_at, heads, digest, mac FROM chain_checkpoints
WHERE checkpoint_id > $1 ORDER BY checkpoint_id LIMIT $2
"""

CHECKPOINT_DIGEST = "SELECT digest FROM chain_checkpoints WHERE checkpoint_id = $1"

HEADS_OF_CHECKPOINTS = """
SELECT checkpoint_id, merchant_id, account_id, sequence, entry_hash FROM chain_checkpoint_heads
WHERE checkpoint_id = ANY ($1::bigint[])
ORDER BY checkpoint_id, merchant_id COLLATE "C", account_id COLLATE "C"
"""

# Of the given merchants, those this shard owns now (their entries are verified here).
OWNED_OF = """
SELECT merchant_id FROM merchants
WHERE merchant_id = ANY ($1::text[]) AND state IN ('active', 'moving')
"""

# Exported heads (merchant, account, sequence, hash) whose entry here is gone or
# differs; each probed by key, as UNSEALABLE's entries are.
EXPORTED_HEADS_DIFFERING = """
SELECT x.merchant_id, x.account_id, x.sequence, here.entry_hash IS NULL AS missing
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[])
    AS x(merchant_id, account_id, sequence, entry_hash)
LEFT JOIN LATERAL (
    SELECT e.entry_hash FROM entries e
    WHERE e.merchant_id = x.merchant_id AND e.account_id = x.account_id
      AND e.sequence = x.sequence
    OFFSET 0
) AS here ON true
WHERE here.entry_hash IS DISTINCT FROM x.entry_hash
ORDER BY x.merchant_id, x.account_id, x.sequence
LIMIT $5
"""

# Owned accounts whose balances are not those of their last entry: a balance
# edited in the account row alone (the entries are the record). An entry count
# off its last entry is HEAD_MISMATCHES' finding, so it is not repeated here.
ACCOUNTS_OFF_THEIR_ENTRIES = """
SELECT a.merchant_id, a.account_id, a.entry_count
FROM accounts a
JOIN merchants m ON m.merchant_id = a.merchant_id AND m.state IN ('active', 'moving')
LEFT JOIN LATERAL (
    SELECT sequence, debits_posted, credits_posted, debits_pending, credits_pending
    FROM entries e WHERE e.merchant_id = a.merchant_id AND e.account_id = a.account_id
    ORDER BY sequence DESC LIMIT 1
) last ON true
WHERE coalesce(last.sequence, 0) = a.entry_count
  AND (coalesce(last.debits_posted, 0) <> a.debits_posted
       OR coalesce(last.credits_posted, 0) <> a.credits_posted
       OR coalesce(last.debits_pending, 0) <> a.debits_pending
       OR coalesce(last.credits_pending, 0) <> a.credits_pending)
ORDER BY a.merchant_id, a.account_id
LIMIT $1
"""

# Every checkpoint's heads in one pass, in the order its digest was computed.
CHECKPOINT_HEADS = """
SELECT checkpoint_id, merchant_id, account_id, sequence, entry_hash FROM chain_checkpoint_heads
ORDER BY checkpoint_id, merchant_id COLLATE "C", account_id COLLATE "C"
"""

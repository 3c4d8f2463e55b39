"""The SQL of account limits and balance monitors (migration 0012), as named constants."""

from __future__ import annotations

LOCK_ACCOUNT = """
SELECT debits_posted, credits_posted, debits_pending, credits_pending
FROM accounts WHERE merchant_id = $1 AND account_id = $2
FOR UPDATE
"""

CHANGE_COLUMNS = """
merchant_id, account_id, sequence, change_id, debits_must_not_exceed_credits,
credits_must_not_exceed_debits, velocity_rules, balance_monitors, changed_by, reason,
changed_at
"""

CHANGE_BY_ID = f"""
SELECT {CHANGE_COLUMNS} FROM account_limit_changes
WHERE merchant_id = $1 AND account_id = $2 AND change_id = $3
"""

# The account's row lock serialises changes, so max + 1 is free.
INSERT_CHANGE = f"""
INSERT INTO account_limit_changes ({CHANGE_COLUMNS})
SELECT $1, $2, coalesce(max(sequence), 0) + 1, $3, $4, $5, $6, $7, $8, $9, clock_timestamp()
FROM account_limit_changes WHERE merchant_id = $1 AND account_id = $2
RETURNING {CHANGE_COLUMNS}
"""

HISTORY = f"""
SELECT {CHANGE_COLUMNS} FROM account_limit_changes
WHERE merchant_id = $1 AND account_id = $2
ORDER BY sequence DESC
LIMIT $3
"""

SET_ACCOUNT_LIMITS = """
UPDATE accounts SET debits_must_not_exceed_credits = $3, credits_must_not_exceed_debits = $4,
    velocity_rules = $5
WHERE merchant_id = $1 AND account_id = $2
"""

# Monitor ids are unique per merchant: an active one on another account is in use.
MONITORS_IN_USE_ELSEWHERE = """
SELECT monitor_id FROM balance_monitors
WHERE merchant_id = $1 AND account_id <> $2 AND active AND monitor_id = ANY($3::text[])
"""

# Removed monitors are marked inactive (never deleted: a move's incremental copy
# carries updates, not deletions); the given ones are upserted active.
DEACTIVATE_MONITORS = """
UPDATE balance_monitors SET active = false
WHERE merchant_id = $1 AND account_id = $2 AND active AND NOT (monitor_id = ANY($3::text[]))
"""

UPSERT_MONITORS = """
INSERT INTO balance_monitors (merchant_id, monitor_id, account_id, balance, threshold_minor,
    active)
SELECT $1, id, $2, b, t, true FROM unnest($3::text[], $4::smallint[], $5::bigint[]) AS u(id, b, t)
ON CONFLICT (merchant_id, monitor_id) DO UPDATE
SET account_id = EXCLUDED.account_id, balance = EXCLUDED.balance,
    threshold_minor = EXCLUDED.threshold_minor, active = true
"""

ACCOUNT_LIMITS = """
SELECT debits_must_not_exceed_credits, credits_must_not_exceed_debits, velocity_rules
FROM accounts WHERE merchant_id = $1 AND account_id = $2
"""

ACTIVE_MONITORS = """
SELECT monitor_id, balance, threshold_minor FROM balance_monitors
WHERE merchant_id = $1 AND account_id = $2 AND active
ORDER BY monitor_id COLLATE "C"
"""

# Oldest first; the position (offset + 1) is the caller's paging cursor.
CROSSINGS = """
SELECT merchant_id, monitor_id, account_id, direction, balance, threshold_minor,
    balance_after_minor, transfer_merchant_id, transfer_id, crossed_at
FROM monitor_crossings WHERE merchant_id = $1
ORDER BY crossed_at, monitor_id COLLATE "C", transfer_merchant_id COLLATE "C",
    transfer_id COLLATE "C", direction
OFFSET $2 LIMIT $3
"""

# The movements of an account that velocity rules count, from its entries:
# reservations (PENDING) and postings that settle nothing (POSTED not right after
# a release by the same transfer: a settle's or a saga's post releases first).
# The same rule as the engine's counting (ledger/domain/velocity.py); the chaos
# checker reads it too.
COUNTED_MOVEMENT = """
(e.kind = 2 OR (e.kind = 1 AND NOT EXISTS (
    SELECT 1 FROM entries r
    WHERE r.merchant_id = e.merchant_id AND r.account_id = e.account_id
      AND r.sequence = e.sequence - 1 AND r.kind = 3
      AND r.transfer_merchant_id = e.transfer_merchant_id AND r.transfer_id = e.transfer_id)))
"""

# Recounts one (direction, window) of an account from its entries, for the
# buckets a check counts now: a rule set at run time counts what moved within
# its window before it was set, and counters left behind while no rule used
# them are made exact again. Runs under the account's lock, with the change.
# $1 merchant, $2 account, $3 direction, $4 window_s, $5 bucket width in seconds.
RECOUNT_VELOCITY = f"""
WITH w AS (
    SELECT (floor(extract(epoch FROM clock_timestamp()))::bigint - $4) / $5 AS first_bucket
), counted AS (
    SELECT floor(extract(epoch FROM e.created_at))::bigint / $5 AS bucket_index,
           sum(e.amount_minor) AS amount_minor, count(*) AS transfer_count
    FROM w JOIN entries e
      ON e.merchant_id = $1 AND e.account_id = $2 AND e.direction = $3
     AND e.created_at >= to_timestamp(w.first_bucket * $5)
    WHERE {COUNTED_MOVEMENT}
    GROUP BY 1
), zeroed AS (
    UPDATE velocity_buckets AS b SET amount_minor = 0, transfer_count = 0 FROM w
    WHERE b.merchant_id = $1 AND b.account_id = $2 AND b.direction = $3 AND b.window_s = $4
      AND b.bucket_index >= w.first_bucket
      AND b.bucket_index NOT IN (SELECT bucket_index FROM counted)
    RETURNING 1
)
INSERT INTO velocity_buckets AS b (merchant_id, account_id, direction, window_s, bucket_index,
    amount_minor, transfer_count)
SELECT $1, $2, $3, $4, c.bucket_index, c.amount_minor, c.transfer_count FROM counted c
ON CONFLICT (merchant_id, account_id, direction, window_s, bucket_index) DO UPDATE
SET amount_minor = EXCLUDED.amount_minor, transfer_count = EXCLUDED.transfer_count
"""

# For reconcile: the windows of every rule in force on a merchant this shard owns
# whose counters (from the oldest bucket a check counts now) differ from the
# counted movements in its entries over the same buckets. One statement, one
# snapshot. $1 is velocity_buckets_per_window (the bucket width is
# ceil(window_s / $1), at least 1, as ledger/domain/velocity.py bucket_width_s).
VELOCITY_COUNTERS_OFF = f"""
WITH windows AS (
    SELECT DISTINCT a.merchant_id, a.account_id, (r ->> 'direction')::smallint AS direction,
        (r ->> 'window_s')::integer AS window_s
    FROM accounts a
    JOIN merchants m ON m.merchant_id = a.merchant_id AND m.state IN ('active', 'moving')
    CROSS JOIN LATERAL jsonb_array_elements(a.velocity_rules) AS r
), w AS (
    SELECT windows.*, greatest(1, ceil(window_s / $1::numeric))::bigint AS width_s,
        (floor(extract(epoch FROM now()))::bigint - window_s)
            / greatest(1, ceil(window_s / $1::numeric))::bigint AS first_bucket
    FROM windows
)
SELECT w.merchant_id, w.account_id, w.direction, w.window_s,
    (SELECT coalesce(sum(b.amount_minor), 0) FROM velocity_buckets b
     WHERE b.merchant_id = w.merchant_id AND b.account_id = w.account_id
       AND b.direction = w.direction AND b.window_s = w.window_s
       AND b.bucket_index >= w.first_bucket) AS counter_minor,
    (SELECT coalesce(sum(b.transfer_count), 0) FROM velocity_buckets b
     WHERE b.merchant_id = w.merchant_id AND b.account_id = w.account_id
       AND b.direction = w.direction AND b.window_s = w.window_s
       AND b.bucket_index >= w.first_bucket) AS counter_count,
    (SELECT count(*) FROM entries e
     WHERE e.merchant_id = w.merchant_id AND e.account_id = w.account_id
       AND e.direction = w.direction
       AND e.created_at >= to_timestamp(w.first_bucket * w.width_s)
       AND {COUNTED_MOVEMENT}) AS entries_count,
    (SELECT coalesce(sum(e.amount_minor), 0) FROM entries e
     WHERE e.merchant_id = w.merchant_id AND e.account_id = w.account_id
       AND e.direction = w.direction
       AND e.created_at >= to_timestamp(w.first_bucket * w.width_s)
       AND {COUNTED_MOVEMENT}) AS entries_minor
FROM w
"""

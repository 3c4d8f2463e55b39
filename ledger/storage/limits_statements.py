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
    velocity_rules = $5, velocity_counters = $6
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

# One (direction, window) of an account recounted from its entries, per bucket
# a check counts now (from the one holding now - window_s): a rule set at run
# time counts what moved within its window before it was set, and counters left
# behind while no rule used them are made exact again. Runs under the account's
# lock, with the change, which writes the rings built from it
# (velocity_counters.rebuilt). $1 merchant, $2 account, $3 direction,
# $4 window_s, $5 bucket width in seconds, $6 the clock (Unix seconds).
RECOUNT_VELOCITY = f"""
SELECT floor(extract(epoch FROM e.created_at))::bigint / $5 AS bucket_index,
       least(sum(e.amount_minor), 9223372036854775807)::bigint AS amount_minor,
       count(*) AS transfer_count
FROM entries e
WHERE e.merchant_id = $1 AND e.account_id = $2 AND e.direction = $3
  AND e.created_at >= to_timestamp((($6::bigint - $4) / $5) * $5)
  AND {COUNTED_MOVEMENT}
GROUP BY 1
"""

CLOCK_S = "SELECT floor(extract(epoch FROM clock_timestamp()))::bigint"

# For reconcile: every window of every rule in force on a merchant this shard
# owns, with the account's counters and the counted movements in its entries
# from the oldest bucket a check counts now (audit.py compares the two). One
# statement, one snapshot. $1 is velocity_buckets_per_window (the bucket width
# is ceil(window_s / $1), at least 1, as ledger/domain/velocity.py bucket_width_s).
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
    floor(extract(epoch FROM now()))::bigint AS now_s,
    (SELECT a.velocity_counters FROM accounts a
     WHERE a.merchant_id = w.merchant_id AND a.account_id = w.account_id) AS counters,
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

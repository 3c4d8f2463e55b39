"""The SQL that Shard runs, as named constants. Parameterised only; arrays via unnest."""

from __future__ import annotations

from ledger.storage.move_statements import MERCHANT_COUNTS

FENCE = "SELECT epoch, claims_paused, merchant_id, state, moved_to FROM ledger_fence($1::text[])"

CLAIM_MERCHANTS = """
INSERT INTO merchants (merchant_id, state, epoch)
SELECT m, 'active', $2 FROM unnest($1::text[]) AS m
ON CONFLICT (merchant_id) DO NOTHING
"""

NOW = "SELECT clock_timestamp()"

ACCOUNT_COLUMNS = """
merchant_id, account_id, currency, debits_must_not_exceed_credits,
credits_must_not_exceed_debits, closed, metadata, debits_posted, credits_posted,
debits_pending, credits_pending, entry_count, created_at, entry_hash,
velocity_rules::text AS velocity_rules, velocity_counters
"""

# Row locks in one fixed order (merchant, account, byte-wise) so that any two
# transactions lock shared accounts in the same order and never deadlock: the
# keys are sorted, and each is probed and locked in turn (as LOCK_STEPS locks
# sagas). Written as `IN (SELECT * FROM unnest(...))` sorted and locked on top,
# its generic plan on a new shard's empty accounts table hash-joined a
# sequential scan of every account into every write (see probe_by_key).
LOCK_ACCOUNTS = f"""
SELECT probed.* FROM (
    SELECT m, a FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[])) AS d(m, a)
    ORDER BY m COLLATE "C", a COLLATE "C"
) AS k(merchant_id, account_id)
CROSS JOIN LATERAL (
    SELECT {ACCOUNT_COLUMNS} FROM accounts
    WHERE merchant_id = k.merchant_id AND account_id = k.account_id
    OFFSET 0
    FOR UPDATE
) AS probed
"""

LIST_ACCOUNTS = f"""
SELECT {ACCOUNT_COLUMNS} FROM accounts
WHERE merchant_id = $1 AND account_id COLLATE "C" > $2
ORDER BY account_id COLLATE "C"
LIMIT $3
"""

# An account's event carries the account as it is after the change (migration 0011).
_ACCOUNT_EVENT = """
INSERT INTO event_outbox (kind, merchant_id, merchant_ids, trace_id, body)
SELECT {kind}, c.merchant_id, ARRAY[c.merchant_id], {trace_id},
    jsonb_build_object('account', to_jsonb(c) - 'entry_hash' - 'velocity_counters')
FROM changed AS c
"""

INSERT_ACCOUNTS = f"""
WITH changed AS (
    INSERT INTO accounts (merchant_id, account_id, currency, debits_must_not_exceed_credits,
                          credits_must_not_exceed_debits, metadata, created_at)
    SELECT m, a, c, d, k, md, clock_timestamp()
    FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[], $5::boolean[], $6::jsonb[])
        AS u(m, a, c, d, k, md)
    ON CONFLICT (merchant_id, account_id) DO NOTHING
    RETURNING {ACCOUNT_COLUMNS}
), announced AS (
    {_ACCOUNT_EVENT.format(kind=1, trace_id="$7")}
)
SELECT merchant_id, account_id FROM changed
"""

# Only accounts whose state changes are written (and announced). The caller has
# locked them (LOCK_ACCOUNTS, in the one byte order every write locks in), so
# each row is found through the primary key and its row version cannot move
# under the update, as in WRITE_BATCH; with `IN (SELECT * FROM unnest(...))` the
# generic plan read every account of the shard (tests/test_key_lookup_plans.py).
SET_ACCOUNTS_CLOSED = f"""
WITH changed AS (
    UPDATE accounts AS a SET closed = $3
    FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[])) AS k(key_merchant, key_account)
    CROSS JOIN LATERAL (SELECT ctid AS row_id FROM accounts
        WHERE merchant_id = k.key_merchant AND account_id = k.key_account OFFSET 0) AS found
    WHERE a.ctid = found.row_id AND a.closed <> $3
    RETURNING {ACCOUNT_COLUMNS}
)
{_ACCOUNT_EVENT.format(kind="CASE WHEN $3 THEN 2 ELSE 3 END", trace_id="$4")}
"""

TRANSFER_COLUMNS = """
merchant_id, transfer_id, kind, action, debit_merchant_id, debit_account_id,
credit_merchant_id, credit_account_id, amount_minor, amount_effective_minor, currency,
pending_id, timeout_ms, linked, reversal_of, metadata, postings, result,
failed_posting_index, expires_at, trace_id, created_at
"""


# Lookups by key probe an index once per key ($1, $2, ...: the keys' columns).
# Written as `(a, b) IN (SELECT * FROM unnest(...))`, a plan made while the
# table was small hash-joins a sequential scan of the whole table, and asyncpg
# keeps a statement's plan for its connection's life, replanned only when the
# table is next analysed: on a new shard (or the benchmark's) the transfers
# read before every write took 9.8 ms instead of 0.05 at 50,000 transfers,
# 38% of PostgreSQL's time in the single benchmark. OFFSET 0 keeps each
# lateral subquery from being flattened into that join; DISTINCT keeps IN's
# meaning when a key is given twice. Sagas' lookups use it too.
def probe_by_key(
    columns: tuple[str, ...], lookup: str, *, types: tuple[str, ...] | None = None
) -> str:
    """FROM clause: the lookup (which names the keys as k.<column>) once per key;
    the keys' columns are $1, $2, ... (arrays of `types`, text unless given)."""
    types = types or ("text",) * len(columns)
    assert len(types) == len(columns), "a type per key column"
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=1))
    return f"""
(SELECT DISTINCT * FROM unnest({arrays})) AS k({", ".join(columns)})
CROSS JOIN LATERAL ({lookup} OFFSET 0) AS probed
"""


SELECT_ACCOUNTS = "SELECT probed.* FROM " + probe_by_key(
    ("merchant_id", "account_id"),
    f"SELECT {ACCOUNT_COLUMNS} FROM accounts "
    "WHERE merchant_id = k.merchant_id AND account_id = k.account_id",
)

_TRANSFERS_BY_KEY = probe_by_key(
    ("merchant_id", "transfer_id"),
    f"SELECT {TRANSFER_COLUMNS} FROM transfers "
    "WHERE merchant_id = k.merchant_id AND transfer_id = k.transfer_id",
)

SELECT_TRANSFERS = f"SELECT probed.* FROM {_TRANSFERS_BY_KEY}"

# The same, plus the clock, in one round trip; always at least one row (the
# clock's), with NULL transfer columns when no id exists yet.
SELECT_TRANSFERS_AND_NOW = f"""
WITH found AS ({SELECT_TRANSFERS})
SELECT clock_timestamp() AS now, found.* FROM (SELECT 1) AS one LEFT JOIN found ON true
"""

SELECT_RESOLUTIONS = "SELECT probed.* FROM " + probe_by_key(
    ("merchant_id", "pending_id"),
    "SELECT merchant_id, pending_id, state FROM pending_resolutions "
    "WHERE merchant_id = k.merchant_id AND pending_id = k.pending_id",
)

# Reversals credit the original's debit merchant, so they are found by that merchant.
# Each one's row is where its debit merchant is, under the lock of the account it
# debits (the original's credit account): every reversal of one original is there.
# A reversal between shards counts from its step 1 (result 26, in progress; its
# saga's row holds the final result) unless its saga was compensated (state 3).
SUM_REVERSALS = (
    "SELECT k.merchant_id, k.reversal_of, probed.reversed_minor FROM "
    + probe_by_key(
        ("merchant_id", "reversal_of"),
        "SELECT sum(t.amount_effective_minor)::bigint AS reversed_minor FROM transfers t "
        # reversal_of <> '' (no key is empty) lets the partial index serve.
        "WHERE t.credit_merchant_id = k.merchant_id AND t.reversal_of = k.reversal_of "
        "AND t.reversal_of <> '' AND (t.result = 1 OR (t.result = 26 AND NOT EXISTS ("
        "SELECT 1 FROM sagas s WHERE s.merchant_id = t.merchant_id "
        "AND s.transfer_id = t.transfer_id AND s.kind = 1 AND s.state = 3 OFFSET 0)))",
    )
    + "WHERE probed.reversed_minor IS NOT NULL"
)

# One round trip writes a whole batch: one array of rows per table, in the row
# types of migration 0007. Data-modifying CTEs always run to completion; the
# counts let the caller check every row landed. Rows it updates or deletes,
# and the monitors it looks up, are found by key one at a time (a lateral
# probe with OFFSET 0, an EXISTS with OFFSET 0, which PostgreSQL does not turn
# into a join): joined to the arrays, a plan made on a new shard's near-empty
# tables (the generic plan asyncpg keeps) hash-joined a sequential scan of
# every account, pending expiry and monitor into every write
# (tests/test_key_lookup_plans.py).
WRITE_BATCH = """
WITH new_transfers AS (
    INSERT INTO transfers (merchant_id, transfer_id, kind, action, debit_merchant_id,
        debit_account_id, credit_merchant_id, credit_account_id, amount_minor,
        amount_effective_minor, currency, pending_id, timeout_ms, linked, reversal_of,
        metadata, postings, result, failed_posting_index, expires_at, trace_id, created_at)
    SELECT * FROM unnest($1::ledger_transfer_row[])
    ON CONFLICT (merchant_id, transfer_id) DO NOTHING
    RETURNING 1
), new_entries AS (
    INSERT INTO entries (merchant_id, account_id, sequence, transfer_merchant_id, transfer_id,
        direction, kind, amount_minor, debits_posted, credits_posted, debits_pending,
        credits_pending, created_at, entry_hash)
    SELECT * FROM unnest($2::ledger_entry_row[])
    RETURNING 1
), updated_accounts AS (
    UPDATE accounts AS a
    SET debits_posted = u.debits_posted, credits_posted = u.credits_posted,
        debits_pending = u.debits_pending, credits_pending = u.credits_pending,
        entry_count = u.entry_count, entry_hash = u.entry_hash,
        velocity_counters = coalesce(u.velocity_counters, a.velocity_counters)
    -- Each row found through the primary key (above); the accounts are
    -- locked by this transaction already, so their row versions cannot move.
    FROM unnest($3::ledger_account_head[]) AS u
    CROSS JOIN LATERAL (SELECT ctid AS row_id FROM accounts
        WHERE merchant_id = u.merchant_id AND account_id = u.account_id OFFSET 0) AS found
    WHERE a.ctid = found.row_id
    RETURNING 1
), new_resolutions AS (
    INSERT INTO pending_resolutions (merchant_id, pending_id, state, by_transfer_id, created_at)
    SELECT * FROM unnest($4::ledger_resolution_row[])
    RETURNING 1
), new_expiries AS (
    INSERT INTO pending_expiries (merchant_id, transfer_id, expires_at)
    SELECT * FROM unnest($5::ledger_expiry_row[])
    RETURNING 1
), ended_expiries AS (
    DELETE FROM pending_expiries AS x
    USING unnest($6::ledger_transfer_key[]) AS r
    CROSS JOIN LATERAL (SELECT ctid AS row_id FROM pending_expiries
        WHERE merchant_id = r.merchant_id AND transfer_id = r.transfer_id OFFSET 0) AS found
    WHERE x.ctid = found.row_id
    RETURNING 1
), monitored_changes AS (
    -- Per account with an active monitor and per transfer: the balances before
    -- its first entry here (the entry undone) and after its last.
    SELECT e.merchant_id, e.account_id, e.transfer_merchant_id, e.transfer_id,
        max(e.created_at) AS created_at,
        (array_agg(
            (e.credits_posted - CASE WHEN e.direction = 2 AND e.kind = 1
                                     THEN e.amount_minor ELSE 0 END)::numeric
            - (e.debits_posted - CASE WHEN e.direction = 1 AND e.kind = 1
                                      THEN e.amount_minor ELSE 0 END)
            ORDER BY e.sequence))[1] AS net_before,
        (array_agg(
            e.debits_pending::numeric
            - CASE WHEN e.direction = 1 AND e.kind = 2 THEN e.amount_minor
                   WHEN e.direction = 1 AND e.kind = 3 THEN -e.amount_minor
                   ELSE 0 END
            ORDER BY e.sequence))[1] AS debits_pending_before,
        (array_agg(e.credits_posted::numeric - e.debits_posted ORDER BY e.sequence DESC))[1]
            AS net_after,
        (array_agg(e.debits_pending ORDER BY e.sequence DESC))[1] AS debits_pending_after
    FROM unnest($2::ledger_entry_row[]) AS e
    WHERE EXISTS (SELECT 1 FROM balance_monitors m WHERE m.merchant_id = e.merchant_id
                  AND m.account_id = e.account_id AND m.active OFFSET 0)
    GROUP BY e.merchant_id, e.account_id, e.transfer_merchant_id, e.transfer_id
), new_crossings AS (
    -- ledger/domain/monitors.py states the rule: at or above, then below, falls.
    INSERT INTO monitor_crossings (merchant_id, monitor_id, account_id, direction, balance,
        threshold_minor, balance_after_minor, transfer_merchant_id, transfer_id, crossed_at)
    SELECT c.merchant_id, m.monitor_id, c.account_id,
        CASE WHEN v.before_minor >= m.threshold_minor THEN 1 ELSE 2 END,
        m.balance, m.threshold_minor, v.after_minor, c.transfer_merchant_id, c.transfer_id,
        c.created_at
    FROM monitored_changes c
    CROSS JOIN LATERAL (SELECT * FROM balance_monitors
        WHERE merchant_id = c.merchant_id AND account_id = c.account_id AND active OFFSET 0) m
    CROSS JOIN LATERAL (SELECT
        CASE m.balance WHEN 1 THEN c.net_before
                       ELSE c.net_before - c.debits_pending_before END AS before_minor,
        CASE m.balance WHEN 1 THEN c.net_after
                       ELSE c.net_after - c.debits_pending_after END AS after_minor) v
    WHERE (v.before_minor >= m.threshold_minor) <> (v.after_minor >= m.threshold_minor)
    ON CONFLICT DO NOTHING
    RETURNING *
), crossing_events AS (
    -- A monitor's crossing is an event too, with the change that crossed it
    -- (in the same transaction; its trace is the change's).
    INSERT INTO event_outbox (kind, merchant_id, merchant_ids, transfer_id, trace_id, body)
    SELECT 18, c.merchant_id, ARRAY[c.merchant_id], c.transfer_id,
        coalesce((SELECT v.trace_id FROM unnest($7::ledger_event_row[]) AS v
                  WHERE v.transfer_merchant_id = c.transfer_merchant_id
                    AND v.transfer_id = c.transfer_id LIMIT 1), ''),
        jsonb_build_object('crossing', to_jsonb(c))
    FROM new_crossings AS c
    RETURNING 1
), new_events AS (
    -- The batch's events (migration 0011), in the order given: each names its
    -- transfer, whose row and entries (with balances after) come from the
    -- batch's own arrays, so the event says exactly what this batch wrote.
    INSERT INTO event_outbox (kind, merchant_id, merchant_ids, transfer_id, trace_id, body)
    SELECT v.kind, v.merchant_id,
        ARRAY(SELECT DISTINCT m FROM unnest(g.merchants || v.merchant_id) AS m ORDER BY m),
        v.transfer_id, v.trace_id,
        json_build_object('transfer', to_json(t), 'entries', coalesce(g.entries, '[]'),
                          'detail', v.detail)
    FROM unnest($7::ledger_event_row[]) WITH ORDINALITY
        AS v(kind, merchant_id, transfer_merchant_id, transfer_id, trace_id, detail, n)
    LEFT JOIN unnest($1::ledger_transfer_row[]) AS t
        ON t.merchant_id = v.transfer_merchant_id AND t.transfer_id = v.transfer_id
    LEFT JOIN (
        SELECT e.transfer_merchant_id, e.transfer_id,
            array_agg(DISTINCT e.merchant_id) AS merchants,
            -- Built from the columns it keeps: to_jsonb(e) and then removing five
            -- keys (each removal a copy) cost twice as much. Bodies are json
            -- text (migration 0018): built as text, stored and read as is.
            json_agg(json_build_object(
                'merchant_id', e.merchant_id, 'account_id', e.account_id,
                'sequence', e.sequence, 'direction', e.direction, 'kind', e.kind,
                'amount_minor', e.amount_minor, 'debits_posted', e.debits_posted,
                'credits_posted', e.credits_posted, 'debits_pending', e.debits_pending,
                'credits_pending', e.credits_pending) ORDER BY e.n) AS entries
        FROM unnest($2::ledger_entry_row[]) WITH ORDINALITY
            AS e(merchant_id, account_id, sequence, transfer_merchant_id, transfer_id, direction,
                 kind, amount_minor, debits_posted, credits_posted, debits_pending,
                 credits_pending, created_at, entry_hash, n)
        GROUP BY e.transfer_merchant_id, e.transfer_id
    ) AS g ON g.transfer_merchant_id = v.transfer_merchant_id AND g.transfer_id = v.transfer_id
    ORDER BY v.n
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_transfers) AS transfers,
       (SELECT count(*) FROM new_entries) AS entries,
       (SELECT count(*) FROM updated_accounts) AS accounts,
       (SELECT count(*) FROM new_resolutions) AS resolutions,
       (SELECT count(*) FROM new_events) AS events,
       (SELECT array_agg(monitor_id || ':' || direction) FROM new_crossings) AS crossings
"""

# Local pending transfers only (a saga's hold folded back into a local one too);
# those a saga carries expire through a saga.
DUE_EXPIRIES = """
SELECT e.merchant_id, e.transfer_id FROM pending_expiries e
WHERE e.expires_at <= clock_timestamp()
  AND NOT EXISTS (SELECT 1 FROM sagas s WHERE s.merchant_id = e.merchant_id
                  AND s.transfer_id = e.transfer_id AND s.kind = 1
                  AND NOT s.settles_locally)
ORDER BY e.expires_at
LIMIT $1
"""

# Seconds until the next pending transfer here expires (negative: overdue; NULL: none).
NEXT_EXPIRY_DUE_S = (
    "SELECT extract(epoch FROM min(expires_at) - clock_timestamp())::float8 FROM pending_expiries"
)

# Only one sweeper per shard works at a time; others skip this round.
TRY_SWEEPER_LOCK = "SELECT pg_try_advisory_xact_lock(7303, 0)"

BALANCE_AS_OF = """
SELECT debits_posted, credits_posted, debits_pending, credits_pending
FROM entries
WHERE merchant_id = $1 AND account_id = $2 AND created_at <= $3
ORDER BY created_at DESC, sequence DESC
LIMIT 1
"""

ENTRY_COLUMNS = """
merchant_id, account_id, sequence, transfer_merchant_id, transfer_id, direction, kind,
amount_minor, debits_posted, credits_posted, debits_pending, credits_pending, created_at,
entry_hash
"""

ENTRIES_OLDEST_FIRST = f"""
SELECT {ENTRY_COLUMNS} FROM entries
WHERE merchant_id = $1 AND account_id = $2 AND sequence > $3
ORDER BY sequence
LIMIT $4
"""

ENTRIES_NEWEST_FIRST = f"""
SELECT {ENTRY_COLUMNS} FROM entries
WHERE merchant_id = $1 AND account_id = $2 AND sequence < $3
ORDER BY sequence DESC
LIMIT $4
"""

READ_META = "SELECT shard_name, epoch FROM shard_meta"

INIT_META = """
INSERT INTO shard_meta (shard_name, epoch, claims_paused) VALUES ($1, $2, $3)
ON CONFLICT (singleton) DO NOTHING
"""

# `trace_id <> ''` lets the generic plan (shard connections plan generically) use
# the partial index transfers_by_trace; without it every transfer was read.
TRANSFERS_BY_TRACE = f"""
SELECT {TRANSFER_COLUMNS} FROM transfers WHERE trace_id = $1 AND trace_id <> '' AND kind = 1
ORDER BY created_at LIMIT $2
"""

# Reads check ownership too (without locks): a merchant that moved or is only
# being copied here is redirected, so a read never returns a stale or partial copy.
# By key, as the fence's read (migration 0015): `merchant_id = ANY($1)` planned a
# sequential scan of every merchant while the table was never analysed.
MERCHANT_STATES = "SELECT probed.* FROM " + probe_by_key(
    ("merchant_id",),
    "SELECT merchant_id, state, moved_to FROM merchants WHERE merchant_id = k.merchant_id",
)

# What the shard gauges show (ledger_sagas, ledger_saga_oldest_running_age_seconds,
# ledger_merchants), with this replica's heartbeat (`ledger shards status`), in
# one round trip every limits.gauge_refresh_interval_s: four statements before,
# a third of an idle replica's CPU. The sagas are counted through their state
# index: counted by state and peer over every saga, the refresh read all of
# them, finished ones included, every two seconds. The oldest running saga is
# of a merchant owned here, as CLAIM_DUE: copies a move leaves ahead or behind
# are not this shard's to drive.
GAUGE_READINGS = f"""
WITH gone AS (
    DELETE FROM replicas WHERE seen_at < clock_timestamp() - interval '1 day'
), noted AS (
    INSERT INTO replicas (replica_id, epoch, seen_at) VALUES ($1, $2, clock_timestamp())
    ON CONFLICT (replica_id) DO UPDATE SET epoch = EXCLUDED.epoch, seen_at = EXCLUDED.seen_at
)
SELECT
    (SELECT count(*) FROM sagas WHERE state = 1) AS running_sagas,
    (SELECT count(*) FROM sagas WHERE state = 4) AS dead_sagas,
    (SELECT coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
     FROM sagas WHERE state = 1
       AND merchant_id IN (SELECT merchant_id FROM merchants
                           WHERE state IN ('active', 'moving'))) AS oldest_running_saga_age_s,
    (SELECT coalesce(jsonb_object_agg(state, merchants), '{{}}')
     FROM ({MERCHANT_COUNTS}) AS m) AS merchants_by_state
"""

RECENT_REPLICAS = """
SELECT replica_id, epoch, seen_at FROM replicas
WHERE seen_at > clock_timestamp() - make_interval(secs => $1)
ORDER BY replica_id
"""

"""The SQL of the saga tables (migration 0002), as named constants."""

from __future__ import annotations

from ledger.storage import move_statements as move_sql
from ledger.storage import statements as ledger_sql

SAGA_COLUMNS = """
merchant_id, transfer_id, kind, state, next_step, peer_shard, debit_account_id,
credit_merchant_id, credit_account_id, currency, credit_action, amount_minor,
pending_minor, pending_id, result, credit_outcome, attempts, next_attempt_at, last_error,
version, trace_context, created_at, updated_at, path_position, reversal_of
"""

ENSURE_SETTLEMENT_ACCOUNT = """
INSERT INTO accounts (merchant_id, account_id, currency, debits_must_not_exceed_credits,
                      credits_must_not_exceed_debits, metadata, created_at)
VALUES ($1, $2, $3, false, false, '{}'::jsonb, clock_timestamp())
ON CONFLICT (merchant_id, account_id) DO NOTHING
"""

# Whether a transfer has any entry on a settlement account (entries_by_transfer).
HAS_LEG_ENTRIES = """
SELECT EXISTS (SELECT 1 FROM entries WHERE transfer_merchant_id = $3 AND transfer_id = $4
               AND merchant_id = $1 AND account_id = $2)
"""

# What a new saga row is given (the rest take their defaults).
_NEW_SAGA_COLUMNS = """
merchant_id, transfer_id, kind, state, next_step, peer_shard, debit_account_id,
credit_merchant_id, credit_account_id, currency, credit_action, amount_minor,
pending_minor, pending_id, next_attempt_at, lease_owner, lease_until, trace_context,
created_at, updated_at
"""

# The saga and its step 1 in the log, in one round trip. A settle's or an
# expiry's saga starts where the hold's path starts ($18: its saga's position).
INSERT_SAGA = f"""
WITH saga AS (
    INSERT INTO sagas ({_NEW_SAGA_COLUMNS}, path_position)
    VALUES ($1, $2, $3, 1, 2, $4, $5, $6, $7, $8, $9, $10, $11, $12,
        $13::timestamptz + make_interval(secs => $15), $14,
        $13::timestamptz + make_interval(secs => $15), $16, $13, $13, $18)
    RETURNING {SAGA_COLUMNS}
), step AS (
    INSERT INTO saga_steps (merchant_id, transfer_id, kind, step, outcome, detail)
    VALUES ($1, $2, $3, 1, $17, '')
)
SELECT * FROM saga
"""


INSERT_STEP = """
INSERT INTO saga_steps (merchant_id, transfer_id, kind, step, outcome, detail)
VALUES ($1, $2, $3, $4, $5, $6)
"""


SELECT_SAGA = f"""
SELECT {SAGA_COLUMNS} FROM sagas WHERE merchant_id = $1 AND transfer_id = $2 AND kind = $3
"""


# Lookups of sagas by transfer key probe the primary key once per key
# (statements.probe_by_key says why; measured here: 0.5 ms at 1,300 sagas
# against 0.05 ms for the probe).
SELECT_SAGAS_OF_TRANSFERS = "SELECT probed.* FROM " + ledger_sql.probe_by_key(
    ("merchant_id", "transfer_id"),
    f"SELECT {SAGA_COLUMNS} FROM sagas "
    "WHERE merchant_id = k.merchant_id AND transfer_id = k.transfer_id AND kind IN (1, 2)",
)

SELECT_STEPS = """
SELECT step, outcome, detail, at FROM saga_steps
WHERE merchant_id = $1 AND transfer_id = $2 AND kind = $3
ORDER BY id
"""


# What a transaction of saga steps records once its entries are written, in one
# round trip: the sagas step 1 starts, with step 1 in their log ($1-$17); the
# outcomes step 2 decided, exactly once each ($18-$25; a concurrent step 2 that
# recorded first makes credits_recorded fall short); the sagas step 3 finishes
# ($26-$33: key, version, state, result, credit outcome, peer shard; a saga
# whose version moved on is left out), with steps 2 and 3 joining each one's log
# ($34-$39: (step 2, step 3) per saga, in order); $40: each new saga's
# reversal_of, beside $1-$13. peer_shard becomes the shard
# that applied the credit (step 2 follows a credit merchant that moved), so a
# later settle or expiry finds the hold there. Always one row at least (with
# credits_recorded); one per saga started (is_new) or finished.
RECORD_STEPS = f"""
WITH new_sagas AS (
    INSERT INTO sagas ({_NEW_SAGA_COLUMNS}, reversal_of)
    SELECT u.merchant_id, u.transfer_id, u.kind, 1, 2, u.peer_shard, u.debit_account_id,
        u.credit_merchant_id, u.credit_account_id, u.currency, u.credit_action, u.amount_minor,
        u.pending_minor, u.pending_id, $15::timestamptz + make_interval(secs => $17), $16,
        $15::timestamptz + make_interval(secs => $17), u.trace_context, $15, $15, u.reversal_of
    FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::smallint[], $10::bigint[], $11::bigint[],
                $12::text[], $13::text[], $40::text[])
        AS u(merchant_id, transfer_id, kind, peer_shard, debit_account_id, credit_merchant_id,
             credit_account_id, currency, credit_action, amount_minor, pending_minor,
             pending_id, trace_context, reversal_of)
    RETURNING {SAGA_COLUMNS}
), new_steps AS (
    INSERT INTO saga_steps (merchant_id, transfer_id, kind, step, outcome, detail)
    SELECT m, t, k, 1, o, '' FROM unnest($1::text[], $2::text[], $3::smallint[], $14::text[])
        WITH ORDINALITY AS u(m, t, k, o, n)
    ORDER BY n
), new_credits AS (
    INSERT INTO saga_credits (merchant_id, transfer_id, kind, credit_merchant_id, outcome,
                              result, peer_shard, credited_on)
    SELECT *, $25 FROM unnest($18::text[], $19::text[], $20::smallint[], $21::text[],
                              $22::smallint[], $23::smallint[], $24::text[])
    ON CONFLICT (merchant_id, transfer_id, kind) DO NOTHING
    RETURNING 1
), finished AS (
    UPDATE sagas AS s SET state = u.state, result = u.result,
        credit_outcome = u.credit_outcome, peer_shard = u.peer_shard, next_step = 3,
        version = s.version + 1, lease_owner = '', lease_until = NULL,
        updated_at = clock_timestamp()
    FROM unnest($26::text[], $27::text[], $28::smallint[], $29::integer[], $30::smallint[],
                $31::smallint[], $32::smallint[], $33::text[])
        AS u(merchant_id, transfer_id, kind, version, state, result, credit_outcome, peer_shard)
    -- Each saga found through its key (as WRITE_BATCH finds accounts: joined to
    -- the array, a plan made on a new shard hash-joined a sequential scan of
    -- every saga); LOCK_STEPS locked these rows in this transaction.
    CROSS JOIN LATERAL (SELECT ctid AS row_id FROM sagas
        WHERE merchant_id = u.merchant_id AND transfer_id = u.transfer_id AND kind = u.kind
        OFFSET 0) AS found
    WHERE s.ctid = found.row_id AND s.version = u.version
    RETURNING {", ".join("s." + c.strip() for c in SAGA_COLUMNS.split(","))}
), finished_steps AS (
    INSERT INTO saga_steps (merchant_id, transfer_id, kind, step, outcome, detail)
    SELECT m, t, k, s, o, d
    FROM unnest($34::text[], $35::text[], $36::smallint[], $37::smallint[], $38::text[],
                $39::text[]) WITH ORDINALITY AS u(m, t, k, s, o, d, n)
    ORDER BY n
)
SELECT counted.credits_recorded, sagas.*
FROM (SELECT count(*) AS credits_recorded FROM new_credits) AS counted
LEFT JOIN (
    SELECT true AS is_new, * FROM new_sagas
    UNION ALL
    SELECT false, * FROM finished
) AS sagas ON true
"""

# The locks a transaction of saga steps takes before its accounts, in one round
# trip and one order: step 2's advisory lock (LOCK_CREDIT's) per saga ($1-$3),
# by lock key; then step 3's saga rows ($4-$6), by key. Each sorted, so two such
# transactions locking overlapping sets never wait on each other in a cycle; the
# saga rows depend on the advisory locks' count, so they are taken after them,
# and the left join runs the advisory locks even when there is no saga to lock.
# Always one row at least (NULL columns when no saga).
LOCK_STEPS = f"""
WITH credit_locks AS MATERIALIZED (
    SELECT pg_advisory_xact_lock(7304, h) FROM (
        SELECT DISTINCT hashtext(m || '/' || t || '/' || k) AS h
        FROM unnest($1::text[], $2::text[], $3::smallint[]) AS u(m, t, k)
        ORDER BY h
        OFFSET 0
    ) AS keys
)
SELECT s.* FROM (SELECT count(*) AS n FROM credit_locks) AS locked
LEFT JOIN LATERAL (
    SELECT found.* FROM (
        SELECT DISTINCT * FROM unnest($4::text[], $5::text[], $6::smallint[]) ORDER BY 1, 2, 3
    ) AS k(merchant_id, transfer_id, kind)
    CROSS JOIN LATERAL (
        SELECT {SAGA_COLUMNS} FROM sagas
        WHERE merchant_id = k.merchant_id AND transfer_id = k.transfer_id AND kind = k.kind
          AND locked.n >= 0
        OFFSET 0
        FOR UPDATE
    ) AS found
) AS s ON true
"""

# What a transaction of saga steps reads after its locks, in one round trip: the
# clock; the transfers its steps 1 and 3 name ($1-$2), each with its saga's
# final result once that saga finished (saga_result); and step 2's recorded
# outcomes ($3-$5, as one jsonb array). Always one row at least (the clock's),
# with NULL transfer columns when no transfer exists yet.
READ_STEPS = f"""
WITH found AS ({ledger_sql.SELECT_TRANSFERS}), credits AS (
    SELECT c.* FROM (SELECT DISTINCT * FROM unnest($3::text[], $4::text[], $5::smallint[]))
        AS k(merchant_id, transfer_id, kind)
    CROSS JOIN LATERAL (
        SELECT merchant_id, transfer_id, kind, outcome, result, credited_on FROM saga_credits
        WHERE merchant_id = k.merchant_id AND transfer_id = k.transfer_id AND kind = k.kind
        OFFSET 0
    ) AS c
)
SELECT clock_timestamp() AS now,
    (SELECT coalesce(jsonb_agg(credits), '[]'::jsonb) FROM credits) AS credits,
    (SELECT s.result FROM sagas s
     WHERE s.merchant_id = found.merchant_id AND s.transfer_id = found.transfer_id
       AND s.kind = 1 AND s.state IN (2, 3)) AS saga_result,
    found.*
FROM (SELECT 1) AS one LEFT JOIN found ON true
"""

# Step 1 of a reversal between shards: what each original ($3-$4: its debit
# merchant and id) posted to the account the reversal debits ($1-$2), from that
# account's entries (they live with it; the original's record is on the other
# shard). A cross-shard original's credit entries name its transfer too.
CREDITED_BY_ORIGINALS = "SELECT k.*, probed.credited_minor FROM " + ledger_sql.probe_by_key(
    ("account_merchant_id", "account_id", "merchant_id", "transfer_id"),
    "SELECT coalesce(sum(amount_minor), 0)::bigint AS credited_minor FROM entries "
    "WHERE transfer_merchant_id = k.merchant_id AND transfer_id = k.transfer_id "
    "AND merchant_id = k.account_merchant_id AND account_id = k.account_id "
    "AND direction = 2 AND kind = 1",
)

# One failed attempt: back off, or move to the dead-letter list when the
# attempts run out. The version check keeps a stale worker from writing.
# $8: whether the attempt counts towards the dead-letter list (a wait for a
# merchant's placement to settle does not: see SagaRunner.drive).
RETRY_LATER = f"""
UPDATE sagas SET attempts = attempts + CASE WHEN $8 THEN 1 ELSE 0 END,
    state = CASE WHEN $8 AND attempts + 1 >= $5 THEN 4 ELSE 1 END,
    next_attempt_at = clock_timestamp() + make_interval(secs => $6),
    last_error = $7, version = version + 1, lease_owner = '', lease_until = NULL,
    updated_at = clock_timestamp()
WHERE merchant_id = $1 AND transfer_id = $2 AND kind = $3 AND version = $4 AND state = 1
RETURNING {SAGA_COLUMNS}
"""

RESET_FOR_RETRY = f"""
UPDATE sagas SET state = 1, attempts = 0,
    next_attempt_at = clock_timestamp() + make_interval(secs => $5),
    last_error = '', version = version + 1, lease_owner = $4,
    lease_until = clock_timestamp() + make_interval(secs => $5),
    updated_at = clock_timestamp()
WHERE merchant_id = $1 AND transfer_id = $2 AND kind = $3 AND state IN (1, 4)
RETURNING {SAGA_COLUMNS}
"""

# Claims due sagas whose lease is free; SKIP LOCKED lets several replicas'
# workers claim disjoint sets, and the version bump fences out the previous
# holder of each.
CLAIM_DUE = f"""
WITH due AS (
    SELECT merchant_id, transfer_id, kind FROM sagas
    WHERE state = 1 AND next_attempt_at <= clock_timestamp()
      AND (lease_until IS NULL OR lease_until < clock_timestamp())
      -- Only sagas of merchants owned here: a move copies a merchant's sagas to
      -- its new shard before it owns them, and leaves them behind after.
      AND merchant_id IN (SELECT merchant_id FROM merchants WHERE state IN ('active', 'moving'))
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE sagas AS s SET lease_owner = $1,
    lease_until = clock_timestamp() + make_interval(secs => $3),
    version = s.version + 1, updated_at = clock_timestamp()
FROM due
WHERE s.merchant_id = due.merchant_id AND s.transfer_id = due.transfer_id AND s.kind = due.kind
RETURNING {", ".join("s." + c.strip() for c in SAGA_COLUMNS.split(","))}
"""

# Seconds until CLAIM_DUE would find a saga here (negative: overdue; NULL: none running).
NEXT_SAGA_DUE_S = """
SELECT extract(epoch FROM min(greatest(next_attempt_at, coalesce(lease_until, next_attempt_at)))
                          - clock_timestamp())::float8
FROM sagas WHERE state = 1
  AND merchant_id IN (SELECT merchant_id FROM merchants WHERE state IN ('active', 'moving'))
"""

# The oldest sagas in the states asked for, of merchants owned here. Each state is
# read through sagas_by_state in age order, and each saga's merchant probed by key,
# until the page is full: with `state = ANY($1)` the generic plan (shard
# connections plan generically) read every saga ever run to list the dead ones.
LIST_SAGAS = f"""
SELECT listed.* FROM (SELECT DISTINCT unnest($1::smallint[])) AS wanted(state)
CROSS JOIN LATERAL (
    SELECT {SAGA_COLUMNS} FROM sagas AS s
    WHERE s.state = wanted.state
      AND EXISTS (SELECT 1 FROM merchants AS m WHERE m.merchant_id = s.merchant_id
                  AND m.state IN ('active', 'moving') OFFSET 0)
    ORDER BY s.created_at LIMIT $2
) AS listed
ORDER BY listed.created_at LIMIT $2
"""

SELECT_CREDIT = """
SELECT outcome, result, credited_on FROM saga_credits
WHERE merchant_id = $1 AND transfer_id = $2 AND kind = $3
"""

INSERT_CREDIT = """
INSERT INTO saga_credits (merchant_id, transfer_id, kind, credit_merchant_id, outcome, result,
                          peer_shard, credited_on)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (merchant_id, transfer_id, kind) DO NOTHING
"""


# A settle's step 2 on a shard: whether the held transfer's debit party is being
# handed over from here (`moving`), and where this shard passes on the hold arriving
# from $3. A move's hand-over (MoveStore.mark_moved) and an arrival's fold change
# both under that party's lock held exclusively, so the step takes it shared first
# (HOLD_PARTIES_LOCK) and reads after, in a statement of its own whose snapshot is
# taken once the lock is held. A step that looked for the relay before a hand-over
# committed, and waited for its settlement rows after, settled the hold as its last
# hop (chaos seed 253: a shard that never drained).
HOLD_PARTIES_LOCK = """
SELECT count(pg_advisory_xact_lock_shared(7302, hashtext(m))) FROM unnest($1::text[]) AS m
"""
# The relay a hold arriving here from shard $3 passes next: on a numbered path
# (migration 0020), the one here with the least number above the stop it
# arrives from ($4); on an unnumbered one (NULL), the one relaying from $3.
RELAY_AFTER = """
SELECT from_shard, to_shard, path_position FROM hold_relays
WHERE merchant_id = $1 AND transfer_id = $2
  AND CASE WHEN $4::bigint IS NULL THEN path_position IS NULL AND from_shard = $3
           ELSE path_position > $4 END
ORDER BY path_position LIMIT 1
"""
HOLD_ROUTE = f"""
SELECT (SELECT state FROM merchants WHERE merchant_id = $1) AS debit_party_state,
       relay.from_shard, relay.to_shard AS relay_to, relay.path_position
FROM (SELECT 1) AS one LEFT JOIN LATERAL ({RELAY_AFTER}) AS relay ON true
"""

INSERT_CREDIT_HOLD = """
INSERT INTO credit_holds (merchant_id, transfer_id, credit_merchant_id, currency, amount_minor,
                          from_shard, path_position)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""

DELETE_CREDIT_HOLD = "DELETE FROM credit_holds WHERE merchant_id = $1 AND transfer_id = $2"

SELECT_RELAY_PASS = """
SELECT to_shard FROM relay_passes
WHERE merchant_id = $1 AND transfer_id = $2 AND kind = $3
  AND CASE WHEN $5::bigint IS NULL THEN path_position IS NULL AND from_shard = $4
           ELSE path_position = $5 END
"""

INSERT_RELAY_PASS = """
INSERT INTO relay_passes (merchant_id, transfer_id, kind, from_shard, to_shard,
    pending_transfer_id, path_position)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""

# Serialises step 2 of one saga on the credit shard, so a concurrent duplicate
# waits and then reads the recorded outcome instead of racing to write its own.
LOCK_CREDIT = "SELECT pg_advisory_xact_lock(7304, hashtext($1 || '/' || $2 || '/' || $3::smallint))"


SELECT_SAGA_KEYS_FOR = "SELECT probed.* FROM " + ledger_sql.probe_by_key(
    ("merchant_id", "transfer_id"),
    "SELECT merchant_id, transfer_id FROM sagas "
    "WHERE merchant_id = k.merchant_id AND transfer_id = k.transfer_id AND kind = 1 "
    "AND NOT settles_locally",
)

# Of these pending transfers, the ones a move folded back into local holds
# (migration 0019): read again under the settlement locks a fold takes, so a
# settle or an expiry that looked before the fold committed hands them back.
SETTLING_LOCALLY = "SELECT probed.* FROM " + ledger_sql.probe_by_key(
    ("merchant_id", "transfer_id"),
    "SELECT merchant_id, transfer_id FROM sagas "
    "WHERE merchant_id = k.merchant_id AND transfer_id = k.transfer_id AND kind = 1 "
    "AND settles_locally",
)

# Due pending transfers that a saga carries (cross-shard); the plain sweeper
# skips them.
DUE_CROSS_SHARD_EXPIRIES = """
SELECT e.merchant_id, e.transfer_id FROM pending_expiries e
WHERE e.expires_at <= clock_timestamp()
  AND EXISTS (SELECT 1 FROM sagas s WHERE s.merchant_id = e.merchant_id
              AND s.transfer_id = e.transfer_id AND s.kind = 1 AND s.state = 2
              AND NOT s.settles_locally)
ORDER BY e.expires_at
LIMIT $1
"""

FINAL_RESULTS = "SELECT probed.* FROM " + ledger_sql.probe_by_key(
    ("merchant_id", "transfer_id"),
    "SELECT merchant_id, transfer_id, result FROM sagas "
    "WHERE merchant_id = k.merchant_id AND transfer_id = k.transfer_id AND kind = 1 "
    "AND state IN (2, 3)",
)

# Reconcile: what one shard reports about itself.
# Merchants that moved away (old copies) or are still being copied here are
# not this shard's: their rows do not count.
SUMS_BY_CURRENCY = """
SELECT currency,
       sum(credits_posted::numeric - debits_posted) AS posted,
       sum(credits_pending::numeric - debits_pending) AS pending
FROM accounts
WHERE merchant_id NOT IN (SELECT merchant_id FROM merchants WHERE state IN ('moved', 'incoming'))
GROUP BY currency ORDER BY currency
"""

# Accounts whose stored balances disagree with their last entry.
ACCOUNTS_OFF_THEIR_ENTRIES = """
SELECT a.merchant_id, a.account_id FROM accounts a
LEFT JOIN LATERAL (
    SELECT sequence, debits_posted, credits_posted, debits_pending, credits_pending
    FROM entries e WHERE e.merchant_id = a.merchant_id AND e.account_id = a.account_id
    ORDER BY sequence DESC LIMIT 1
) last ON true
WHERE (a.entry_count = 0 AND last.sequence IS NOT NULL)
   OR (a.entry_count > 0 AND (last.sequence IS DISTINCT FROM a.entry_count
       OR last.debits_posted <> a.debits_posted OR last.credits_posted <> a.credits_posted
       OR last.debits_pending <> a.debits_pending OR last.credits_pending <> a.credits_pending))
LIMIT 20
"""

SETTLEMENT_BALANCES = """
SELECT account_id, debits_posted, credits_posted, debits_pending, credits_pending
FROM accounts WHERE merchant_id = '$settlement'
"""

# Sagas of the merchants this shard owns: a copy a move left (a deferred or
# abandoned move's `incoming` one, or the old one until cleanup) keeps its saga
# rows as they were when copied, and counting them kept a finished saga running
# here for reconcile, which then skipped this shard's settlement pairs.
OWNED_SAGAS = """
SELECT s.* FROM sagas AS s JOIN merchants AS m
  ON m.merchant_id = s.merchant_id AND m.state IN ('active', 'moving')
"""

SAGA_COUNTS = f"""
SELECT state, peer_shard, count(*) AS sagas FROM ({OWNED_SAGAS}) AS s GROUP BY state, peer_shard
"""

STUCK_SAGAS = f"""
SELECT merchant_id, transfer_id, kind FROM ({OWNED_SAGAS}) AS s
WHERE state = 1 AND created_at < clock_timestamp() - make_interval(secs => $1)
ORDER BY created_at LIMIT 20
"""

# Finished sagas, a page at a time, to check their legs on both shards.
FINISHED_SAGAS_PAGE = """
SELECT merchant_id, transfer_id, kind, state, credit_action, peer_shard FROM sagas
WHERE state IN (2, 3) AND (merchant_id, transfer_id, kind) > ($1, $2, $3)
ORDER BY merchant_id, transfer_id, kind
LIMIT $4
"""

# Each key probed: with `IN (SELECT * FROM unnest(...))` the generic plan read
# every saga credit, and every entry below, for each page of sagas a
# reconciliation checks: quadratic in the shard's sagas.
CREDITS_FOR = "SELECT probed.* FROM " + ledger_sql.probe_by_key(
    ("merchant_id", "transfer_id", "kind"),
    "SELECT merchant_id, transfer_id, kind, outcome FROM saga_credits"
    " WHERE merchant_id = k.merchant_id AND transfer_id = k.transfer_id AND kind = k.kind",
    types=("text", "text", "smallint"),
)

# For completed POST sagas: the debit side posted (a POSTED debit entry exists).
POSTED_DEBITS_FOR = "SELECT k.merchant_id, k.transfer_id FROM " + ledger_sql.probe_by_key(
    ("merchant_id", "transfer_id"),
    "SELECT 1 FROM entries WHERE transfer_merchant_id = k.merchant_id"
    " AND transfer_id = k.transfer_id AND direction = 1 AND kind = 1"
    " AND merchant_id <> '$settlement' LIMIT 1",
)

# Reconcile: a rebalance or cleanup holds the admin lock on every shard it uses;
# without it, no move is in progress.
ADMIN_LOCK_HELD = f"SELECT EXISTS ({move_sql.ADMIN_LOCK_HOLDER})"

CLAIMS_PAUSED = "SELECT claims_paused FROM shard_meta"

MOVE_MARKERS = """
SELECT merchant_id, state FROM merchants WHERE state IN ('incoming', 'moving')
ORDER BY merchant_id LIMIT 20
"""

# The shards that open cross-shard holds need to settle, with how many holds
# need each: the peers of open holds of merchants here (debit side: the saga's
# peer; credit side: where the credit arrives from) and the relays here that no
# settle has passed yet.
HOLD_ROUTE_SHARDS = """
SELECT shard, count(*) AS holds FROM (
    SELECT s.peer_shard AS shard FROM sagas s
    JOIN merchants m ON m.merchant_id = s.merchant_id AND m.state IN ('active', 'moving')
    WHERE s.kind = 1 AND s.credit_action = 2 AND s.state = 2 AND NOT s.settles_locally
      AND NOT EXISTS (SELECT 1 FROM pending_resolutions r
                      WHERE r.merchant_id = s.merchant_id AND r.pending_id = s.transfer_id)
    UNION ALL
    SELECT c.from_shard FROM credit_holds c
    JOIN merchants m ON m.merchant_id = c.credit_merchant_id AND m.state IN ('active', 'moving')
    UNION ALL
    SELECT unnest(ARRAY[h.from_shard, h.to_shard]) FROM hold_relays h
    WHERE NOT EXISTS (SELECT 1 FROM relay_passes p WHERE p.merchant_id = h.merchant_id
                      AND p.pending_transfer_id = h.transfer_id)
) routes GROUP BY shard ORDER BY shard
"""

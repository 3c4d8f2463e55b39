"""The raw baseline's tables and statements: the ledger's rows, written with no service.

The tables copy the columns, keys, CHECKs and indexes of accounts, transfers and
entries from ledger/storage/migrations/0001_ledger.sql, under bench_ names in
the same shard databases, so the baseline pays the same index upkeep, the same
WAL and the same fsync on the same disks. Left out on purpose, because none of
them does work on the rows written here:
- the foreign key accounts -> merchants: PostgreSQL checks it only when the key
  columns change, and the baseline only updates balances;
- the append-only triggers: they fire on UPDATE and DELETE of history, never
  on INSERT.
"""

from __future__ import annotations

RAW_TABLES = ("bench_entries", "bench_transfers", "bench_accounts")

DROP_TABLES = """
DROP TABLE IF EXISTS bench_entries, bench_transfers, bench_accounts;
DROP TYPE IF EXISTS bench_transfer_row, bench_entry_row, bench_account_head
"""

CREATE_TABLES = """
CREATE TABLE bench_accounts (
    merchant_id                     text NOT NULL,
    account_id                      text NOT NULL,
    currency                        text NOT NULL,
    debits_must_not_exceed_credits  boolean NOT NULL,
    credits_must_not_exceed_debits  boolean NOT NULL,
    closed                          boolean NOT NULL DEFAULT false,
    metadata                        jsonb NOT NULL,
    debits_posted                   bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted                  bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending                  bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending                 bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    entry_count                     bigint NOT NULL DEFAULT 0,
    created_at                      timestamptz NOT NULL,
    entry_hash                      bytea NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    PRIMARY KEY (merchant_id, account_id),
    CHECK (NOT (debits_must_not_exceed_credits AND credits_must_not_exceed_debits)),
    CHECK (NOT debits_must_not_exceed_credits
           OR debits_posted::numeric + debits_pending <= credits_posted),
    CHECK (NOT credits_must_not_exceed_debits
           OR credits_posted::numeric + credits_pending <= debits_posted)
);

CREATE TABLE bench_transfers (
    merchant_id             text NOT NULL,
    transfer_id             text NOT NULL,
    kind                    smallint NOT NULL CHECK (kind IN (1, 2)),
    action                  smallint NOT NULL,
    debit_merchant_id       text NOT NULL,
    debit_account_id        text NOT NULL,
    credit_merchant_id      text NOT NULL,
    credit_account_id       text NOT NULL,
    amount_minor            bigint NOT NULL CHECK (amount_minor >= 0),
    amount_effective_minor  bigint NOT NULL CHECK (amount_effective_minor >= 0),
    currency                text NOT NULL,
    pending_id              text NOT NULL,
    timeout_ms              bigint NOT NULL,
    linked                  boolean NOT NULL,
    reversal_of             text NOT NULL,
    metadata                jsonb NOT NULL,
    postings                jsonb,
    result                  smallint NOT NULL,
    failed_posting_index    integer NOT NULL DEFAULT -1,
    expires_at              timestamptz,
    trace_id                text NOT NULL DEFAULT '',
    created_at              timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, transfer_id)
);

CREATE INDEX bench_transfers_reversals ON bench_transfers (credit_merchant_id, reversal_of)
    WHERE reversal_of <> '';

CREATE TABLE bench_entries (
    merchant_id           text NOT NULL,
    account_id            text NOT NULL,
    sequence              bigint NOT NULL CHECK (sequence >= 1),
    transfer_merchant_id  text NOT NULL,
    transfer_id           text NOT NULL,
    direction             smallint NOT NULL CHECK (direction IN (1, 2)),
    kind                  smallint NOT NULL CHECK (kind IN (1, 2, 3)),
    amount_minor          bigint NOT NULL CHECK (amount_minor > 0),
    debits_posted         bigint NOT NULL,
    credits_posted        bigint NOT NULL,
    debits_pending        bigint NOT NULL,
    credits_pending       bigint NOT NULL,
    created_at            timestamptz NOT NULL,
    entry_hash            bytea NOT NULL,
    PRIMARY KEY (merchant_id, account_id, sequence)
);

CREATE INDEX bench_entries_as_of ON bench_entries (merchant_id, account_id, created_at);

-- WRITE_BATCH receives one array of rows per table, as the service does (its
-- row types are in migration 0007): the cheapest way asyncpg knows to send
-- them. Only the columns that differ between transfers are sent.
CREATE TYPE bench_transfer_row AS (
    merchant_id text, transfer_id text, debit_account_id text, credit_merchant_id text,
    credit_account_id text, amount_minor bigint
);
CREATE TYPE bench_entry_row AS (
    merchant_id text, account_id text, sequence bigint, transfer_merchant_id text,
    transfer_id text, direction smallint, amount_minor bigint, debits_posted bigint,
    credits_posted bigint, entry_hash bytea
);
CREATE TYPE bench_account_head AS (
    merchant_id text, account_id text, debits_posted bigint, credits_posted bigint,
    entry_count bigint, entry_hash bytea
);
"""

INSERT_ACCOUNTS = """
INSERT INTO bench_accounts (merchant_id, account_id, currency, debits_must_not_exceed_credits,
                            credits_must_not_exceed_debits, metadata, created_at)
SELECT m, a, 'USD', false, false, '{}'::jsonb, clock_timestamp()
FROM unnest($1::text[], $2::text[]) AS u(m, a)
"""

# The same row locks as the service's LOCK_ACCOUNTS: one statement, one fixed
# order, the same columns read back.
LOCK_ACCOUNTS = """
SELECT merchant_id, account_id, currency, debits_must_not_exceed_credits,
       credits_must_not_exceed_debits, closed, metadata, debits_posted, credits_posted,
       debits_pending, credits_pending, entry_count, created_at, entry_hash
FROM bench_accounts
WHERE (merchant_id, account_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY merchant_id COLLATE "C", account_id COLLATE "C"
FOR UPDATE
"""

# The transfers, entries and balance parts of the service's WRITE_BATCH, with
# the same columns: one round trip, set-based, for one transfer or a batch.
WRITE_BATCH = """
WITH new_transfers AS (
    INSERT INTO bench_transfers (merchant_id, transfer_id, kind, action, debit_merchant_id,
        debit_account_id, credit_merchant_id, credit_account_id, amount_minor,
        amount_effective_minor, currency, pending_id, timeout_ms, linked, reversal_of,
        metadata, postings, result, failed_posting_index, expires_at, trace_id, created_at)
    SELECT u.merchant_id, u.transfer_id, 1, 1, u.merchant_id, u.debit_account_id,
        u.credit_merchant_id, u.credit_account_id, u.amount_minor, u.amount_minor, 'USD', '',
        0, false, '', '{}'::jsonb, NULL, 1, -1, NULL, '', $4::timestamptz
    FROM unnest($1::bench_transfer_row[]) AS u
    RETURNING 1
), new_entries AS (
    INSERT INTO bench_entries (merchant_id, account_id, sequence, transfer_merchant_id,
        transfer_id, direction, kind, amount_minor, debits_posted, credits_posted,
        debits_pending, credits_pending, created_at, entry_hash)
    SELECT u.merchant_id, u.account_id, u.sequence, u.transfer_merchant_id, u.transfer_id,
        u.direction, 1, u.amount_minor, u.debits_posted, u.credits_posted, 0, 0,
        $4::timestamptz, u.entry_hash
    FROM unnest($2::bench_entry_row[]) AS u
    RETURNING 1
), updated_accounts AS (
    UPDATE bench_accounts AS a
    SET debits_posted = u.debits_posted, credits_posted = u.credits_posted,
        entry_count = u.entry_count, entry_hash = u.entry_hash
    FROM unnest($3::bench_account_head[]) AS u
    WHERE a.merchant_id = u.merchant_id AND a.account_id = u.account_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_transfers) AS transfers,
       (SELECT count(*) FROM new_entries) AS entries,
       (SELECT count(*) FROM updated_accounts) AS accounts
"""

# pgbench (the C client that ships with PostgreSQL) drives the same writes, so a
# Python client's own cost never flatters a ratio (bench/pgbench.py). pgbench
# cannot hash or do arithmetic on rows it read, so its first statement does in
# SQL what the asyncpg raw client does in Python between its two statements:
# pick the merchants, lock the accounts (LOCK_ACCOUNTS's rows, order and FOR
# UPDATE), compute the entries with their balances after and one SHA-256 each,
# and return the three row arrays as text for WRITE_BATCH, sent unchanged.
# Its transaction is the same four round trips (BEGIN, lock, write, COMMIT).
# Each entry hashes its account's locked head hash rather than the previous
# entry of the same batch (a window cannot chain), the same bytes hashed and
# written per entry.
PGBENCH_MERCHANTS_TABLE = "bench_pgbench_merchants"
DROP_PGBENCH_MERCHANTS = "DROP TABLE IF EXISTS bench_pgbench_merchants"
# The shard's merchants numbered from 0, so pgbench can pick one by number.
CREATE_PGBENCH_MERCHANTS = """
CREATE TABLE bench_pgbench_merchants (idx integer PRIMARY KEY, merchant_id text NOT NULL);
"""
INSERT_PGBENCH_MERCHANTS = """
INSERT INTO bench_pgbench_merchants (idx, merchant_id)
SELECT i - 1, m FROM unnest($1::text[]) WITH ORDINALITY AS u(m, i)
"""

# pgbench variables: :batch transfers per transaction over the merchants
# numbered :first, :first + :stride, ... (:slots of them); :seq and :client_id
# make transfer ids unique in the run (:prefix).
PGBENCH_PICK_AND_LOCK = """
WITH picks AS MATERIALIZED (
    SELECT g AS k, (:first + :stride * floor(random() * :slots))::integer AS idx,
           1 + floor(random() * 1000)::bigint AS amount_minor
    FROM generate_series(1, :batch) AS g
), transfers AS MATERIALIZED (
    SELECT p.k, m.merchant_id, p.amount_minor,
           (ARRAY['cash', 'sales'])[1 + (:seq + p.k) % 2] AS debit_account_id,
           (ARRAY['sales', 'cash'])[1 + (:seq + p.k) % 2] AS credit_account_id,
           :prefix || '-' || :client_id || '-' || (:seq + p.k) AS transfer_id
    FROM picks AS p JOIN bench_pgbench_merchants AS m USING (idx)
), locked AS MATERIALIZED (
    SELECT merchant_id, account_id, currency, debits_must_not_exceed_credits,
           credits_must_not_exceed_debits, closed, metadata, debits_posted, credits_posted,
           debits_pending, credits_pending, entry_count, created_at, entry_hash
    FROM bench_accounts
    WHERE (merchant_id, account_id) IN (
        SELECT merchant_id, debit_account_id FROM transfers
        UNION SELECT merchant_id, credit_account_id FROM transfers)
    ORDER BY merchant_id COLLATE "C", account_id COLLATE "C"
    FOR UPDATE
), legs AS (
    SELECT k, merchant_id, debit_account_id AS account_id, transfer_id,
           1::smallint AS direction, amount_minor FROM transfers
    UNION ALL
    SELECT k, merchant_id, credit_account_id, transfer_id, 2::smallint, amount_minor
    FROM transfers
), entries AS (
    SELECT l.*, a.entry_hash AS head_hash,
           a.entry_count + row_number() OVER w AS sequence,
           a.debits_posted
               + coalesce(sum(l.amount_minor) FILTER (WHERE l.direction = 1) OVER w, 0)
               AS debits_posted,
           a.credits_posted
               + coalesce(sum(l.amount_minor) FILTER (WHERE l.direction = 2) OVER w, 0)
               AS credits_posted
    FROM legs AS l JOIN locked AS a USING (merchant_id, account_id)
    WINDOW w AS (PARTITION BY l.merchant_id, l.account_id ORDER BY l.k)
), hashed AS MATERIALIZED (
    SELECT e.*, sha256(e.head_hash || convert_to(concat_ws(E'\\x1f', e.merchant_id,
               e.account_id, e.sequence, e.transfer_id, e.debits_posted, e.credits_posted),
               'UTF8')) AS entry_hash
    FROM entries AS e
)
SELECT
    (SELECT array_agg(ROW(merchant_id, transfer_id, debit_account_id, merchant_id,
        credit_account_id, amount_minor)::bench_transfer_row ORDER BY k) FROM transfers)::text
        AS transfer_rows,
    (SELECT array_agg(ROW(merchant_id, account_id, sequence, merchant_id, transfer_id,
        direction, amount_minor, debits_posted, credits_posted,
        entry_hash)::bench_entry_row) FROM hashed)::text AS entry_rows,
    (SELECT array_agg(ROW(merchant_id, account_id, debits_posted, credits_posted, sequence,
        entry_hash)::bench_account_head) FROM (
            SELECT DISTINCT ON (merchant_id, account_id) * FROM hashed
            ORDER BY merchant_id, account_id, sequence DESC) AS last)::text AS head_rows,
    clock_timestamp()::text AS now
"""

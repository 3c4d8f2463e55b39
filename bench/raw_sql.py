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
    WHERE reversal_of <> '' AND result = 1;

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

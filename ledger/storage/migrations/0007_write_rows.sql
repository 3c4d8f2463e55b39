-- The shapes in which WRITE_BATCH receives a batch: one array of rows per
-- table instead of one array per column. asyncpg pays a fixed cost per
-- parameter and per array element; a row array carries the same values in 6
-- parameters instead of 54, for about half the encoding CPU in the service
-- and less decoding in PostgreSQL (see the README's Performance section).
-- Field order is the order of the INSERT column lists in WRITE_BATCH.

CREATE TYPE ledger_transfer_row AS (
    merchant_id             text,
    transfer_id             text,
    kind                    smallint,
    action                  smallint,
    debit_merchant_id       text,
    debit_account_id        text,
    credit_merchant_id      text,
    credit_account_id       text,
    amount_minor            bigint,
    amount_effective_minor  bigint,
    currency                text,
    pending_id              text,
    timeout_ms              bigint,
    linked                  boolean,
    reversal_of             text,
    metadata                jsonb,
    postings                jsonb,
    result                  smallint,
    failed_posting_index    integer,
    expires_at              timestamptz,
    trace_id                text,
    created_at              timestamptz
);

CREATE TYPE ledger_entry_row AS (
    merchant_id           text,
    account_id            text,
    sequence              bigint,
    transfer_merchant_id  text,
    transfer_id           text,
    direction             smallint,
    kind                  smallint,
    amount_minor          bigint,
    debits_posted         bigint,
    credits_posted        bigint,
    debits_pending        bigint,
    credits_pending       bigint,
    created_at            timestamptz,
    entry_hash            bytea
);

-- An account's balances and chain head after the batch.
CREATE TYPE ledger_account_head AS (
    merchant_id      text,
    account_id       text,
    debits_posted    bigint,
    credits_posted   bigint,
    debits_pending   bigint,
    credits_pending  bigint,
    entry_count      bigint,
    entry_hash       bytea
);

CREATE TYPE ledger_resolution_row AS (
    merchant_id     text,
    pending_id      text,
    state           smallint,
    by_transfer_id  text,
    created_at      timestamptz
);

CREATE TYPE ledger_expiry_row AS (
    merchant_id  text,
    transfer_id  text,
    expires_at   timestamptz
);

CREATE TYPE ledger_transfer_key AS (
    merchant_id  text,
    transfer_id  text
);

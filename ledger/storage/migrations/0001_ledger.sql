-- The ledger's tables on one shard. Money columns are bigint minor units.
-- History (transfers, entries, pending_resolutions) is append-only: triggers
-- below refuse UPDATE, DELETE and TRUNCATE on those tables.

CREATE TABLE shard_meta (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The stable shard name from the config; a DSN pointing at another
    -- shard's database is caught at start-up by comparing it.
    shard_name  text NOT NULL,
    -- The newest config epoch this shard has seen; a router on an older epoch
    -- is refused and reloads its config.
    epoch       bigint NOT NULL CHECK (epoch >= 1),
    -- Set by a rebalance while it decides which merchants move: a write for a
    -- merchant this shard has never seen waits (retryable) instead of taking
    -- it on, so no merchant can be taken on by two shards.
    claims_paused boolean NOT NULL DEFAULT false
);

-- The service replicas using this shard and the config epoch each has loaded,
-- refreshed every few seconds (shown by `ledger shards status`).
CREATE TABLE replicas (
    replica_id  text PRIMARY KEY,
    epoch       bigint NOT NULL,
    seen_at     timestamptz NOT NULL
);

-- Which merchants this shard owns. Every write locks its merchants (shared
-- advisory lock) and checks state = 'active' in the same transaction.
--   active:   owned here;
--   moving:   owned here but fenced by a move in progress (writes retry);
--   moved:    handed to the shard in moved_to (writes are redirected there);
--   incoming: being copied here from the shard in moved_to, which still owns it.
CREATE TABLE merchants (
    merchant_id text PRIMARY KEY,
    state       text NOT NULL CHECK (state IN ('active', 'moving', 'moved', 'incoming')),
    moved_to    text,
    epoch       bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK ((state IN ('moved', 'incoming')) = (moved_to IS NOT NULL))
);

CREATE TABLE accounts (
    merchant_id                     text NOT NULL REFERENCES merchants,
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
    -- The sequence number of the account's last entry.
    entry_count                     bigint NOT NULL DEFAULT 0,
    created_at                      timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, account_id),
    CHECK (NOT (debits_must_not_exceed_credits AND credits_must_not_exceed_debits)),
    -- Defence in depth: the service checks limits, the database refuses a
    -- row that breaks them (numeric, so the sum itself cannot overflow).
    CHECK (NOT debits_must_not_exceed_credits
           OR debits_posted::numeric + debits_pending <= credits_posted),
    CHECK (NOT credits_must_not_exceed_debits
           OR credits_posted::numeric + credits_pending <= debits_posted)
);

-- Transfers and journals, including failed ones (a failed id stays failed).
CREATE TABLE transfers (
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

CREATE INDEX transfers_reversals ON transfers (credit_merchant_id, reversal_of)
    WHERE reversal_of <> '' AND result = 1;

-- How each pending transfer ended (posted, voided, expired): at most once.
CREATE TABLE pending_resolutions (
    merchant_id     text NOT NULL,
    pending_id      text NOT NULL,
    state           smallint NOT NULL CHECK (state IN (2, 3, 4)),
    by_transfer_id  text NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, pending_id)
);

-- A work queue, not history: pending transfers with a timeout that have not
-- ended yet. A row is deleted when its pending transfer is posted, voided or
-- expired.
CREATE TABLE pending_expiries (
    merchant_id  text NOT NULL,
    transfer_id  text NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, transfer_id)
);

CREATE INDEX pending_expiries_due ON pending_expiries (expires_at);

-- Each account's history with the balances after each entry.
CREATE TABLE entries (
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
    PRIMARY KEY (merchant_id, account_id, sequence)
);

CREATE INDEX entries_as_of ON entries (merchant_id, account_id, created_at);

-- History is append-only. The one exception, for a later cleanup of a
-- merchant that moved to another shard, must set ledger.allow_history_cleanup.
CREATE FUNCTION ledger_refuse_history_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('ledger.allow_history_cleanup', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'ledger history is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = '55000';
END $$;

CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER pending_resolutions_append_only BEFORE UPDATE OR DELETE ON pending_resolutions
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER pending_resolutions_no_truncate BEFORE TRUNCATE ON pending_resolutions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();

-- The fence every write starts with: shared advisory locks on the config epoch
-- and on each merchant (a merchant move takes them exclusively; PostgreSQL's
-- lock queue is fair, so writers cannot starve a waiting move), then the
-- shard's epoch and the merchants' ownership rows.
CREATE FUNCTION ledger_fence(p_merchants text[])
RETURNS TABLE (epoch bigint, claims_paused boolean, merchant_id text, state text, moved_to text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7301, 0);
    PERFORM count(pg_advisory_xact_lock_shared(7302, hashtext(m)))
        FROM unnest(p_merchants) AS m;
    RETURN QUERY
        SELECT s.epoch, s.claims_paused, m.merchant_id, m.state, m.moved_to
        FROM shard_meta s
        LEFT JOIN merchants m ON m.merchant_id = ANY (p_merchants);
END $$;

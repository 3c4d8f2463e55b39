-- Spending controls (issue 21): velocity rules, limits that change at run time,
-- and balance monitors. See ledger/domain/velocity.py and monitors.py for the
-- rules, docs/data-model.md for the tables.

-- The velocity rules in force, beside the overdraft flags they join: read with
-- the account's row lock by every transfer, changed under that same lock.
-- A JSON array of {rule_id, direction, metric, window_s, limit}.
ALTER TABLE accounts ADD COLUMN velocity_rules jsonb NOT NULL DEFAULT '[]';

-- Every change of an account's limits (append-only): who, when, why, and the
-- whole set of limits from then on. accounts holds the current view.
CREATE TABLE account_limit_changes (
    merchant_id                     text NOT NULL,
    account_id                      text NOT NULL,
    sequence                        bigint NOT NULL CHECK (sequence >= 1),
    change_id                       text NOT NULL,
    debits_must_not_exceed_credits  boolean NOT NULL,
    credits_must_not_exceed_debits  boolean NOT NULL,
    velocity_rules                  jsonb NOT NULL,
    balance_monitors                jsonb NOT NULL,
    changed_by                      text NOT NULL,
    reason                          text NOT NULL,
    changed_at                      timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, account_id, sequence),
    UNIQUE (merchant_id, account_id, change_id)
);

-- What each limited account moved per (direction, window) in fixed buckets of
-- window_s / 20 seconds, numbered from the Unix epoch. Written by the same
-- statement as the entries (WRITE_BATCH), under the account's lock. amount is
-- numeric: a window with only a count rule is never bounded in amount.
-- Rows are never deleted while the merchant lives here: at most one per bucket
-- an account moved money in, so never more than its entries.
CREATE TABLE velocity_buckets (
    merchant_id     text NOT NULL,
    account_id      text NOT NULL,
    direction       smallint NOT NULL CHECK (direction IN (1, 2)),
    window_s        integer NOT NULL CHECK (window_s >= 1),
    bucket_index    bigint NOT NULL,
    amount_minor    numeric NOT NULL CHECK (amount_minor >= 0),
    transfer_count  bigint NOT NULL CHECK (transfer_count >= 0),
    PRIMARY KEY (merchant_id, account_id, direction, window_s, bucket_index)
) WITH (fillfactor = 70);  -- rows are updated in place by every transfer (HOT updates)

CREATE TYPE ledger_velocity_row AS (
    merchant_id     text,
    account_id      text,
    direction       smallint,
    window_s        integer,
    bucket_index    bigint,
    amount_minor    numeric,
    transfer_count  bigint
);

-- Balance monitors (the current view; their history is in account_limit_changes).
-- A removed monitor is marked inactive, never deleted, so a merchant move's
-- incremental copy carries the removal like any other change.
CREATE TABLE balance_monitors (
    merchant_id      text NOT NULL,
    monitor_id       text NOT NULL,
    account_id       text NOT NULL,
    balance          smallint NOT NULL CHECK (balance IN (1, 2)),
    threshold_minor  bigint NOT NULL,
    active           boolean NOT NULL,
    PRIMARY KEY (merchant_id, monitor_id)
);
CREATE INDEX balance_monitors_by_account ON balance_monitors (merchant_id, account_id)
    WHERE active;

-- Crossings of monitors' thresholds (append-only), written by WRITE_BATCH in the
-- transaction of the change that crossed. Each row describes itself (for the
-- event stream): monitor, account, which way, the balance after, the threshold,
-- the transfer that crossed it and when.
CREATE TABLE monitor_crossings (
    merchant_id           text NOT NULL,
    monitor_id            text NOT NULL,
    account_id            text NOT NULL,
    direction             smallint NOT NULL CHECK (direction IN (1, 2)),
    balance               smallint NOT NULL,
    threshold_minor       bigint NOT NULL,
    balance_after_minor   numeric NOT NULL,
    transfer_merchant_id  text NOT NULL,
    transfer_id           text NOT NULL,
    crossed_at            timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, monitor_id, transfer_merchant_id, transfer_id, direction)
);
CREATE INDEX monitor_crossings_by_time ON monitor_crossings (merchant_id, crossed_at);

-- Append-only, with the one exception of migration 0009: a transaction granted
-- the cleanup of a merchant (moved away, or being copied here) may delete its rows.
CREATE FUNCTION ledger_refuse_limits_history_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND EXISTS (
        SELECT 1 FROM ledger_guard.history_cleanup_grants g
        WHERE g.xact_id = pg_current_xact_id() AND g.merchant_id = OLD.merchant_id
    ) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'ledger history is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = '55000';
END $$;

CREATE TRIGGER account_limit_changes_append_only BEFORE UPDATE OR DELETE
    ON account_limit_changes FOR EACH ROW EXECUTE FUNCTION ledger_refuse_limits_history_change();
CREATE TRIGGER monitor_crossings_append_only BEFORE UPDATE OR DELETE
    ON monitor_crossings FOR EACH ROW EXECUTE FUNCTION ledger_refuse_limits_history_change();
CREATE TRIGGER account_limit_changes_no_truncate BEFORE TRUNCATE ON account_limit_changes
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER monitor_crossings_no_truncate BEFORE TRUNCATE ON monitor_crossings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();

-- Cross-shard pending transfers whose parties move (see ledger/domain/moves.py).
--
-- A hold between shards H (debit party) and P (credit party) is held by H's
-- settlement account for P and P's for H. When a party moves away, the shard
-- it leaves keeps both settlement positions (its own settlement account for
-- the new shard takes the leaving party's side) and becomes a relay: settling
-- the hold later passes through it, hop by hop, each hop recorded once.

-- Open cross-shard holds credited to a merchant here, and the shard whose
-- settlement account for this one holds the other side. A work table (rows
-- leave when the hold is settled); it moves with the credit merchant. Holds
-- credited before this migration have no row: their merchant is not moved
-- until they settle.
CREATE TABLE credit_holds (
    merchant_id         text NOT NULL,
    transfer_id         text NOT NULL,
    credit_merchant_id  text NOT NULL,
    currency            text NOT NULL,
    amount_minor        bigint NOT NULL CHECK (amount_minor > 0),
    from_shard          text NOT NULL,
    PRIMARY KEY (merchant_id, transfer_id)
);

CREATE INDEX credit_holds_by_merchant ON credit_holds (credit_merchant_id);

-- This shard relays the hold of pending transfer (merchant_id, transfer_id)
-- arriving from from_shard on to to_shard: its settlement account for
-- from_shard holds the debit side, the one for to_shard the credit side.
CREATE TABLE hold_relays (
    merchant_id  text NOT NULL,
    transfer_id  text NOT NULL,
    from_shard   text NOT NULL,
    to_shard     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (merchant_id, transfer_id, from_shard)
);

CREATE TRIGGER hold_relays_append_only BEFORE UPDATE OR DELETE ON hold_relays
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER hold_relays_no_truncate BEFORE TRUNCATE ON hold_relays
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();

-- Each settle (or expiry) saga passes a relay at most once per arriving shard:
-- the exactly-once record of that hop (saga_credits keeps the last hop's).
CREATE TABLE relay_passes (
    merchant_id  text NOT NULL,
    transfer_id  text NOT NULL,
    kind         smallint NOT NULL,
    from_shard   text NOT NULL,
    to_shard     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (merchant_id, transfer_id, kind, from_shard)
);

CREATE TRIGGER relay_passes_append_only BEFORE UPDATE OR DELETE ON relay_passes
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER relay_passes_no_truncate BEFORE TRUNCATE ON relay_passes
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();

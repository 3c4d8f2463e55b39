-- Folding a hold's path (see ledger/domain/moves.py and docs/moves.md).
--
-- A party of a cross-shard hold that moves back to the shard its hold's path
-- passes next (a merchant moving away and back while a hold stays open) does
-- not add two relay steps: the step between the shard it leaves and the one
-- it arrives on is folded away. Both shards release their settlement legs
-- for that step and the arriving shard's relay for it is removed, so the
-- path gets shorter instead of longer.

-- A fold may not happen while a settle is passing the relay it removes: each
-- relay pass now names the pending transfer it settles.
ALTER TABLE relay_passes ADD COLUMN pending_transfer_id text;
CREATE INDEX relay_passes_by_pending ON relay_passes (merchant_id, pending_transfer_id);

-- The folds this shard made as a moving party arrived (append-only): the
-- shard it left reads them to release its own leg instead of becoming a relay,
-- so a rerun after a crash between the two switches decides the same way.
CREATE TABLE hold_folds (
    merchant_id        text NOT NULL,
    transfer_id        text NOT NULL,
    party_merchant_id  text NOT NULL,
    epoch              bigint NOT NULL,
    from_shard         text NOT NULL,
    onward_shard       text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (party_merchant_id, epoch, merchant_id, transfer_id)
);

CREATE TRIGGER hold_folds_append_only BEFORE UPDATE OR DELETE ON hold_folds
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER hold_folds_no_truncate BEFORE TRUNCATE ON hold_folds
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();

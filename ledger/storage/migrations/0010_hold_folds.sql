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

-- A fold removes the relay it folds away: a routing record, not money history
-- (the fold's releases are entries, and hold_folds keeps the record), so only a
-- move's switch may do it, for the holds of the merchant arriving here, under
-- the guard of migration 0009: a grant per relayed hold, made by a function
-- that runs as the guard role and checks that the merchant is being received.
CREATE FUNCTION ledger_allow_relay_fold(p_party text, p_merchants text[], p_transfers text[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    party_state text;
BEGIN
    SELECT m.state INTO party_state FROM merchants m WHERE m.merchant_id = p_party;
    IF party_state IS DISTINCT FROM 'incoming' THEN
        RAISE EXCEPTION 'relays may be folded only as merchant % arrives here (state %)',
            p_party, coalesce(party_state, 'none') USING ERRCODE = '55000';
    END IF;
    DELETE FROM ledger_guard.history_cleanup_grants
        WHERE pg_xact_status(xact_id) IS DISTINCT FROM 'in progress';
    INSERT INTO ledger_guard.history_cleanup_grants (xact_id, merchant_id)
        SELECT pg_current_xact_id(), 'relay:' || m || '/' || t
        FROM unnest(p_merchants, p_transfers) AS held(m, t)
        ON CONFLICT DO NOTHING;
END $$;
ALTER FUNCTION ledger_allow_relay_fold(text, text[], text[]) OWNER TO ledger_history_guard;

-- As in 0009, plus hold_relays rows under a fold grant for their hold.
CREATE OR REPLACE FUNCTION ledger_refuse_history_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_merchant text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_merchant := CASE
            WHEN TG_TABLE_NAME = 'saga_credits' THEN to_jsonb(OLD) ->> 'credit_merchant_id'
            WHEN TG_TABLE_NAME IN ('transfers', 'entries', 'pending_resolutions', 'saga_steps')
                THEN to_jsonb(OLD) ->> 'merchant_id'
            WHEN TG_TABLE_NAME = 'hold_relays'
                THEN 'relay:' || (to_jsonb(OLD) ->> 'merchant_id') || '/'
                     || (to_jsonb(OLD) ->> 'transfer_id')
        END;
        IF row_merchant IS NOT NULL AND EXISTS (
            SELECT 1 FROM ledger_guard.history_cleanup_grants g
            WHERE g.xact_id = pg_current_xact_id() AND g.merchant_id = row_merchant
        ) THEN
            RETURN OLD;
        END IF;
    END IF;
    RAISE EXCEPTION 'ledger history is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = '55000';
END $$;

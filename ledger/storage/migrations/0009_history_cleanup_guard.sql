-- The append-only guard no longer listens to a session setting. Before, any
-- connection could `SET LOCAL ledger.allow_history_cleanup = 'on'` and delete
-- history. Now a DELETE of history passes only in a transaction that holds a
-- cleanup grant for the row's merchant, and a grant is made only by
-- ledger_allow_history_cleanup(), which runs as the role ledger_history_guard
-- (NOLOGIN) and grants it only for a merchant this shard has handed over
-- ('moved': the cleanup of the old copy) or is receiving ('incoming': a copy
-- replacing its saga steps). The grants table belongs to that role: a
-- connection that is neither a superuser, nor a member of ledger_history_guard,
-- nor the owner of the history tables (who may disable their triggers) cannot
-- write a grant of its own. See docs/security.md.

-- Roles belong to the PostgreSQL server, not to one database: several shard
-- databases on one server share it, and may migrate at the same moment.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_history_guard') THEN
        CREATE ROLE ledger_history_guard NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- another shard database created it a moment ago
END $$;

-- The grants live in a schema of the guard role's own, so a blanket
-- `GRANT ... ON ALL TABLES IN SCHEMA public` to the service role does not reach
-- them. One row per transaction and merchant allowed to remove history. Rows
-- of finished transactions grant nothing (transaction ids are never reused)
-- and are swept by the next grant.
CREATE SCHEMA ledger_guard AUTHORIZATION ledger_history_guard;
REVOKE ALL ON SCHEMA ledger_guard FROM PUBLIC;
GRANT USAGE ON SCHEMA ledger_guard TO PUBLIC;
CREATE TABLE ledger_guard.history_cleanup_grants (
    xact_id      xid8 NOT NULL,
    merchant_id  text NOT NULL,
    PRIMARY KEY (xact_id, merchant_id)
);
ALTER TABLE ledger_guard.history_cleanup_grants OWNER TO ledger_history_guard;
REVOKE ALL ON ledger_guard.history_cleanup_grants FROM PUBLIC;
GRANT SELECT ON ledger_guard.history_cleanup_grants TO PUBLIC;
GRANT SELECT ON merchants TO ledger_history_guard;

CREATE FUNCTION ledger_allow_history_cleanup(p_merchant_id text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    merchant_state text;
BEGIN
    SELECT m.state INTO merchant_state FROM merchants m WHERE m.merchant_id = p_merchant_id;
    IF merchant_state IS NULL OR merchant_state NOT IN ('moved', 'incoming') THEN
        RAISE EXCEPTION 'history of merchant % may be removed only when it moved away or is '
            'being copied here (state %)', p_merchant_id, coalesce(merchant_state, 'none')
            USING ERRCODE = '55000';
    END IF;
    DELETE FROM ledger_guard.history_cleanup_grants
        WHERE pg_xact_status(xact_id) IS DISTINCT FROM 'in progress';
    INSERT INTO ledger_guard.history_cleanup_grants (xact_id, merchant_id)
        VALUES (pg_current_xact_id(), p_merchant_id)
        ON CONFLICT DO NOTHING;
END $$;
ALTER FUNCTION ledger_allow_history_cleanup(text) OWNER TO ledger_history_guard;

-- Only the tables the cleanup path removes rows from can pass, by the column
-- that names the merchant whose copy it is; checkpoints and relays never do.
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

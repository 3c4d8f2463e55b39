-- The fence reads each merchant through the primary key, whatever the table's
-- statistics. Written as `merchant_id = ANY (p_merchants)`, its read planned a
-- sequential scan of every merchant while the table had never been analysed
-- (a new shard's, the benchmark's: 1,000 merchants, 9 pages): 20% of
-- PostgreSQL's execution time in the single benchmark, 68 us a transfer, on
-- the statement every write runs first. PL/pgSQL keeps the plan for the
-- session, so it stayed until the next ANALYZE. OFFSET 0 keeps the per-key
-- lookup from being flattened into that scan (as statements.probe_by_key).
-- Locks, result and its one row when no merchant is known are unchanged.
CREATE OR REPLACE FUNCTION ledger_fence(p_merchants text[])
RETURNS TABLE (epoch bigint, claims_paused boolean, merchant_id text, state text, moved_to text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7301, 0);
    PERFORM count(pg_advisory_xact_lock_shared(7302, hashtext(m)))
        FROM unnest(p_merchants) AS m;
    RETURN QUERY
        SELECT s.epoch, s.claims_paused, found.id, found.state, found.moved_to
        FROM shard_meta s
        LEFT JOIN (
            SELECT probed.merchant_id AS id, probed.state, probed.moved_to
            FROM (SELECT DISTINCT unnest(p_merchants)) AS k(id)
            CROSS JOIN LATERAL (
                SELECT x.merchant_id, x.state, x.moved_to FROM merchants x
                WHERE x.merchant_id = k.id OFFSET 0
            ) AS probed
        ) AS found ON true;
END $$;

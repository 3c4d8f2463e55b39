-- Tamper evidence (see ledger/domain/chain.py): each entry carries a hash that
-- chains it to the previous entry of its account; each account keeps the head
-- of its chain; checkpoints record the heads from time to time, so a history
-- rewritten and re-hashed to its end is still caught against a checkpoint.

-- The SQL mirror of ledger.domain.chain.chained_entry, used by verification.
CREATE FUNCTION ledger_entry_hash(previous bytea, e entries) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(previous || convert_to(concat_ws(E'\x1f',
        e.merchant_id, e.account_id, e.sequence, e.transfer_merchant_id, e.transfer_id,
        e.direction, e.kind, e.amount_minor, e.debits_posted, e.credits_posted,
        e.debits_pending, e.credits_pending,
        (extract(epoch FROM e.created_at) * 1000000)::bigint), 'UTF8'))
$$;

ALTER TABLE entries ADD COLUMN entry_hash bytea;
ALTER TABLE accounts ADD COLUMN entry_hash bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;

-- Entries written before this migration get their hashes now, oldest first per
-- account. History is otherwise append-only; this one-time fill is the exception.
ALTER TABLE entries DISABLE TRIGGER entries_append_only;
DO $$
DECLARE
    e entries;
    head bytea;
    last_account text[] := NULL;
BEGIN
    FOR e IN SELECT * FROM entries ORDER BY merchant_id, account_id, sequence LOOP
        IF last_account IS DISTINCT FROM ARRAY[e.merchant_id, e.account_id] THEN
            head := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
            last_account := ARRAY[e.merchant_id, e.account_id];
        END IF;
        head := ledger_entry_hash(head, e);
        UPDATE entries SET entry_hash = head
        WHERE merchant_id = e.merchant_id AND account_id = e.account_id AND sequence = e.sequence;
        UPDATE accounts SET entry_hash = head
        WHERE merchant_id = e.merchant_id AND account_id = e.account_id AND entry_count = e.sequence;
    END LOOP;
END $$;
ALTER TABLE entries ENABLE TRIGGER entries_append_only;
ALTER TABLE entries ALTER COLUMN entry_hash SET NOT NULL;
ALTER TABLE entries ADD CHECK (octet_length(entry_hash) = 32);
ALTER TABLE accounts ADD CHECK (octet_length(entry_hash) = 32);

-- A checkpoint records the heads of the accounts whose chains grew since the
-- previous one; its digest chains it to the previous checkpoint's digest.
-- Publishing the latest digest elsewhere (a ticket, another system) anchors
-- everything before it.
CREATE TABLE chain_checkpoints (
    checkpoint_id  bigint PRIMARY KEY CHECK (checkpoint_id >= 1),
    created_at     timestamptz NOT NULL,
    heads          bigint NOT NULL,
    digest         bytea NOT NULL
);

CREATE TABLE chain_checkpoint_heads (
    checkpoint_id  bigint NOT NULL REFERENCES chain_checkpoints,
    merchant_id    text NOT NULL,
    account_id     text NOT NULL,
    sequence       bigint NOT NULL CHECK (sequence >= 1),
    entry_hash     bytea NOT NULL,
    PRIMARY KEY (checkpoint_id, merchant_id, account_id)
);

CREATE INDEX chain_checkpoint_heads_by_account
    ON chain_checkpoint_heads (merchant_id, account_id, sequence);

CREATE TRIGGER chain_checkpoints_append_only BEFORE UPDATE OR DELETE ON chain_checkpoints
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER chain_checkpoint_heads_append_only BEFORE UPDATE OR DELETE ON chain_checkpoint_heads
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();

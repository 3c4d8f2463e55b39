-- A move finds a merchant's saga credits by credit_merchant_id: it copies them
-- (move_statements.MOVED_TABLES), counts them (MERCHANT_DIGEST) and deletes the
-- old copy after it. Only the primary key, led by the debit side's merchant,
-- indexed the table, so each of those read every saga credit of the shard, for
-- every merchant moved; the table grows with every cross-shard transfer.
CREATE INDEX saga_credits_by_credit_merchant ON saga_credits (credit_merchant_id);

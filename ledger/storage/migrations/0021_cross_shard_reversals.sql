-- Reversals of transfers whose parties are on two shards (see docs/sagas.md,
-- "Reversals across shards").
--
-- Every reversal of one original debits the original's credit account, so its
-- step 1 runs where that account's merchant is, and so does its transfer row
-- (rows live with their debit merchant). There, under that account's lock, the
-- reversals of the original are summed: the posted ones (result 1) and those
-- whose saga has not been compensated (result 26, in progress: a saga's row
-- keeps it, and the saga's row holds the final result). A partial index on
-- result = 1 alone would miss the second kind, so the index covers every
-- reversal.
DROP INDEX transfers_reversals;
CREATE INDEX transfers_reversals ON transfers (credit_merchant_id, reversal_of)
    WHERE reversal_of <> '';

-- Step 2 checks the original against the reversal on the original's debit
-- shard, and a saga resumed after a crash must check it again: the saga keeps
-- the original's id ('' for every other saga).
ALTER TABLE sagas ADD COLUMN reversal_of text NOT NULL DEFAULT '';

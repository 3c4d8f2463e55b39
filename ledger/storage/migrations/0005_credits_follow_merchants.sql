-- Step 2 of a saga runs wherever its credit merchant is when it runs, which a
-- move may have made another shard than the one step 1 reserved towards. The
-- shard that applied the credit is recorded with the outcome (and travels with
-- the merchant when it moves again), so step 3 knows which settlement account
-- must mirror it. '' on rows written before this migration: the saga's peer
-- shard (a merchant moved then only with no credit to it in flight).
ALTER TABLE saga_credits ADD COLUMN credited_on text NOT NULL DEFAULT '';


-- Open pending transfers that credit a merchant from another merchant's
-- transfer: a merchant move carries them across shards (see MoveStore).
CREATE INDEX transfers_pending_by_credit ON transfers (credit_merchant_id)
    WHERE action = 2 AND result = 1;

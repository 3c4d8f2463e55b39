-- Folding a cross-shard hold back into a local one (see docs/moves.md, "Holds
-- carried by a move").
--
-- A hold made between two merchants while one of them had moved and the other
-- not yet (a rebalance moves merchants one at a time) is cross-shard. When the
-- second one arrives on the first one's shard, both parties share a shard
-- again: the move releases the hold's settlement legs on both shards (they net
-- to zero on each), and the hold settles from then on as a local pending
-- transfer. Without this, the shard left kept relaying the hold to the shard it
-- came from, and every later move of the two merchants together added steps to
-- its path, until a move had to wait for the hold to settle.
--
-- The saga that made the hold keeps its row (its result is the transfer's
-- result), marked here: a saga row with settles_locally carries nothing, and
-- every reader that asks "does a saga carry this pending transfer" skips it.
-- A later move that makes the hold cross-shard again clears the mark.
ALTER TABLE sagas ADD COLUMN settles_locally boolean NOT NULL DEFAULT false;

-- A move's checks find a merchant's open local holds by either party
-- (move_statements.LOCAL_OPEN_PENDINGS): these find the folded ones.
CREATE INDEX sagas_settling_locally_by_debit ON sagas (merchant_id) WHERE settles_locally;
CREATE INDEX sagas_settling_locally_by_credit ON sagas (credit_merchant_id)
    WHERE settles_locally;

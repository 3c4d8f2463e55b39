-- Checkpoints authenticated outside the database's reach: a checkpoint's MAC is
-- an HMAC-SHA256 keyed with LEDGER_CHECKPOINT_KEY, a secret of the service that
-- is never stored here (see ledger/domain/chain.py, checkpoint_mac). Someone who
-- rewrites history and re-hashes it can recompute the plain digests, not the
-- MACs. NULL: made without a key.
ALTER TABLE chain_checkpoints ADD COLUMN mac bytea CHECK (octet_length(mac) = 32);

-- Relays found by their position on the hold's path (see docs/moves.md, "Holds
-- carried by a move").
--
-- A relay and each pass through it were found by the shard the hold arrives
-- from, so a path could take each step (shard, arriving from) once: a party
-- moving round three shards (a, b, c, a, b) while the other stays needed one
-- twice, and its move waited for the hold to settle (chaos seeds 322, 325).
--
-- Now every stop of a path has a number that grows from the debit party's end
-- to the credit party's: the saga row holds its end's (0 when made), the
-- credit side's record its end's (1 when made), each relay its own. A debit
-- party that moves leaves a relay numbered as its end was, and its end takes
-- the number below; a credit party that moves leaves one numbered as its end
-- was, and its end takes the number above; a fold removes a relay next to the
-- moving end, which takes that relay's number. So the numbers stay distinct and
-- in path order, whatever shard a stop is on, and a settle arriving at a shard
-- from the stop numbered p passes the relay there with the least number above
-- p (none: the credit party's end). Each pass is recorded by that number.
--
-- Rows from before this migration keep no number (NULL): such a hold's relays
-- are still found by where it arrives from, and its moves keep the old rule (a
-- move that would repeat a step waits for the hold). Holds made from now on
-- are numbered: the columns default for new rows only.
ALTER TABLE sagas ADD COLUMN path_position bigint;
ALTER TABLE sagas ALTER COLUMN path_position SET DEFAULT 0;
ALTER TABLE credit_holds ADD COLUMN path_position bigint;
ALTER TABLE credit_holds ALTER COLUMN path_position SET DEFAULT 1;

-- Unique by number (NULLs are distinct: unnumbered rows never conflict here),
-- and by arriving shard where unnumbered. The first also serves every lookup of
-- a hold's relays, numbered or not (by its leading columns).
ALTER TABLE hold_relays ADD COLUMN path_position bigint;
ALTER TABLE hold_relays DROP CONSTRAINT hold_relays_pkey;
CREATE UNIQUE INDEX hold_relays_by_position
    ON hold_relays (merchant_id, transfer_id, path_position);
CREATE UNIQUE INDEX hold_relays_unnumbered ON hold_relays (merchant_id, transfer_id, from_shard)
    WHERE path_position IS NULL;

ALTER TABLE relay_passes ADD COLUMN path_position bigint;
ALTER TABLE relay_passes DROP CONSTRAINT relay_passes_pkey;
CREATE UNIQUE INDEX relay_passes_by_position
    ON relay_passes (merchant_id, transfer_id, kind, path_position);
CREATE UNIQUE INDEX relay_passes_unnumbered
    ON relay_passes (merchant_id, transfer_id, kind, from_shard) WHERE path_position IS NULL;

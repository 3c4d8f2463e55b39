-- An event's body is written once. Until now the sequencer moved each
-- committed outbox row into `events`, body and all: every event's 1.3 kB jsonb
-- written twice (about 1.3 kB of WAL and 30 us of PostgreSQL per batch
-- transfer, docs/performance.md). Now the outbox row stays where the change
-- wrote it, as the event, and the sequencer numbers it by reference:
--
--   event_outbox   every event's row, written once by the change (unchanged);
--   event_queue    the ids of the outbox rows not numbered yet, one small row
--                  each, inserted by a statement trigger in the writing
--                  statement (so no writer can forget it, and a row is visible
--                  exactly when its change committed, as the outbox rows were);
--   event_numbers  position -> outbox id, gapless per shard, in id order as
--                  before (migration 0011 says why that keeps every account's
--                  order);
--   events         a view of the numbered rows, with the columns of the table
--                  it replaces, so every reader is unchanged.
--
-- Pruning deletes the number and the outbox row together.

CREATE TABLE event_queue (
    outbox_id  bigint PRIMARY KEY
);

CREATE TABLE event_numbers (
    position      bigint PRIMARY KEY CHECK (position >= 1),
    -- Each outbox row is numbered once; a departure is looked up by its row.
    outbox_id     bigint NOT NULL UNIQUE,
    sequenced_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION ledger_queue_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_queue (outbox_id) SELECT id FROM added;
    RETURN NULL;
END $$;
CREATE TRIGGER event_outbox_queued AFTER INSERT ON event_outbox
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_queue_events();

-- What the old layout held, in the new one: unnumbered outbox rows are queued;
-- numbered events become outbox rows again (new ids, past every queued one,
-- which does not matter: they are numbered already) with their positions.
INSERT INTO event_queue (outbox_id) SELECT id FROM event_outbox;
WITH numbered AS (
    SELECT nextval(pg_get_serial_sequence('event_outbox', 'id')) AS outbox_id, e.*
    FROM events AS e
), moved AS (
    INSERT INTO event_outbox (id, event_id, kind, merchant_id, merchant_ids, transfer_id,
                              trace_id, body, committed_at)
    SELECT outbox_id, event_id, kind, merchant_id, merchant_ids, transfer_id, trace_id, body,
           committed_at
    FROM numbered
)
INSERT INTO event_numbers (position, outbox_id, sequenced_at)
SELECT position, outbox_id, sequenced_at FROM numbered;
-- The rows just moved were queued by the trigger: they are numbered already.
DELETE FROM event_queue AS q USING event_numbers AS n WHERE n.outbox_id = q.outbox_id;

DROP TABLE events;

CREATE VIEW events AS
SELECT n.position, o.event_id, o.kind, o.merchant_id, o.merchant_ids, o.transfer_id,
       o.trace_id, o.body, o.committed_at, n.sequenced_at
FROM event_numbers AS n JOIN event_outbox AS o ON o.id = n.outbox_id;

-- Readers that follow a merchant across a move look up its departure.
CREATE INDEX event_outbox_moves ON event_outbox (merchant_id) WHERE kind IN (16, 17);

-- Events are never edited; pruning deletes them from the oldest end.
CREATE TRIGGER event_outbox_not_updated BEFORE UPDATE ON event_outbox
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_event_update();
CREATE TRIGGER event_numbers_not_updated BEFORE UPDATE ON event_numbers
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_event_update();

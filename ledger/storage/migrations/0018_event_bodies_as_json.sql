-- An event's body is kept as the JSON text the change wrote, not as jsonb.
-- Nothing queries inside a body but a move's departure lookup (`->` works on
-- json too); every reader takes the whole body as text, once per consumer.
-- jsonb made each write build a binary document (sorting its keys) and each
-- read turn it back into text. Measured on PostgreSQL 15 with the hot path's
-- body (a transfer and its two entries, docs/performance.md): building and
-- inserting it 30-39 us as jsonb, 17-26 us as json; reading it out 6-9 us
-- against 1.4-1.7 us; 1,390 against 1,194 bytes a row. Bodies written as jsonb
-- elsewhere (account, crossing, saga and move events, all rare) are stored
-- through the assignment cast, as text.
DROP VIEW events;
ALTER TABLE event_outbox ALTER COLUMN body TYPE json USING body::json;
CREATE VIEW events AS
SELECT n.position, o.event_id, o.kind, o.merchant_id, o.merchant_ids, o.transfer_id,
       o.trace_id, o.body, o.committed_at, n.sequenced_at
FROM event_numbers AS n JOIN event_outbox AS o ON o.id = n.outbox_id;

"""The SQL of the event stream (migration 0011), as named constants."""

from __future__ import annotations

# An AMQP publisher's lease on a shard, per consumer name ($1): a session-level
# lock held on a connection of its own for as long as it publishes the shard,
# so that one publisher of a consumer at a time publishes it; the lock goes with
# the connection when the process dies, and another publisher takes the shard
# over. Publishers of different consumers (other brokers, other exchanges) do
# not wait for each other. (Other keys: 7300 migrations, 7301-7302 moves, 7303
# expiry sweeper, 7304 saga credits, 7305 the admin lock, 7306 the sequencer,
# 7308 checkpoints.)
TRY_PUBLISHER_LEASE = "SELECT pg_try_advisory_lock(7307, hashtext($1))"
# Who holds the lease of consumer $1 (the holder's application_name), if anyone.
PUBLISHER_LEASE_HOLDER = """
SELECT a.application_name FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid = 7307 AND l.objid = hashtext($1)::oid
  AND l.objsubid = 2 AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

# Readers learn of new events from this channel (one notification per round).
NOTIFY_CHANNEL = "ledger_events"

# Whether any outbox row waits for a number (migration 0016: the queue).
OUTBOX_HAS_ROWS = "SELECT EXISTS (SELECT 1 FROM event_queue)"

# Numbers up to $1 committed outbox rows, on from the last position in id order
# (why that order keeps every account's order: migration 0011), by reference:
# the bodies stay in the outbox (migration 0016). Rows of transactions still in
# progress are invisible here and wait for a later round. Returns the last
# position given, or NULL when nothing was numbered. The ids taken are deleted
# from the queue through its index: with `IN (SELECT ...)` the planner
# hash-joined a sequential scan of the whole queue, dead rows included, so a
# round cost more the further behind the sequencer was (and on a new shard,
# whose tables were never analysed, its cost estimate crossed jit_above_cost:
# 12-200 ms of JIT compilation every round).
# One sequencer at a time per shard: a round that does not get the advisory
# lock (7306, held to the statement's commit) deletes nothing.
# The round is this one statement, run on its own (autocommit): the lock, the
# numbering and the notification (sent at commit) in one round trip, not five
# (BEGIN, lock, number, notify, COMMIT). The statement's snapshot may predate
# a round that committed while this one started (the lock is only tried, never
# waited for): rows that round took are gone when this one deletes them and are
# skipped, and event_positions is updated from its newest version, so no
# position is given twice and none is skipped.
SEQUENCE_EVENTS = f"""
WITH locked AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock(7306, 0) AS held
), taken AS (
    DELETE FROM event_queue
    WHERE (SELECT held FROM locked)
      AND outbox_id = ANY (ARRAY(SELECT outbox_id FROM event_queue ORDER BY outbox_id LIMIT $1))
    RETURNING outbox_id
), counted AS (
    SELECT count(*) AS n FROM taken
), advanced AS (
    UPDATE event_positions SET last_position = last_position + counted.n
    FROM counted WHERE counted.n > 0
    RETURNING last_position - counted.n AS base, last_position
), inserted AS (
    INSERT INTO event_numbers (position, outbox_id)
    SELECT a.base + row_number() OVER (ORDER BY t.outbox_id), t.outbox_id
    FROM taken AS t, advanced AS a
    RETURNING 1
), notified AS (
    SELECT pg_notify('{NOTIFY_CHANNEL}', last_position::text) FROM advanced
)
SELECT (SELECT last_position FROM advanced) AS last_position,
       (SELECT count(*) FROM inserted) AS inserted, (SELECT n FROM counted) AS taken,
       (SELECT count(*) FROM notified) AS notified
"""

LAST_POSITION = "SELECT last_position FROM event_positions"

# Departures are kept when the rest is pruned: a reader of the arrival that
# follows one looks it up (ledger/core/event_feed.py), and there is one per move.
KEPT_KIND = 17  # EventKind.MERCHANT_MOVED_OUT

# The oldest position still retained; last_position + 1 when none is.
OLDEST_RETAINED = f"""
SELECT coalesce((SELECT position FROM events WHERE kind <> {KEPT_KIND}
                 ORDER BY position LIMIT 1),
                (SELECT last_position + 1 FROM event_positions)) AS oldest
"""

EVENT_COLUMNS = """
position, event_id, kind, merchant_id, merchant_ids, transfer_id, trace_id, body, committed_at
"""

# $3 NULL: every merchant.
READ_EVENTS = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE position > $1 AND ($3::text IS NULL OR $3::text = ANY(merchant_ids))
ORDER BY position
LIMIT $2
"""

# Where a merchant's departure at a move's epoch was sequenced (none yet: no row).
# `kind IN (16, 17)` lets the generic plan use the partial index of moves
# (event_outbox_moves), which `kind = $3` alone does not imply.
MOVED_OUT_POSITION = """
SELECT position FROM events
WHERE kind IN (16, 17) AND kind = $3 AND merchant_id = $1
  AND (body -> 'detail' ->> 'epoch')::bigint = $2
ORDER BY position LIMIT 1
"""

# Registration keeps events from being pruned past the consumer's position.
# Positions not given out yet are clamped to the last one: acknowledging the
# future would let pruning take events the consumer never saw.
REGISTER_CONSUMER = """
INSERT INTO event_consumers (consumer, position)
SELECT $1, least($2, last_position) FROM event_positions
ON CONFLICT (consumer) DO NOTHING
"""

CONSUMER = "SELECT consumer, position, acked_at, lapsed_at FROM event_consumers WHERE consumer = $1"

# Never moves a consumer back: acknowledgements may arrive out of order.
ACK_CONSUMER = """
UPDATE event_consumers AS c
SET position = greatest(c.position, least($2, p.last_position)), acked_at = clock_timestamp()
FROM event_positions AS p
WHERE c.consumer = $1 AND c.lapsed_at IS NULL
RETURNING c.position
"""

DROP_CONSUMER = "DELETE FROM event_consumers WHERE consumer = $1 RETURNING consumer"

# A consumer lapses when it is more than $1 events behind, or its oldest
# unacknowledged event is older than $2 seconds: the retention bound.
LAPSE_CONSUMERS = """
UPDATE event_consumers AS c SET lapsed_at = clock_timestamp()
FROM event_positions AS p
WHERE c.lapsed_at IS NULL AND c.position < p.last_position
  AND (p.last_position - c.position > $1
       OR (SELECT e.committed_at FROM events AS e WHERE e.position > c.position
           ORDER BY e.position LIMIT 1) < clock_timestamp() - make_interval(secs => $2))
RETURNING c.consumer, c.position
"""

# Of the events that every live consumer has acknowledged, deletes up to $2
# of those older than $1 seconds (kept that long for subscribers that never
# registered): their numbers and their outbox rows (migration 0016), the count
# is of the outbox rows. A pass reads the events it deletes and the one after
# them, however many are retained: it walks from the oldest event by position,
# one key probe a step, and stops at the first that is too young or not yet
# acknowledged. The form before took the $2 oldest and checked their age after
# the limit; planned generically (as shard connections plan) it hash-joined
# every retained event's number to its body, so every pass on every shard read
# the whole stream, and deleted nothing until the stream was a day old
# (tests/test_event_retention.py). Positions follow commit order closely, so
# the oldest events are at the head; one committed out of order waits for a
# later pass. The doomed are deleted by key.
PRUNE_EVENTS = f"""
WITH RECURSIVE floor AS (
    SELECT coalesce((SELECT min(position) FROM event_consumers WHERE lapsed_at IS NULL),
                    (SELECT last_position FROM event_positions)) AS position,
           clock_timestamp() - make_interval(secs => $1) AS cutoff
), walk AS (
    (SELECT e.position, e.committed_at, e.kind FROM events AS e
     WHERE e.kind <> {KEPT_KIND} ORDER BY e.position LIMIT 1)
    UNION ALL
    SELECT n.position, n.committed_at, n.kind
    FROM walk AS w CROSS JOIN floor AS f
    CROSS JOIN LATERAL (SELECT e.position, e.committed_at, e.kind FROM events AS e
                        WHERE e.position > w.position ORDER BY e.position LIMIT 1) AS n
    WHERE w.committed_at < f.cutoff AND w.position < f.position
), head AS (
    SELECT w.position FROM walk AS w, floor AS f
    WHERE w.committed_at < f.cutoff AND w.position <= f.position AND w.kind <> {KEPT_KIND}
    LIMIT $2
), unnumbered AS (
    DELETE FROM event_numbers WHERE position = ANY (ARRAY(SELECT position FROM head))
    RETURNING outbox_id
)
DELETE FROM event_outbox WHERE id = ANY (ARRAY(SELECT outbox_id FROM unnumbered))
"""

CONSUMER_LAGS = """
SELECT c.consumer, c.position, c.lapsed_at IS NOT NULL AS lapsed,
       p.last_position - c.position AS lag_events,
       coalesce(extract(epoch FROM clock_timestamp() - (
           SELECT e.committed_at FROM events AS e WHERE e.position > c.position
           ORDER BY e.position LIMIT 1)), 0)::float8 AS lag_s
FROM event_consumers AS c, event_positions AS p
ORDER BY c.consumer
"""

# The outbox rows not numbered yet.
OUTBOX_BACKLOG = """
SELECT count(*) AS rows,
       coalesce(extract(epoch FROM clock_timestamp() - min(o.committed_at)), 0)::float8
           AS oldest_s
FROM event_queue AS q
-- Each queued row's body found by key: joined, the outbox (every retained event)
-- was hash-joined in whole.
CROSS JOIN LATERAL (SELECT committed_at FROM event_outbox WHERE id = q.outbox_id OFFSET 0) AS o
"""

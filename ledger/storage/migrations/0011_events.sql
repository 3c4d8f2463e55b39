-- The event stream (issue 20): every change to the books, in order, per shard.
--
-- A write inserts its events into event_outbox in the same statement as the
-- change (WRITE_BATCH, INSERT_ACCOUNTS, SET_ACCOUNTS_CLOSED, the saga trigger
-- below), so an event exists if and only if its change committed. The outbox
-- is unordered: rows get a bigserial id as they are inserted, and
-- transactions commit in another order. A sequencer (one at a time per shard,
-- advisory lock 7306) moves the committed outbox rows into `events` and gives
-- them gapless positions in id order. That order keeps every account's order:
-- two transactions that touch one account are serialised by its row lock, so
-- the second inserts its events (and draws its ids) only after the first
-- committed, and any snapshot that sees the second sees the first.

-- What WRITE_BATCH passes per event: the rest (the transfer row, the entries
-- with balances after) is joined in from the batch's own row arrays.
CREATE TYPE ledger_event_row AS (
    kind                  smallint,
    merchant_id           text,
    transfer_merchant_id  text,
    transfer_id           text,
    trace_id              text,
    detail                jsonb
);

CREATE TABLE event_outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL DEFAULT gen_random_uuid(),
    kind          smallint NOT NULL,
    -- The merchant the change belongs to (a transfer's debit merchant).
    merchant_id   text NOT NULL,
    -- Every merchant whose accounts the change touched, for filtering.
    merchant_ids  text[] NOT NULL,
    transfer_id   text NOT NULL DEFAULT '',
    trace_id      text NOT NULL DEFAULT '',
    body          jsonb NOT NULL,
    -- The writing transaction's clock just before its commit.
    committed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE events (
    position      bigint PRIMARY KEY CHECK (position >= 1),
    event_id      uuid NOT NULL,
    kind          smallint NOT NULL,
    merchant_id   text NOT NULL,
    merchant_ids  text[] NOT NULL,
    transfer_id   text NOT NULL,
    trace_id      text NOT NULL,
    body          jsonb NOT NULL,
    committed_at  timestamptz NOT NULL,
    sequenced_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Readers that follow a merchant across a move look up its departure.
CREATE INDEX events_moves ON events (merchant_id) WHERE kind IN (16, 17);

-- The last position given out: never reused, even once pruning removed it.
CREATE TABLE event_positions (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_position  bigint NOT NULL CHECK (last_position >= 0)
);
INSERT INTO event_positions (last_position) VALUES (0);

-- Registered consumers (and the AMQP publisher) and what each acknowledged
-- here: events are pruned only up to the lowest live acknowledgement. A
-- consumer that falls further behind than the retention bound lapses
-- (lapsed_at) and is told so, instead of silently missing events.
CREATE TABLE event_consumers (
    consumer       text PRIMARY KEY,
    position       bigint NOT NULL CHECK (position >= 0),
    registered_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    acked_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    lapsed_at      timestamptz
);

-- Events are never edited; pruning deletes them from the oldest end.
CREATE FUNCTION ledger_refuse_event_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP USING ERRCODE = '55000';
END $$;
CREATE TRIGGER events_not_updated BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_event_update();

-- A saga's end is an event on its debit shard, whichever path ended it
-- (step 3, a dead letter after the last attempt, an operator's resolve).
-- Kinds: 11 completed, 12 compensated, 13 dead-lettered (EventKind in
-- ledger/domain/events.py).
CREATE FUNCTION ledger_saga_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A move's copy refreshing a saga row on the shard it is copied to is not
    -- an end: the saga ended (and said so) on the shard that owned it then.
    IF EXISTS (SELECT 1 FROM merchants m
               WHERE m.merchant_id = NEW.merchant_id AND m.state = 'incoming') THEN
        RETURN NULL;
    END IF;
    INSERT INTO event_outbox (kind, merchant_id, merchant_ids, transfer_id, trace_id, body)
    VALUES (
        CASE NEW.state WHEN 2 THEN 11 WHEN 3 THEN 12 ELSE 13 END,
        NEW.merchant_id,
        ARRAY[NEW.merchant_id, NEW.credit_merchant_id],
        NEW.transfer_id,
        coalesce(substring(NEW.trace_context FROM 4 FOR 32), ''),
        jsonb_build_object('saga', jsonb_build_object(
            'merchant_id', NEW.merchant_id, 'transfer_id', NEW.transfer_id,
            'kind', NEW.kind, 'state', NEW.state, 'result', NEW.result,
            'peer_shard', NEW.peer_shard, 'debit_account_id', NEW.debit_account_id,
            'credit_merchant_id', NEW.credit_merchant_id,
            'credit_account_id', NEW.credit_account_id, 'currency', NEW.currency,
            'amount_minor', NEW.amount_minor, 'pending_minor', NEW.pending_minor,
            'pending_id', NEW.pending_id, 'attempts', NEW.attempts,
            'last_error', NEW.last_error))
    );
    RETURN NULL;
END $$;
CREATE TRIGGER sagas_end_event AFTER UPDATE OF state ON sagas
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.state IN (2, 3, 4))
    EXECUTE FUNCTION ledger_saga_event();

-- Transfers between shards run as sagas (see DESIGN.md, "Cross-shard transfer saga").
--
-- On the debit shard S: `sagas` is the state machine of each saga, updated in
-- place under a version check so two workers cannot move it backwards;
-- `saga_steps` is its append-only history.
-- On the credit shard T: `saga_credits` holds exactly one outcome per saga
-- (applied, refused, aborted). It is append-only and keyed by the saga, so a
-- late or repeated step 2 finds the outcome instead of applying twice, and an
-- abort recorded first makes any later credit impossible.

-- Settlement accounts belong to this reserved merchant, which lives on every
-- shard and never moves. Caller ids cannot start with '$'.
INSERT INTO merchants (merchant_id, state, epoch) VALUES ('$settlement', 'active', 1);

CREATE TABLE sagas (
    merchant_id        text NOT NULL,
    transfer_id        text NOT NULL,
    -- 1 transfer (POST or PENDING), 2 settle (post/void of a cross-shard
    -- pending transfer), 3 expire (its timeout).
    kind               smallint NOT NULL CHECK (kind IN (1, 2, 3)),
    -- 1 running, 2 completed, 3 compensated, 4 dead (the dead-letter list).
    state              smallint NOT NULL CHECK (state IN (1, 2, 3, 4)),
    next_step          smallint NOT NULL CHECK (next_step IN (2, 3)),
    -- The credit shard at step 1; S's settlement account for it took the money.
    peer_shard         text NOT NULL,
    debit_account_id   text NOT NULL,
    credit_merchant_id text NOT NULL,
    credit_account_id  text NOT NULL,
    currency           text NOT NULL,
    -- What step 2 does on T: 1 post, 2 pending credit, 3 post part of a
    -- pending credit (amount_minor of pending_minor), 4 release a pending credit.
    credit_action      smallint NOT NULL CHECK (credit_action IN (1, 2, 3, 4)),
    amount_minor       bigint NOT NULL CHECK (amount_minor >= 0),
    pending_minor      bigint NOT NULL DEFAULT 0 CHECK (pending_minor >= 0),
    -- The cross-shard pending transfer a settle or expire saga ends.
    pending_id         text NOT NULL DEFAULT '',
    -- TransferResult once finished (1 OK or the refusal), 0 while running.
    result             smallint NOT NULL DEFAULT 0,
    -- The outcome step 2 reported (1 applied, 2 refused, 3 aborted), 0 before.
    credit_outcome     smallint NOT NULL DEFAULT 0,
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL,
    last_error         text NOT NULL DEFAULT '',
    lease_owner        text NOT NULL DEFAULT '',
    lease_until        timestamptz,
    version            bigint NOT NULL DEFAULT 1,
    -- W3C traceparent of the request that started the saga.
    trace_context      text NOT NULL DEFAULT '',
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, transfer_id, kind)
);

CREATE INDEX sagas_due ON sagas (next_attempt_at) WHERE state = 1;
CREATE INDEX sagas_by_state ON sagas (state, created_at);

CREATE TABLE saga_steps (
    id           bigserial PRIMARY KEY,
    merchant_id  text NOT NULL,
    transfer_id  text NOT NULL,
    kind         smallint NOT NULL,
    step         smallint NOT NULL,
    outcome      text NOT NULL,
    detail       text NOT NULL DEFAULT '',
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX saga_steps_by_saga ON saga_steps (merchant_id, transfer_id, kind, id);

CREATE TABLE saga_credits (
    merchant_id         text NOT NULL,
    transfer_id         text NOT NULL,
    kind                smallint NOT NULL,
    credit_merchant_id  text NOT NULL,
    -- 1 applied, 2 refused, 3 aborted.
    outcome             smallint NOT NULL CHECK (outcome IN (1, 2, 3)),
    result              smallint NOT NULL,
    peer_shard          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (merchant_id, transfer_id, kind)
);

CREATE TRIGGER saga_steps_append_only BEFORE UPDATE OR DELETE ON saga_steps
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER saga_credits_append_only BEFORE UPDATE OR DELETE ON saga_credits
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER saga_steps_no_truncate BEFORE TRUNCATE ON saga_steps
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();
CREATE TRIGGER saga_credits_no_truncate BEFORE TRUNCATE ON saga_credits
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_history_change();

-- Finds a transfer's entries on any shard (reconcile checks a saga's legs).
CREATE INDEX entries_by_transfer ON entries (transfer_merchant_id, transfer_id);

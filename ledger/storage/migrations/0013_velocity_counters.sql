-- Velocity counters move onto the account row (issue 21's cost target): one
-- ring of buckets per (direction, window) the account's rules use, packed as
-- ledger/domain/velocity_counters.py describes (big-endian int8: direction,
-- window_s, head bucket, 21 amounts, 21 counts). The lock that reads the rules
-- reads them too, and the UPDATE that writes the balances writes them: no
-- bucket rows, index entries or reads of their own.
ALTER TABLE accounts ADD COLUMN velocity_counters bytea NOT NULL DEFAULT '\x';
ALTER TYPE ledger_account_head ADD ATTRIBUTE velocity_counters bytea;

-- Each limited account's rings from its buckets: the 21 buckets up to the one
-- holding now (or the newest, if later). 20 is limits.velocity_buckets_per_window,
-- the bucket width ceil(window_s / 20) (velocity.bucket_width_s).
WITH windows AS (
    SELECT DISTINCT a.merchant_id, a.account_id, (r ->> 'direction')::smallint AS direction,
        (r ->> 'window_s')::integer AS window_s
    FROM accounts AS a CROSS JOIN LATERAL jsonb_array_elements(a.velocity_rules) AS r
), heads AS (
    SELECT w.*, greatest(
        floor(extract(epoch FROM now()))::bigint / greatest(1, ceil(w.window_s / 20.0))::bigint,
        (SELECT max(b.bucket_index) FROM velocity_buckets AS b
         WHERE b.merchant_id = w.merchant_id AND b.account_id = w.account_id
           AND b.direction = w.direction AND b.window_s = w.window_s)) AS head
    FROM windows AS w
), slots AS (
    SELECT h.*, s.slot, b.amount_minor, b.transfer_count
    FROM heads AS h CROSS JOIN generate_series(0, 20) AS s(slot)
    LEFT JOIN velocity_buckets AS b
        ON b.merchant_id = h.merchant_id AND b.account_id = h.account_id
        AND b.direction = h.direction AND b.window_s = h.window_s
        AND b.bucket_index = h.head - (((h.head - s.slot) % 21) + 21) % 21
), rings AS (
    SELECT merchant_id, account_id, direction, window_s,
        int8send(direction::bigint) || int8send(window_s::bigint) || int8send(head)
        || string_agg(int8send(least(coalesce(amount_minor, 0), 9223372036854775807)::bigint),
                      ''::bytea ORDER BY slot)
        || string_agg(int8send(coalesce(transfer_count, 0)), ''::bytea ORDER BY slot) AS ring
    FROM slots
    GROUP BY merchant_id, account_id, direction, window_s, head
)
UPDATE accounts AS a SET velocity_counters = r.counters
FROM (SELECT merchant_id, account_id,
             string_agg(ring, ''::bytea ORDER BY direction, window_s) AS counters
      FROM rings GROUP BY merchant_id, account_id) AS r
WHERE a.merchant_id = r.merchant_id AND a.account_id = r.account_id;

DROP TABLE velocity_buckets;
DROP TYPE ledger_velocity_row;

"""The SQL of merchant moves (rebalancing), as named constants."""

from __future__ import annotations

# Tables holding a merchant's rows, with the column that names the merchant,
# whether rows are history (copied once, never changed) and the conflict key.
# Order matters on insert: accounts before the entries that reference them.
MOVED_TABLES: tuple[tuple[str, str, str], ...] = (
    ("accounts", "merchant_id", "merchant_id, account_id"),
    ("transfers", "merchant_id", "merchant_id, transfer_id"),
    ("entries", "merchant_id", "merchant_id, account_id, sequence"),
    ("pending_resolutions", "merchant_id", "merchant_id, pending_id"),
    ("sagas", "merchant_id", "merchant_id, transfer_id, kind"),
    ("saga_credits", "credit_merchant_id", "merchant_id, transfer_id, kind"),
    # Spending controls (migration 0012): the limits history, the monitors and
    # their crossings (the velocity counters are on the accounts' rows).
    ("account_limit_changes", "merchant_id", "merchant_id, account_id, sequence"),
    ("balance_monitors", "merchant_id", "merchant_id, monitor_id"),
    (
        "monitor_crossings",
        "merchant_id",
        "merchant_id, monitor_id, transfer_merchant_id, transfer_id, direction",
    ),
)
# Of those, the tables whose rows change (a copy refreshes them); the rest are
# history, copied once. None is ever deleted from while the merchant lives here,
# so an incremental copy (rows written since) carries every change.
MUTABLE_MOVED_TABLES = frozenset({"accounts", "sagas", "balance_monitors"})

# A copy made while writes go on reads, next time, every row written by a
# transaction that its snapshot could not see: those have an xmin at least the
# snapshot's xmin (the oldest transaction then running), however long they ran
# before committing. xmin is a 32-bit xid, compared by age (wraparound-safe;
# frozen rows are the oldest). Updated rows (accounts, sagas) get a new xmin.
SNAPSHOT_HORIZON_XID = """
SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint % 4294967296)::text
"""
WRITTEN_SINCE_XID = "age(xmin) <= age($2::text::xid)"

ACTIVE_MERCHANTS = """
SELECT merchant_id FROM merchants WHERE state = 'active' AND merchant_id NOT LIKE '$%'
ORDER BY merchant_id
"""

MERCHANTS_IN_STATE = """
SELECT merchant_id, moved_to FROM merchants WHERE state = $1 ORDER BY merchant_id
"""

MERCHANT_ROW = "SELECT state, moved_to, epoch FROM merchants WHERE merchant_id = $1"

MERCHANT_SIZES = """
SELECT m AS merchant_id,
       (SELECT count(*) FROM accounts a WHERE a.merchant_id = m) AS accounts,
       (SELECT count(*) FROM entries e WHERE e.merchant_id = m) AS entries
FROM unnest($1::text[]) AS m
"""

# A merchant that once left this shard (state moved) can come back: its row
# turns incoming again; old rows it left here are a prefix of its history.
MARK_INCOMING = """
INSERT INTO merchants (merchant_id, state, moved_to, epoch) VALUES ($1, 'incoming', $2, $3)
ON CONFLICT (merchant_id) DO UPDATE
    SET state = 'incoming', moved_to = EXCLUDED.moved_to, epoch = EXCLUDED.epoch,
        updated_at = clock_timestamp()
    WHERE merchants.state = 'moved'
"""

# The epoch lock is the one every write holds shared: raising the epoch and
# pausing claims waits for writes in flight and is seen by every later one.
SET_EPOCH_AND_CLAIMS = """
WITH lock AS (SELECT pg_advisory_xact_lock(7301, 0))
UPDATE shard_meta SET epoch = greatest(epoch, $1), claims_paused = $2 FROM lock
RETURNING epoch
"""

READ_META = "SELECT shard_name, epoch, claims_paused FROM shard_meta"

MERCHANT_COUNTS = "SELECT state, count(*) AS merchants FROM merchants GROUP BY state"

# The fence of one merchant: its advisory lock exclusively (PostgreSQL queues
# new shared requests behind a waiting exclusive one, so writers cannot starve
# it), within lock_timeout.
LOCK_MERCHANT_EXCLUSIVE = "SELECT pg_advisory_xact_lock(7302, hashtext($1))"

# Open local pending transfers (not made by a saga) recorded under the merchant
# or crediting it: between its own accounts they move with it (hold, record,
# timer); with another merchant here they become cross-shard pending
# transfers when it moves (see MoveStore.local_holds). Action 2 and result 1
# (TransferAction.PENDING, TransferResult.OK) are written out, not parameters:
# shard connections plan generically, and only literals let that plan use the
# partial index transfers_pending_by_credit; the OFFSET 0s make the checks per
# row probes by key. As it was, it read every transfer, resolution, saga and
# merchant of the shard for each merchant a move checks
# (tests/test_key_lookup_plans.py).
# A saga's hold that a move folded back into a local one (migration 0019) is one
# too; its record reads IN_PROGRESS (its saga's result is the hold's), so it is
# found through its saga row, by the partial indexes of that migration.
LOCAL_OPEN_PENDINGS = """
SELECT t.merchant_id, t.transfer_id, t.debit_merchant_id, t.debit_account_id,
       t.credit_merchant_id, t.credit_account_id, t.currency, t.amount_effective_minor
FROM transfers t
WHERE (t.merchant_id = $1 OR t.credit_merchant_id = $1) AND t.kind = 1
  AND t.action = 2 AND t.result = 1
  AND NOT EXISTS (SELECT 1 FROM pending_resolutions r
                  WHERE r.merchant_id = t.merchant_id AND r.pending_id = t.transfer_id OFFSET 0)
  AND NOT EXISTS (SELECT 1 FROM sagas s
                  WHERE s.merchant_id = t.merchant_id AND s.transfer_id = t.transfer_id
                    AND s.kind = 1 AND NOT s.settles_locally OFFSET 0)
  -- Not the old copy of a merchant that moved away (its holds went with it).
  AND EXISTS (SELECT 1 FROM merchants m
              WHERE m.merchant_id = t.merchant_id AND m.state <> 'moved' OFFSET 0)
UNION ALL
SELECT t.merchant_id, t.transfer_id, t.debit_merchant_id, t.debit_account_id,
       t.credit_merchant_id, t.credit_account_id, t.currency, t.amount_effective_minor
FROM sagas s
JOIN transfers t ON t.merchant_id = s.merchant_id AND t.transfer_id = s.transfer_id
WHERE (s.merchant_id = $1 OR s.credit_merchant_id = $1) AND s.settles_locally
  AND s.kind = 1 AND s.state = 2 AND s.result = 1 AND t.kind = 1 AND t.result <> 1
  AND NOT EXISTS (SELECT 1 FROM pending_resolutions r
                  WHERE r.merchant_id = t.merchant_id AND r.pending_id = t.transfer_id OFFSET 0)
  AND EXISTS (SELECT 1 FROM merchants m
              WHERE m.merchant_id = t.merchant_id AND m.state <> 'moved' OFFSET 0)
"""


# Open cross-shard holds the merchant is a party of: as the debit party (its
# own completed pending-transfer sagas not yet settled here) ...
CROSS_HOLDS_AS_DEBIT = """
SELECT s.transfer_id, s.currency, s.amount_minor, s.peer_shard, s.path_position FROM sagas s
WHERE s.merchant_id = $1 AND s.kind = 1 AND s.state = 2 AND s.credit_action = 2
  AND s.result = 1 AND NOT s.settles_locally
  -- A probe by key per hold (OFFSET 0): as an anti-join it could read every
  -- resolution of the shard.
  AND NOT EXISTS (SELECT 1 FROM pending_resolutions r
                  WHERE r.merchant_id = s.merchant_id AND r.pending_id = s.transfer_id
                  OFFSET 0)
"""

# ... and as the credit party (in the column order of INSERT_CREDIT_HOLD).
CREDIT_HOLDS_OF = """
SELECT merchant_id, transfer_id, credit_merchant_id, currency, amount_minor, from_shard,
       path_position
FROM credit_holds WHERE credit_merchant_id = $1
"""

DELETE_CREDIT_HOLDS_OF = "DELETE FROM credit_holds WHERE credit_merchant_id = $1"

# The credit side of a hold arrived with its merchant: held against the
# settlement account for the shard it came from, its end renumbered ($4).
MOVE_CREDIT_HOLD = """
UPDATE credit_holds SET from_shard = $3, path_position = $4
WHERE merchant_id = $1 AND transfer_id = $2
"""

# The debit party of a hold arrived: its saga's peer is now the shard it left,
# its end renumbered ($4).
MOVE_SAGA_PEER = """
UPDATE sagas SET peer_shard = $3, path_position = $4, updated_at = clock_timestamp()
WHERE merchant_id = $1 AND transfer_id = $2 AND kind = 1
"""

SAGA_PEER = """
SELECT peer_shard, path_position FROM sagas WHERE merchant_id = $1 AND transfer_id = $2 AND kind = 1
"""

INSERT_HOLD_RELAY = """
INSERT INTO hold_relays (merchant_id, transfer_id, from_shard, to_shard, path_position)
VALUES ($1, $2, $3, $4, $5)
"""

# What keeps a merchant from moving now: money pending that no hold above
# explains (its pending amounts are more than its open holds hold: a local
# one between its own accounts holds its amount twice), or a saga of its own
# not finished.
MERCHANT_BLOCKERS = f"""
SELECT
  (SELECT coalesce(sum(debits_pending::numeric + credits_pending), 0)
     FROM accounts WHERE merchant_id = $1) AS pending_minor,
  (SELECT coalesce(sum(amount_effective_minor::numeric
                       * ((debit_merchant_id = $1)::int + (credit_merchant_id = $1)::int)), 0)
     FROM ({LOCAL_OPEN_PENDINGS}) local_open)
  + (SELECT coalesce(sum(amount_minor::numeric), 0) FROM ({CROSS_HOLDS_AS_DEBIT}) as_debit)
  + (SELECT coalesce(sum(amount_minor::numeric), 0) FROM credit_holds
     WHERE credit_merchant_id = $1) AS held_minor,
  (SELECT count(*) FROM sagas WHERE merchant_id = $1 AND state IN (1, 4)) AS open_sagas
"""

# A cross-shard pending transfer that a move made of a local one, as if its
# saga had run: completed, its credit applied, settled later by a settle saga.
# A saga's hold that an earlier move folded into a local one has its row: the
# hold is cross-shard again, by way of the shard named.
INSERT_CARRIED_SAGA = """
INSERT INTO sagas (merchant_id, transfer_id, kind, state, next_step, peer_shard,
    debit_account_id, credit_merchant_id, credit_account_id, currency, credit_action,
    amount_minor, result, credit_outcome, next_attempt_at, trace_context, created_at,
    updated_at)
VALUES ($1, $2, 1, 2, 3, $3, $4, $5, $6, $7, 2, $8, 1, 1, $9, $10, $9, $9)
ON CONFLICT (merchant_id, transfer_id, kind) DO UPDATE
SET peer_shard = excluded.peer_shard, settles_locally = false, updated_at = excluded.updated_at,
    path_position = excluded.path_position
WHERE sagas.settles_locally
"""

# A saga's hold (s) with its credit side (c) on this shard that could become
# local: open (a settle or an expiry under way resolved its debit side first),
# not local already, and no relay here passes it.
_OPEN_SAGA_HOLD_HERE = """
  AND s.kind = 1 AND s.state = 2 AND s.credit_action = 2 AND s.result = 1
  AND NOT s.settles_locally
  AND NOT EXISTS (SELECT 1 FROM pending_resolutions r
                  WHERE r.merchant_id = s.merchant_id AND r.pending_id = s.transfer_id OFFSET 0)
  AND NOT EXISTS (SELECT 1 FROM hold_relays h
                  WHERE h.merchant_id = s.merchant_id AND h.transfer_id = s.transfer_id OFFSET 0)
"""

# A hold of the merchant arriving here that may fold into a local one: its saga
# and its credit side are both here (one arrived with the merchant), and its
# path is the two shards of the move (the caller checks the shards). Read under
# the settlement locks that a settle's or an expiry's first step takes too.
FOLDABLE_HOLD = f"""
SELECT s.peer_shard, s.credit_merchant_id, c.from_shard
FROM sagas s
JOIN credit_holds c ON c.merchant_id = s.merchant_id AND c.transfer_id = s.transfer_id
WHERE s.merchant_id = $1 AND s.transfer_id = $2 {_OPEN_SAGA_HOLD_HERE}
"""

# The hold's other party, kept where it is while the fold commits; never waited
# for (a fence or another arrival may hold it, and may wait for the merchant
# arriving here): not taken, the hold stays cross-shard.
TRY_LOCK_MERCHANT_SHARED = "SELECT pg_try_advisory_xact_lock_shared(7302, hashtext($1))"

SETTLE_LOCALLY = """
UPDATE sagas SET settles_locally = true, updated_at = clock_timestamp()
WHERE merchant_id = $1 AND transfer_id = $2 AND kind = 1
"""

# Open holds of the merchant that a saga carries though both their ends are on
# this shard ($2): the saga's peer and the credit's source are this shard (a
# transfer routed across shards while one party was being moved here, or a
# path folded back to it). Moving either party would make this shard relay the
# hold to itself. As the debit party, then as the credit party.
_SELF_HOLD_COLUMNS = (
    "s.merchant_id, s.transfer_id, s.currency, s.amount_minor, s.credit_merchant_id"
)
_SELF_HOLD_CHECKS = f"""
  AND s.peer_shard = $2 AND c.from_shard = $2 {_OPEN_SAGA_HOLD_HERE}
"""
SELF_HOLDS_OF = f"""
SELECT {_SELF_HOLD_COLUMNS} FROM sagas s
JOIN credit_holds c ON c.merchant_id = s.merchant_id AND c.transfer_id = s.transfer_id
WHERE s.merchant_id = $1 {_SELF_HOLD_CHECKS}
UNION
SELECT {_SELF_HOLD_COLUMNS} FROM credit_holds c
JOIN sagas s ON s.merchant_id = c.merchant_id AND s.transfer_id = c.transfer_id AND s.kind = 1
WHERE c.credit_merchant_id = $1 {_SELF_HOLD_CHECKS}
"""

SET_STATE = """
UPDATE merchants SET state = $2, moved_to = $3, epoch = greatest(epoch, $4),
    updated_at = clock_timestamp()
WHERE merchant_id = $1 AND state = ANY($5::text[])
RETURNING state
"""

ACCOUNT_ENTRY_MISMATCHES = """
SELECT a.account_id FROM accounts a
LEFT JOIN (
    SELECT account_id,
        sum(CASE WHEN direction = 1 AND kind = 1 THEN amount_minor ELSE 0 END) AS dp,
        sum(CASE WHEN direction = 2 AND kind = 1 THEN amount_minor ELSE 0 END) AS cp,
        sum(CASE WHEN direction = 1 AND kind = 2 THEN amount_minor
                 WHEN direction = 1 AND kind = 3 THEN -amount_minor ELSE 0 END) AS dpe,
        sum(CASE WHEN direction = 2 AND kind = 2 THEN amount_minor
                 WHEN direction = 2 AND kind = 3 THEN -amount_minor ELSE 0 END) AS cpe,
        max(sequence) AS last
    FROM entries WHERE merchant_id = $1 GROUP BY account_id
) e USING (account_id)
WHERE a.merchant_id = $1
  AND (coalesce(e.dp, 0) <> a.debits_posted OR coalesce(e.cp, 0) <> a.credits_posted
       OR coalesce(e.dpe, 0) <> a.debits_pending OR coalesce(e.cpe, 0) <> a.credits_pending
       OR coalesce(e.last, 0) <> a.entry_count)
LIMIT 10
"""

MERCHANT_DIGEST = """
SELECT
  (SELECT count(*) FROM accounts WHERE merchant_id = $1) AS accounts,
  (SELECT count(*) FROM transfers WHERE merchant_id = $1) AS transfers,
  (SELECT count(*) FROM entries WHERE merchant_id = $1) AS entries,
  (SELECT count(*) FROM pending_resolutions WHERE merchant_id = $1) AS resolutions,
  (SELECT count(*) FROM transfers t
     WHERE t.merchant_id = $1 AND t.kind = 1 AND t.action = $2 AND t.result = $3
       AND NOT EXISTS (SELECT 1 FROM pending_resolutions r
                       WHERE r.merchant_id = t.merchant_id AND r.pending_id = t.transfer_id)
  ) AS open_pendings,
  (SELECT count(*) FROM pending_expiries WHERE merchant_id = $1) AS expiries,
  (SELECT count(*) FROM saga_credits WHERE credit_merchant_id = $1) AS credits,
  (SELECT md5(coalesce(string_agg(
      account_id || ':' || sequence || ':' || transfer_id || ':' || amount_minor || ':'
      || direction || ':' || kind || ':' || debits_posted || ':' || credits_posted
      || ':' || encode(entry_hash, 'hex'),
      ',' ORDER BY account_id, sequence), ''))
   FROM entries WHERE merchant_id = $1) AS entries_md5,
  (SELECT md5(coalesce(string_agg(
      account_id || ':' || debits_posted || ':' || credits_posted || ':' || debits_pending
      || ':' || credits_pending || ':' || entry_count || ':' || closed
      || ':' || encode(entry_hash, 'hex'),
      ',' ORDER BY account_id), ''))
   FROM accounts WHERE merchant_id = $1) AS accounts_md5,
  (SELECT md5(
      (SELECT coalesce(string_agg(account_id || ':' || debits_must_not_exceed_credits || ':'
          || credits_must_not_exceed_debits || ':' || velocity_rules::text
          || ':' || encode(velocity_counters, 'hex'), ','
          ORDER BY account_id), '') FROM accounts WHERE merchant_id = $1)
      || '|' || (SELECT coalesce(string_agg(account_id || ':' || sequence || ':' || change_id
          || ':' || velocity_rules::text || ':' || balance_monitors::text || ':' || changed_by,
          ',' ORDER BY account_id, sequence), '')
          FROM account_limit_changes WHERE merchant_id = $1)
      || '|' || (SELECT coalesce(string_agg(monitor_id || ':' || account_id || ':' || balance
          || ':' || threshold_minor || ':' || active, ',' ORDER BY monitor_id), '')
          FROM balance_monitors WHERE merchant_id = $1)
      || '|' || (SELECT coalesce(string_agg(monitor_id || ':' || transfer_merchant_id || ':'
          || transfer_id || ':' || direction || ':' || balance_after_minor, ','
          ORDER BY monitor_id, transfer_merchant_id, transfer_id, direction), '')
          FROM monitor_crossings WHERE merchant_id = $1)
  )) AS limits_md5
"""

# numeric, not bigint: a merchant's accounts together may hold more than one can.
NET_POSITIONS = """
SELECT currency, sum(credits_posted::numeric - debits_posted) AS net_posted,
       sum(credits_pending::numeric - debits_pending) AS net_pending
FROM accounts WHERE merchant_id = $1 GROUP BY currency ORDER BY currency
"""

# Held (session-level) by a running rebalance or cleanup on every shard it uses:
# a second one refuses to start instead of interleaving with the first. A
# crashed run's lock goes with its connection.
TRY_ADMIN_LOCK = "SELECT pg_try_advisory_lock(7305, 0)"
ADMIN_UNLOCK = "SELECT pg_advisory_unlock(7305, 0)"
# The backend holding that lock in this shard's database (advisory locks are per
# database; pg_locks lists the whole server's), or no row.
ADMIN_LOCK_HOLDER = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND classid = 7305 AND objid = 0 AND objsubid = 2 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

# Lets this transaction remove the history of one merchant that moved away or is
# being copied here (migration 0009); a session setting can no longer do it.
ALLOW_HISTORY_CLEANUP = "SELECT ledger_allow_history_cleanup($1)"

# Folding a hold's path as its credit party arrives back (migration 0010): the
# relay here that ends at the shard the credit party leaves ($3). On a numbered
# path (migration 0020), the one here with the greatest number below the credit
# party's end ($4; the caller checks it ends at $3); on an unnumbered one, every
# relay here ending at $3 (the caller folds only one).
RELAYS_BEFORE = """
SELECT from_shard, to_shard, path_position FROM hold_relays
WHERE merchant_id = $1 AND transfer_id = $2
  AND CASE WHEN $4::bigint IS NULL THEN path_position IS NULL AND to_shard = $3
           ELSE path_position < $4 END
ORDER BY path_position DESC LIMIT 2
"""

# A settle of this hold has passed a relay here: the relay's legs are settled.
RELAY_PASSED = """
SELECT EXISTS (SELECT 1 FROM relay_passes WHERE merchant_id = $1 AND pending_transfer_id = $2)
"""

ALLOW_RELAY_FOLDS = "SELECT ledger_allow_relay_fold($1, $2::text[], $3::text[])"

DELETE_HOLD_RELAY = """
DELETE FROM hold_relays WHERE merchant_id = $1 AND transfer_id = $2 AND from_shard = $3
  AND path_position IS NOT DISTINCT FROM $4
"""

INSERT_HOLD_FOLD = """
INSERT INTO hold_folds (merchant_id, transfer_id, party_merchant_id, epoch, from_shard,
    onward_shard)
VALUES ($1, $2, $3, $4, $5, $6)
"""

HOLD_FOLDS_OF = """
SELECT merchant_id, transfer_id FROM hold_folds WHERE party_merchant_id = $1 AND epoch = $2
"""

# What keeps a shard in the routing config (draining or leaving): merchants it
# owns or is handed, money pending on its settlement accounts (holds in flight
# or relayed through it), sagas of merchants it owns not finished; and, for
# deleting its entry outright, any settlement position at all (the peers'
# settlement accounts for it mirror them, and reconcile needs both sides).
SHARD_PINS = """
SELECT
  (SELECT count(*) FROM merchants
     WHERE state IN ('active', 'moving', 'incoming') AND merchant_id NOT LIKE '$%') AS merchants,
  (SELECT count(*) FROM accounts WHERE merchant_id = '$settlement'
     AND (debits_pending <> 0 OR credits_pending <> 0)) AS holding,
  (SELECT count(*) FROM sagas s JOIN merchants m USING (merchant_id)
     WHERE s.state IN (1, 4) AND m.state IN ('active', 'moving')) AS sagas,
  (SELECT count(*) FROM accounts WHERE merchant_id = '$settlement'
     AND debits_posted <> credits_posted) AS positions
"""

# What keeps a shard's event stream from ending while consumers are registered:
# events not numbered yet, and the live (not lapsed) consumers that have not
# acknowledged it to its last position. A shard that stops being routed is no
# longer read by the replicas' streams, so it leaves only once every registered
# consumer has all of its events.
STREAM_PINS = """
SELECT (SELECT count(*) FROM event_consumers WHERE lapsed_at IS NULL) AS live,
       (SELECT count(*) FROM event_queue) AS unnumbered,
       coalesce((SELECT array_agg(c.consumer || ':' || (p.last_position - c.position)
                                  ORDER BY c.consumer)
                 FROM event_consumers AS c
                 WHERE c.lapsed_at IS NULL AND c.position < p.last_position), '{}')
           AS behind
FROM event_positions AS p
"""

# A merchant's arrival on or departure from a shard, in the event stream
# (migration 0011): readers order the merchant's events across the move by it.
INSERT_MOVE_EVENT = """
INSERT INTO event_outbox (kind, merchant_id, merchant_ids, body)
VALUES ($1, $2, ARRAY[$2], jsonb_build_object('detail', $3::jsonb))
"""

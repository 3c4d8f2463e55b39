"""Every hard limit of the service, in one place, each with the reason for its value.

The proto documents the caller-visible ones; tests import them from here so the
two cannot drift apart silently. Relationships between limits are checked at
import, so a bad edit fails at start-up rather than under load.
"""

from __future__ import annotations

from datetime import timedelta

# PostgreSQL bigint, the type of every amount and balance column.
AMOUNT_MINOR_MAX = 2**63 - 1

# Batches: 1000 keeps one shard transaction well under a second on a small
# machine while still amortising round trips (TigerBeetle uses ~8k with a much
# cheaper apply path).
transfers_per_request_max = 1000
accounts_per_request_max = 1000
refs_per_lookup_max = 1000
# A journal is one atomic multi-leg transaction; 100 legs covers payroll-style
# splits without letting one call hold many row locks.
postings_per_journal_max = 100

# Identifiers are bytes of UTF-8; 128 fits UUIDs, ULIDs and prefixed keys.
id_bytes_max = 128
# Metadata is for tagging, not storage: bounded so a row stays small.
metadata_keys_max = 16
metadata_key_bytes_max = 64
metadata_value_bytes_max = 256

# Paging: the default keeps responses small; the max bounds one query's work.
page_size_default = 100
page_size_max = 1000
# Issued tokens hold a kind and a cursor (an id of at most 128 bytes), base64.
page_token_bytes_max = 512

# A pending transfer cannot reserve funds for longer than a month; longer holds
# are a product decision that should be an explicit new transfer.
pending_timeout_max = timedelta(days=30)

# Message sizes: a full batch (1000 transfers, each with 16 metadata pairs of
# 64 + 256 bytes and 128-byte ids) is about 6 MB, so 8 MiB admits every legal
# request and refuses anything bigger before it is parsed. Responses (1000 looked-up
# transfers with metadata) stay under 16 MiB. Headers carry a token and a trace
# context; 16 KiB is plenty and bounds what an unauthenticated caller can send.
request_bytes_max = 8 * 1024 * 1024
response_bytes_max = 16 * 1024 * 1024
request_metadata_bytes_max = 16 * 1024

# Server: more concurrent RPCs than this get RESOURCE_EXHAUSTED at once instead
# of queueing without bound behind the shard pools.
concurrent_rpcs_max = 256
# Streams one client connection may open at once: it bounds what one
# connection (one attacker) holds in gRPC itself. Not lower than the
# concurrency limit: a client that fires more calls at once than the server's
# SETTINGS allow before it has read them gets REFUSED_STREAM (UNAVAILABLE)
# instead of queueing, so a legitimate caller with 200 calls in flight on one
# channel would fail. Silent or unauthenticated streams hold no concurrency
# slot (ledger/api/admission.py), so this bound does not let them starve others.
streams_per_connection_max = 256
# Callers' connections the server holds at once; gRPC closes the ones past it
# as they arrive. Each is a file descriptor, as is each connection to a shard:
# unbounded, a flood of connections (no token needed) used the process's last
# descriptors and the shard pools could open none (ledger/api/connections.py).
# An idle connection costs about 20 KB, so 4,096 cost about 80 MB.
incoming_connections_max = 4096
# Callers' connections may take at most this share of the process's file
# limit: the rest is the service's own (shard pools, listeners, files).
incoming_connections_file_share_percent = 50
# A connection must finish its TLS and HTTP/2 handshake within this long or be
# closed (gRPC's default is 120 s), so a silent socket holds a slot no longer.
connection_handshake_timeout_ms = 10_000
# The metrics endpoint serves a thread per connection: it holds this many at
# once (a scraper needs one) and closes the rest as they arrive, and a
# connection must send its request within the timeout, so a flood on that port
# cannot take the file descriptors the shard pools need either.
metrics_connections_max = 8
metrics_request_timeout_s = 5.0
# An admitted call's request must arrive within this long of its headers, or
# the call ends DEADLINE_EXCEEDED: a caller that sends headers and then nothing
# holds a stream this long at most. 8 MiB (the largest request) takes under a
# second at 10 MB/s; 10 s leaves slow links their margin.
request_receive_timeout_s = 10.0
# One token may hold at most this share of the concurrency limit (its calls
# from headers to answer), so one caller, runaway or idle, leaves the rest to
# the others; 75 % still lets a single busy caller use most of a replica.
caller_calls_percent_max = 75
# Per-shard connection pool. 2 cores: more connections than this only add
# contention inside PostgreSQL.
pool_connections_max = 16
# Fail fast on a dead shard so its merchants get UNAVAILABLE quickly while the
# other shards keep serving.
shard_connect_timeout_s = 2.0
# An admin command (`ledger shards ...`) that finds a shard starting up (it
# answers "cannot connect now" while it replays WAL after a restart or crash)
# waits this long for it before failing, checking at this interval: recovery
# of a shard's WAL takes seconds; a minute leaves a loaded machine its margin.
shard_starting_wait_s = 60.0
shard_starting_poll_s = 0.2
# A shard lost under `ledger shards rebalance` (stopped, restarted or cut off:
# such faults last seconds) is waited for this long, at the interval above, and
# the step under way (the plan, a merchant's move) run again; at most this many
# times per shard and step (a shard that answers its check but fails the step
# again and again is not waited for without end). A run that gives up fails, to
# be rerun.
rebalance_shard_lost_wait_s = 20.0
rebalance_shard_losses_per_step_max = 3
# Waiting this long for a free pool connection means the shard is busy (not
# down): the call fails with a retryable overload status.
pool_acquire_timeout_s = 5.0
# A single shard statement that takes longer is treated as the shard being
# unavailable; locks are held for at most this long.
shard_command_timeout_s = 10.0

# A shard that failed as unavailable is logged as available again only once its
# transactions have gone through for this long without a failure: longer than the
# background workers' intervals, so a shard that takes reads but refuses writes
# (read-only) is not logged as coming and going at every round.
shard_recovered_after_s = 1.0

# A write that lands on a shard that does not own its merchant is refused; the
# service reloads its config and tries again this many times. A merchant in the
# middle of a move takes two (its new shard redirects to the old, which hands it
# over), a config reload meanwhile a third: four leaves one to spare.
redirect_attempts_max = 4
# A call for a merchant fenced by a move (or a shard about to be raised to the
# caller's epoch) waits it out in short, growing steps: a move's write pause is
# tens of milliseconds (p99 under 100 ms under load), so steps start at 5 ms
# and grow to 50 ms, and the whole wait is bounded by 1 s, well past any pause
# seen, before the caller gets a retryable UNAVAILABLE.
fence_wait_step_s_min = 0.005
fence_wait_step_s_max = 0.05
fence_wait_s_max = 1.0
# The garbage collector's first-generation threshold in the service (CPython's
# default is 700). At 700 it ran several times per batch call, which allocates
# thousands of short-lived objects. Each gRPC call leaves five objects in a
# reference cycle (grpc.aio's own, with or without interceptors), so a young
# collection pauses the loop for about 0.1 us per object: at 20,000 that was
# 7-50 ms every few seconds under load; at 5,000 pauses are 1-4 ms, and the
# collector's CPU per transfer is the same (docs/performance.md).
gc_young_threshold = 5_000
# Settlement accounts are one per peer shard, currency and stripe; a shard
# remembers this many as existing (and forgets them all past it).
settlement_accounts_remembered_max = 4096
# A move books a merchant's position on the first of these numbered accounts per
# peer and currency with room (ledger/domain/moves.py, position_account); each
# takes AMOUNT_MINOR_MAX a side, so this many outlast any real history.
position_generations_max = 1024
# A settle of a cross-shard hold whose credit merchant moved passes through
# at most this many relay shards (one per move of a party while it was held).
hold_relay_hops_max = 16
# Deadlocks cannot happen with ordered locks, but serialization failures and
# concurrent-duplicate inserts are retried, boundedly, in a fresh transaction.
transaction_attempts_max = 5

# Expired pending transfers are released by a sweeper on each shard at this
# interval, at most this many per sweep transaction.
expiry_sweep_interval_s = 0.5
expiry_sweep_batch_max = 500
expiry_sweeps_per_round_max = 20
# With nothing due, the sweeper and the recovery worker ask each shard when its next
# expiry or saga is due (one read) and sleep until then, but at most this long: work
# that another replica or a crashed one left is found within it. Work this replica
# schedules wakes its own worker at once. Polling at the intervals above cost 14-20 ms
# of CPU per second on an idle replica (issue 18).
background_idle_poll_s_max = 1.0
# Those looks, and the event sequencer's at every event_idle_poll_s, fall on the same
# tick and share one read per shard (ledger/storage/due_probe.py) no older than this.
due_probe_share_s = 0.25
# The gauges the recovery worker refreshes (sagas, merchants, reachability) are this old
# at most.
gauge_refresh_interval_s = 2.0

# Group commit: concurrent transfer calls for one shard share a transaction of
# at most this many transfers, with at most this many such transactions per
# shard and replica at once. One, as TigerBeetle's clients batch: while a
# transaction runs, the next one fills up, so each costs its fixed round trips
# once for many transfers. Measured (bench, 32 callers, 2 cores): single
# transfers 315/s with 8 in flight, 384/s with 2, 501/s with 1, and lower p50.
# Parallelism comes from shards and replicas.
group_commit_transfers_max = 1000
group_commit_batches_in_flight_max = 1

# Sagas. Attempts before a saga goes to the dead-letter list: with the back-off
# below this is over ten minutes of a credit shard being unreachable.
saga_attempts_max = 30
saga_retry_delay_s_min = 0.1
saga_retry_delay_s_max = 30.0
# A worker that claims a saga holds it this long; a crashed worker's sagas are
# picked up by another replica after it runs out.
saga_lease_s = 10.0
# How long a CreateTransfers call waits for its sagas when the caller set no
# deadline (and the most it waits when it did).
saga_inline_wait_s_max = 5.0
# Kept back from the caller's deadline so the answer still reaches it in time.
saga_deadline_margin_s = 0.25
# Sagas started at once by one call, so one batch cannot take every connection.
saga_starts_per_request_max = 16
# Group commit of saga steps: concurrent sagas' steps on one shard share a
# transaction of at most this many steps, one such transaction per shard and
# replica at once (as for transfers above; two at once measured 318 against 380
# cross-shard transfers/s).
saga_step_group_sagas_max = 200
# The recovery worker looks for due sagas this often while a shard has due work (or
# is unavailable), and claims this many per shard.
saga_recovery_interval_s = 0.2
saga_claims_per_round_max = 50
# LookupTransfers.wait_timeout_ms may not exceed this.
lookup_wait_ms_max = 30_000
# A RUNNING saga older than this is reported stuck by reconcile.
saga_stuck_after_s = 3600.0

# Hash-chain checkpoints: how often each shard records its grown account heads,
# and at most how many heads one checkpoint takes (the rest go in the next).
chain_checkpoint_interval_s = 60.0
chain_checkpoint_heads_max = 100_000
# Verification stops listing after this many violations per check.
chain_violations_max = 100
# A checkpoint the export lacks (made by another replica, or before a crash
# between commit and export) is exported on the next round, this many per
# shard and round, so catching up after a long outage stays a bounded step.
checkpoint_export_catch_up_max = 100
# `verify --against` reads a shard's export file whole; past this size it
# refuses rather than exhaust memory (a year of one checkpoint a minute with
# a thousand grown accounts each is about 8 GiB: rotate the files before that).
checkpoint_export_bytes_max = 4 * 1024**3
# Heads checked against a shard in one query while verifying an export.
checkpoint_export_heads_per_query_max = 10_000

# The token file is checked for changes this often, so a revoked token stops
# working within about a second (SIGHUP reloads at once).
token_file_poll_interval_s = 1.0
# Tokens that expire within this are named in a warning at start-up and reload.
token_expiry_warning = timedelta(days=7)

# The server's TLS certificate: warned about from this long before it expires
# (two weeks: time to renew through a change process), checked this often.
tls_certificate_expiry_warning = timedelta(days=14)
tls_certificate_check_interval_s = 3600.0

# The event stream (issue 20; ledger/core/event_sequencer.py, event_feed.py).
# A sequencer round numbers at most this many outbox events in one transaction.
event_sequence_batch_max = 5_000
# Under load, rounds are at least this far apart, so that each numbers many
# events instead of one transaction per commit: it adds at most this much to
# the delay from commit to delivery. 5 ms gave nearly a round per commit at low
# load; 50 ms took PostgreSQL's CPU per single call from 1,730 to 1,400 us and
# per cross-shard transfer from 12.0 to 8.5 ms (bench.cpu_cost, docs/performance.md).
event_sequence_round_gap_s = 0.05
# An idle shard's outbox is looked at this often (writes by other processes, a
# rebalance, another replica) and a subscriber looks again this often when a
# notification was lost.
event_idle_poll_s = 1.0
# Events a subscriber reads from one shard per query.
event_read_batch_max = 500
# Under load, a subscription's reads are at least this far apart, so that each
# takes the events of several sequencer rounds (a read per round cost the
# writers measurably on a 2-core machine): it adds at most this much to
# the delay from commit to delivery, and nothing to the first event after a lull.
event_read_gap_s = 0.05
# An EventBatch (SubscribeEventBatches) is split before it passes this many bytes:
# well under gRPC's default 4 MiB receive limit of every client, whatever its
# events hold (a journal's postings, metadata); one event alone is never split.
event_batch_bytes_max = 1 << 20
# Consumers lapse and old events are pruned this often; the lag gauges are this old.
event_retention_interval_s = 10.0
# Events are kept at least this long, for subscribers that never registered.
event_retention_s_min = 86_400.0
# The retention bound: a registered consumer further behind than this lapses
# (and is told so), so that one forgotten consumer cannot grow a shard forever.
event_consumer_lag_events_max = 10_000_000
event_consumer_lag_s_max = 7 * 86_400.0
event_prune_batch_max = 10_000
# Event subscriptions one replica serves at once (each holds a call slot and
# reads every shard when woken).
event_subscriptions_max = 64
# Consumer names: a registered consumer is a row on every shard.
event_consumer_name_bytes_max = 128
# Shards an event cursor may name (more than any cluster has; each is checked).
event_cursor_shards_max = 64

# The AMQP publisher (ledger events publish; ledger/api/amqp_publisher.py).
# Events one shard publishes before it awaits the broker's confirms and
# acknowledges: what a publisher killed mid-batch may publish again (per shard).
event_publish_batch_max = 500
# A shard whose lease another publisher holds is asked for it again this often:
# how long a shard waits to be taken over once its publisher died.
event_publish_lease_retry_s = 1.0
# The broker confirms a healthy publish in milliseconds; one that has not within
# this long (a memory or disk alarm blocks publishers) is treated as lost and
# the batch is published again after reconnecting.
event_publish_confirm_timeout_s = 30.0
event_publish_connect_timeout_s = 10.0
# Reconnecting to the broker: a jittered, doubling delay within these bounds, for
# at most this many failures in a row (about ten minutes at the longest delay);
# then the publisher exits 1 for its supervisor to restart and alert on.
event_publish_reconnect_delay_s_min = 0.1
event_publish_reconnect_delay_s_max = 5.0
event_publish_reconnect_attempts_max = 120
# A shard whose database cannot be reached is tried again after this long.
event_publish_shard_retry_s = 1.0

# Graceful shutdown: in-flight RPCs get this long to finish.
shutdown_grace_s = 5.0
# `ledger serve --workers N` (ledger/workers.py): a worker connects to and
# migrates every shard before it serves, as a single process does (the bench
# gives a service 60 s for the same); past this the replica gives up and exits.
worker_start_timeout_s = 60.0
# A worker told to stop lets in-flight calls finish (shutdown_grace_s), stops
# its background work and closes its pools; past this it is killed.
worker_stop_timeout_s = 30.0
# More workers than this is a typo, not a machine: each holds a share of every
# shard pool, and pool_connections_max split further leaves them one connection.
workers_max = 64

assert 1 <= refs_per_lookup_max <= 10_000
assert 1 <= transfers_per_request_max <= 10_000
assert 2 <= postings_per_journal_max <= transfers_per_request_max
assert 1 <= page_size_default <= page_size_max
assert streams_per_connection_max <= concurrent_rpcs_max
assert 0 < request_receive_timeout_s <= shard_command_timeout_s
assert 0 < caller_calls_percent_max <= 100


def caller_calls_max(concurrent_rpcs_max: int) -> int:
    """The calls one token may have in progress under a concurrency limit."""
    return max(1, concurrent_rpcs_max * caller_calls_percent_max // 100)


assert shard_connect_timeout_s < shard_command_timeout_s
assert max(expiry_sweep_interval_s, saga_recovery_interval_s) < shard_recovered_after_s
assert max(expiry_sweep_interval_s, saga_recovery_interval_s) <= background_idle_poll_s_max
assert background_idle_poll_s_max < saga_lease_s
# The idle looks and the gauge refresh fall on one grid of ticks, to share readings.
assert event_idle_poll_s == background_idle_poll_s_max
assert gauge_refresh_interval_s % background_idle_poll_s_max == 0
assert due_probe_share_s < background_idle_poll_s_max
assert expiry_sweep_batch_max <= transfers_per_request_max
assert saga_retry_delay_s_min < saga_retry_delay_s_max < saga_lease_s * 10
assert saga_deadline_margin_s < saga_inline_wait_s_max
assert group_commit_transfers_max >= transfers_per_request_max
assert group_commit_batches_in_flight_max <= pool_connections_max
assert shutdown_grace_s < worker_stop_timeout_s
assert 0 < fence_wait_step_s_min <= fence_wait_step_s_max < fence_wait_s_max
assert event_sequence_batch_max >= transfers_per_request_max
assert event_subscriptions_max <= concurrent_rpcs_max
assert event_read_batch_max <= event_sequence_batch_max
assert event_batch_bytes_max <= response_bytes_max

# Spending controls (velocity rules and balance monitors, ledger/domain/velocity.py).
# A rule's window is split into this many fixed buckets; the check counts the
# whole oldest bucket the window touches, so it may refuse early by at most one
# bucket's share of the window (5%) and never lets a limit be exceeded. More
# buckets tighten the bound but add rows summed per checked transfer.
velocity_buckets_per_window = 20
# Rules per account: each rule costs a counter update and a sum per transfer;
# a handful covers "amount and count, debits and credits, a short and a long window".
velocity_rules_per_account_max = 8
# Windows from a second to 31 days: longer controls are reporting, not velocity.
velocity_window_s_min = 1
velocity_window_s_max = 31 * 24 * 3600
# Monitors per account: each is compared on every change of the account's balance.
balance_monitors_per_account_max = 8
# A limits change carries a reason for the audit trail; bounded like metadata values.
limits_reason_bytes_max = 256
assert 1 <= velocity_buckets_per_window <= 1000
assert 1 <= velocity_window_s_min <= velocity_window_s_max
assert 1 <= velocity_rules_per_account_max <= 64
assert 1 <= balance_monitors_per_account_max <= 64
assert event_sequence_round_gap_s <= event_read_gap_s < event_idle_poll_s
assert event_publish_batch_max <= event_read_batch_max
assert 0 < event_publish_reconnect_delay_s_min < event_publish_reconnect_delay_s_max
assert event_publish_connect_timeout_s < event_publish_confirm_timeout_s

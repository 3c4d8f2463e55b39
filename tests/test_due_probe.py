"""The idle workers' looks at a shard: one read for all three, on one tick (issue 18:
three statements per shard and second were most of an idle replica's CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ledger import limits
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.storage.due_probe import DueProbes
from ledger.storage.migrate import apply_migrations
from ledger.storage.shard import Shard
from tests.support import Service, background_wake_times, fresh_databases


@pytest.fixture
async def shard(pg_server: EmbeddedPostgres) -> AsyncIterator[Shard]:
    (spec,) = fresh_databases(pg_server, ["due"])
    opened = Shard(name="due", dsn=spec.dsn)
    await opened.open()
    async with opened.pool.acquire() as conn:
        await apply_migrations(conn)
    yield opened
    await opened.close()


async def test_one_reading_answers_every_worker_and_a_woken_one_reads_afresh(
    shard: Shard,
) -> None:
    probes = DueProbes(share_s=60.0)
    # The workers wake on one tick and look together: one statement for all three.
    readings = await asyncio.gather(*(probes.read(shard, shared=True) for _ in range(3)))
    assert probes.reads == 1
    empty = readings[0]
    assert (empty.saga_due_s, empty.expiry_due_s, empty.events_waiting) == (None, None, False)
    async with shard.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO pending_expiries (merchant_id, transfer_id, expires_at)"
            " VALUES ('m', 't', clock_timestamp() + interval '30 seconds')"
        )
        await conn.execute(
            "INSERT INTO event_outbox (kind, merchant_id, merchant_ids, body)"
            " VALUES (4, 'm', ARRAY['m'], '{}')"
        )
    # On the clock: the reading of a moment ago, aged, without a statement.
    shared = await probes.read(shard, shared=True)
    assert probes.reads == 1
    assert shared.expiry_due_s is None and not shared.events_waiting
    # Woken for work of its own: what the shard holds now.
    fresh = await probes.read(shard, shared=False)
    assert probes.reads == 2
    assert fresh.expiry_due_s is not None and 25 < fresh.expiry_due_s <= 30
    assert fresh.events_waiting
    await asyncio.sleep(0.05)  # only to age the reading; nothing waits on it
    aged = await probes.read(shard, shared=True)
    assert probes.reads == 2
    assert aged.expiry_due_s is not None and aged.expiry_due_s < fresh.expiry_due_s
    # Past the share window, a look on the clock reads again.
    probes.share_s = 0.0
    await probes.read(shard, shared=True)
    assert probes.reads == 3


async def test_idle_workers_sleep_to_the_same_tick_and_share_their_probes(
    service: Service,
) -> None:
    server = service.server
    assert server.sweeper.due_probes is server.recovery.due_probes is server.sequencer.due_probes
    wakes = await background_wake_times(server)
    assert len(wakes) == 2
    for name, sleeps_until in wakes.items():
        # Nothing is due: each wakes at the next whole idle poll of the loop's clock,
        # exactly. It slept a delay worked out before its round's reads, so it woke
        # that long after the tick (14 ms under load, where 10 ms was allowed).
        off_tick_s = sleeps_until % limits.background_idle_poll_s_max
        assert min(off_tick_s, limits.background_idle_poll_s_max - off_tick_s) < 1e-6, name

"""A publisher's lease on one shard's event stream: one publisher at a time per shard.

The lease is a session-level advisory lock (event_statements.TRY_PUBLISHER_LEASE)
held on a connection of its own, outside the pool, for as long as the holder
publishes the shard for a consumer name. It is released by closing that connection, and PostgreSQL
releases it when the holder's process dies (its socket closes), so another
publisher takes the shard over without any timeout to wait out. The same
connection LISTENs for the sequencer's notifications, so the holder wakes when
the shard numbers new events.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from ledger import limits
from ledger.storage import event_statements as sql
from ledger.storage.errors import ShardUnavailable, is_unavailable
from ledger.storage.events import EventRow, EventStore
from ledger.storage.shard import Shard, init_connection


class ShardLease:
    def __init__(
        self, shard: Shard, consumer: str, connection: asyncpg.Connection[asyncpg.Record]
    ) -> None:
        self.shard = shard
        self.consumer = consumer
        self._connection = connection

    @classmethod
    async def try_take(
        cls, shard: Shard, *, consumer: str, holder: str, on_sequenced: Callable[[], None]
    ) -> ShardLease | None:
        """The shard's lease for consumer if no other publisher holds it (None if one does); raises
        ShardUnavailable when the shard cannot be reached. The holder's name is the
        connection's application_name: pg_stat_activity shows who holds the lease."""
        try:
            connection = await asyncpg.connect(
                shard.dsn,
                timeout=limits.shard_connect_timeout_s,
                command_timeout=limits.shard_command_timeout_s,
                server_settings={"application_name": holder},
            )
        except BaseException as error:
            if is_unavailable(error) or isinstance(error, asyncpg.PostgresError):
                raise ShardUnavailable(shard.name, error) from error
            raise
        try:
            await init_connection(connection)  # it reads events: jsonb as the pool reads it
            if not await connection.fetchval(sql.TRY_PUBLISHER_LEASE, consumer):
                await connection.close()
                return None
            await connection.add_listener(sql.NOTIFY_CHANNEL, lambda *_: on_sequenced())
        except BaseException as error:
            connection.terminate()
            if is_unavailable(error):
                raise ShardUnavailable(shard.name, error) from error
            raise
        return cls(shard, consumer, connection)

    async def read(self, *, after: int, limit: int) -> list[EventRow] | None:
        """Up to limit events after position `after`, read on the lease's own session;
        None when that session is gone (the lease with it).

        A read that answers proves the lease is still held: a session-level advisory
        lock goes only with its session (or an unlock the publisher never sends), and
        asyncpg never reconnects a connection behind our back. So a batch needs no
        round trip of its own to check the lease (it read pg_locks, which takes every
        lock-manager partition lock of the server), nor a pool connection: at a few
        events per batch under a steady load, those were most of the publisher's CPU
        per event (docs/performance.md, "Event stream")."""
        if self._connection.is_closed():
            return None
        try:
            records = await self._connection.fetch(sql.READ_EVENTS, after, limit, None)
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError):
            return None
        return EventStore(self.shard).rows(records)

    async def acknowledge(self, position: int) -> int | None:
        """Acknowledges the lease's consumer up to position on the lease's session
        (no pool connection: one round trip a batch); its position, or None when the
        session is gone (the lease with it: the batch goes again, as after a kill
        between confirm and acknowledgement). Raises ConsumerLapsed."""
        if self._connection.is_closed():
            return None
        try:
            return await EventStore(self.shard).acknowledge_on(
                self._connection, self.consumer, position
            )
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError):
            return None

    @staticmethod
    async def holder(shard: Shard, consumer: str) -> str | None:
        """Who holds consumer's lease on the shard (its application_name), if anyone."""
        async with shard.connection() as conn:
            holder = await conn.fetchval(sql.PUBLISHER_LEASE_HOLDER, consumer)
        return str(holder) if holder is not None else None

    async def release(self) -> None:
        """Gives the shard up (closing the connection drops the lock)."""
        if self._connection.is_closed():
            return
        try:
            await self._connection.close(timeout=limits.shard_connect_timeout_s)
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError):
            self._connection.terminate()

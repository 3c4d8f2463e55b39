"""A TCP proxy in front of one shard, run by the chaos runner on its own event loop.

The service replicas reach a shard's PostgreSQL only through its proxy (the shard
config's DSN names the proxy's port), so the runner can:
- cut every current connection (both sides are reset at once, as a broken link);
- refuse new connections for a while (each is accepted and reset at once);
- add latency to everything sent towards the shard (a slow shard or a slow link).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

LISTEN_HOST = "127.0.0.1"
# Bytes moved per read; PostgreSQL messages of this workload are far smaller.
CHUNK_BYTES_MAX = 64 * 1024
# Reaching the shard's own PostgreSQL on this machine takes milliseconds; past
# this the shard is down and the caller's connection is reset.
UPSTREAM_CONNECT_TIMEOUT_S = 2.0
# Chunks queued per direction while latency is on; a full queue makes the reader
# wait (back-pressure) instead of buffering without bound.
DELAYED_CHUNKS_MAX = 1024
# Latency the proxy will add, at most (a bad edit must not make a hang look slow).
LATENCY_MS_MAX = 5_000


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection, pumped both ways."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to upstream_host:upstream_port, with faults on command."""

    def __init__(self, *, name: str, upstream_host: str, upstream_port: int) -> None:
        self.name = name
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.connections_total = 0
        self.connections_cut = 0
        self.connections_refused = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._refusing = False
        self._latency_s = 0.0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, LISTEN_HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()

    # Faults.

    def cut(self) -> int:
        """Resets every current connection; returns how many there were."""
        links, self._links = self._links, set()
        for link in links:
            link.abort()
        self.connections_cut += len(links)
        return len(links)

    def set_refusing(self, refusing: bool) -> None:
        self._refusing = refusing

    def set_latency_ms(self, latency_ms: int) -> None:
        if not 0 <= latency_ms <= LATENCY_MS_MAX:
            raise ValueError(f"latency must be 0 to {LATENCY_MS_MAX} ms, got {latency_ms}")
        self._latency_s = latency_ms / 1000.0

    def heal(self) -> None:
        """No refusals, no latency; connections already open stay open."""
        self._refusing = False
        self._latency_s = 0.0

    @property
    def clean(self) -> bool:
        return not self._refusing and self._latency_s == 0.0

    # Forwarding.

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if self._refusing:
            self.connections_refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port),
                UPSTREAM_CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        if self._refusing:  # a partition began while this one was connecting
            self.connections_refused += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        link = _Link(client=writer, upstream=up_writer)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link, delayed=True)),
            asyncio.create_task(self._pump(up_reader, writer, link, delayed=False)),
        ]
        self._links.add(link)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        delayed: bool,
    ) -> None:
        """Copies one direction until EOF or an error, then closes the whole link.

        Towards the shard every chunk is held back by the latency in force when it
        arrived; a queue keeps their order while later chunks are already read.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(DELAYED_CHUNKS_MAX)
        writing = asyncio.create_task(self._write_when_due(queue, writer))
        graceful = False
        try:
            while True:
                data = await reader.read(CHUNK_BYTES_MAX)
                if not data:
                    break
                due = loop.time() + (self._latency_s if delayed else 0.0)
                await queue.put((due, data))
            await queue.put((loop.time(), b""))
            await writing
            graceful = True
        except OSError:
            pass
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await writing
            self._links.discard(link)
            if graceful:
                # The peer closed: what was queued has been written; close() flushes it.
                link.client.close()
                link.upstream.close()
            else:
                link.client.transport.abort()
                link.upstream.transport.abort()

    async def _write_when_due(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if not data:
                return
            writer.write(data)
            await writer.drain()

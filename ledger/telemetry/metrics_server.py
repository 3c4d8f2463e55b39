"""The /metrics endpoint: prometheus_client's WSGI app on a server that holds a
bounded number of connections.

prometheus_client's own server starts a thread per connection and reads each
request without a deadline, so every connection to the port (no token needed)
kept a thread and a file descriptor for as long as its sender liked: enough of
them take the descriptors the shard pools need, as a flood of gRPC connections
did (tests/test_connection_flood.py). This one serves at most
limits.metrics_connections_max connections at once, closes the rest as they
arrive, and gives each limits.metrics_request_timeout_s to send its request and
read the answer.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app

from ledger import limits


class _Handler(WSGIRequestHandler):
    # StreamRequestHandler sets it on the connection's socket: a sender that
    # stalls is cut off (the handler ends the connection on the timeout).
    timeout = limits.metrics_request_timeout_s

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # The kernel's queue of connections not yet accepted: accepting is quick
    # (one past the bound is closed at once), so a burst waits here, not in SYN
    # retries.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(limits.metrics_connections_max)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(host: str, port: int) -> int:
    """Serves the default registry on host:port (0 picks a port) from a daemon
    thread; returns the port. host may be an IPv6 address in brackets."""
    host = host.strip("[]")
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_BoundedServer,), {"address_family": family})
    server: WSGIServer = make_server(
        host, port, make_wsgi_app(REGISTRY), server_class, handler_class=_Handler
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_port)

"""How many callers' connections the server holds at once (docs/security.md).

A TCP connect needs no token, and every connection the server accepts is a
file descriptor of this process, as is every connection to a shard. Unbounded,
a flood of connections used the process's last descriptors: the shard pools
could open none, and valid callers' calls on channels they already held failed
UNAVAILABLE (tests/test_connection_flood.py). So callers' connections get at
most a share of the file limit (gRPC closes the ones past it as they arrive),
and a connection must finish its handshake within a deadline, so silent
sockets give their slots back.

A flood can still fill the callers' share: new callers are then refused until
it ends, while every channel already open keeps its calls. Limits per client
address belong in front of the service (a load balancer, the orchestrator).
"""

from __future__ import annotations

import logging
import resource

from ledger import limits
from ledger.invariant import invariant

log = logging.getLogger(__name__)

# Where the hard limit is unlimited, the soft one is raised this far (Linux's
# default fs.nr_open: a file limit may not pass it).
FILE_LIMIT_RAISED_MAX = 1 << 20


def raise_file_limit() -> int:
    """Raises this process's soft file limit to its hard one (as Go's runtime does):
    the callers' share grows with it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FILE_LIMIT_RAISED_MAX if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as error:
            log.warning("file limit stays %d (could not raise it to %d: %s)", soft, target, error)
    return soft


def incoming_connections_max(configured_max: int = limits.incoming_connections_max) -> int:
    """The callers' connections this process may hold: configured_max, or its share
    of the file limit if that is smaller (then it warns, naming both)."""
    invariant(configured_max >= 1, "a server accepts at least one connection")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured_max
    share = max(1, soft * limits.incoming_connections_file_share_percent // 100)
    if share < configured_max:
        log.warning(
            "the file limit (%d) leaves callers %d connections, fewer than the %d configured "
            "(LEDGER_INCOMING_CONNECTIONS_MAX): raise the limit (ulimit -n) to accept more",
            soft,
            share,
            configured_max,
        )
        return share
    return configured_max

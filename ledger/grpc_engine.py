"""gRPC's I/O engine for the connections the service accepts, chosen before gRPC loads.

Since about 1.6x gRPC serves accepted connections through its EventEngine: each
read and write completes on one of the EventEngine's threads, is queued to the
completion queue, and reaches the asyncio loop through grpc.aio's poller thread.
With the listener on gRPC's older I/O manager (the experiment
event_engine_listener off), the poller thread does the socket I/O itself: one
thread hand-off fewer per read or write, on a machine where every thread competes
with the event loop and PostgreSQL for two cores. Measured (issue 18,
docs/performance.md): a bare grpc.aio health server's CPU per call fell by 16-20%,
the service's health call from 380 and 423 to 333 and 370 us, single transfers
under load rose 2-4%.

gRPC reads GRPC_EXPERIMENTS once, when it loads, so this runs from the package's
__init__, before any module imports grpc. An operator's own GRPC_EXPERIMENTS is
kept as it is (set it to "" for gRPC's defaults). A gRPC that no longer knows the
experiment logs "Unknown experiment" and serves with its default.
Only the listener changes: clients (this package's and the callers') keep gRPC's
default engine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, MutableMapping

GRPC_EXPERIMENTS_VARIABLE = "GRPC_EXPERIMENTS"
SERVICE_GRPC_EXPERIMENTS = "-event_engine_listener"


def choose_listener_engine(
    environ: MutableMapping[str, str] = os.environ,
    loaded_modules: Collection[str] = sys.modules.keys(),
) -> bool:
    """Sets GRPC_EXPERIMENTS for the service's listener unless gRPC already loaded or
    the operator chose; whether it did."""
    if "grpc" in loaded_modules or GRPC_EXPERIMENTS_VARIABLE in environ:
        return False
    environ[GRPC_EXPERIMENTS_VARIABLE] = SERVICE_GRPC_EXPERIMENTS
    return True

"""A limit on concurrent ledger calls that health checks do not count against.

gRPC's own maximum_concurrent_rpcs counts every call from its headers, so a
saturated replica would answer its health probe RESOURCE_EXHAUSTED and be
restarted for being busy, and callers that never send a body could exhaust it
(issue 23); the server does not set it. The call interceptor
(ledger/api/admission.py) enforces this limit on everything but the open
services, and counts a call only once its request has arrived and its token was
accepted, so silent and unauthenticated callers hold none of it.
"""

from __future__ import annotations

import grpc

from ledger.api.status import AbortError


class ConcurrencyLimit:
    def __init__(self, calls_max: int) -> None:
        assert calls_max >= 1, "at least one call at a time"
        self.calls_max = calls_max
        self.in_flight = 0

    def full(self) -> bool:
        return self.in_flight >= self.calls_max

    def refusal(self) -> AbortError:
        # Fail fast: queueing would only grow latency and memory.
        return AbortError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"more than {self.calls_max} calls in progress; retry shortly",
        )

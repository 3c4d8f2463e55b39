"""What the call interceptor needs from gRPC's handlers, and which services are open."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Any]]
Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]

# Services anyone may call at any time: load balancers probe health without
# credentials, and a busy replica must still answer that it is alive.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})


def is_open(method: str) -> bool:
    """method: the full path, "/package.Service/Method"."""
    return method.lstrip("/").partition("/")[0] in OPEN_SERVICES

"""What the server's interceptors share: open services and re-wrapping a unary handler."""

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


def with_behavior(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: Behavior, *, parse_request: bool = True
) -> grpc.RpcMethodHandler[Any, Any]:
    """The unary handler with behavior in place of its own; with parse_request=False
    behavior receives the request's raw bytes."""
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer if parse_request else None,
        response_serializer=handler.response_serializer,
    )

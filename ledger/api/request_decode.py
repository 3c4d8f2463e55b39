"""Undecodable request bytes get INVALID_ARGUMENT, not gRPC's default INTERNAL.

gRPC Python answers INTERNAL ("Exception deserializing request!") when a
request does not parse, for example a string field holding invalid UTF-8, which
the wire allows but proto3 does not. That would blame the server for the
caller's bytes. This interceptor takes the raw bytes and parses them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ledger.api.handlers import Continuation, with_behavior
from ledger.api.status import invalid_argument, send_abort


class RequestDecodeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse: Callable[[bytes], Any] = handler.request_deserializer
        inner = handler.unary_unary

        async def decoded(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                request = parse(raw)
            except (DecodeError, UnicodeDecodeError, ValueError) as error:
                reason = f"the request bytes are not a valid message: {type(error).__name__}"
                await send_abort(context, invalid_argument([("request", reason)]))
            return await inner(request, context)

        return with_behavior(handler, decoded, parse_request=False)

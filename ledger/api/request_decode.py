"""Undecodable request bytes get INVALID_ARGUMENT, not gRPC's default INTERNAL.

gRPC Python answers INTERNAL ("Exception deserializing request!") when a
request does not parse, for example a string field holding invalid UTF-8, which
the wire allows but proto3 does not. That would blame the server for the
caller's bytes. The call interceptor (ledger/api/admission.py) takes the raw
bytes and parses them here.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from ledger.api.status import AbortError, invalid_argument

# What a message's FromString raises for bytes that are not that message.
PARSE_ERRORS = (DecodeError, UnicodeDecodeError, ValueError)


def undecodable(error: Exception) -> AbortError:
    reason = f"the request bytes are not a valid message: {type(error).__name__}"
    return invalid_argument([("request", reason)])

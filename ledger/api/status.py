"""Rich gRPC error statuses (google.rpc details), raised as AbortError and sent by the servicer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "ledger.v1"


class AbortError(Exception):
    """A whole-call failure with a google.rpc.Status to send as the RPC's status."""

    def __init__(
        self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)

    def to_rpc_status(self) -> status_pb2.Status:
        packed = []
        for detail in self.details:
            wrapper = any_pb2.Any()
            wrapper.Pack(detail)
            packed.append(wrapper)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


async def send_abort(context: grpc.aio.ServicerContext[Any, Any], error: AbortError) -> None:
    """Ends the call with the error's status and its details in the standard trailer."""
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=(("grpc-status-details-bin", error.to_rpc_status().SerializeToString()),),
    )


def invalid_argument(violations: Sequence[tuple[str, str]]) -> AbortError:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ]
    )
    first_field, first_reason = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return AbortError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"invalid {first_field}: {first_reason}{more}",
        [bad_request],
    )


def failed_precondition(
    reason: str,
    message: str,
    *,
    subjects: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> AbortError:
    details: list[Message] = [
        error_details_pb2.ErrorInfo(
            reason=reason, domain=ERROR_DOMAIN, metadata=dict(metadata or {})
        )
    ]
    if subjects:
        details.append(
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=reason, subject=subject, description=message
                    )
                    for subject in subjects
                ]
            )
        )
    return AbortError(grpc.StatusCode.FAILED_PRECONDITION, message, details)


def with_reason(code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> AbortError:
    return AbortError(
        code,
        message,
        [error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)],
    )


def unavailable(message: str) -> AbortError:
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(100)
    return AbortError(grpc.StatusCode.UNAVAILABLE, message, [retry])


assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]

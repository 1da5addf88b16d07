"""One error hierarchy with a transport-neutral code, mapped to HTTP and gRPC by one table each."""

from __future__ import annotations

from enum import Enum

import grpc


class Code(Enum):
    INVALID = "invalid_argument"
    TOO_LARGE = "payload_too_large"
    NOT_FOUND = "not_found"
    OVERLOADED = "resource_exhausted"
    DEADLINE = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"
    REQUEST_TIMEOUT = "request_timeout"
    FORBIDDEN = "permission_denied"
    FAILED_PRECONDITION = "failed_precondition"


class ServiceError(Exception):
    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The client sent something we cannot serve; the message names the field and the limit."""

    code = Code.INVALID


class PayloadTooLarge(ServiceError):
    code = Code.TOO_LARGE


class ModelNotFound(ServiceError):
    code = Code.NOT_FOUND


class Overloaded(ServiceError):
    code = Code.OVERLOADED


class DeadlinePassed(ServiceError):
    code = Code.DEADLINE


class NotReady(ServiceError):
    code = Code.UNAVAILABLE


class Unauthenticated(ServiceError):
    """No or a wrong API key; the message never repeats what the client sent."""

    code = Code.UNAUTHENTICATED


class BodyTimeout(ServiceError):
    """The request body did not arrive in time (a slow or stalled upload)."""

    code = Code.REQUEST_TIMEOUT


class Forbidden(ServiceError):
    """The server's settings do not allow this call (e.g. loading models outside explicit model control)."""

    code = Code.FORBIDDEN


class LoadFailed(ServiceError):
    """A model asked to load has no version that loads: the repository's content, not the request, is wrong."""

    code = Code.FAILED_PRECONDITION


class ModelFailure(ServiceError):
    """The model itself failed: a 500, never blamed on the client."""

    code = Code.INTERNAL


HTTP_STATUS: dict[Code, int] = {
    Code.INVALID: 400,
    Code.TOO_LARGE: 413,
    Code.NOT_FOUND: 404,
    Code.OVERLOADED: 429,
    Code.DEADLINE: 504,
    Code.UNAVAILABLE: 503,
    Code.INTERNAL: 500,
    Code.UNAUTHENTICATED: 401,
    Code.REQUEST_TIMEOUT: 408,
    Code.FORBIDDEN: 403,
    Code.FAILED_PRECONDITION: 409,
}

GRPC_STATUS: dict[Code, grpc.StatusCode] = {
    Code.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Code.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.REQUEST_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}


def shorten(value: str, limit: int = 64) -> str:
    """A client-chosen string as error messages and logs may show it: bounded, printable."""
    text = value if len(value) <= limit else f"{value[:limit]}...({len(value)} chars)"
    return repr(text)

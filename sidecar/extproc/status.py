"""gRPC status codes, and the exception a handler raises to end its call with one.

Transport-neutral: the ext_proc server maps a failed stream to a status here, and each transport sends
it its own way (the native one as trailers, grpc.aio through `abort`).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CallError", "Status"]


class Status(IntEnum):
    """gRPC status codes the sidecar sends."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class CallError(Exception):
    """Raised by a handler to end its call with a status other than OK."""

    def __init__(self, status: Status, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message

"""The one place where engine and store errors become gRPC status codes."""

from __future__ import annotations

import grpc

from ratchet_server.engine import errors
from ratchet_server.store import StoreDataError, StoreUnavailable

# Every error a servicer turns into a status; anything else is a bug (UNKNOWN).
MAPPED: tuple[type[Exception], ...] = (errors.EngineError, StoreUnavailable, StoreDataError)

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # The database dropped the connection, shut down or is busy: the client
    # may retry (gRPC's UNAVAILABLE means exactly that).
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    # A value the engine's checks let through but the database refused.
    (StoreDataError, grpc.StatusCode.INVALID_ARGUMENT),
)


def code_for(exc: Exception) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL

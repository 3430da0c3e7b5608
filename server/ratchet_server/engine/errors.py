"""Errors the engine raises; the api layer maps each to one gRPC status.

    EngineError
    ├── NotFound               (NOT_FOUND)
    ├── InvalidArgument        (INVALID_ARGUMENT)
    ├── StaleLease             (FAILED_PRECONDITION: the lease is no longer current)
    ├── FailedPrecondition     (FAILED_PRECONDITION: e.g. cancel of a final run)
    ├── Unauthenticated        (UNAUTHENTICATED)
    ├── PermissionDenied       (PERMISSION_DENIED)
    └── ResourceExhausted      (RESOURCE_EXHAUSTED: size and batch limits)
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class NotFound(EngineError):
    pass


class InvalidArgument(EngineError):
    pass


class FailedPrecondition(EngineError):
    pass


class StaleLease(FailedPrecondition):
    pass


class Unauthenticated(EngineError):
    pass


class PermissionDenied(EngineError):
    pass


class ResourceExhausted(EngineError):
    pass

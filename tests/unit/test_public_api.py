"""The public surface of `ratchet`: a change to it must be deliberate."""

from __future__ import annotations

import pytest

import ratchet

pytestmark = pytest.mark.timeout(10)

PUBLIC = [
    "NO_RETRY",
    "AuthenticationError",
    "BatchItem",
    "ChildOutputError",
    "ChildRunFailedError",
    "Client",
    "ClientError",
    "Context",
    "Decision",
    "InvalidArgumentError",
    "LeaseLostError",
    "NonRetryableError",
    "NotFoundError",
    "NotSupportedError",
    "PayloadValidationError",
    "RatchetError",
    "Retry",
    "Run",
    "RunError",
    "RunEvent",
    "RunFailedError",
    "RunStatus",
    "StepFailedError",
    "StepInfo",
    "Task",
    "TaskInfo",
    "Token",
    "TokenDataError",
    "TokenResult",
    "TokenTimeoutError",
    "UnavailableError",
    "Worker",
    "WorkerError",
    "WorkerInfo",
    "WriteRefusedError",
    "__version__",
    "current_context",
    "retry",
    "task",
]


def test_all_is_pinned() -> None:
    assert ratchet.__all__ == PUBLIC


def test_every_exported_name_exists() -> None:
    for name in ratchet.__all__:
        assert hasattr(ratchet, name), name


def test_exported_names_are_defined_in_ratchet() -> None:
    for name in ratchet.__all__:
        value = getattr(ratchet, name)
        if name == "retry":  # the retry.fetch module
            assert value.__name__ == "ratchet.retry"
        elif name != "__version__":
            assert value.__module__.startswith("ratchet."), name


def test_errors_form_one_tree() -> None:
    errors = [getattr(ratchet, n) for n in ratchet.__all__
              if n.endswith("Error") and n != "RunError"]
    assert all(issubclass(e, ratchet.RatchetError) for e in errors)
    for leaf in (ratchet.NotFoundError, ratchet.InvalidArgumentError,
                 ratchet.AuthenticationError, ratchet.UnavailableError):
        assert issubclass(leaf, ratchet.ClientError)
    assert issubclass(ratchet.PayloadValidationError, ratchet.NonRetryableError)

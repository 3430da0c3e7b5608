"""Ratchet: durable execution for Python.

    import ratchet

    @ratchet.task(id="process-document", retry=ratchet.Retry(max_attempts=3))
    async def process_document(ctx: ratchet.Context, payload: Doc) -> Result:
        text = await ctx.step("download", download, payload.url)
        ...

Every `await ctx.step(...)` is a checkpoint: once a step completed, no crash,
retry or redeploy runs it again.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ratchet import retry
from ratchet._client import Client
from ratchet._context import Context, current_context
from ratchet._errors import (
    AuthenticationError,
    ChildOutputError,
    ChildRunFailedError,
    ClientError,
    InvalidArgumentError,
    LeaseLostError,
    NonRetryableError,
    NotFoundError,
    NotSupportedError,
    RatchetError,
    RunFailedError,
    StepFailedError,
    TokenDataError,
    TokenTimeoutError,
    UnavailableError,
    WorkerError,
    WriteRefusedError,
)
from ratchet._retry import NO_RETRY, Retry
from ratchet._task import PayloadValidationError, Task, task
from ratchet._types import (
    BatchItem,
    Decision,
    Run,
    RunError,
    RunEvent,
    RunStatus,
    StepInfo,
    TaskInfo,
    Token,
    TokenResult,
    WorkerInfo,
)
from ratchet._worker import Worker

__all__ = [
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

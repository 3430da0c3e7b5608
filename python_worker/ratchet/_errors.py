"""Errors of the Ratchet SDK.

    RatchetError
    ├── NonRetryableError       raise it (or a subclass) to fail at once, without retries
    │   ├── ChildOutputError    a child's output does not fit its task's output type
    │   ├── TokenDataError      a token's data does not fit the model it was waited with
    │   ├── WriteRefusedError   the coordinator refused a step's or run's write (too large, ...)
    │   └── NotSupportedError   an option Ratchet does not implement yet (queue=, ...)
    ├── StepFailedError         a step used up its attempts; carries the step key and error
    ├── RunFailedError          Client.wait(): the run ended other than COMPLETED
    ├── LeaseLostError          the coordinator no longer honours this worker's lease
    ├── TokenTimeoutError       a wait token's timeout passed before it was completed
    ├── ChildRunFailedError     a child run waited on ended other than COMPLETED
    ├── WorkerError             the worker cannot go on (e.g. its API key was refused)
    └── ClientError             a coordinator call failed; `.code` is the gRPC status name
        ├── NotFoundError
        ├── InvalidArgumentError
        ├── AuthenticationError (UNAUTHENTICATED, PERMISSION_DENIED)
        └── UnavailableError    the coordinator could not be reached

Cancellation (`asyncio.CancelledError`) is never wrapped or swallowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ratchet._types import Run, RunError


class RatchetError(Exception):
    """Base of every error the SDK raises on purpose."""


class NonRetryableError(RatchetError):
    """Retrying cannot help: the step or run fails at once."""

    non_retryable = True


class StepFailedError(RatchetError):
    """A step failed and will not be tried again in this run attempt.

    If the task does not catch it, the run attempt fails with the step's error
    and the task's retry policy decides what happens next.
    """

    def __init__(self, step_key: str, attempts: int, error: RunError) -> None:
        super().__init__(f"step {step_key!r} failed after {attempts} attempt(s): "
                         f"{error.type}: {error.message}")
        self.step_key = step_key
        self.attempts = attempts
        self.error = error


class RunFailedError(RatchetError):
    """The run finished without an output (FAILED, CANCELED, ...)."""

    def __init__(self, run: Run) -> None:
        detail = f": {run.error.type}: {run.error.message}" if run.error else ""
        super().__init__(f"run {run.id} ended {run.status}{detail}")
        self.run = run


class TokenTimeoutError(RatchetError):
    """`ctx.wait_for_token()`: the token's timeout passed before anyone completed it."""


class ChildRunFailedError(RatchetError):
    """A child run waited on by `trigger_and_wait` (or a batch) did not complete.

    `run_id`, `status` and `error` describe the first child that failed;
    `results` holds every child's result, in input order.
    """

    def __init__(self, run_id: str, status: str, error: RunError | None,
                 results: list[dict[str, Any]]) -> None:
        detail = f": {error.type}: {error.message}" if error else ""
        super().__init__(f"child run {run_id} ended {status}{detail}")
        self.run_id = run_id
        self.status = status
        self.error = error
        self.results = results


class TokenDataError(NonRetryableError):
    """`ctx.wait_for_token(token, model=M)`: the token was completed with data
    that does not fit M.

    `step_key` and `token_id` name the token step and the token; `data` is the
    data as plain JSON; `validation` holds pydantic's ValidationError.
    Non-retryable: the data is stored, so a later attempt would see the same.
    """

    def __init__(self, step_key: str, token_id: str, model: Any, data: Any,
                 validation: Exception) -> None:
        name = getattr(model, "__name__", repr(model))
        super().__init__(f"token step {step_key!r} (token {token_id}): its data does not fit "
                         f"{name}: {validation}")
        self.step_key = step_key
        self.token_id = token_id
        self.model = model
        self.data = data
        self.validation = validation


class ChildOutputError(NonRetryableError):
    """A child run completed, but its output does not fit the output type of
    the child's task (the Task object the parent passed to `trigger_and_wait`).

    `run_id`, `task_id` and `output_type` name the child, its task and the
    type; `output` is the child's output as plain JSON; `validation` holds
    pydantic's ValidationError. Non-retryable: the output is stored, so a
    later attempt would see the same one. After fixing the type, `replay` the
    parent: the child is not run again.
    """

    def __init__(self, run_id: str, task_id: str, output_type: Any, output: Any,
                 validation: Exception) -> None:
        name = getattr(output_type, "__qualname__", None) or repr(output_type)
        super().__init__(f"the output of child run {run_id} (task {task_id!r}) does not "
                         f"fit its output type {name}: {validation}")
        self.run_id = run_id
        self.task_id = task_id
        self.output_type = output_type
        self.output = output
        self.validation = validation


class WriteRefusedError(NonRetryableError):
    """The coordinator refused a checkpoint or an outcome as invalid: an output,
    state or payload over its size limit, or not valid JSON. Sending it again
    cannot help. `step_key` names the step whose checkpoint was refused ("" for
    the run's own outcome)."""

    def __init__(self, message: str, *, step_key: str = "") -> None:
        super().__init__(message)
        self.step_key = step_key


class NotSupportedError(NonRetryableError):
    """An option that Ratchet accepts in its protocol but does not implement yet
    (`queue=`, `concurrency_key=`): refused rather than silently ignored."""


class LeaseLostError(RatchetError):
    """This worker's lease on a run is no longer current; the run is abandoned here."""


class WorkerError(RatchetError):
    """The worker cannot go on (for example, its API key was refused)."""


class ClientError(RatchetError):
    """A call to the coordinator failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NotFoundError(ClientError):
    pass


class InvalidArgumentError(ClientError):
    pass


class AuthenticationError(ClientError):
    pass


class UnavailableError(ClientError):
    pass


def from_rpc_error(exc: Any) -> ClientError:
    """Map a grpc.aio.AioRpcError to the matching ClientError."""
    code = exc.code().name
    message = exc.details() or ""
    cls: type[ClientError] = {
        "NOT_FOUND": NotFoundError,
        "INVALID_ARGUMENT": InvalidArgumentError,
        "UNAUTHENTICATED": AuthenticationError,
        "PERMISSION_DENIED": AuthenticationError,
        "UNAVAILABLE": UnavailableError,
    }.get(code, ClientError)
    return cls(code, message)

"""Compensation (sagas) and finishing mode, for one execution.

`ctx.step(..., compensate=undo)` registers `undo` for the run once the step
has completed, live or passed again on replay. When the run's attempt then
fails, the failure is final (no run-level retry) and the execution
*finishes* the run:

1. the error is recorded as the step ``ratchet:failure``, FAILED with that
   error (so that a worker that takes over after a crash knows that the run
   is finishing, and with what error);
2. the undos run in reverse order of registration, each once, as durable
   steps ``ratchet:undo:<step key>`` with their own retry policy; an undo that
   still fails is logged, its step stays FAILED, and the others still run;
3. the task's on_failure hook runs (step ``ratchet:on_failure``);
4. Failed is reported, non-retryable, with the original error.

Finishing mode: a run that has started finishing never runs a forward step
again. When a lease arrives whose snapshot holds ``ratchet:failure`` FAILED
(its worker died while compensating, or the compensations suspended on an
undo's retry wait), or a finishing lease (``LeaseGrant.final_error``: the coordinator has failed the
run for good, e.g. too many lost leases), the task function is replayed only
to learn which undos were registered: the first durable call that has not
completed raises `Finishing`, a BaseException, so a user's ``except
Exception`` does not swallow it and the function stops there. Then steps 2
to 4 above run. On a finishing lease, the hook gets the final error and
Failed carries it; otherwise the error recorded in ``ratchet:failure`` is
reported.

``ratchet:failure`` is a FAILED step of kind RUN so that a forced replay
(`replay --rerun-compensated`), which gives every FAILED step of kind RUN a
fresh start, also ends finishing mode: the replayed run goes forward again
from its last checkpoint (completed steps, undos included, are not redone;
failed ones run again), and should it fail again, it finishes again.

Step names starting with ``ratchet:`` are reserved for these internal steps.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ratchet._codec import error_to_pb
from ratchet._errors import StepFailedError
from ratchet._retry import Retry
from ratchet._types import RunError
from ratchet.v1 import common_pb2, worker_pb2

if typing.TYPE_CHECKING:
    from ratchet._context import Context
    from ratchet._steps import Steps

log = logging.getLogger("ratchet.worker")

# Keys of the internal steps; user step names may not start with RESERVED.
RESERVED = "ratchet:"
UNDO_PREFIX = "ratchet:undo:"
FAILURE_KEY = "ratchet:failure"

# An undo's attempts unless `compensate_retry=` says otherwise: patient, with
# short waits (0.5 s doubling to 10 s; about a minute in all).
UNDO_RETRY = Retry(max_attempts=10, min_delay=0.5, max_delay=10.0)


class Finishing(BaseException):
    """Internal: the run is finishing (compensating, or on a finishing lease)
    and the task function reached a durable call that has not completed.

    A BaseException, like asyncio.CancelledError, so that `except Exception`
    in task code does not catch it: it stops the task function, and the
    execution goes on with the compensations. Never catch it."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the run is finishing: {key!r} may not start")
        self.key = key


def is_finishing(exc: BaseException) -> bool:
    """True for `Finishing`, or a group (TaskGroup) holding one."""
    if isinstance(exc, Finishing):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(is_finishing(e) for e in exc.exceptions)
    return False


def started(records: Mapping[str, common_pb2.Step]) -> bool:
    """Whether the run had started finishing: ``ratchet:failure`` is recorded."""
    record = records.get(FAILURE_KEY)
    return record is not None and record.status == common_pb2.STEP_STATUS_FAILED


def recorded_error(records: Mapping[str, common_pb2.Step]) -> RunError:
    """The error the run is finishing with, as recorded in ``ratchet:failure``
    (a generic one should the record hold none)."""
    record = records.get(FAILURE_KEY)
    if record is not None and record.HasField("error"):
        pb = record.error
        return RunError(type=pb.type, message=pb.message, stack=pb.stack, non_retryable=True,
                        step_key=pb.step_key, attempt=pb.attempt)
    return RunError(type="ratchet.CompensationInterrupted", non_retryable=True,
                    message="the run failed and had started its compensations; the "
                            "original error was not recorded")


async def record_failure(steps: Steps, error: RunError) -> None:
    """Record ``ratchet:failure``: FAILED, with the error the run finishes with."""
    record = steps.records.get(FAILURE_KEY)
    attempts = record.attempts if record is not None else 0
    now = time.time()
    with steps.executing():
        await steps.checkpoint(FAILURE_KEY, worker_pb2.STEP_EVENT_FAILED, attempts + 1,
                               attempts, now, now, error=error_to_pb(error))
    steps.records[FAILURE_KEY] = common_pb2.Step(
        key=FAILURE_KEY, kind=common_pb2.STEP_KIND_RUN, status=common_pb2.STEP_STATUS_FAILED,
        attempts=attempts + 1, error=error_to_pb(error))


@dataclasses.dataclass(frozen=True, slots=True)
class Undo:
    """A registered compensation: `fn(output)` undoes step `key`."""

    key: str
    fn: Callable[[Any], Any]
    output: Any
    retry: Retry


class Saga:
    """The undos registered by one execution, in registration order."""

    def __init__(self) -> None:
        self.undos: list[Undo] = []
        self._keys: set[str] = set()

    def register(self, key: str, fn: Callable[[Any], Any], output: Any,
                 retry: Retry | None) -> None:
        if key in self._keys:  # the same step passed twice: one undo
            return
        self._keys.add(key)
        self.undos.append(Undo(key, fn, output, retry or UNDO_RETRY))

    async def compensate(self, ctx: Context) -> None:
        """Run the undos in reverse order, each as durable step
        ``ratchet:undo:<key>``; one that fails for good does not stop the rest."""
        for undo in reversed(self.undos):
            try:
                await ctx._internal_step(UNDO_PREFIX + undo.key, _discarding(undo.fn),
                                         (undo.output,), undo.retry)
            except StepFailedError as exc:
                log.error("run %s: the compensation of step %r failed for good (its step "
                          "%r is FAILED; the other compensations still run): %s",
                          ctx.run_id, undo.key, UNDO_PREFIX + undo.key, exc)


def _discarding(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`fn`, sync or async as it is, returning None: an undo's result is not
    recorded (it need not be JSON)."""
    if inspect.iscoroutinefunction(fn):
        async def undo_async(output: Any) -> None:
            await fn(output)
        return undo_async

    def undo(output: Any) -> Awaitable[None] | None:
        result = fn(output)
        if inspect.isawaitable(result):  # a callable object returning a coroutine
            return _awaited(result)  # awaited by the step's caller, on the loop
        return None
    return undo


async def _awaited(result: Awaitable[Any]) -> None:
    await result

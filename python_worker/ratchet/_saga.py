"""Compensation (sagas) and finishing mode, for one execution.

`ctx.step(..., compensate=undo)` registers `undo` for the run once the step
has completed, live or passed again on replay. When the run's attempt then
fails, the failure is final (no run-level retry) and the execution
*finishes* the run:

1. the error is recorded as the value step ``ratchet:failure`` (so that a
   worker that takes over after a crash knows what failed);
2. the undos run in reverse order of registration, each once, as durable
   steps ``ratchet:undo:<step key>`` with their own retry policy; an undo that
   still fails is logged, its step stays FAILED, and the others still run;
3. the task's on_failure hook runs (step ``ratchet:on_failure``);
4. Failed is reported, non-retryable, with the original error.

Finishing mode: a run that has started finishing never runs a forward step
again. When a lease arrives whose snapshot already holds ``ratchet:failure``
or a ``ratchet:undo:*`` step (its worker died while compensating), or a
finishing lease (``LeaseGrant.final_error``: the coordinator has failed the
run for good, e.g. too many lost leases), the task function is replayed only
to learn which undos were registered: the first durable call that has not
completed raises `Finishing`, a BaseException, so a user's ``except
Exception`` does not swallow it and the function stops there. Then steps 2
to 4 above run. On a finishing lease, the hook gets the final error and
Failed carries it; otherwise the error recorded in ``ratchet:failure`` is
reported.

Step names starting with ``ratchet:`` are reserved for these internal steps.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ratchet._errors import StepFailedError
from ratchet._retry import Retry
from ratchet._types import RunError
from ratchet.v1 import common_pb2

if typing.TYPE_CHECKING:
    from ratchet._context import Context

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
    """Whether the run had started finishing: the error or an undo is recorded."""
    return any(key == FAILURE_KEY or key.startswith(UNDO_PREFIX) for key in records)


def recorded_error(records: Mapping[str, common_pb2.Step]) -> RunError:
    """The error the run is finishing with, as recorded in ``ratchet:failure``.

    Without that record (it cannot normally be missing once an undo ran), the
    last FAILED forward step's error stands in, else a generic one."""
    record = records.get(FAILURE_KEY)
    if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED \
            and record.output:
        data = json.loads(record.output)
        fields = {f.name for f in dataclasses.fields(RunError)}
        return RunError(**{k: v for k, v in data.items() if k in fields})
    failed = [r for r in records.values() if r.status == common_pb2.STEP_STATUS_FAILED
              and r.HasField("error") and not r.key.startswith(RESERVED)]
    if failed:
        pb = max(failed, key=lambda r: r.finished_at.ToNanoseconds()).error
        return RunError(type=pb.type, message=pb.message, stack=pb.stack, non_retryable=True,
                        step_key=pb.step_key, attempt=pb.attempt)
    return RunError(type="ratchet.CompensationInterrupted", non_retryable=True,
                    message="the run failed and had started its compensations; the "
                            "original error was not recorded")


def error_json(error: RunError) -> dict[str, Any]:
    """The error as the ``ratchet:failure`` step records it."""
    return dataclasses.asdict(error)


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
        if not callable(fn):
            raise TypeError(f"compensate= must be callable, got {fn!r}")
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

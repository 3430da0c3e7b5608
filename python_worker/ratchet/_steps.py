"""What `Context`'s durable calls are built on, for one execution.

`Steps` holds what the run has recorded (the snapshot it resumed from, and
what this execution added), hands out step keys (`a`, `a#2`, ...), writes
checkpoints one at a time with the state that changed, runs a step's
function with its retry policy, and decides when the run must suspend: when
no branch is doing durable work and at least one is blocked on a durable wait
(the execution then stops the task and reports the keys it waits on).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

import pydantic

from ratchet import _process
from ratchet._codec import (
    duration,
    error_from_exception,
    error_from_pb,
    error_to_pb,
    step_output,
    timestamp,
    to_json,
)
from ratchet._errors import StepFailedError, WriteRefusedError
from ratchet._retry import Retry
from ratchet._saga import RESERVED, Finishing
from ratchet._types import RunError
from ratchet.v1 import common_pb2, worker_pb2

# The key of the step whose function is running (for ctx.idempotency_key).
current_step: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ratchet_current_step", default=None)

Call = Callable[[tuple[Any, ...], dict[str, Any]], Awaitable[Any]]

# A step's policy when ctx.step() is given no `retry=`: 3 attempts, 1 s
# doubling to 60 s. Run attempts do not retry a FAILED step (unless the run's
# policy says rerun_failed_steps), so a step retries on its own.
STEP_RETRY = Retry()

# Fault injection, set only by `ratchet.testing` (Environment.fail_step):
# called with (run id, step key, attempt) before each attempt of a step's
# function; what it raises is that attempt's failure. None in production.
fault_hook: Callable[[str, str, int], None] | None = None


class Journal(Protocol):
    """Where a Context sends its writes; each returns once the coordinator committed."""

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None: ...

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]: ...


class Steps:
    """One execution's durable calls: records, keys, checkpoints, retries, suspension."""

    def __init__(
        self,
        *,
        run_id: str,
        lease_id: str,
        records: Mapping[str, common_pb2.Step],
        state: Callable[[], Any],
        journal: Journal,
        logger: logging.LoggerAdapter[logging.Logger],
        executor: concurrent.futures.Executor | None,
        processes: _process.ProcessPool | None,
        sleep_threshold: float,
        clock_offset: float,
        rerun_failed_steps: bool = False,
        state_touched: Callable[[], bool] = lambda: True,
    ) -> None:
        self.run_id = run_id
        self.lease_id = lease_id
        # Each step by key: the snapshot's, updated as this execution records.
        self.records = dict(records)
        self.journal = journal
        # Waits up to this long happen in process; longer ones suspend the run.
        self.sleep_threshold = sleep_threshold
        # The coordinator's clock minus this worker's (LeaseGrant.sent_at): the
        # snapshot's wake_at times are on the coordinator's clock.
        self.clock_offset = clock_offset
        # The run's policy (LeaseGrant.retry): a step FAILED in an earlier
        # lease runs again with a fresh budget, instead of failing again.
        self.rerun_failed_steps = rerun_failed_steps
        # Read at each write: `ctx.state` may be replaced, not just changed.
        self._state = state
        # False while the state cannot have changed since the lease began
        # (the task's code never reached it): nothing to serialise then.
        self._state_touched = state_touched
        self._sent_state = to_json(state())
        self._logger = logger
        self._executor = executor
        self._processes = processes
        self._uses: dict[str, int] = {}
        # Suspension: the run suspends when no step is executing and at least
        # one branch is blocked on a durable wait.
        self._active = 0
        self._blocked: set[str] = set()
        self.suspended = asyncio.Event()
        # One write in flight per lease (protocol checklist item 12): branches
        # of a gather() take turns, so state is saved in the order it changed.
        self.write_lock = asyncio.Lock()
        # Finishing mode (_saga.py): no durable call that has not completed
        # may start, except Ratchet's own (undos, on_failure).
        self.finishing = False
        self._busy_changed = asyncio.Event()  # set when _active may have changed

    def key(self, name: str) -> str:
        """The key of the next call named `name` (`name`, then `name#2`, ...)."""
        if not name or "#" in name:
            raise ValueError(f"step name {name!r} must be non-empty and must not contain '#'")
        if name.startswith(RESERVED):
            raise ValueError(f"step name {name!r}: names starting with {RESERVED!r} are "
                             f"reserved for Ratchet's own steps (compensations, hooks)")
        n = self._uses.get(name, 0) + 1
        self._uses[name] = n
        return name if n == 1 else f"{name}#{n}"

    def forward(self, key: str) -> None:
        """Called before a durable call that has not completed starts (or
        resumes): in finishing mode, stop the task function instead. Ratchet's
        own steps (undos, on_failure), and calls made inside them (a hook
        may use ratchet.retry.fetch), go on."""
        if self.finishing and not key.startswith(RESERVED):
            inside = current_step.get()
            if inside is None or not inside.startswith(RESERVED):
                raise Finishing(key)

    async def settle(self) -> None:
        """Wait until no branch is executing durable work. With finishing set,
        a step in flight ends with its current attempt (a completion is still
        recorded, and its undo registered) and none starts."""
        while self._active > 0:
            self._busy_changed.clear()
            await self._busy_changed.wait()
        # Branches left blocked on a wait belong to the stopped task function:
        # they must not make the finishing run suspend.
        self._blocked.clear()
        self.suspended.clear()

    def state_update(self) -> bytes | None:
        """The state as JSON if it changed since it was last sent, else None.

        Serialised only once the task's code could have changed it: a change
        made through a reference the code kept cannot be seen otherwise."""
        if not self._state_touched():
            return None
        current = to_json(self._state())
        if current == self._sent_state:
            return None
        self._sent_state = current
        return current

    def local(self, when: Any) -> float:
        """A time of the snapshot (coordinator's clock) on this worker's clock."""
        return float(when.ToNanoseconds()) / 1e9 - self.clock_offset

    # --- ctx.step ---------------------------------------------------------------------

    async def run(
        self,
        key: str,
        record: common_pb2.Step | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: Retry | None,
        executor: str | None,
        decode: Callable[[Any], Any],
    ) -> Any:
        """Run a step that has not completed: its attempts, each checkpointed."""
        call = self._caller(fn, executor)
        policy = retry or STEP_RETRY
        if (record is not None and record.status == common_pb2.STEP_STATUS_FAILED
                and not self.rerun_failed_steps):
            # It failed in an earlier lease, and a failure the task may have
            # handled (say, by a refund) stays a failure: raise it again
            # without calling fn. `Client.replay()` gives it a fresh budget.
            raise StepFailedError(key, record.attempts, _recorded_error(key, record))
        attempts = record.attempts if record is not None else 0
        # A step still RUNNING was retrying when its worker stopped: keep counting.
        # A FAILED one (rerun_failed_steps) gets a fresh budget.
        running = record is not None and record.status == common_pb2.STEP_STATUS_RUNNING
        base = record.retry_base if running and record is not None else attempts
        if running and record is not None and record.HasField("wake_at"):
            # Resumed during a backoff: the next attempt is not due yet, maybe.
            await self.wait_for_retry(key, self.local(record.wake_at), executing=False)
        with self.executing():
            return await self._attempts(key, call, args, kwargs, policy, attempts, base, decode)

    def _caller(self, fn: Callable[..., Any], executor: str | None) -> Call:
        """How to call a step's function: awaited, in a thread, or in a process."""
        if executor not in (None, "thread", "process"):
            raise ValueError(f"executor must be 'thread' or 'process', not {executor!r}")
        if executor != "process":
            return lambda args, kwargs: _call(fn, args, kwargs, self._executor)
        target = _process.reference(fn)  # TypeError now, not at each attempt
        processes = self._processes
        if processes is None:
            raise RuntimeError("executor='process' needs a Context created by a ratchet.Worker")
        return lambda args, kwargs: processes.run(target, args, kwargs)

    async def _attempts(
        self,
        key: str,
        call: Call,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        policy: Retry,
        attempts: int,
        base: int,
        decode: Callable[[Any], Any],
    ) -> Any:
        while True:
            self.forward(key)  # the run began finishing during the backoff
            attempt = attempts + 1
            started = time.time()
            token = current_step.set(key)
            try:
                if fault_hook is not None:
                    fault_hook(self.run_id, key, attempt)
                value = await call(args, kwargs)
                output = step_output(key, value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempts = attempt
                error = error_from_exception(exc, step_key=key, attempt=attempt)
                finished = time.time()
                retryable = not error.non_retryable and policy.retries(exc)
                if not retryable:  # no_retry_on / retry_on said so: fail the run at once too
                    error = dataclasses.replace(error, non_retryable=True)
                if not retryable or not policy.allows_another(attempt - base):
                    await self.checkpoint(
                        key, worker_pb2.STEP_EVENT_FAILED, attempt, base, started, finished,
                        error=error_to_pb(error))
                    raise StepFailedError(key, attempt, error) from exc
                delay = policy.delay_after(attempt - base)
                retry_after = getattr(exc, "retry_after", None)
                if isinstance(retry_after, int | float) and retry_after > delay:
                    delay = min(policy.max_delay, float(retry_after))
                self._logger.warning("step %s attempt %d failed (%s); retrying in %.2fs",
                                     key, attempt, error.type, delay)
                # The wait goes to the coordinator only when the run will
                # suspend for it; a short wait stays in this process. As a
                # duration: the coordinator's clock decides when it is due.
                long_wait = delay > self.sleep_threshold
                await self.checkpoint(
                    key, worker_pb2.STEP_EVENT_RETRYING, attempt, base, started, finished,
                    error=error_to_pb(error), retry_after=delay if long_wait else None)
                await self.wait_for_retry(key, finished + delay)
                continue
            finally:
                current_step.reset(token)
            await self.checkpoint(key, worker_pb2.STEP_EVENT_COMPLETED, attempt, base, started,
                                  time.time(), output=output)
            return decode(json.loads(output))

    async def wait_for_retry(self, key: str, due: float, *, executing: bool = True) -> None:
        """Wait for a step's next attempt: in process when it is soon, else
        suspend the run (the timer wakes it when due; the step stays RUNNING)."""
        remaining = due - time.time()
        if remaining <= self.sleep_threshold:
            await asyncio.sleep(max(0.0, remaining))
            return
        if executing:
            self._active -= 1  # this branch now waits durably
        try:
            await self.block(key)
        finally:
            if executing:
                self._active += 1

    # --- suspension -------------------------------------------------------------------

    @contextlib.contextmanager
    def executing(self) -> Iterator[None]:
        """Mark a branch as doing durable work (the run must not suspend now)."""
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._check_suspend()

    async def block(self, key: str) -> Any:
        """Wait for the run to suspend (this execution ends; the run resumes later)."""
        self.forward(key)
        self._blocked.add(key)
        self._check_suspend()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self._blocked.discard(key)

    def _check_suspend(self) -> None:
        # Two loop hops: branches started by the same gather() get to begin
        # their own steps before the decision is made.
        self._busy_changed.set()
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._decide)

    def _decide(self) -> None:
        if self._active == 0 and self._blocked:
            self.suspended.set()

    @property
    def waiting_on(self) -> list[str]:
        """Keys of the waits the run is blocked on (sent when it suspends)."""
        return sorted(self._blocked)

    # --- writes -----------------------------------------------------------------------

    async def checkpoint(
        self,
        key: str,
        event: int,
        attempt: int,
        base: int,
        started: float,
        finished: float,
        *,
        output: bytes = b"",
        error: common_pb2.ErrorInfo | None = None,
        retry_after: float | None = None,
        kind: int = common_pb2.STEP_KIND_RUN,
        wake_after: float | None = None,
        token_id: str = "",
        existing_token: bool = False,
    ) -> None:
        """Record a step event, with the state if it changed; returns once committed."""
        checkpoint = worker_pb2.Checkpoint(
            lease_id=self.lease_id, run_id=self.run_id, step_key=key,
            kind=kind, event=event,  # type: ignore[arg-type]
            attempt=attempt, output=output, error=error, started_at=timestamp(started),
            finished_at=timestamp(finished), retry_base=base, token_id=token_id,
            existing_token=existing_token)
        # Durations decide (the coordinator's clock); the absolute times are
        # for coordinators older than the duration fields.
        if retry_after is not None:
            checkpoint.retry_after.CopyFrom(duration(retry_after))
            checkpoint.retry_at.CopyFrom(timestamp(time.time() + retry_after))
        if wake_after is not None:
            checkpoint.wake_after.CopyFrom(duration(wake_after))
            checkpoint.wake_at.CopyFrom(timestamp(time.time() + wake_after))
        async with self.write_lock:
            state = self.state_update()
            if state is not None:
                checkpoint.state = state
            try:
                await self.journal.checkpoint(checkpoint)
            except WriteRefusedError as exc:
                if exc.step_key:
                    raise
                raise WriteRefusedError(f"step {key!r}: {exc}", step_key=key) from None

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]:
        """Create child runs (a write like a checkpoint: one at a time)."""
        async with self.write_lock:
            return await self.journal.trigger_children(request)


def _recorded_error(key: str, record: common_pb2.Step) -> RunError:
    """The error a FAILED step was recorded with."""
    if record.HasField("error"):
        return error_from_pb(record.error)
    return RunError(type="ratchet.StepFailedError", message="the step failed in an earlier "
                    "attempt (no error was recorded)", step_key=key, attempt=record.attempts)


async def _call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    executor: concurrent.futures.Executor | None,
) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    # In a thread, with this task's context (so ctx.idempotency_key works there).
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    result = await asyncio.get_running_loop().run_in_executor(executor, call)
    if inspect.isawaitable(result):
        return await result
    return result


# --- a step's result, as its function's return type -------------------------------------


def adapter(tp: Any) -> pydantic.TypeAdapter[Any] | None:
    """A validator for `tp`, or None when pydantic cannot validate it."""
    try:
        return _adapter(tp)
    except TypeError:  # an unhashable annotation: not cached
        return _make_adapter(tp)


@functools.lru_cache(maxsize=512)
def _adapter(tp: Any) -> pydantic.TypeAdapter[Any] | None:
    return _make_adapter(tp)


def _make_adapter(tp: Any) -> pydantic.TypeAdapter[Any] | None:
    try:
        return pydantic.TypeAdapter(tp)
    except (pydantic.PydanticUserError, TypeError):
        return None


def decoder(fn: Callable[..., Any]) -> Callable[[Any], Any]:
    """Validate a step's JSON result against `fn`'s return annotation, if any."""
    try:
        return _cached_decoder(fn)
    except TypeError:  # unhashable callable
        return _make_decoder(fn)


@functools.lru_cache(maxsize=1024)
def _cached_decoder(fn: Callable[..., Any]) -> Callable[[Any], Any]:
    return _make_decoder(fn)


def _make_decoder(fn: Callable[..., Any]) -> Callable[[Any], Any]:
    try:
        target = inspect.unwrap(fn)
        hints = typing.get_type_hints(target)
    except Exception:
        return lambda v: v
    tp = hints.get("return")
    if tp is None or tp is typing.Any or tp is type(None):
        return lambda v: v
    origin = typing.get_origin(tp)
    if origin in (typing.Awaitable, typing.Coroutine) or str(origin).endswith("Awaitable"):
        args = typing.get_args(tp)
        tp = args[-1] if args else None
    adapter = _adapter(tp) if tp is not None else None
    if adapter is None:
        return lambda v: v
    return adapter.validate_python

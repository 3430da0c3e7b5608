"""`ratchet.Context`: what a task sees of its run, and `ctx.step`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import datetime as dt
import functools
import inspect
import json
import logging
import random
import secrets
import time
import typing
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import pydantic

from ratchet import _process
from ratchet._codec import (
    duration,
    error_from_exception,
    error_to_pb,
    timestamp,
    to_json,
    trigger_options,
)
from ratchet._errors import ChildRunFailedError, StepFailedError, TokenTimeoutError
from ratchet._retry import NO_RETRY, Retry
from ratchet._types import RunError
from ratchet.v1 import common_pb2, run_pb2, worker_pb2

if typing.TYPE_CHECKING:
    from ratchet._task import Task

T = TypeVar("T")

_current_step: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ratchet_current_step", default=None)

logger = logging.getLogger("ratchet.task")

_current_context: contextvars.ContextVar[Context] = contextvars.ContextVar("ratchet_context")


def current() -> Context:
    """The Context of the run this code executes in (for helpers such as retry.fetch)."""
    try:
        return _current_context.get()
    except LookupError:
        raise RuntimeError("not inside a Ratchet task") from None


class Journal(Protocol):
    """Where a Context sends its writes; each returns once the coordinator committed."""

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None: ...

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]: ...


class Context:
    """The run a task is executing: ids, state, and durable steps.

    A Context is created by the worker for one run attempt. `ctx.state` is a
    small JSON document saved with every checkpoint; `ctx.step()` runs a
    function at most once per run once it has completed.
    """

    def __init__(
        self,
        *,
        run_id: str,
        task_id: str,
        attempt: int,
        lease_id: str,
        steps: Mapping[str, common_pb2.Step],
        state: dict[str, Any],
        journal: Journal,
        executor: concurrent.futures.Executor | None = None,
        sleep_threshold: float = 5.0,
        processes: _process.ProcessPool | None = None,
        clock_offset: float = 0.0,
    ) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self.attempt = attempt
        self.state: dict[str, Any] = state
        self.logger = logging.LoggerAdapter(logger, {"run_id": run_id, "task_id": task_id})
        self._lease_id = lease_id
        self._steps = dict(steps)
        self._journal = journal
        self._executor = executor
        self._processes = processes
        # The coordinator's clock minus this worker's (LeaseGrant.sent_at): the
        # snapshot's wake_at times are on the coordinator's clock.
        self._clock_offset = clock_offset
        self._uses: dict[str, int] = {}
        self._sent_state = to_json(state)
        self._cancelled = False
        self._sleep_threshold = sleep_threshold
        # Suspension: the run suspends when no step is executing and at least
        # one branch is blocked on a durable wait.
        self._active = 0
        self._blocked: set[str] = set()
        self.suspended = asyncio.Event()
        # One write in flight per lease (protocol checklist item 12): branches
        # of a gather() take turns, so state is saved in the order it changed.
        self._write_lock = asyncio.Lock()

    @property
    def idempotency_key(self) -> str:
        """Stable for this run and the step being executed (the run alone outside a step).

        Pass it to downstream APIs so that a step that runs twice (its worker died
        between the side effect and the checkpoint) does not act twice.
        """
        step = _current_step.get()
        return self.run_id if step is None else f"{self.run_id}:{step}"

    @property
    def cancelled(self) -> bool:
        """True once the run was canceled; long sync step code can poll it."""
        return self._cancelled

    def _cancel(self) -> None:
        self._cancelled = True

    def _key(self, name: str) -> str:
        if not name or "#" in name:
            raise ValueError(f"step name {name!r} must be non-empty and must not contain '#'")
        n = self._uses.get(name, 0) + 1
        self._uses[name] = n
        return name if n == 1 else f"{name}#{n}"

    def _state_update(self) -> bytes | None:
        current = to_json(self.state)
        if current == self._sent_state:
            return None
        self._sent_state = current
        return current

    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]] | Callable[..., T],
        *args: Any,
        retry: Retry | None = None,
        executor: str | None = None,
        **kwargs: Any,
    ) -> T:
        """Run `fn(*args, **kwargs)` as a durable step named `name`.

        Once the step has completed, its stored result is returned at once on
        every later attempt or replay, and `fn` is not called again. `fn` may
        be sync (it then runs in a thread, so heartbeats go on while it
        computes in Python) or async. Its result must be JSON-serialisable
        (pydantic models allowed); what you get back is the JSON round trip,
        validated against `fn`'s return annotation when it has one, so live
        runs and replays agree.

        `executor="process"` runs a sync `fn` in a child process of the
        worker instead of a thread: for code that holds the GIL for long (C
        code such as a backtracking regex), which would otherwise freeze the
        worker's heartbeats and cost the lease. `fn` must be a module-level
        function; arguments and result are pickled (see `ratchet._process`).

        Without `retry`, a failure raises `StepFailedError` and the run
        attempt's own retry policy applies. With `retry`, failed attempts are
        recorded before the step is tried again, so a crash never resets the
        count. Raises `StepFailedError` when the attempts are used up or the
        error is a `NonRetryableError`.
        """
        key = self._key(name)
        decode = _decoder(fn)
        record = self._steps.get(key)
        if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED:
            return typing.cast(T, decode(json.loads(record.output or b"null")))
        call = self._caller(fn, executor)
        policy = retry or NO_RETRY
        attempts = record.attempts if record is not None else 0
        # A step still RUNNING was retrying when its worker stopped: keep counting.
        # A FAILED one failed in an earlier run attempt: it gets a fresh budget.
        running = record is not None and record.status == common_pb2.STEP_STATUS_RUNNING
        base = record.retry_base if running and record is not None else attempts
        if running and record is not None and record.HasField("wake_at"):
            # Resumed during a backoff: the next attempt is not due yet, maybe.
            await self._wait_for_retry(key, self._local(record.wake_at), executing=False)
        with self._executing():
            value = await self._attempts(key, call, args, kwargs, policy, attempts, base, decode)
        return typing.cast(T, value)

    def _caller(self, fn: Callable[..., Any], executor: str | None
                ) -> Callable[[tuple[Any, ...], dict[str, Any]], Awaitable[Any]]:
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

    def _local(self, when: Any) -> float:
        """A time of the snapshot (coordinator's clock) on this worker's clock."""
        return float(when.ToNanoseconds()) / 1e9 - self._clock_offset

    async def _attempts(
        self,
        key: str,
        call: Callable[[tuple[Any, ...], dict[str, Any]], Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        policy: Retry,
        attempts: int,
        base: int,
        decode: Callable[[Any], Any],
    ) -> Any:
        while True:
            attempt = attempts + 1
            started = time.time()
            token = _current_step.set(key)
            try:
                value = await call(args, kwargs)
                output = to_json(value)
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
                    await self._checkpoint(
                        key, worker_pb2.STEP_EVENT_FAILED, attempt, base, started, finished,
                        error=error_to_pb(error))
                    raise StepFailedError(key, attempt, error) from exc
                delay = policy.delay_after(attempt - base)
                retry_after = getattr(exc, "retry_after", None)
                if isinstance(retry_after, int | float) and retry_after > delay:
                    delay = min(policy.max_delay, float(retry_after))
                self.logger.warning("step %s attempt %d failed (%s); retrying in %.2fs",
                                    key, attempt, error.type, delay)
                # The wait goes to the coordinator only when the run will
                # suspend for it; a short wait stays in this process. As a
                # duration: the coordinator's clock decides when it is due.
                long_wait = delay > self._sleep_threshold
                await self._checkpoint(
                    key, worker_pb2.STEP_EVENT_RETRYING, attempt, base, started, finished,
                    error=error_to_pb(error), retry_after=delay if long_wait else None)
                await self._wait_for_retry(key, finished + delay)
                continue
            finally:
                _current_step.reset(token)
            await self._checkpoint(key, worker_pb2.STEP_EVENT_COMPLETED, attempt, base, started,
                                   time.time(), output=output)
            return decode(json.loads(output))

    # --- durable waits and values ---------------------------------------------------

    async def sleep(self, name: str, duration: float | dt.timedelta) -> None:
        """Wait durably. Short waits (up to the worker's sleep threshold, 5 s by
        default) happen in process; longer ones suspend the run: it holds no
        worker slot and is leased again when due, resuming from its snapshot."""
        seconds = duration.total_seconds() if isinstance(duration, dt.timedelta) else duration
        if seconds < 0:
            raise ValueError("a sleep cannot be negative")
        await self._sleep(name, lambda: float(seconds))

    async def sleep_until(self, name: str, when: dt.datetime) -> None:
        """Wait durably until `when` (an aware datetime; naive means UTC).

        `when` is turned into a duration on this worker's clock when the
        sleep begins; from then on the coordinator counts it on its own
        clock. So the wall-clock target is `when` as this worker sees it: a
        worker whose clock is off by a minute wakes a minute early or late,
        but a long sleep never ends at once because of it."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        await self._sleep(name, lambda: when.timestamp() - time.time())

    async def _sleep(self, name: str, length: Callable[[], float]) -> None:
        key = self._key(name)
        record = self._steps.get(key)
        if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED:
            return
        started = time.time()
        if record is not None and record.HasField("wake_at"):
            remaining = self._local(record.wake_at) - started
        else:
            remaining = length()
        if remaining <= self._sleep_threshold:
            with self._executing():
                await asyncio.sleep(max(0.0, remaining))
                await self._checkpoint(key, worker_pb2.STEP_EVENT_COMPLETED, 1, 0, started,
                                       time.time(), output=b"null", kind=common_pb2.STEP_KIND_SLEEP)
            return
        if record is None:
            with self._executing():
                await self._checkpoint(key, worker_pb2.STEP_EVENT_STARTED, 1, 0, started,
                                       started, kind=common_pb2.STEP_KIND_SLEEP,
                                       wake_after=remaining)
                self._steps[key] = common_pb2.Step(
                    key=key, kind=common_pb2.STEP_KIND_SLEEP,
                    status=common_pb2.STEP_STATUS_RUNNING, attempts=1,
                    wake_at=timestamp(started + remaining + self._clock_offset))
        await self._block(key)

    async def create_token(self, name: str, *,
                           timeout: float | dt.timedelta | None = None) -> str:
        """Create a wait token and return its id, for an outside system or a
        person to complete (`ratchet tokens complete`, `Client.complete_token`).
        The same id comes back on every replay."""
        key = self._key(name)
        record = self._steps.get(key)
        if record is not None:
            return record.token_id
        seconds = timeout.total_seconds() if isinstance(timeout, dt.timedelta) else timeout
        if seconds is not None and seconds < 0:
            raise ValueError("a token timeout cannot be negative")
        token_id = "tok_" + secrets.token_urlsafe(24)
        now = time.time()
        with self._executing():
            await self._checkpoint(key, worker_pb2.STEP_EVENT_STARTED, 1, 0, now, now,
                                   kind=common_pb2.STEP_KIND_TOKEN,
                                   wake_after=None if seconds is None else float(seconds),
                                   token_id=token_id)
        self._steps[key] = common_pb2.Step(
            key=key, kind=common_pb2.STEP_KIND_TOKEN, status=common_pb2.STEP_STATUS_RUNNING,
            attempts=1, token_id=token_id,
            wake_at=None if seconds is None else timestamp(now + seconds + self._clock_offset))
        return token_id

    async def wait_for_token(self, token: str) -> Any:
        """The data the token was completed with. Suspends the run until then;
        raises TokenTimeoutError if the token's timeout passes first."""
        found = [k for k, r in self._steps.items() if r.token_id == token]
        if not found:
            raise ValueError(f"token {token!r} was not created by this run")
        key = found[0]
        record = self._steps[key]
        if record.status == common_pb2.STEP_STATUS_COMPLETED:
            return json.loads(record.output or b"null")
        if record.status == common_pb2.STEP_STATUS_FAILED:
            raise TokenTimeoutError(f"wait token {key!r} timed out")
        await self._block(key)

    async def trigger(self, task: Task[Any, Any] | str, payload: Any = None, *,
                      name: str | None = None, **options: Any) -> str:
        """Start a child run (once per step key, however often this run
        replays) and return its run id without waiting for it. `options` are
        those of `Client.trigger` (delay, ttl, priority, tags, metadata, ...)."""
        [run_id] = await self._children(name, task, [payload], False, options)
        return str(run_id)

    async def trigger_and_wait(self, task: Task[Any, Any] | str, payload: Any = None, *,
                               name: str | None = None, **options: Any) -> Any:
        """Start a child run and return its output. The run suspends while the
        child works (holding no slot). Raises ChildRunFailedError if the child
        ends other than COMPLETED."""
        [output] = await self._children(name, task, [payload], True, options)
        return output

    async def batch_trigger_and_wait(self, task: Task[Any, Any] | str, payloads: Sequence[Any],
                                     *, name: str | None = None, **options: Any) -> list[Any]:
        """Fan out: one child per payload (at most 1,000), created together and
        exactly once; returns their outputs in input order. Raises
        ChildRunFailedError (with every result) if any child failed."""
        return await self._children(name, task, list(payloads), True, options)

    async def _children(self, name: str | None, task: Task[Any, Any] | str,
                        payloads: list[Any], wait: bool, options: dict[str, Any]) -> list[Any]:
        task_id = task if isinstance(task, str) else task.id
        key = self._key(name or task_id)
        record = self._steps.get(key)
        if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED:
            data = json.loads(record.output)
            return _child_outputs(data) if wait else list(data)
        if record is None or record.status == common_pb2.STEP_STATUS_FAILED:
            opts = trigger_options(
                None, None, options.get("delay"), options.get("ttl"),
                options.get("priority", 0), options.get("queue"), options.get("concurrency_key"),
                options.get("tags", ()), options.get("metadata"), options.get("retry"),
                options.get("max_duration"))
            request = worker_pb2.TriggerChildren(
                lease_id=self._lease_id, run_id=self.run_id, step_key=key, wait=wait,
                items=[run_pb2.BatchTriggerItem(task_id=task_id, payload=to_json(p),
                                                options=opts) for p in payloads])
            with self._executing():
                async with self._write_lock:
                    run_ids = await self._journal.trigger_children(request)
            if not wait:
                self._steps[key] = common_pb2.Step(
                    key=key, kind=common_pb2.STEP_KIND_CHILD,
                    status=common_pb2.STEP_STATUS_COMPLETED, output=to_json(run_ids))
                return run_ids
            self._steps[key] = common_pb2.Step(key=key, kind=common_pb2.STEP_KIND_CHILD,
                                               status=common_pb2.STEP_STATUS_RUNNING)
        await self._block(key)
        raise AssertionError("unreachable: a blocked branch ends with the suspension")

    async def now(self) -> dt.datetime:
        """The current time, recorded: a replay sees the same value."""
        value = await self._value("now", lambda: time.time())
        return dt.datetime.fromtimestamp(float(value), tz=dt.UTC)

    async def random(self) -> float:
        """A random float in [0, 1), recorded: a replay sees the same value."""
        return float(await self._value("random", random.random))

    async def uuid(self) -> uuid_module.UUID:
        """A random UUID (v4), recorded: a replay sees the same value."""
        return uuid_module.UUID(await self._value("uuid", lambda: str(uuid_module.uuid4())))

    async def _value(self, name: str, produce: Callable[[], Any]) -> Any:
        key = self._key(name)
        record = self._steps.get(key)
        if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED:
            return json.loads(record.output)
        value = produce()
        now = time.time()
        with self._executing():
            await self._checkpoint(key, worker_pb2.STEP_EVENT_COMPLETED, 1, 0, now, now,
                                   output=to_json(value), kind=common_pb2.STEP_KIND_VALUE)
        return value

    async def _wait_for_retry(self, key: str, due: float, *, executing: bool = True) -> None:
        """Wait for a step's next attempt: in process when it is soon, else
        suspend the run (the timer wakes it when due; the step stays RUNNING)."""
        remaining = due - time.time()
        if remaining <= self._sleep_threshold:
            await asyncio.sleep(max(0.0, remaining))
            return
        if executing:
            self._active -= 1  # this branch now waits durably
        try:
            await self._block(key)
        finally:
            if executing:
                self._active += 1

    # --- suspension -------------------------------------------------------------------

    @contextlib.contextmanager
    def _executing(self) -> Iterator[None]:
        """Mark a branch as doing durable work (the run must not suspend now)."""
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._check_suspend()

    async def _block(self, key: str) -> Any:
        """Wait for the run to suspend (this execution ends; the run resumes later)."""
        self._blocked.add(key)
        self._check_suspend()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self._blocked.discard(key)

    def _check_suspend(self) -> None:
        # Two loop hops: branches started by the same gather() get to begin
        # their own steps before the decision is made.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._decide)

    def _decide(self) -> None:
        if self._active == 0 and self._blocked:
            self.suspended.set()

    @property
    def waiting_on(self) -> list[str]:
        """Keys of the waits the run is blocked on (sent when it suspends)."""
        return sorted(self._blocked)

    async def _checkpoint(
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
    ) -> None:
        checkpoint = worker_pb2.Checkpoint(
            lease_id=self._lease_id, run_id=self.run_id, step_key=key,
            kind=kind, event=event,  # type: ignore[arg-type]
            attempt=attempt, output=output, error=error, started_at=timestamp(started),
            finished_at=timestamp(finished), retry_base=base, token_id=token_id)
        # Durations decide (the coordinator's clock); the absolute times are
        # for coordinators older than the duration fields.
        if retry_after is not None:
            checkpoint.retry_after.CopyFrom(duration(retry_after))
            checkpoint.retry_at.CopyFrom(timestamp(time.time() + retry_after))
        if wake_after is not None:
            checkpoint.wake_after.CopyFrom(duration(wake_after))
            checkpoint.wake_at.CopyFrom(timestamp(time.time() + wake_after))
        async with self._write_lock:
            state = self._state_update()
            if state is not None:
                checkpoint.state = state
            await self._journal.checkpoint(checkpoint)


def _child_outputs(results: list[dict[str, Any]]) -> list[Any]:
    for result in results:
        if result["status"] != "COMPLETED":
            error = result.get("error")
            raise ChildRunFailedError(
                result["run_id"], result["status"],
                None if not error else RunError(**error), results)
    return [result["output"] for result in results]


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


@functools.lru_cache(maxsize=512)
def _adapter(tp: Any) -> pydantic.TypeAdapter[Any] | None:
    try:
        return pydantic.TypeAdapter(tp)
    except (pydantic.PydanticUserError, TypeError):
        return None


def _decoder(fn: Callable[..., Any]) -> Callable[[Any], Any]:
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

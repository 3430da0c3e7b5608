"""`ratchet.Context`: what a task sees of its run, and the durable calls it makes.

Each call here says what it means for a run (a step returns its stored
result on replay; a long sleep suspends the run; ...). What they share (step
keys, checkpoints, a step's retries, when the run suspends) is `_steps.py`;
running a whole lease (the task function, hooks, outcome) is `_execution.py`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime as dt
import json
import logging
import random
import secrets
import time
import typing
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import pydantic

from ratchet import _process, _saga, _steps
from ratchet._codec import timestamp, to_json, trigger_options
from ratchet._errors import (
    ChildOutputError,
    ChildRunFailedError,
    TokenDataError,
    TokenTimeoutError,
)
from ratchet._retry import Retry
from ratchet._types import BatchItem, RunError, Token, TokenResult
from ratchet.v1 import common_pb2, run_pb2, worker_pb2

if typing.TYPE_CHECKING:
    from ratchet._task import Task

T = TypeVar("T")
Out = TypeVar("Out")

logger = logging.getLogger("ratchet.task")

_current_context: contextvars.ContextVar[Context] = contextvars.ContextVar("ratchet_context")


def current_context() -> Context:
    """The Context of the run whose task function or step is executing.

    For helpers that step code calls without a `ctx` argument. It works in
    async steps and in sync steps (their thread gets a copy of the task's
    context variables), and in the task's hooks. Raises RuntimeError outside
    a run, and in a step run with `executor="process"`: that step runs in
    another process, where the run's Context does not exist.
    """
    try:
        return _current_context.get()
    except LookupError:
        if _process.IN_STEP_PROCESS:
            raise RuntimeError(
                "ratchet.current_context() is not available in a step run with "
                "executor='process' (it runs in a child process, without the run's "
                "Context): pass what the step needs, such as ctx.idempotency_key, "
                "as arguments") from None
        raise RuntimeError(
            "ratchet.current_context() was called outside a Ratchet run (it works in a "
            "task function, its steps and its hooks, as executed by a ratchet.Worker)"
        ) from None


def current() -> Context:
    """The Context of the run this code executes in (for helpers such as retry.fetch)."""
    return current_context()


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
        journal: _steps.Journal,
        executor: concurrent.futures.Executor | None = None,
        sleep_threshold: float = 5.0,
        processes: _process.ProcessPool | None = None,
        clock_offset: float = 0.0,
        rerun_failed_steps: bool = False,
    ) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self.attempt = attempt
        self._state: dict[str, Any] = state
        # Set once the task's code may have changed the state: it read or
        # replaced `ctx.state` (and may hold a reference), or a replay
        # restored a saved one. Until then a checkpoint need not serialise it.
        self._state_touched = False
        self.logger = logging.LoggerAdapter(logger, {"run_id": run_id, "task_id": task_id})
        self._lease_id = lease_id
        self._cancelled = False
        self._steps = _steps.Steps(
            run_id=run_id, lease_id=lease_id, records=steps, state=lambda: self._state,
            state_touched=lambda: self._state_touched,
            journal=journal, logger=self.logger, executor=executor, processes=processes,
            sleep_threshold=sleep_threshold, clock_offset=clock_offset,
            rerun_failed_steps=rerun_failed_steps)
        # Undos registered by ctx.step(..., compensate=...), see _saga.py.
        self._saga = _saga.Saga()

    @property
    def state(self) -> dict[str, Any]:
        """The run's state: a JSON-serialisable dict saved with each checkpoint
        when it changed. On a replay it reads, as the replay
        passes each completed step, what it was when that step completed."""
        self._state_touched = True
        return self._state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._state_touched = True
        self._state = value

    def _restart_state(self) -> None:
        """The code runs again from the top: the state starts empty (and
        counts as changed if the stored one was not)."""
        if self._state:
            self._state_touched = True
        self._state = {}

    @property
    def idempotency_key(self) -> str:
        """Stable for this run and the step being executed (the run alone outside a step).

        Pass it to downstream APIs so that a step that runs twice (its worker died
        between the side effect and the checkpoint) does not act twice.
        """
        step = _steps.current_step.get()
        return self.run_id if step is None else f"{self.run_id}:{step}"

    @property
    def cancelled(self) -> bool:
        """True once the run was canceled; long sync step code can poll it."""
        return self._cancelled

    @property
    def suspended(self) -> asyncio.Event:
        """Set when every branch of the task waits durably: the run suspends."""
        return self._steps.suspended

    @property
    def waiting_on(self) -> list[str]:
        """Keys of the waits the run is blocked on (sent when it suspends)."""
        return self._steps.waiting_on

    def _cancel(self) -> None:
        self._cancelled = True

    def _state_update(self) -> bytes | None:
        return self._steps.state_update()

    def _replayed(self, record: common_pb2.Step) -> None:
        """The replay passed a completed step: `ctx.state` becomes the state
        saved with its COMPLETED checkpoint, so updates made before it are not
        applied twice. A step saved without state (unchanged, or completed by
        the coordinator: a long sleep, a token, children) leaves it as is."""
        if record.state:
            self._state = json.loads(record.state)
            self._state_touched = True

    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]] | Callable[..., T],
        *args: Any,
        retry: Retry | None = None,
        executor: str | None = None,
        compensate: Callable[[T], Any] | None = None,
        compensate_retry: Retry | None = None,
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

        `retry` is the step's own policy; without it a step gets
        `ratchet.Retry()` (3 attempts, 1 s doubling to 60 s), and
        `retry=ratchet.NO_RETRY` means one attempt. Failed attempts are
        recorded before the step is tried again, so a crash never resets the
        count. Raises `StepFailedError` when the attempts are used up or the
        error is a `NonRetryableError`; the step is then FAILED for good: a
        later run attempt raises the same error again without calling `fn`
        (unless the task's policy has `rerun_failed_steps=True`), so a failure
        the task handled stays handled. `Client.replay()` re-runs it.

        `compensate=undo` makes the step part of a saga (README, "Sagas and
        compensation"): once the step has completed (now, or on an earlier
        attempt that this one replays), `undo` is registered for the run. If
        the run's attempt then fails, the failure is final (no run-level
        retry): the registered undos run in reverse order, each once, as
        durable steps `ratchet:undo:<step key>`, each called with this step's
        output (decoded as returned here); `undo` may be sync or async. An
        undo is retried per `compensate_retry` (default: 10 attempts, 0.5 s
        doubling to 10 s); one that still fails is logged and left FAILED,
        and the others still run. Then `on_failure` runs and the run ends
        FAILED with the original error. Steps run at least once: make the
        step and its undo idempotent with `ctx.idempotency_key`. Step names
        starting with "ratchet:" are reserved.
        """
        if compensate is not None and not callable(compensate):
            raise TypeError(f"compensate= must be callable, got {compensate!r}")
        key = self._steps.key(name)
        value = await self._step(key, fn, args, kwargs, retry, executor)
        if compensate is not None:
            self._saga.register(key, compensate, value, compensate_retry)
        return typing.cast(T, value)

    async def _internal_step(self, key: str, fn: Callable[..., Any], args: tuple[Any, ...],
                             retry: Retry | None) -> Any:
        """A step of Ratchet's own, under its exact key (`ratchet:...`, unique
        in a run): allowed while the run is finishing."""
        return await self._step(key, fn, args, {}, retry, None)

    async def _step(self, key: str, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any], retry: Retry | None, executor: str | None) -> Any:
        decode = _steps.decoder(fn)
        record = self._steps.records.get(key)
        if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED:
            self._replayed(record)
            return decode(json.loads(record.output or b"null"))
        self._steps.forward(key)
        return await self._steps.run(key, record, fn, args, kwargs, retry, executor, decode)

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
        steps = self._steps
        key = steps.key(name)
        record = steps.records.get(key)
        if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED:
            self._replayed(record)
            return
        steps.forward(key)
        started = time.time()
        if record is not None and record.HasField("wake_at"):
            remaining = steps.local(record.wake_at) - started
        else:
            remaining = length()
        if remaining <= steps.sleep_threshold:
            with steps.executing():
                await asyncio.sleep(max(0.0, remaining))
                await steps.checkpoint(key, worker_pb2.STEP_EVENT_COMPLETED, 1, 0, started,
                                       time.time(), output=b"null", kind=common_pb2.STEP_KIND_SLEEP)
            return
        if record is None:
            with steps.executing():
                await steps.checkpoint(key, worker_pb2.STEP_EVENT_STARTED, 1, 0, started,
                                       started, kind=common_pb2.STEP_KIND_SLEEP,
                                       wake_after=remaining)
                steps.records[key] = common_pb2.Step(
                    key=key, kind=common_pb2.STEP_KIND_SLEEP,
                    status=common_pb2.STEP_STATUS_RUNNING, attempts=1,
                    wake_at=timestamp(started + remaining + steps.clock_offset))
        await steps.block(key)

    async def create_token(self, name: str, *,
                           timeout: float | dt.timedelta | None = None) -> str:
        """Create a wait token and return its id, for an outside system or a
        person to complete (`ratchet tokens complete`, `Client.complete_token`).
        The same id comes back on every replay."""
        steps = self._steps
        key = steps.key(name)
        record = steps.records.get(key)
        if record is not None:
            return record.token_id
        steps.forward(key)
        seconds = timeout.total_seconds() if isinstance(timeout, dt.timedelta) else timeout
        if seconds is not None and seconds < 0:
            raise ValueError("a token timeout cannot be negative")
        token_id = "tok_" + secrets.token_urlsafe(24)
        now = time.time()
        with steps.executing():
            await steps.checkpoint(key, worker_pb2.STEP_EVENT_STARTED, 1, 0, now, now,
                                   kind=common_pb2.STEP_KIND_TOKEN,
                                   wake_after=None if seconds is None else float(seconds),
                                   token_id=token_id)
        steps.records[key] = common_pb2.Step(
            key=key, kind=common_pb2.STEP_KIND_TOKEN, status=common_pb2.STEP_STATUS_RUNNING,
            attempts=1, token_id=token_id,
            wake_at=None if seconds is None else timestamp(now + seconds + steps.clock_offset))
        return token_id

    @overload
    async def wait_for_token(self, token: str | Token, *, model: type[T],
                             timeout_as_value: Literal[False] = False) -> T: ...

    @overload
    async def wait_for_token(self, token: str | Token, *, model: None = None,
                             timeout_as_value: Literal[False] = False) -> Any: ...

    @overload
    async def wait_for_token(self, token: str | Token, *, model: type[T],
                             timeout_as_value: Literal[True]) -> TokenResult[T]: ...

    @overload
    async def wait_for_token(self, token: str | Token, *, model: None = None,
                             timeout_as_value: Literal[True]) -> TokenResult[Any]: ...

    async def wait_for_token(self, token: str | Token, *, model: Any = None,
                             timeout_as_value: bool = False) -> Any:
        """The data the token was completed with. Suspends the run until then.

        `token` is a token this run created (`ctx.create_token`), or one
        created outside it (`Client.create_token`, passed in the payload; its
        id or the Token): the run then waits on it under the step key
        `token:<id>`, and if it was completed before the run got here, the run
        resumes at once with its data. A token wakes one run: another run
        waiting on it fails with WriteRefusedError, as does an unknown token.

        With `model` (a pydantic model or any type pydantic validates), the
        data is validated and converted; data that does not fit raises
        TokenDataError (non-retryable), naming the token step.

        If the token's timeout passes first, TokenTimeoutError is raised, or,
        with `timeout_as_value=True`, a `TokenResult(ok=False, timed_out=True)`
        is returned (`TokenResult(ok=True, data=...)` otherwise). Either way
        the token step shows as TIMED_OUT, not FAILED: whether a timeout is a
        failure is the task's decision.
        """
        token_id = token if isinstance(token, str) else token.id
        if not token_id:
            raise ValueError("a token id must not be empty")
        steps = self._steps
        found = [k for k, r in steps.records.items() if r.token_id == token_id]
        if found:
            key = found[0]
        else:
            # A token from outside the run: the coordinator links it to this
            # step, or records the step COMPLETED at once if its data is in.
            key = steps.key(f"token:{token_id}")
            steps.forward(key)
            now = time.time()
            with steps.executing():
                await steps.checkpoint(key, worker_pb2.STEP_EVENT_STARTED, 1, 0, now, now,
                                       kind=common_pb2.STEP_KIND_TOKEN, token_id=token_id,
                                       existing_token=True)
            steps.records[key] = common_pb2.Step(
                key=key, kind=common_pb2.STEP_KIND_TOKEN,
                status=common_pb2.STEP_STATUS_RUNNING, attempts=1, token_id=token_id)
        record = steps.records[key]
        if record.status == common_pb2.STEP_STATUS_COMPLETED:
            data = json.loads(record.output or b"null")
            if model is not None:
                try:
                    data = pydantic.TypeAdapter(model).validate_python(data)
                except pydantic.ValidationError as exc:
                    raise TokenDataError(key, token_id, model, json.loads(
                        record.output or b"null"), exc) from None
            if timeout_as_value:
                return TokenResult(ok=True, data=data, timed_out=False, token_id=token_id)
            return data
        if record.status in (common_pb2.STEP_STATUS_TIMED_OUT, common_pb2.STEP_STATUS_FAILED):
            if timeout_as_value:
                return TokenResult(ok=False, data=None, timed_out=True, token_id=token_id)
            raise TokenTimeoutError(f"wait token {key!r} timed out")
        await steps.block(key)

    async def trigger(self, task: Task[Any, Any] | str, payload: Any = None, *,
                      name: str | None = None, **options: Any) -> str:
        """Start a child run (once per step key, however often this run
        replays) and return its run id without waiting for it. `options` are
        those of `Client.trigger` (delay, ttl, priority, tags, metadata, ...)."""
        [run_id] = await self._children(name, task, [payload], False, options)
        return str(run_id)

    @overload
    async def trigger_and_wait(self, task: Task[Any, Out], payload: Any = None, *,
                               name: str | None = None, **options: Any) -> Out: ...

    @overload
    async def trigger_and_wait(self, task: str, payload: Any = None, *,
                               name: str | None = None, **options: Any) -> Any: ...

    async def trigger_and_wait(self, task: Task[Any, Any] | str, payload: Any = None, *,
                               name: str | None = None, **options: Any) -> Any:
        """Start a child run and return its output. The run suspends while the
        child works (holding no slot). Raises ChildRunFailedError if the child
        ends other than COMPLETED.

        Given the Task (not just its id), the output is parsed into the task's
        return type (a pydantic model, a list of them, ...), as the child's
        own code saw it; an output that does not fit raises ChildOutputError
        (non-retryable) naming the child run and the type. Given an id, the
        output is plain JSON."""
        [output] = await self._children(name, task, [payload], True, options)
        return output

    @overload
    async def batch_trigger_and_wait(self, task: Task[Any, Out], payloads: Sequence[Any], *,
                                     name: str | None = None, **options: Any) -> list[Out]: ...

    @overload
    async def batch_trigger_and_wait(self, task: str, payloads: Sequence[Any], *,
                                     name: str | None = None, **options: Any) -> list[Any]: ...

    async def batch_trigger_and_wait(self, task: Task[Any, Any] | str, payloads: Sequence[Any],
                                     *, name: str | None = None, **options: Any) -> list[Any]:
        """Fan out: one child per payload (at most 1,000), created together and
        exactly once; returns their outputs in input order, typed as by
        `trigger_and_wait`. Raises ChildRunFailedError (with every result) if
        any child failed, ChildOutputError for the first output that does not
        fit the Task's return type."""
        return await self._children(name, task, list(payloads), True, options)

    async def _children(self, name: str | None, task: Task[Any, Any] | str,
                        payloads: list[Any], wait: bool, options: dict[str, Any]) -> list[Any]:
        steps = self._steps
        task_id = task if isinstance(task, str) else task.id
        payloads = _child_payloads(payloads, options)
        key = steps.key(name or task_id)
        record = steps.records.get(key)
        if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED:
            data = json.loads(record.output)
            return _child_outputs(data, task) if wait else list(data)
        steps.forward(key)
        if record is None or record.status == common_pb2.STEP_STATUS_FAILED:
            opts = trigger_options(
                task_id, None, None, options.get("delay"), options.get("ttl"),
                options.get("priority", 0), options.get("queue"), options.get("concurrency_key"),
                options.get("tags", ()), options.get("metadata"), options.get("retry"),
                options.get("max_duration"))
            request = worker_pb2.TriggerChildren(
                lease_id=self._lease_id, run_id=self.run_id, step_key=key, wait=wait,
                items=[run_pb2.BatchTriggerItem(task_id=task_id, payload=to_json(p),
                                                options=opts) for p in payloads])
            with steps.executing():
                run_ids = await steps.trigger_children(request)
            if not wait:
                steps.records[key] = common_pb2.Step(
                    key=key, kind=common_pb2.STEP_KIND_CHILD,
                    status=common_pb2.STEP_STATUS_COMPLETED, output=to_json(run_ids))
                return run_ids
            steps.records[key] = common_pb2.Step(key=key, kind=common_pb2.STEP_KIND_CHILD,
                                                 status=common_pb2.STEP_STATUS_RUNNING)
        await steps.block(key)
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
        key = self._steps.key(name)
        record = self._steps.records.get(key)
        if record is not None and record.status == common_pb2.STEP_STATUS_COMPLETED:
            self._replayed(record)
            return json.loads(record.output)
        self._steps.forward(key)
        value = produce()
        now = time.time()
        with self._steps.executing():
            await self._steps.checkpoint(key, worker_pb2.STEP_EVENT_COMPLETED, 1, 0, now, now,
                                         output=to_json(value), kind=common_pb2.STEP_KIND_VALUE)
        return value

_NO_CHILD_KEYS = (
    "child runs take no idempotency key: each child is created exactly once per (parent "
    "run, step key, position), however often the parent replays. To deduplicate across "
    "runs, trigger them with Client.batch_trigger(..., ratchet.BatchItem(payload, "
    "idempotency_key=...)), or pass ctx.idempotency_key to the side effect itself")


def _child_payloads(payloads: list[Any], options: Mapping[str, Any]) -> list[Any]:
    """The payloads of child runs; keys are refused before anything is sent."""
    if options.get("idempotency_key") is not None:
        raise ValueError(_NO_CHILD_KEYS)
    out = []
    for p in payloads:
        if isinstance(p, BatchItem):
            if p.idempotency_key is not None:
                raise ValueError(_NO_CHILD_KEYS)
            p = p.payload
        out.append(p)
    return out


def _child_outputs(results: list[dict[str, Any]], task: Task[Any, Any] | str) -> list[Any]:
    for result in results:
        if result["status"] != "COMPLETED":
            error = result.get("error")
            raise ChildRunFailedError(
                result["run_id"], result["status"],
                None if not error else RunError(**error), results)
    outputs = [result["output"] for result in results]
    # Typed only when the parent holds the Task: an id says nothing of the type.
    # A type pydantic cannot validate stays plain JSON, as for ctx.step.
    adapter = None if isinstance(task, str) or task.output_type is None \
        else _steps.adapter(task.output_type)
    if adapter is None:
        return outputs
    typed = []
    for result, output in zip(results, outputs, strict=True):
        try:
            typed.append(adapter.validate_python(output))
        except pydantic.ValidationError as exc:
            assert not isinstance(task, str)
            raise ChildOutputError(result["run_id"], task.id, task.output_type, output,
                                   exc) from None
    return typed

"""`ratchet.Context`: what a task sees of its run, and `ctx.step`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import json
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import pydantic

from ratchet._codec import error_from_exception, error_to_pb, timestamp, to_json
from ratchet._errors import StepFailedError
from ratchet._retry import NO_RETRY, Retry
from ratchet.v1 import common_pb2, worker_pb2

T = TypeVar("T")

_current_step: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ratchet_current_step", default=None)

logger = logging.getLogger("ratchet.task")


class Journal(Protocol):
    """Where a Context sends checkpoints; returns once the coordinator committed."""

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None: ...


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
        self._uses: dict[str, int] = {}
        self._sent_state = to_json(state)
        self._cancelled = False

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
        **kwargs: Any,
    ) -> T:
        """Run `fn(*args, **kwargs)` as a durable step named `name`.

        Once the step has completed, its stored result is returned at once on
        every later attempt or replay, and `fn` is not called again. `fn` may
        be sync (it then runs in a thread, so heartbeats never stall) or
        async. Its result must be JSON-serialisable (pydantic models allowed);
        what you get back is the JSON round trip, validated against `fn`'s
        return annotation when it has one, so live runs and replays agree.

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
        policy = retry or NO_RETRY
        attempts = record.attempts if record is not None else 0
        # A step still RUNNING was retrying when its worker stopped: keep counting.
        # A FAILED one failed in an earlier run attempt: it gets a fresh budget.
        running = record is not None and record.status == common_pb2.STEP_STATUS_RUNNING
        base = record.retry_base if running and record is not None else attempts
        while True:
            attempt = attempts + 1
            started = time.time()
            token = _current_step.set(key)
            try:
                value = await _call(fn, args, kwargs, self._executor)
                output = to_json(value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempts = attempt
                error = error_from_exception(exc, step_key=key, attempt=attempt)
                finished = time.time()
                if error.non_retryable or not policy.allows_another(attempt - base):
                    await self._checkpoint(
                        key, worker_pb2.STEP_EVENT_FAILED, attempt, base, started, finished,
                        error=error_to_pb(error))
                    raise StepFailedError(key, attempt, error) from exc
                delay = policy.delay_after(attempt - base)
                self.logger.warning("step %s attempt %d failed (%s); retrying in %.2fs",
                                    key, attempt, error.type, delay)
                await self._checkpoint(
                    key, worker_pb2.STEP_EVENT_RETRYING, attempt, base, started, finished,
                    error=error_to_pb(error), retry_at=finished + delay)
                await asyncio.sleep(delay)
                continue
            finally:
                _current_step.reset(token)
            await self._checkpoint(key, worker_pb2.STEP_EVENT_COMPLETED, attempt, base, started,
                                   time.time(), output=output)
            return typing.cast(T, decode(json.loads(output)))

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
        retry_at: float | None = None,
    ) -> None:
        checkpoint = worker_pb2.Checkpoint(
            lease_id=self._lease_id, run_id=self.run_id, step_key=key,
            kind=common_pb2.STEP_KIND_RUN, event=event,  # type: ignore[arg-type]
            attempt=attempt, output=output, error=error, started_at=timestamp(started),
            finished_at=timestamp(finished), retry_base=base,
            retry_at=None if retry_at is None else timestamp(retry_at))
        state = self._state_update()
        if state is not None:
            checkpoint.state = state
        await self._journal.checkpoint(checkpoint)


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

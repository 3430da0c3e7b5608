"""`@ratchet.task`: a plain `async def` becomes a durable task."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import pydantic

from ratchet._codec import QUEUE_NOT_SUPPORTED, step_output
from ratchet._errors import NonRetryableError, NotSupportedError
from ratchet._retry import Retry

if typing.TYPE_CHECKING:
    from ratchet._context import Context
    from ratchet._types import Decision, RunError

P = TypeVar("P")
Out = TypeVar("Out")

_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class PayloadValidationError(NonRetryableError):
    """The payload a run was triggered with does not fit the task's payload type."""


@dataclasses.dataclass(frozen=True, eq=False)
class Task(Generic[P, Out]):
    """A durable task: its id, policy and function. Create it with `@ratchet.task`."""

    id: str
    fn: Callable[[Context, P], Awaitable[Out]]
    retry: Retry
    queue: str
    version: str
    max_duration: float | None
    payload_type: Any  # None when the payload is unannotated
    output_type: Any
    on_failure: Callable[[Context, RunError], Awaitable[None]] | None = None
    catch_error: Callable[[Context, RunError], Awaitable[Decision | None]] | None = None

    def payload_schema(self) -> bytes:
        """JSON Schema of the payload, or b"" when the payload is any JSON."""
        if self.payload_type is None:
            return b""
        schema = _adapter(self.payload_type).json_schema()
        return json.dumps(schema, sort_keys=True).encode()

    def output_schema(self) -> bytes:
        if self.output_type is None:
            return b""
        try:
            schema = pydantic.TypeAdapter(self.output_type).json_schema()
        except pydantic.PydanticUserError:
            return b""
        return json.dumps(schema, sort_keys=True).encode()

    def parse_payload(self, raw: bytes) -> P:
        data = json.loads(raw) if raw else None
        if self.payload_type is None:
            return typing.cast(P, data)
        try:
            return typing.cast(P, _adapter(self.payload_type).validate_python(data))
        except pydantic.ValidationError as exc:
            raise PayloadValidationError(f"payload of task {self.id!r}: {exc}") from None

    def dump_output(self, value: Out) -> bytes:
        """The output as JSON; a non-retryable TypeError if JSON cannot carry it."""
        return step_output(self.id, value, what="task")

    async def __call__(self, ctx: Context, payload: P) -> Out:
        """Call the function directly (no durability): handy in unit tests."""
        return await self.fn(ctx, payload)


@functools.lru_cache(maxsize=256)
def _adapter(tp: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(tp)


def task(
    id: str | None = None,
    *,
    retry: Retry | None = None,
    queue: str | None = None,
    version: str = "",
    max_duration: float | None = None,
    on_failure: Callable[[Context, RunError], Awaitable[None]] | None = None,
    catch_error: Callable[[Context, RunError], Awaitable[Decision | None]] | None = None,
) -> Callable[[Callable[[Context, P], Awaitable[Out]]], Task[P, Out]]:
    """Declare a durable task.

    The function is `async def fn(ctx: ratchet.Context, payload: T) -> Out`.
    When `T` is a pydantic model (or any type pydantic understands), payloads
    are validated on the worker and its JSON Schema is announced to the
    coordinator, which rejects triggers that do not fit. `retry` governs run
    attempts (default: 3 attempts, 1 s doubling to 60 s; `ratchet.NO_RETRY`
    for one). A later run attempt replays the code: completed steps return
    their results, and a step that FAILED raises its error again without
    running, unless `retry` has `rerun_failed_steps=True` (each step retries
    on its own: see `Context.step`). `on_failure(ctx,
    error)` runs once, as a durable step, when the run ends FAILED (not on
    attempts that will be retried). `queue` must be left unset (or be the
    task id): queues are not supported yet, and another value raises
    NotSupportedError rather than being ignored.
    """

    def wrap(fn: Callable[[Context, P], Awaitable[Out]]) -> Task[P, Out]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@ratchet.task needs an async def, got {fn!r}")
        task_id = id or fn.__name__.replace("_", "-")
        if not _TASK_ID.match(task_id):
            raise ValueError(f"invalid task id {task_id!r}: use letters, digits and . _ : -")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) != 2:
            raise TypeError(f"task {task_id!r} must take (ctx, payload)")
        hints = typing.get_type_hints(fn)
        payload_type = hints.get(params[1].name)
        if payload_type is typing.Any:
            payload_type = None
        if queue not in (None, task_id):
            raise NotSupportedError(f"task {task_id!r}: {QUEUE_NOT_SUPPORTED}")
        output_type = hints.get("return")
        if output_type in (typing.Any, type(None)):
            output_type = None
        return Task(id=task_id, fn=fn, retry=retry or Retry(), queue=queue or task_id,
                    version=version, max_duration=max_duration, payload_type=payload_type,
                    output_type=output_type, on_failure=on_failure, catch_error=catch_error)

    return wrap

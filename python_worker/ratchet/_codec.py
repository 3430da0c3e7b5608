"""Protobuf <-> SDK objects, and JSON encoding of payloads and outputs.

The SDK's only module (with the transports) that touches generated stubs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic_core
from google.protobuf import duration_pb2, timestamp_pb2

from ratchet._errors import (
    NonRetryableError,
    NotSupportedError,
    StepFailedError,
    WriteRefusedError,
)
from ratchet._retry import Retry
from ratchet._types import (
    Run,
    RunError,
    RunEvent,
    RunStatus,
    StepInfo,
    TaskInfo,
    Token,
    WorkerInfo,
)
from ratchet.v1 import common_pb2, run_pb2

STEP_KINDS = {common_pb2.STEP_KIND_RUN: "run", common_pb2.STEP_KIND_SLEEP: "sleep",
              common_pb2.STEP_KIND_TOKEN: "token", common_pb2.STEP_KIND_CHILD: "child",
              common_pb2.STEP_KIND_VALUE: "value"}
STEP_STATUSES = {common_pb2.STEP_STATUS_RUNNING: "RUNNING",
                 common_pb2.STEP_STATUS_COMPLETED: "COMPLETED",
                 common_pb2.STEP_STATUS_FAILED: "FAILED",
                 common_pb2.STEP_STATUS_TIMED_OUT: "TIMED_OUT"}
TOKEN_STATUSES = {run_pb2.TOKEN_STATUS_WAITING: "WAITING",
                  run_pb2.TOKEN_STATUS_COMPLETED: "COMPLETED",
                  run_pb2.TOKEN_STATUS_TIMED_OUT: "TIMED_OUT"}


def to_json(value: Any) -> bytes:
    """Encode a payload, output or state as UTF-8 JSON (pydantic models allowed).

    Raises TypeError for values JSON cannot carry, NaN and infinities included.
    """
    try:
        data = pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError as exc:
        raise TypeError(f"value is not JSON-serialisable: {exc}") from None
    if b"NaN" in data or b"Infinity" in data:  # rare: confirm outside strings
        json.loads(data, parse_constant=_no_constants)
    return data


def step_output(key: str, value: Any, what: str = "step") -> bytes:
    """A step's (or task's) return value as JSON, or a TypeError naming the
    step, what could not be encoded and the fix. The error is marked
    `non_retryable`: encoding the same value again cannot succeed, so retrying
    would only repeat the step's side effects."""
    try:
        return to_json(value)
    except TypeError as exc:
        error = TypeError(
            f"{what} {key!r} returned {_unencodable(value, exc)}, which cannot be stored as "
            "JSON: return JSON-compatible data (dict, list, str, int, float, bool, None), "
            "a pydantic model or a dataclass")
        setattr(error, "non_retryable", True)  # noqa: B010 (an attribute TypeError lacks)
        raise error from None


def _unencodable(value: Any, exc: TypeError) -> str:
    """What in a value JSON cannot carry, as pydantic names it ("a set" is fine,
    "Unable to serialize unknown type: <class 'x.Y'>" is not)."""
    match = re.search(r"unknown type: <class '([^']+)'>", str(exc))
    if match:
        found = match.group(1).removeprefix("builtins.")
        outer = _type_name(type(value))
        return (f"a value of type {found}" if outer == found
                else f"a {outer} holding a value of type {found}")
    if "NaN" in str(exc) or "Infinity" in str(exc):
        return "a float that is NaN or infinite"
    return f"a value of type {_type_name(type(value))} ({exc})"


def _type_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else \
        f"{cls.__module__}.{cls.__qualname__}"


def _no_constants(name: str) -> None:
    raise TypeError(f"value is not JSON-serialisable: {name} is not JSON")


def from_json(data: bytes) -> Any:
    return None if not data else json.loads(data)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def _dt(value: timestamp_pb2.Timestamp, present: bool) -> dt.datetime | None:
    if not present:
        return None
    return dt.datetime.fromtimestamp(value.ToNanoseconds() / 1e9, tz=dt.UTC)


def retry_to_pb(retry: Retry) -> common_pb2.RetryPolicy:
    return common_pb2.RetryPolicy(
        max_attempts=retry.max_attempts or 0, unlimited_attempts=retry.max_attempts is None,
        factor=retry.factor,
        min_delay=duration(retry.min_delay), max_delay=duration(retry.max_delay),
        jitter=retry.jitter, max_lease_losses=retry.max_lease_losses,
        rerun_failed_steps=retry.rerun_failed_steps)


def retry_from_pb(pb: common_pb2.RetryPolicy) -> Retry:
    """A policy as the coordinator sends it: resolved, every field set (a
    zero the policy cannot hold is refused by Retry, not replaced by a
    default the coordinator did not use)."""
    return Retry(
        max_attempts=None if pb.unlimited_attempts else pb.max_attempts, factor=pb.factor,
        min_delay=pb.min_delay.ToNanoseconds() / 1e9, max_delay=pb.max_delay.ToNanoseconds() / 1e9,
        jitter=pb.jitter, max_lease_losses=pb.max_lease_losses,
        rerun_failed_steps=pb.rerun_failed_steps)


def error_from_pb(pb: common_pb2.ErrorInfo) -> RunError:
    return RunError(type=pb.type, message=pb.message, stack=pb.stack,
                    non_retryable=pb.non_retryable, step_key=pb.step_key, attempt=pb.attempt)


def error_to_pb(error: RunError) -> common_pb2.ErrorInfo:
    return common_pb2.ErrorInfo(type=error.type, message=error.message, stack=error.stack,
                                non_retryable=error.non_retryable, step_key=error.step_key,
                                attempt=error.attempt)


def error_from_exception(exc: BaseException, *, step_key: str = "", attempt: int = 0) -> RunError:
    """Describe an exception; a StepFailedError reports the step's own error."""
    if isinstance(exc, StepFailedError):
        return exc.error
    if isinstance(exc, WriteRefusedError) and not step_key:
        step_key = exc.step_key  # the step whose checkpoint was refused, if any
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "ratchet._errors") \
        else f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__ == "ratchet._errors":
        name = f"ratchet.{cls.__qualname__}"
    stack = "".join(traceback.format_exception(exc))[-8000:]
    return RunError(type=name, message=str(exc), stack=stack,
                    non_retryable=bool(getattr(exc, "non_retryable", False))
                    or isinstance(exc, NonRetryableError),
                    step_key=step_key, attempt=attempt)


def step_from_pb(pb: common_pb2.Step) -> StepInfo:
    return StepInfo(
        key=pb.key, kind=STEP_KINDS.get(pb.kind, "run"),
        status=STEP_STATUSES.get(pb.status, "UNSPECIFIED"), attempts=pb.attempts,
        output=from_json(pb.output) if pb.status == common_pb2.STEP_STATUS_COMPLETED else None,
        error=error_from_pb(pb.error) if pb.HasField("error") else None,
        started_at=_dt(pb.started_at, pb.HasField("started_at")),
        finished_at=_dt(pb.finished_at, pb.HasField("finished_at")),
        token_id=pb.token_id, wake_at=_dt(pb.wake_at, pb.HasField("wake_at")))


def token_from_pb(pb: run_pb2.Token) -> Token:
    return Token(
        id=pb.id, status=TOKEN_STATUSES.get(pb.status, "UNSPECIFIED"), url=pb.url,
        tags=tuple(pb.tags), idempotency_key=pb.idempotency_key,
        created_at=_dt(pb.created_at, pb.HasField("created_at")),
        expires_at=_dt(pb.expires_at, pb.HasField("expires_at")),
        completed_at=_dt(pb.completed_at, pb.HasField("completed_at")),
        data=from_json(pb.data) if pb.data else None, run_id=pb.run_id,
        step_key=pb.step_key)


def run_from_pb(pb: run_pb2.Run, steps: Any = (), created: bool = True) -> Run:
    return Run(
        id=pb.id, task_id=pb.task_id,
        status=RunStatus(common_pb2.RunStatus.Name(pb.status).removeprefix("RUN_STATUS_")),
        attempt=pb.attempt, payload=from_json(pb.payload), output=from_json(pb.output),
        error=error_from_pb(pb.error) if pb.HasField("error") else None,
        idempotency_key=pb.idempotency_key, tags=tuple(pb.tags), metadata=dict(pb.metadata),
        created_at=_dt(pb.created_at, pb.HasField("created_at")),
        started_at=_dt(pb.started_at, pb.HasField("started_at")),
        finished_at=_dt(pb.finished_at, pb.HasField("finished_at")),
        steps=tuple(step_from_pb(s) for s in steps), created=created,
        parent_run_id=pb.parent_run_id, replay_of=pb.replay_of, lease_losses=pb.lease_losses)


def event_from_pb(pb: run_pb2.RunEvent) -> RunEvent:
    return RunEvent(id=pb.id, at=_dt(pb.at, pb.HasField("at")), type=pb.type,
                    attempt=pb.attempt, lease_id=pb.lease_id, step_key=pb.step_key,
                    data=from_json(pb.data) or {})


QUEUE_NOT_SUPPORTED = (
    "queue= is not supported yet: runs are dispatched by task id, each task is its own "
    "queue; leave queue unset or set it to the task id (to keep workloads apart, make "
    "them separate tasks served by separate workers)")
CONCURRENCY_KEY_NOT_SUPPORTED = (
    "concurrency_key= is not supported yet: runs are not limited per key; leave it unset "
    "(to bound how many runs execute at once, use the worker's slots: ratchet worker --slots)")


def trigger_options(
    task_id: str, idempotency_key: str | None, idempotency_key_ttl: float | None,
    delay: float | None, ttl: float | None, priority: int, queue: str | None,
    concurrency_key: str | None, tags: Sequence[str], metadata: Mapping[str, str] | None,
    retry: Retry | None, max_duration: float | None,
) -> run_pb2.TriggerOptions:
    """Trigger options as the protocol carries them (None and empty = unset).

    Raises NotSupportedError for `queue` and `concurrency_key`: the protocol
    carries them, but the coordinator does not act on them yet (and refuses them).
    The one queue there is, the task's own (`task_id`), is accepted, as the
    coordinator accepts it.
    """
    if queue and queue != task_id:
        raise NotSupportedError(QUEUE_NOT_SUPPORTED)
    if concurrency_key:
        raise NotSupportedError(CONCURRENCY_KEY_NOT_SUPPORTED)
    opts = run_pb2.TriggerOptions(
        idempotency_key=idempotency_key or "", priority=priority, queue=queue or "",
        concurrency_key=concurrency_key or "", tags=list(tags), metadata=dict(metadata or {}))
    if idempotency_key_ttl is not None:
        opts.idempotency_key_ttl.CopyFrom(duration(idempotency_key_ttl))
    if delay is not None:
        opts.delay.CopyFrom(duration(delay))
    if ttl is not None:
        opts.ttl.CopyFrom(duration(ttl))
    if retry is not None:
        opts.retry.CopyFrom(retry_to_pb(retry))
    if max_duration is not None:
        opts.max_duration.CopyFrom(duration(max_duration))
    return opts


def task_info_from_pb(pb: run_pb2.TaskInfo) -> TaskInfo:
    return TaskInfo(
        id=pb.id, version=pb.version, queue=pb.queue, retry=retry_from_pb(pb.retry),
        payload_schema=from_json(pb.payload_schema) if pb.payload_schema else None,
        output_schema=from_json(pb.output_schema) if pb.output_schema else None,
        max_duration=(pb.max_duration.ToNanoseconds() / 1e9
                      if pb.HasField("max_duration") else None),
        registered_at=_dt(pb.registered_at, pb.HasField("registered_at")),
        served_by=tuple(pb.served_by))


def worker_from_pb(pb: run_pb2.WorkerSession) -> WorkerInfo:
    return WorkerInfo(
        session_id=pb.session_id, worker_id=pb.worker_id, task_ids=tuple(pb.task_ids),
        slots=pb.slots, slots_used=pb.slots_used,
        connected_at=_dt(pb.connected_at, pb.HasField("connected_at")),
        last_seen_at=_dt(pb.last_seen_at, pb.HasField("last_seen_at")),
        coordinator=pb.coordinator)

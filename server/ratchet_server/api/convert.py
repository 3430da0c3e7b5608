"""Protobuf <-> domain objects. The only module of the server that builds messages."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from ratchet import Retry
from ratchet.v1 import common_pb2, run_pb2, worker_pb2
from ratchet_server import clock, model
from ratchet_server.engine import errors
from ratchet_server.engine.engine import DEFAULT_TASK_RETRY, TriggerSpec
from ratchet_server.engine.inventory import TaskInfo, WorkerInfo

RUN_STATUS_TO_PB = {s: getattr(common_pb2, f"RUN_STATUS_{s.value}") for s in model.RunStatus}
RUN_STATUS_FROM_PB = {v: k for k, v in RUN_STATUS_TO_PB.items()}
STEP_KIND_TO_PB = {k: getattr(common_pb2, f"STEP_KIND_{k.name}") for k in model.StepKind}
STEP_KIND_FROM_PB = {v: k for k, v in STEP_KIND_TO_PB.items()}
STEP_STATUS_TO_PB = {s: getattr(common_pb2, f"STEP_STATUS_{s.name}") for s in model.StepStatus}
TOKEN_STATUS_TO_PB = {s: getattr(run_pb2, f"TOKEN_STATUS_{s.name}") for s in model.TokenStatus}
TOKEN_STATUS_FROM_PB = {v: k for k, v in TOKEN_STATUS_TO_PB.items()}
STEP_EVENT_FROM_PB = {
    getattr(worker_pb2, f"STEP_EVENT_{e.name}"): e for e in model.StepEvent
}


# google.protobuf.Timestamp holds years 1 to 9999, Duration ±10,000 years.
_MIN_TS, _MAX_TS = -62_135_596_800, 253_402_300_799
_MAX_DUR = 315_576_000_000


def ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """A stored time as a Timestamp, clamped to what a Timestamp can hold:
    one odd value in the store must never make a run unreadable."""
    if seconds is None:
        return None
    if not math.isfinite(seconds):
        seconds = _MAX_TS if seconds > 0 else _MIN_TS  # NaN lands here too
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(min(max(seconds, _MIN_TS), _MAX_TS) * 1e9))
    return out


def from_ts(value: timestamp_pb2.Timestamp, present: bool,
            what: str = "timestamp") -> float | None:
    if not present:
        return None
    try:
        return float(value.ToNanoseconds()) / 1e9
    except ValueError:
        raise errors.InvalidArgument(
            f"{what} is not a valid timestamp (years 1 to 9999, nanos 0 to 999999999)"
        ) from None


def dur(seconds: float) -> duration_pb2.Duration:
    if not math.isfinite(seconds):
        seconds = _MAX_DUR if seconds > 0 else -_MAX_DUR
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(min(max(seconds, -_MAX_DUR), _MAX_DUR) * 1e9))
    return out


def seconds(value: duration_pb2.Duration) -> float:
    return float(value.ToNanoseconds()) / 1e9


def from_dur(value: duration_pb2.Duration, present: bool) -> float | None:
    return seconds(value) if present else None


def retry_from_pb(pb: common_pb2.RetryPolicy, default: Retry) -> Retry:
    try:
        return Retry(
            max_attempts=None if pb.unlimited_attempts
            else pb.max_attempts or default.max_attempts,
            factor=pb.factor or default.factor,
            min_delay=seconds(pb.min_delay) if pb.HasField("min_delay") else default.min_delay,
            max_delay=seconds(pb.max_delay) if pb.HasField("max_delay") else default.max_delay,
            jitter=pb.jitter,
            max_lease_losses=pb.max_lease_losses or default.max_lease_losses,
            rerun_failed_steps=pb.rerun_failed_steps,
        )
    except ValueError as exc:
        raise errors.InvalidArgument(f"invalid retry policy: {exc}") from None


def retry_to_pb(retry: Retry) -> common_pb2.RetryPolicy:
    return common_pb2.RetryPolicy(
        max_attempts=retry.max_attempts or 0, unlimited_attempts=retry.max_attempts is None,
        factor=retry.factor, min_delay=dur(retry.min_delay), max_delay=dur(retry.max_delay),
        jitter=retry.jitter, max_lease_losses=retry.max_lease_losses,
        rerun_failed_steps=retry.rerun_failed_steps)


def error_from_pb(pb: common_pb2.ErrorInfo) -> model.ErrorInfo:
    # A worker's error text is whatever an exception said: a NUL in it is
    # replaced rather than refused (Postgres could not cast it to jsonb when
    # ListRuns filters by error type).
    def clean(text: str) -> str:
        return text.replace("\x00", "\ufffd")

    return model.ErrorInfo(type=clean(pb.type) or "Error", message=clean(pb.message),
                           stack=clean(pb.stack), non_retryable=pb.non_retryable,
                           step_key=clean(pb.step_key), attempt=pb.attempt)


def error_to_pb(error: model.ErrorInfo | None) -> common_pb2.ErrorInfo | None:
    if error is None:
        return None
    return common_pb2.ErrorInfo(type=error.type, message=error.message, stack=error.stack,
                                non_retryable=error.non_retryable, step_key=error.step_key,
                                attempt=error.attempt)


def _utf8(text: str | None) -> bytes:
    return b"" if text is None else text.encode("utf-8")


def step_to_pb(step: model.Step) -> common_pb2.Step:
    return common_pb2.Step(
        key=step.key, kind=STEP_KIND_TO_PB[step.kind], status=STEP_STATUS_TO_PB[step.status],
        attempts=step.attempts, output=_utf8(step.output), error=error_to_pb(step.error),
        started_at=ts(step.started_at), finished_at=ts(step.finished_at),
        retry_base=step.retry_base,
        wake_at=ts(step.wake_at) if step.status is model.StepStatus.RUNNING else None,
        token_id=step.token_id or "", state=_utf8(step.state))


def run_to_pb(run: model.Run) -> run_pb2.Run:
    return run_pb2.Run(
        id=run.id, task_id=run.task_id, status=RUN_STATUS_TO_PB[run.status],
        attempt=run.attempt, payload=_utf8(run.payload), output=_utf8(run.output),
        error=error_to_pb(run.error), idempotency_key=run.idempotency_key or "",
        tags=list(run.tags), metadata=dict(run.metadata), priority=run.priority,
        queue=run.queue, concurrency_key=run.concurrency_key or "",
        parent_run_id=run.parent_run_id or "", created_at=ts(run.created_at),
        started_at=ts(run.started_at), finished_at=ts(run.finished_at),
        run_at=ts(run.run_at) if run.status is model.RunStatus.QUEUED else None,
        state=_utf8(run.state), retry=retry_to_pb(run.retry), replay_of=run.replay_of or "",
        discarded_at=ts(run.discarded_at), lease_losses=run.lease_losses)


def event_to_pb(event: dict[str, Any], *, show_lease: bool) -> run_pb2.RunEvent:
    """`show_lease`: lease ids are for operators (admin keys) only."""
    return run_pb2.RunEvent(
        id=event["id"], at=ts(event["at"]), type=event["type"], attempt=event["attempt"] or 0,
        lease_id=(event["lease_id"] or "") if show_lease else "",
        step_key=event["step_key"] or "",
        data=_utf8(event["data"]))


def trigger_spec(task_id: str, payload: bytes, opts: run_pb2.TriggerOptions) -> TriggerSpec:
    return TriggerSpec(
        task_id=task_id,
        payload=payload,
        idempotency_key=opts.idempotency_key or None,
        idempotency_ttl=seconds(opts.idempotency_key_ttl)
        if opts.HasField("idempotency_key_ttl") else None,
        delay=seconds(opts.delay) if opts.HasField("delay") else None,
        ttl=seconds(opts.ttl) if opts.HasField("ttl") else None,
        priority=opts.priority,
        queue=opts.queue or None,
        concurrency_key=opts.concurrency_key or None,
        tags=tuple(opts.tags),
        metadata=dict(opts.metadata),
        retry=retry_from_pb(opts.retry, DEFAULT_TASK_RETRY) if opts.HasField("retry") else None,
        max_duration=seconds(opts.max_duration) if opts.HasField("max_duration") else None,
    )


def task_from_pb(env: str, pb: worker_pb2.TaskDefinition) -> model.TaskDef:
    def schema(raw: bytes, what: str) -> str | None:
        if not raw:
            return None
        try:
            text = raw.decode("utf-8")
            json.loads(text)
        except (UnicodeDecodeError, ValueError):
            raise errors.InvalidArgument(f"task {pb.id!r}: {what} is not JSON") from None
        return text

    return model.TaskDef(
        env=env, id=pb.id, version=pb.version, queue=pb.queue or pb.id,
        retry=retry_from_pb(pb.retry, DEFAULT_TASK_RETRY),
        payload_schema=schema(pb.payload_schema, "payload_schema"),
        output_schema=schema(pb.output_schema, "output_schema"),
        max_duration=seconds(pb.max_duration) if pb.HasField("max_duration") else None,
        handles_final_error=pb.handles_final_error)


def lease_to_pb(leased: model.LeasedRun, lease_ttl: float) -> worker_pb2.LeaseGrant:
    run = leased.run
    return worker_pb2.LeaseGrant(
        lease_id=run.lease_id or "", run_id=run.id, task_id=run.task_id, attempt=run.attempt,
        snapshot=worker_pb2.Snapshot(payload=_utf8(run.payload),
                                     steps=[step_to_pb(s) for s in leased.steps],
                                     state=_utf8(run.state)),
        expires_at=ts(run.lease_expires_at), retry=retry_to_pb(run.retry),
        # The worker measures the snapshot's wake_at times from this, not
        # from its own clock (protocol §4).
        sent_at=ts(clock.now()),
        # A finishing lease (protocol §4): compensations and on_failure only.
        final_error=error_to_pb(run.final_error))


def summary(run: model.Run) -> model.Run:
    """A run without its bodies (payload, output, state), as listings show it."""
    return dataclasses.replace(run, payload="", output=None, state=None)


def summary_view(view: int) -> bool:
    """Whether ListRuns returns summaries: unless RUN_VIEW_FULL is asked for."""
    if view == run_pb2.RUN_VIEW_FULL:
        return False
    if view in (run_pb2.RUN_VIEW_UNSPECIFIED, run_pb2.RUN_VIEW_SUMMARY):
        return True
    raise errors.InvalidArgument(f"unknown view {view}")


def check_strings(message: Any) -> None:
    """Refuse a request with a NUL character in any string field, nested or
    repeated or in a map (Postgres text cannot hold one). Walks without
    recursion; the field's path names it in the error."""
    todo: list[tuple[str, Any]] = [("", message)]
    while todo:
        prefix, msg = todo.pop()
        for field, value in msg.ListFields():
            name = prefix + field.name
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    _check_text(f"{name} key", k)
                    if isinstance(v, str):
                        _check_text(f"{name}[{k[:40]!r}]", v)
            elif field.type == field.TYPE_STRING:
                for item in value if field.is_repeated else (value,):
                    _check_text(name, item)
            elif field.type == field.TYPE_MESSAGE:
                items = value if field.is_repeated else (value,)
                todo.extend((f"{name}.", item) for item in items)


def _check_text(name: str, value: str) -> None:
    if "\x00" in value:
        raise errors.InvalidArgument(f"{name} must not contain NUL characters (\\x00)")


def token_to_pb(token: model.Token, status: model.TokenStatus, url: str = "") -> run_pb2.Token:
    """A token as a message; `status` as the engine reads it now, `url` only
    where the caller may see it (CreateToken, GetToken)."""
    return run_pb2.Token(
        id=token.id, status=TOKEN_STATUS_TO_PB[status], url=url, tags=list(token.tags),
        idempotency_key=token.idempotency_key or "", created_at=ts(token.created_at),
        expires_at=ts(token.expires_at), completed_at=ts(token.completed_at),
        data=_utf8(token.data), run_id=token.run_id or "", step_key=token.step_key or "")


def task_info_to_pb(info: TaskInfo) -> run_pb2.TaskInfo:
    task = info.task
    return run_pb2.TaskInfo(
        id=task.id, version=task.version, queue=task.queue, retry=retry_to_pb(task.retry),
        payload_schema=_utf8(task.payload_schema), output_schema=_utf8(task.output_schema),
        max_duration=None if task.max_duration is None else dur(task.max_duration),
        handles_final_error=task.handles_final_error, registered_at=ts(info.registered_at),
        served_by=list(info.served_by))


def worker_to_pb(info: WorkerInfo) -> run_pb2.WorkerSession:
    return run_pb2.WorkerSession(
        session_id=info.session_id, worker_id=info.worker_id, task_ids=list(info.task_ids),
        slots=info.slots, slots_used=info.slots_used, connected_at=ts(info.connected_at),
        last_seen_at=ts(info.last_seen_at), coordinator=info.coordinator)

"""Plain data the SDK returns: runs, steps, errors. No protobuf here."""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import enum
import importlib
from typing import Any, Generic, TypeVar

from ratchet._retry import Retry

T = TypeVar("T")


class RunStatus(enum.StrEnum):
    """Lifecycle of a run; the final ones are COMPLETED, FAILED, CANCELED, EXPIRED, TIMED_OUT."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def is_final(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)


@dataclasses.dataclass(frozen=True, slots=True)
class RunError:
    """Why a step or run attempt failed.

    `type` is the exception's name as the worker recorded it: the bare name
    for builtins (`ValueError`), `ratchet.X` for the SDK's errors, else
    `module.QualName`. `error_class()` and `is_instance()` turn it back into
    the class where this process can import it.
    """

    type: str
    message: str
    stack: str = ""
    non_retryable: bool = False
    step_key: str = ""
    attempt: int = 0

    def error_class(self) -> builtins.type[BaseException] | None:
        """The exception class `type` names, or None when it cannot be had here.

        The module is imported if it is not yet (so it must be installed in
        this process); names of classes defined inside functions, of modules
        that fail to import and of things that are not exception classes
        (such as the coordinator's own `LeaseLost`) give None.
        """
        return _error_class(self.type)

    def is_instance(
        self, cls: builtins.type[BaseException] | tuple[builtins.type[BaseException], ...]
    ) -> bool:
        """What `isinstance(exc, cls)` said of the original exception: True when
        `type` names `cls` or a subclass of it. False when the class cannot be
        imported here (see `error_class`)."""
        found = self.error_class()
        return found is not None and issubclass(found, cls)


def _error_class(name: str) -> type[BaseException] | None:
    parts = name.split(".")
    found: object = None
    if len(parts) == 1:
        found = getattr(builtins, name, None)
    else:
        # The longest importable prefix is the module; the rest is a qualname.
        for split in range(len(parts) - 1, 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:split]))
            except Exception:  # not a module, not installed, or broken on import
                continue
            for attr in parts[split:]:
                found = getattr(found, attr, None)
            break
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class BatchItem:
    """One run of `Client.batch_trigger`, in place of a bare payload, when it
    needs an idempotency key of its own (Hatchet's `key=`):

        await client.batch_trigger(charge, [ratchet.BatchItem(o, idempotency_key=o["id"])
                                            for o in orders])

    A run with a key that is already in use (by an earlier run of the task,
    or an earlier item of the same batch) is not created again: its result
    is that run, with `created` False. `idempotency_key_ttl` (seconds) as in
    `Client.trigger`. Child runs take no key (see `ctx.batch_trigger_and_wait`).
    """

    payload: Any = None
    idempotency_key: str | None = None
    idempotency_key_ttl: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class StepInfo:
    """One entry of a run's journal."""

    key: str
    kind: str
    status: str
    attempts: int
    output: Any
    error: RunError | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    # For a token step: the token's id ("" otherwise), and while it waits,
    # when it times out by itself.
    token_id: str = ""
    wake_at: dt.datetime | None = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """A run as the coordinator last reported it."""

    id: str
    task_id: str
    status: RunStatus
    attempt: int
    payload: Any
    output: Any
    error: RunError | None
    idempotency_key: str
    tags: tuple[str, ...]
    metadata: dict[str, str]
    created_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    steps: tuple[StepInfo, ...] = ()
    # False when a trigger's idempotency key matched this existing run (the
    # trigger started nothing); True otherwise, and on runs read back.
    created: bool = True
    parent_run_id: str = ""
    replay_of: str = ""
    # Times the run's worker died or went silent (lost leases); these do not
    # count as attempts (Retry.max_lease_losses bounds them).
    lease_losses: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (times as ISO 8601), as `ratchet runs show --json` prints."""

        def iso(value: dt.datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        def err(e: RunError | None) -> dict[str, Any] | None:
            return None if e is None else dataclasses.asdict(e)

        return {
            "id": self.id,
            "task": self.task_id,
            "status": self.status.value,
            "attempt": self.attempt,
            "lease_losses": self.lease_losses,
            "payload": self.payload,
            "output": self.output,
            "error": err(self.error),
            "idempotency_key": self.idempotency_key or None,
            "tags": list(self.tags),
            "parent_run_id": self.parent_run_id or None,
            "replay_of": self.replay_of or None,
            "metadata": self.metadata,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "steps": [
                {
                    "key": s.key,
                    "kind": s.kind,
                    "status": s.status,
                    "attempts": s.attempts,
                    "output": s.output,
                    "error": err(s.error),
                    "started_at": iso(s.started_at),
                    "finished_at": iso(s.finished_at),
                    "duration_s": s.duration,
                    "token_id": s.token_id or None,
                    "wake_at": iso(s.wake_at),
                }
                for s in self.steps
            ],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class RunEvent:
    """One entry of a run's append-only history."""

    id: int
    at: dt.datetime | None
    type: str
    attempt: int
    lease_id: str
    step_key: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": None if self.at is None else self.at.isoformat(),
                "type": self.type, "attempt": self.attempt, "lease_id": self.lease_id or None,
                "step_key": self.step_key or None, "data": self.data}


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What a task's `catch_error(ctx, error)` hook decides about a failed attempt.

    Return `Decision.retry_now()`, `Decision.retry_at(when)`, `Decision.fail()`
    or `Decision.replace(error)`; returning None keeps the retry policy's
    choice. A retry still needs an attempt left in the policy.
    """

    action: str
    at: float | None = None
    error: RunError | None = None

    @classmethod
    def retry_now(cls) -> Decision:
        return cls("retry", at=0.0)

    @classmethod
    def retry_at(cls, when: dt.datetime | float) -> Decision:
        """At a datetime (naive means UTC), or after `when` seconds."""
        if isinstance(when, dt.datetime):
            if when.tzinfo is None:  # naive means UTC, as for ctx.sleep_until
                when = when.replace(tzinfo=dt.UTC)
            return cls("retry", at=when.timestamp())
        return cls("retry_in", at=float(when))

    @classmethod
    def fail(cls) -> Decision:
        """No more attempts: the run ends FAILED now."""
        return cls("fail")

    @classmethod
    def replace(cls, error: RunError) -> Decision:
        """Record this error instead (its non_retryable flag is honoured)."""
        return cls("replace", error=error)


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """A wait token created with `Client.create_token`.

    Pass `id` to a run (in its payload); the run waits with
    `ctx.wait_for_token(id)`. Complete it with `Client.complete_token(id,
    data)`, `ratchet tokens complete`, or by POSTing JSON to `url` (no API
    key needed: the URL's secret is the credential, so hand it only to whoever
    should complete the token). `status` is "WAITING", "COMPLETED" or
    "TIMED_OUT". `url` is empty in listings; `get_token` returns it.
    """

    id: str
    status: str
    url: str
    tags: tuple[str, ...]
    idempotency_key: str
    created_at: dt.datetime | None
    expires_at: dt.datetime | None
    completed_at: dt.datetime | None
    # The data it was completed with (None until then).
    data: Any
    # The run waiting on it, and its token step ("" until a run waits).
    run_id: str
    step_key: str


@dataclasses.dataclass(frozen=True, slots=True)
class TokenResult(Generic[T]):
    """What `ctx.wait_for_token(..., timeout_as_value=True)` returns: either
    `ok` with `data` (validated against the model, if one was given), or
    `timed_out` (the token's timeout passed first; `data` is None)."""

    ok: bool
    data: T | None
    timed_out: bool
    token_id: str


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclasses.dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task registered in the environment (`Client.tasks()`): the definition
    its last worker announced, and who serves it now.

    `served_by` holds the session ids (`WorkerInfo.session_id`) connected to
    the coordinator that answered which serve the task; empty means no worker
    connected there serves it, so its runs wait QUEUED. A task stays
    registered after its workers leave.
    """

    id: str
    version: str
    queue: str
    retry: Retry
    # JSON Schemas as documents (None = none given).
    payload_schema: Any
    output_schema: Any
    # Seconds; None = no limit.
    max_duration: float | None
    registered_at: dt.datetime | None
    served_by: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        r = self.retry
        return {"id": self.id, "version": self.version, "queue": self.queue,
                "retry": {"max_attempts": r.max_attempts, "factor": r.factor,
                          "min_delay": r.min_delay, "max_delay": r.max_delay,
                          "jitter": r.jitter, "max_lease_losses": r.max_lease_losses,
                          "rerun_failed_steps": r.rerun_failed_steps},
                "payload_schema": self.payload_schema, "output_schema": self.output_schema,
                "max_duration": self.max_duration,
                "registered_at": _iso(self.registered_at), "served_by": list(self.served_by)}


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker's session with the coordinator that answered `Client.workers()`.

    Sessions live on the coordinator a worker streams to: with several
    coordinators, each lists its own (`coordinator` names it, "host:pid").
    `last_seen_at` is when the coordinator last heard from the worker (a
    heartbeat or any other message).
    """

    session_id: str
    worker_id: str
    task_ids: tuple[str, ...]
    slots: int
    slots_used: int
    connected_at: dt.datetime | None
    last_seen_at: dt.datetime | None
    coordinator: str

    @property
    def slots_free(self) -> int:
        return max(0, self.slots - self.slots_used)

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "worker_id": self.worker_id,
                "task_ids": list(self.task_ids), "slots": self.slots,
                "slots_used": self.slots_used, "slots_free": self.slots_free,
                "connected_at": _iso(self.connected_at),
                "last_seen_at": _iso(self.last_seen_at), "coordinator": self.coordinator}

"""Domain objects shared by the engine and the stores.

Frozen dataclasses and enums only: no protobuf, no SQL. JSON documents
(payload, output, state, schemas) travel as UTF-8 `str` exactly as received,
so nothing is re-encoded on the hot path. Times are POSIX seconds (float).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence

from ratchet import Retry as Retry

# The retry policy is the SDK's own class: one formula for task attempts (applied
# here) and step attempts (applied by workers). The store reaches it only
# through this module.
NO_RETRY = Retry(max_attempts=1, min_delay=0.0, max_delay=0.0)


class RunStatus(enum.StrEnum):
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
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED, RunStatus.EXPIRED,
     RunStatus.TIMED_OUT}
)


class StepKind(enum.StrEnum):
    RUN = "run"
    SLEEP = "sleep"
    TOKEN = "token"
    CHILD = "child"
    VALUE = "value"


class StepStatus(enum.StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    # A token step whose token timed out: the task decides what that means.
    TIMED_OUT = "TIMED_OUT"


class StepEvent(enum.StrEnum):
    STARTED = "started"
    COMPLETED = "completed"
    RETRYING = "retrying"
    FAILED = "failed"


class Role(enum.StrEnum):
    CLIENT = "client"
    WORKER = "worker"
    ADMIN = "admin"


class EventType(enum.StrEnum):
    """Entries of the append-only run history (DESIGN §3)."""

    TRIGGERED = "triggered"
    LEASED = "leased"
    LEASE_ADOPTED = "lease_adopted"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    STEP_RETRYING = "step_retrying"
    RETRY_SCHEDULED = "retry_scheduled"
    LEASE_LOST = "lease_lost"
    LEASE_RELEASED = "lease_released"
    FINISHED = "finished"
    CANCELED = "canceled"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    WAIT_COMPLETED = "wait_completed"
    EXPIRED = "expired"
    TIMED_OUT = "timed_out"
    CHILDREN_TRIGGERED = "children_triggered"
    REPLAYED = "replayed"
    RETRY_DUE = "retry_due"
    DISCARDED = "discarded"
    # The reconciler gave a run that nothing would move again a way on.
    REPAIRED = "repaired"


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorInfo:
    type: str
    message: str
    stack: str = ""
    non_retryable: bool = False
    step_key: str = ""
    attempt: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    env: str
    role: Role
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """What `ratchet keys list` shows of a key (never the key or its hash)."""

    id: str
    env: str
    role: Role
    name: str
    created_at: float
    revoked_at: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class TaskDef:
    env: str
    id: str
    version: str
    queue: str
    retry: Retry
    payload_schema: str | None
    output_schema: str | None
    max_duration: float | None
    # Its workers run finishing leases (TaskDefinition.handles_final_error).
    handles_final_error: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class NewRun:
    """A run to create; the engine has validated everything in it."""

    id: str
    env: str
    task_id: str
    payload: str
    queue: str
    retry: Retry
    priority: int = 0
    run_at: float = 0.0
    idempotency_key: str | None = None
    idempotency_expires_at: float | None = None
    concurrency_key: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    parent_run_id: str | None = None
    parent_step_key: str | None = None
    child_index: int | None = None
    replay_of: str | None = None
    ttl: float | None = None
    max_duration: float | None = None
    # When a never-started run expires (the engine counts the TTL from run_at).
    expire_at: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    id: str
    env: str
    task_id: str
    status: RunStatus
    attempt: int
    payload: str
    output: str | None
    error: ErrorInfo | None
    queue: str
    priority: int
    retry: Retry
    run_at: float
    idempotency_key: str | None
    concurrency_key: str | None
    tags: tuple[str, ...]
    metadata: Mapping[str, str]
    parent_run_id: str | None
    state: str | None
    lease_id: str | None
    lease_owner: str | None
    lease_expires_at: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    replay_of: str | None = None
    discarded_at: float | None = None
    # Leases lost so far (not attempts; Retry.max_lease_losses bounds them).
    lease_losses: int = 0
    # Set when the run has failed for good without its worker's report: its
    # lease is (or its next lease will be) a finishing lease.
    final_error: ErrorInfo | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    run_id: str
    key: str
    kind: StepKind
    status: StepStatus
    attempts: int
    retry_base: int
    output: str | None
    error: ErrorInfo | None
    started_at: float | None
    finished_at: float | None
    wake_at: float | None = None
    token_id: str | None = None
    # ctx.state (JSON) as saved with the step's COMPLETED checkpoint.
    state: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class LeasedRun:
    """A run just leased, with the snapshot a worker needs to continue it."""

    run: Run
    steps: tuple[Step, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseRef:
    run_id: str
    lease_id: str
    attempt: int
    retry: Retry
    lease_owner: str | None
    # What the lease-loss rule needs (policy.lease_loss_transition): losses so
    # far, the final error of a finishing lease, and whether the run's task
    # handles final errors.
    lease_losses: int = 0
    final_error: ErrorInfo | None = None
    handles_final_error: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    run_id: str
    type: EventType
    at: float
    attempt: int = 0
    lease_id: str | None = None
    step_key: str | None = None
    data: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class RunFilter:
    env: str
    statuses: tuple[RunStatus, ...] = ()
    task_id: str | None = None
    tag: str | None = None
    parent_run_id: str | None = None
    error_type: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    include_discarded: bool = False
    # Not a filter: leave out payload, output and state (ListRuns summaries).
    summary: bool = False


# Fenced writes. Each names the lease it was made under; the store applies it
# only while that lease is current (run RUNNING with that lease id), and
# reports per write whether it was applied. Many are applied in one
# transaction (group commit).


@dataclasses.dataclass(frozen=True, slots=True)
class StepWrite:
    """Record a step event under a lease (and optionally the new state)."""

    run_id: str
    lease_id: str
    key: str
    kind: StepKind
    status: StepStatus
    attempt: int
    retry_base: int
    output: str | None
    error: ErrorInfo | None
    started_at: float | None
    finished_at: float | None
    state: str | None
    events: tuple[Event, ...]
    wake_at: float | None = None
    token_id: str | None = None
    # Fences beyond the lease id: the writer's environment and session.
    env: str | None = None
    owner: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class RunTransition:
    """Move a run out of RUNNING under a lease (finish, retry, requeue)."""

    run_id: str
    lease_id: str
    status: RunStatus
    events: tuple[Event, ...]
    output: str | None = None
    error: ErrorInfo | None = None
    state: str | None = None
    run_at: float | None = None
    # A released lease does not count as an attempt: the next lease reuses it.
    refund_attempt: bool = False
    # Forget the error of earlier attempts (otherwise a transition without an
    # error keeps the last one).
    clear_error: bool = False
    # For WAITING: the wait step keys the run is blocked on.
    waiting_on: tuple[str, ...] = ()
    # Extra fences for taking a lease from a holder presumed gone: apply only
    # if the lease still has this owner (no reconnect adopted it) and, when
    # set, only if it is still expired at this time (no heartbeat renewed it).
    expect_owner: str | None = None
    expired_before: float | None = None
    # The environment the writer belongs to: a lease id alone never crosses
    # environments.
    env: str | None = None
    # A late failure report may land on a run its lease loss already requeued
    # (QUEUED, same lease id, not leased again): see Engine.complete_failure.
    expect_status: RunStatus = RunStatus.RUNNING
    # For WAITING: the engine's rule, checked under the run's row lock right
    # after the suspension, so a wait that ended first is never missed.
    wake_rule: WakeRule | None = None
    # A lost lease: the run's lease_losses grows by one.
    count_lease_loss: bool = False
    # A late report replaces a lease-loss guess (Engine.complete_failure): the
    # loss's count and its refund of the attempt are taken back.
    undo_lease_loss: bool = False
    # Set the run's final error (its next lease is a finishing lease), or clear it.
    final_error: ErrorInfo | None = None
    clear_final_error: bool = False
    # Fence on the lease's kind: True applies only under a finishing lease
    # (final_error set), False only under an ordinary one, None under either.
    finishing: bool | None = None


FencedWrite = StepWrite | RunTransition


@dataclasses.dataclass(frozen=True, slots=True)
class WaitResolution:
    """A wait step ends from outside its run's lease (a timer, a token, its
    children), as the engine decided. Applied only while the step is still
    RUNNING (and, for a timer, still due at `expect_wake_at`), so whichever of
    two racing resolutions commits first wins and the other changes nothing."""

    run_id: str
    key: str
    status: StepStatus
    events: tuple[Event, ...]
    output: str | None = None
    error: ErrorInfo | None = None
    finished_at: float | None = None
    expect_wake_at: float | None = None
    # A due retry keeps its step RUNNING and only clears the due time.
    clear_wake_at: bool = False


# Whether a WAITING run goes back to the queue: (the step keys it waits on,
# those steps by key, now) -> bool. The engine's rule, called by the store
# inside the transaction that holds the run's row lock.
WakeRule = Callable[[Sequence[str], Mapping[str, Step], float], bool]

# What a child-wait step becomes once its children are all final: (parent run
# id, step key, its children in trigger order, now) -> the resolution, or None
# while a child is unfinished. The engine's rule, called by the store right
# after the transaction of the child that finished last, holding the parent's
# row lock.
ChildWaitRule = Callable[[str, str, Sequence["ChildRun"], float], WaitResolution | None]


@dataclasses.dataclass(frozen=True, slots=True)
class ChildRun:
    """What a child-wait step's result says of one child (a Run has it too)."""

    id: str
    status: RunStatus
    output: str | None
    error: ErrorInfo | None


class TokenStatus(enum.StrEnum):
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    # Never stored: a WAITING token past its expires_at reads so.
    TIMED_OUT = "TIMED_OUT"


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """A wait token created outside any run (CreateToken), as stored: its
    status is WAITING or COMPLETED (policy.token_status derives TIMED_OUT)."""

    id: str
    env: str
    secret: str
    status: TokenStatus
    data: str | None
    tags: tuple[str, ...]
    idempotency_key: str | None
    created_at: float
    expires_at: float | None
    completed_at: float | None
    # The run waiting on it, and its token step, once one does.
    run_id: str | None = None
    step_key: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TokenFilter:
    env: str
    run_id: str | None = None
    statuses: tuple[TokenStatus, ...] = ()
    tags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class TokenCompletion:
    """What completing a token did (the store reports, the engine explains):
    whether it completed, the token as last read, whether its run was queued,
    and, for a token a run waits on, the run's status and the token step."""

    completed: bool
    token: Token
    woken: bool = False
    run_status: RunStatus | None = None
    step: Step | None = None


# How a run's wait on an existing token starts: (the token locked under the
# run's row, or None if unknown in the environment; now) -> the step write to
# record (RUNNING, COMPLETED with the data, or TIMED_OUT), or the reason the
# wait is refused. The engine's rule, called by the store in the transaction.
TokenWaitRule = Callable[[Token | None, float], "StepWrite | str"]

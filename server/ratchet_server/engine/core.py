"""What every part of the engine shares: configuration, limits, the
sessions this coordinator serves, the task cache, and the rule that turns a
failed attempt into a retry or a final failure.

The engine is one object (engine.py) assembled from one part per concern:
runs.py (what clients ask), sessions.py (workers and dispatch), leases.py
(progress under a lease), timers.py (due times, reconciler, retention), with
the group commit in writes.py and every pure decision in policy.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ratchet import Retry
from ratchet_server import clock, model
from ratchet_server.engine import errors, policy, validate, writes
from ratchet_server.engine.ids import new_id
from ratchet_server.engine.schemas import SchemaCache
from ratchet_server.store import Store

log = logging.getLogger("ratchet.engine")

MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_STATE_BYTES = 256 * 1024
MAX_BATCH = 1000
MAX_SLOTS = 10_000
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600.0
DEFAULT_TASK_RETRY = Retry()
TASK_CACHE_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Timing of leases and sessions (see docs/operations.md for the defaults)."""

    lease_ttl: float = 30.0
    heartbeat_interval: float = 5.0
    session_grace: float = 1.0
    # The timer loop ticks every min(timer_interval, reap_interval, lease_ttl / 4).
    reap_interval: float = 1.0
    timer_interval: float = 0.25
    # Finished runs (with their steps and history) are deleted after this
    # long, in batches of `retention_batch`; None keeps them for ever.
    retention: float | None = 30 * 24 * 3600.0
    retention_batch: int = 500
    retention_interval: float = 60.0
    max_write_batch: int = 512
    write_concurrency: int = 2
    # The reconciler checks a page of unfinished runs this often, skipping
    # runs changed in the last `reconcile_settle` seconds (0 disables it).
    reconcile_interval: float = 5.0
    reconcile_settle: float = 5.0
    # A child wait ends in its last child's transaction; this sweep over
    # pending child waits is the safety net under that (0 disables it).
    child_sweep_interval: float = 15.0
    # The dispatcher looks for ready runs at least this often, woken or not:
    # the bound on how late a run made ready on another coordinator starts
    # when there is no NOTIFY to wake this one (`ratchet server --no-notify`).
    poll_interval: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class TriggerSpec:
    """One run to trigger, as a client asked for it."""

    task_id: str
    payload: bytes
    idempotency_key: str | None = None
    idempotency_ttl: float | None = None
    delay: float | None = None
    ttl: float | None = None
    priority: int = 0
    queue: str | None = None
    concurrency_key: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    retry: Retry | None = None
    max_duration: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class LeasePush:
    leased: model.LeasedRun


@dataclasses.dataclass(frozen=True, slots=True)
class CancelPush:
    run_id: str
    lease_id: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class EndPush:
    """End the session's stream: its API key was revoked (engine/keys.py), or
    this coordinator is shutting down (`Engine.end_sessions`)."""

    reason: str
    key_revoked: bool = False


Push = LeasePush | CancelPush | EndPush


class Session:
    """One worker's stream to this coordinator."""

    def __init__(self, env: str, worker_id: str, task_ids: Sequence[str], slots: int,
                 key_id: str = "") -> None:
        self.id = new_id("ses")
        self.env = env
        self.key_id = key_id  # the API key that opened it: revoking the key ends it
        self.worker_id = worker_id
        self.task_ids = tuple(sorted(set(task_ids)))
        self.slots = slots
        self.active: set[str] = set()  # lease ids held through this session
        self.outbox: asyncio.Queue[Push] = asyncio.Queue()
        self.closed = False
        self.last_seen = time.monotonic()
        # Wall times (the coordinator's clock), for people: ListWorkers.
        self.connected_at = clock.now()
        self.last_seen_at = self.connected_at

    def seen(self) -> None:
        self.last_seen = time.monotonic()
        self.last_seen_at = clock.now()

    @property
    def free(self) -> int:
        return max(0, self.slots - len(self.active))


class EngineBase:
    """State and helpers shared by the engine's parts (see the module docstring)."""

    def __init__(self, store: Store, config: EngineConfig | None = None) -> None:
        self.store = store
        self.config = config or EngineConfig()
        self._sessions: dict[str, Session] = {}
        self._lease_session: dict[str, Session] = {}  # lease id -> local session
        self._task_cache: dict[tuple[str, str], tuple[float, model.TaskDef | None]] = {}
        self._schemas = SchemaCache()
        self._wake = asyncio.Event()
        store.use_child_wait_rules(policy.child_wait_outcome, policy.counts_as_woken,
                                   self._wake.set)
        self.writes = writes.GroupCommit(store, self.config.max_write_batch,
                                         self.config.write_concurrency)
        self._loops: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[Any]] = set()
        # Set by begin_shutdown(): no new leases, and closing sessions keep theirs.
        self._closing = False

    def _runs_ready(self, env: str, task_id: str) -> None:
        """Runs of `task_id` in `env` became ready ("*": of any task, in any
        environment): wake the dispatcher if a session here has a free slot
        for them. Skipping the others loses nothing: every slot that frees,
        and every session that opens, wakes the dispatcher itself."""
        if self._wake.is_set():
            return
        for session in self._sessions.values():
            if (session.free and not session.closed
                    and (env == "*" or session.env == env)
                    and (task_id == "*" or task_id in session.task_ids)):
                self._wake.set()
                return

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def register_tasks(self, tasks: Sequence[model.TaskDef]) -> None:
        for task in tasks:
            if not task.id:
                raise errors.InvalidArgument("task id must not be empty")
            for schema in (task.payload_schema, task.output_schema):
                if schema:
                    self._schemas.check_schema(task.id, schema)
        await self.store.upsert_tasks(tasks)
        now = time.monotonic()
        for task in tasks:
            self._task_cache[(task.env, task.id)] = (now, task)

    async def _task(self, env: str, task_id: str) -> model.TaskDef | None:
        cached = self._task_cache.get((env, task_id))
        if cached is not None and time.monotonic() - cached[0] < TASK_CACHE_SECONDS:
            return cached[1]
        task = await self.store.get_task(env, task_id)
        self._task_cache[(env, task_id)] = (time.monotonic(), task)
        return task

    async def _new_run(self, env: str, spec: TriggerSpec, now: float) -> model.NewRun:
        validate.trigger_spec(spec)
        task = await self._task(env, spec.task_id)
        if task is None:
            raise errors.NotFound(
                f"task {spec.task_id!r} is not registered in environment {env!r}: "
                "start a worker that serves it first")
        payload = decode_json(spec.payload, "payload", MAX_PAYLOAD_BYTES)
        if task.payload_schema:
            self._schemas.validate(task.id, task.payload_schema, json.loads(payload))
        key = spec.idempotency_key or None
        run_at = now + max(0.0, spec.delay or 0.0)
        return model.NewRun(
            id=new_id("run"),
            env=env,
            task_id=task.id,
            payload=payload,
            queue=spec.queue or task.queue,
            retry=spec.retry or task.retry,
            priority=spec.priority,
            run_at=run_at,
            idempotency_key=key,
            idempotency_expires_at=(
                None if key is None else now + (spec.idempotency_ttl or DEFAULT_IDEMPOTENCY_TTL)),
            concurrency_key=spec.concurrency_key or None,
            tags=spec.tags,
            metadata=dict(spec.metadata),
            ttl=spec.ttl,
            # A TTL counts from run_at, so a delayed run gets all of it.
            expire_at=None if spec.ttl is None else run_at + spec.ttl,
            max_duration=spec.max_duration or task.max_duration,
        )

    def _forget_lease(self, lease_id: str) -> None:
        session = self._lease_session.pop(lease_id, None)
        if session is not None:
            session.active.discard(lease_id)

    def _tell_worker(self, run_id: str, lease_id: str, reason: str) -> None:
        """Push a cancel to the session holding the lease, if it is connected here."""
        session = self._lease_session.pop(lease_id, None)
        if session is not None:
            session.active.discard(lease_id)
            session.outbox.put_nowait(CancelPush(run_id=run_id, lease_id=lease_id, reason=reason))
            self._wake.set()

    def _state(self, state: bytes | None) -> str | None:
        if state is None:
            return None
        return decode_json(state, "state", MAX_STATE_BYTES)

    async def _lose_leases(
        self, refs: Sequence[model.LeaseRef], why: str, *, expired_before: float | None
    ) -> None:
        """Leases whose holder is gone: requeued with the attempt given back
        and the loss counted, up to the policy's bound (policy.lease_loss_transition).

        Each write is fenced by the owner read with the lease (and, for expiry,
        by the expiry), so a lease renewed or adopted meanwhile is left alone.
        """

        async def lose(ref: model.LeaseRef) -> None:
            transition = policy.lease_loss_transition(ref, why, now=clock.now())
            applied = await self._write(dataclasses.replace(
                transition, expect_owner=ref.lease_owner, expired_before=expired_before))
            if applied:
                log.warning("run %s: lease %s lost (%s); %d lost so far%s", ref.run_id,
                            ref.lease_id, why, ref.lease_losses + 1,
                            "" if transition.status is model.RunStatus.QUEUED
                            else ": the run FAILED")
                self._forget_lease(ref.lease_id)

        await asyncio.gather(*(lose(ref) for ref in refs))
        if refs:
            self._wake.set()

    async def _write(self, write: model.FencedWrite) -> bool:
        """Apply a fenced write in the next group commit; True if its lease was current."""
        return await self.writes.write(write)



def check_slots(slots: int) -> None:
    if not 0 <= slots <= MAX_SLOTS:
        raise errors.InvalidArgument(f"slots must be between 0 and {MAX_SLOTS}")


def decode_json(data: bytes, what: str, limit: int) -> str:
    """Check that `data` is one UTF-8 JSON document within `limit` bytes (validate.py)."""
    return validate.json_document(data, what, limit)

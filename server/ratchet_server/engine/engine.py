"""The engine: triggers, leases, checkpoints, completions, retries.

The engine owns every rule and state transition of DESIGN §3. It keeps only
soft state in memory (the sessions connected to this coordinator and what it
pushed to them); the store holds the truth, so any replica can take over.

Background loops, all started by `start()` and stopped by `stop()`:
- the dispatcher pushes ready runs to sessions with free slots, woken by
  triggers, freed slots, requeues and NOTIFY from other replicas, and by the
  next due `run_at` (retry backoff, delay);
- the timer loop requeues (or fails) runs whose lease expired, and fires
  sleeps, token timeouts, TTL, max duration and finished child waits;
- the writer applies fenced writes from many runs in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from ratchet import Retry
from ratchet_server import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, model
from ratchet_server.engine import errors, policy, timers, validate
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

    def seen(self) -> None:
        self.last_seen = time.monotonic()

    @property
    def free(self) -> int:
        return max(0, self.slots - len(self.active))


@dataclasses.dataclass(slots=True)
class _Pending:
    write: model.FencedWrite
    future: asyncio.Future[bool]


class Engine:
    def __init__(self, store: Store, config: EngineConfig | None = None) -> None:
        self.store = store
        self.config = config or EngineConfig()
        self._sessions: dict[str, Session] = {}
        self._lease_session: dict[str, Session] = {}  # lease id -> local session
        self._task_cache: dict[tuple[str, str], tuple[float, model.TaskDef | None]] = {}
        self._schemas = SchemaCache()
        self._wake = asyncio.Event()
        self._writes: asyncio.Queue[_Pending] = asyncio.Queue()
        self._loops: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self.reconciler = timers.Reconciler(store, settle=self.config.reconcile_settle)
        # Set by begin_shutdown(): no new leases, and closing sessions keep theirs.
        self._closing = False

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        await self.store.listen(lambda env: self._wake.set())
        for name, coro in (("dispatcher", self._dispatch_loop()),
                           ("writer", self._write_loop()), ("timers", self._timer_loop()),
                           ("retention", self._retention_loop()),
                           ("reconciler", self._reconcile_loop())):
            self._loops.append(asyncio.create_task(coro, name=f"ratchet-{name}"))

    async def stop(self) -> None:
        for handle in self._timers:
            handle.cancel()
        for task in [*self._loops, *self._background]:
            task.cancel()
        for task in [*self._loops, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- tasks --------------------------------------------------------------------

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

    # --- runs ---------------------------------------------------------------------

    async def trigger(
        self, env: str, specs: Sequence[TriggerSpec]
    ) -> list[tuple[model.Run, bool]]:
        """Validate and create runs, all or none. Raises before writing anything."""
        if not specs:
            raise errors.InvalidArgument("nothing to trigger")
        if len(specs) > MAX_BATCH:
            raise errors.ResourceExhausted(f"a batch holds at most {MAX_BATCH} runs")
        now = time.time()
        new_runs = [await self._new_run(env, spec, now) for spec in specs]
        results = await self.store.create_runs(new_runs)
        if any(created for _, created in results):
            self._wake.set()
        return results

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
        return model.NewRun(
            id=new_id("run"),
            env=env,
            task_id=task.id,
            payload=payload,
            queue=spec.queue or task.queue,
            retry=spec.retry or task.retry,
            priority=spec.priority,
            run_at=now + max(0.0, spec.delay or 0.0),
            idempotency_key=key,
            idempotency_expires_at=(
                None if key is None else now + (spec.idempotency_ttl or DEFAULT_IDEMPOTENCY_TTL)),
            concurrency_key=spec.concurrency_key or None,
            tags=spec.tags,
            metadata=dict(spec.metadata),
            ttl=spec.ttl,
            max_duration=spec.max_duration or task.max_duration,
        )

    async def get_run(self, env: str, run_id: str) -> tuple[model.Run, list[model.Step]]:
        run = await self.store.get_run(env, run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        return run, await self.store.get_steps(run_id)

    async def list_runs(
        self, flt: model.RunFilter, page_size: int, page_token: str
    ) -> tuple[list[model.Run], str]:
        validate.run_filter(flt)
        limit = min(max(page_size or 50, 1), 1000)
        cursor = validate.list_page_token(page_token)
        runs = await self.store.list_runs(flt, limit + 1, cursor)
        limit = min(limit, validate.fit_page(runs[:limit]))  # the reply stays under 16 MiB
        if len(runs) <= limit:
            return runs, ""
        last = runs[limit - 1]
        return runs[:limit], f"{last.created_at!r}|{last.id}"

    async def stuck_runs(self, env: str, limit: int) -> list[timers.StuckRun]:
        """What the reconciler would repair in `env` (read only). Runs changed
        in the last second are left out: a reader may see half of a
        transition that is still committing."""
        limit = min(max(limit or 100, 1), 1000)
        found = await timers.find_stuck(self.store, env=env, settle=1.0, limit=limit)
        return found[:limit]

    async def cancel(self, env: str, run_id: str, reason: str = "") -> model.Run:
        run = await self.store.cancel_run(env, run_id)
        if run is None:
            await self._refuse(env, run_id, "is already {status}")
        if run.lease_id and run.lease_owner:
            self._tell_worker(run.id, run.lease_id, reason or "canceled")
        # Unfinished children go too, and theirs.
        parents = [run.id]
        while parents:
            children = await self.store.cancel_children(parents.pop())
            for child in children:
                if child.lease_id and child.lease_owner:
                    self._tell_worker(child.id, child.lease_id, "the parent run was canceled")
                parents.append(child.id)
        return run

    def _tell_worker(self, run_id: str, lease_id: str, reason: str) -> None:
        """Push a cancel to the session holding the lease, if it is connected here."""
        session = self._lease_session.pop(lease_id, None)
        if session is not None:
            session.active.discard(lease_id)
            session.outbox.put_nowait(CancelPush(run_id=run_id, lease_id=lease_id, reason=reason))
            self._wake.set()

    # --- failed runs and history -------------------------------------------------

    async def history(
        self, env: str, run_id: str, page_size: int, page_token: str
    ) -> tuple[list[dict[str, Any]], str]:
        """A run's history, oldest first, a page at a time."""
        if await self.store.get_run(env, run_id) is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        after = validate.history_page_token(page_token)
        limit = min(max(page_size or 200, 1), 1000)
        events = await self.store.get_events_page(run_id, after, limit + 1)
        if len(events) <= limit:
            return events, ""
        return events[:limit], str(events[limit - 1]["id"])

    async def replay(self, env: str, run_id: str, *, from_scratch: bool) -> model.Run:
        """A new attempt from the last checkpoint, or a new linked run from scratch."""
        run = await self.store.get_run(env, run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        if from_scratch:
            return await self._rerun(run, run.payload.encode("utf-8"), "replayed from scratch")
        if run.status is model.RunStatus.COMPLETED or not run.status.is_final:
            raise errors.FailedPrecondition(
                f"run {run_id!r} is {run.status.value}: only a run that ended without "
                "completing can be replayed from its last checkpoint")
        # The task's current policy (its fixed code may have changed it), with a
        # fresh budget counted from the attempts already made.
        task = await self._task(env, run.task_id)
        policy = task.retry if task is not None else run.retry
        budget = dataclasses.replace(policy, max_attempts=run.attempt + policy.max_attempts)
        replayed = await self.store.replay_run(env, run_id, budget)
        if replayed is None:
            raise errors.FailedPrecondition(f"run {run_id!r} changed meanwhile; try again")
        self._wake.set()
        return replayed

    async def discard(self, env: str, run_id: str) -> model.Run:
        """Hide a final run from listings; its data stays until retention."""
        run = await self.store.discard_run(env, run_id)
        if run is None:
            await self._refuse(env, run_id, "is {status}: only a final run can be discarded")
        return run

    async def _refuse(self, env: str, run_id: str, why: str) -> typing.NoReturn:
        """An operation changed nothing: NOT_FOUND, or FAILED_PRECONDITION saying why."""
        existing = await self.store.get_run(env, run_id)
        if existing is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        raise errors.FailedPrecondition(
            f"run {run_id!r} " + why.format(status=existing.status.value))

    async def retry_with_payload(self, env: str, run_id: str, payload: bytes) -> model.Run:
        """A new run of the same task with a corrected payload, linked to the old one."""
        run = await self.store.get_run(env, run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        return await self._rerun(run, payload, "retried with a new payload")

    async def _rerun(self, old: model.Run, payload: bytes, why: str) -> model.Run:
        spec = TriggerSpec(task_id=old.task_id, payload=payload, priority=old.priority,
                           tags=old.tags, metadata=old.metadata)
        new = dataclasses.replace(await self._new_run(old.env, spec, time.time()),
                                  replay_of=old.id)
        [(run, _)] = await self.store.create_runs([new])
        now = time.time()
        await self.store.append_events([
            model.Event(run_id=old.id, type=model.EventType.REPLAYED, at=now,
                        attempt=old.attempt, data=json.dumps({"new_run_id": run.id, "why": why})),
            model.Event(run_id=run.id, type=model.EventType.REPLAYED, at=now,
                        data=json.dumps({"replay_of": old.id, "why": why})),
        ])
        self._wake.set()
        return run

    # --- sessions -----------------------------------------------------------------

    async def open_session(
        self,
        env: str,
        worker_id: str,
        tasks: Sequence[model.TaskDef],
        slots: int,
        active_lease_ids: Sequence[str],
        *,
        protocol_version: int = PROTOCOL_VERSION,
        key_id: str = "",
    ) -> tuple[Session, list[str]]:
        """Register the worker's tasks, adopt its surviving leases, start pushing."""
        if protocol_version and protocol_version < MIN_PROTOCOL_VERSION:
            raise errors.FailedPrecondition(
                f"protocol version {protocol_version} is no longer supported; "
                f"this coordinator speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}")
        check_slots(slots)
        ids = [t.id for t in tasks]
        if len(set(ids)) != len(ids):
            raise errors.InvalidArgument("a task id appears twice in hello")
        await self.register_tasks(tasks)
        session = Session(env, worker_id, [t.id for t in tasks], slots, key_id)
        adopted: list[str] = []
        if active_lease_ids:
            adopted = await self.store.adopt_leases(
                env, list(active_lease_ids), session.id, self.config.lease_ttl)
            for lease_id in adopted:
                session.active.add(lease_id)
                self._lease_session[lease_id] = session
        self._sessions[session.id] = session
        log.info("session %s opened: worker %s, env %s, tasks %s, slots %d, adopted %d",
                 session.id, worker_id, env, ",".join(session.task_ids), slots, len(adopted))
        self._wake.set()
        return session, adopted

    def open_sessions(self) -> list[Session]:
        """The sessions connected to this coordinator now."""
        return list(self._sessions.values())

    def begin_shutdown(self) -> None:
        """This coordinator is stopping: lease nothing more, and leave the
        leases of the sessions that close to their workers, which reconnect
        (here after a restart, or to another replica) and adopt them; a lease
        nobody adopts is lost after the lease TTL, like a crashed coordinator's."""
        self._closing = True

    def end_sessions(self, reason: str) -> int:
        """Ask every open session's stream to end (the servicer ends it
        UNAVAILABLE); how many were open."""
        sessions = self.open_sessions()
        for session in sessions:
            session.outbox.put_nowait(EndPush(reason))
        return len(sessions)

    def close_session(self, session: Session) -> None:
        """The stream ended. Its leases are released after the grace period,
        unless the worker reconnected and adopted them by then (or this
        coordinator is shutting down: then they are not released at all)."""
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.id, None)
        for lease_id in session.active:
            if self._lease_session.get(lease_id) is session:
                del self._lease_session[lease_id]
        if self._closing:
            log.info("session %s closed by the coordinator's shutdown; its %d lease(s) stay "
                     "with the worker to adopt when it reconnects (lost after the lease TTL, "
                     "%.0fs, if it does not)", session.id, len(session.active),
                     self.config.lease_ttl)
            return
        log.info("session %s closed; its %d lease(s) are released in %.1fs unless the worker "
                 "reconnects and adopts them", session.id, len(session.active),
                 self.config.session_grace)
        # Leases pushed to the session but never sent: the worker never saw
        # them, so they go back without costing an attempt.
        while not session.outbox.empty():
            push = session.outbox.get_nowait()
            if isinstance(push, LeasePush) and push.leased.run.lease_id:
                self._spawn(self._give_back(push.leased.run.id, push.leased.run.lease_id,
                                            session.id))
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            self._spawn(self._release_session(session.id))

        handle = loop.call_later(self.config.session_grace, fire)
        self._timers.add(handle)

    async def _release_session(self, session_id: str) -> None:
        refs = await self.store.owned_leases(session_id)
        await self._lose_leases(refs, "the worker's session closed", expired_before=None)

    async def _give_back(self, run_id: str, lease_id: str, owner: str) -> None:
        write = model.RunTransition(
            run_id=run_id, lease_id=lease_id, status=model.RunStatus.QUEUED,
            run_at=time.time(), refund_attempt=True, expect_owner=owner,
            events=(model.Event(run_id=run_id, type=model.EventType.LEASE_RELEASED,
                                at=time.time(), lease_id=lease_id,
                                data=json.dumps({"reason": "never delivered"})),))
        if await self._write(write):
            self._forget_lease(lease_id)
            self._wake.set()

    async def heartbeat(self, session: Session, lease_ids: Sequence[str]) -> None:
        """Renew the leases the worker says it is executing (only those)."""
        session.seen()
        if lease_ids:
            await self.store.renew_leases(session.id, lease_ids, self.config.lease_ttl)

    def set_slots(self, session: Session, slots: int) -> None:
        check_slots(slots)
        session.slots = slots
        self._wake.set()

    # --- progress under a lease -----------------------------------------------------

    async def checkpoint(
        self,
        session: Session,
        *,
        run_id: str,
        lease_id: str,
        key: str,
        kind: model.StepKind,
        event: model.StepEvent,
        attempt: int,
        retry_base: int,
        output: bytes | None,
        error: model.ErrorInfo | None,
        started_at: float | None,
        finished_at: float | None,
        state: bytes | None,
        wake_at: float | None = None,
        token_id: str | None = None,
        retry_at: float | None = None,
        wake_after: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Record a step event; returns once committed. Raises StaleLease.

        `wake_after` / `retry_after` are durations: the due time is counted on
        this coordinator's clock. `wake_at` / `retry_at` (absolute, on the
        worker's clock) are honoured only from workers that send no duration."""
        if kind is model.StepKind.TOKEN and event is model.StepEvent.STARTED and not token_id:
            raise errors.InvalidArgument("a token step needs a token_id")
        if not key:
            raise errors.InvalidArgument("step_key must not be empty")
        if attempt < 1:
            raise errors.InvalidArgument("attempt is 1-based")
        out = None
        if event is model.StepEvent.COMPLETED:
            out = decode_json(output or b"null", "output", MAX_PAYLOAD_BYTES)
        elif event in (model.StepEvent.RETRYING, model.StepEvent.FAILED) and error is None:
            raise errors.InvalidArgument(f"a {event.value} checkpoint needs an error")
        status = {
            model.StepEvent.STARTED: model.StepStatus.RUNNING,
            model.StepEvent.RETRYING: model.StepStatus.RUNNING,
            model.StepEvent.COMPLETED: model.StepStatus.COMPLETED,
            model.StepEvent.FAILED: model.StepStatus.FAILED,
        }[event]
        event_type = {
            model.StepEvent.STARTED: None,
            model.StepEvent.RETRYING: model.EventType.STEP_RETRYING,
            model.StepEvent.COMPLETED: model.EventType.STEP_COMPLETED,
            model.StepEvent.FAILED: model.EventType.STEP_FAILED,
        }[event]
        write = model.StepWrite(
            run_id=run_id, lease_id=lease_id, key=key, kind=kind, status=status,
            attempt=attempt, retry_base=retry_base, output=out, error=error,
            started_at=started_at,
            finished_at=finished_at if status is not model.StepStatus.RUNNING else None,
            state=self._state(state),
            wake_at=_wake_at(kind, event, _due(wake_after, wake_at),
                             _due(retry_after, retry_at)),
            token_id=token_id or None,
            env=session.env, owner=session.id,
            events=() if event_type is None else (model.Event(
                run_id=run_id, type=event_type, at=time.time(),
                attempt=attempt, lease_id=lease_id, step_key=key,
                data=None if error is None else json.dumps(
                    {"type": error.type, "message": error.message})),),
        )
        if not await self._write(write):
            self._forget_lease(lease_id)
            raise errors.StaleLease(
                f"lease {lease_id!r} of run {run_id!r} is no longer current")

    async def complete_success(
        self, session: Session, *, run_id: str, lease_id: str, output: bytes,
        state: bytes | None,
    ) -> None:
        out = decode_json(output or b"null", "output", MAX_PAYLOAD_BYTES)
        now = time.time()
        write = model.RunTransition(
            run_id=run_id, lease_id=lease_id, status=model.RunStatus.COMPLETED, output=out,
            state=self._state(state), env=session.env, expect_owner=session.id,
            events=(model.Event(run_id=run_id, type=model.EventType.FINISHED, at=now,
                                lease_id=lease_id, data=json.dumps({"status": "COMPLETED"})),))
        await self._finish(session, write, model.RunStatus.COMPLETED)

    async def complete_suspended(
        self, session: Session, *, run_id: str, lease_id: str, step_keys: Sequence[str],
        state: bytes | None,
    ) -> None:
        """Every branch of the run waits: WAITING, no slot held, until a wait completes."""
        if not step_keys:
            raise errors.InvalidArgument("a suspended outcome names the wait steps")
        write = model.RunTransition(
            run_id=run_id, lease_id=lease_id, status=model.RunStatus.WAITING,
            state=self._state(state), waiting_on=tuple(step_keys),
            # Waiting is not failing: the resume continues the same attempt.
            refund_attempt=True, env=session.env, expect_owner=session.id,
            wake_rule=policy.counts_as_woken,
            events=(model.Event(run_id=run_id, type=model.EventType.SUSPENDED, at=time.time(),
                                lease_id=lease_id,
                                data=json.dumps({"waiting_on": list(step_keys)})),))
        await self._finish(session, write, model.RunStatus.WAITING)

    async def complete_token(self, env: str, token_id: str, data: bytes) -> tuple[bool, str, str]:
        """Deliver data to a waiting token; (completed, run id, why not)."""
        text = decode_json(data or b"null", "data", MAX_PAYLOAD_BYTES)
        found = await self.store.find_token(env, token_id)
        if found is None:
            raise errors.NotFound(f"token {token_id!r} not found")
        step, run_status = found
        if run_status.is_final:
            return False, step.run_id, f"the run is already {run_status.value}; nothing changed"
        if step.status is model.StepStatus.RUNNING:
            [done] = await self.store.resolve_waits(
                [policy.token_outcome(step, text, time.time())], policy.counts_as_woken)
            if done:
                self._wake.set()
                return True, step.run_id, ""
            # Timed out or completed by someone else meanwhile: say which.
            found = await self.store.find_token(env, token_id)
            assert found is not None
            step = found[0]
        why = "timed out" if step.status is model.StepStatus.FAILED else "already completed"
        return False, step.run_id, f"the token was {why}; nothing changed"

    async def trigger_children(
        self, session: Session, *, run_id: str, lease_id: str, step_key: str,
        specs: Sequence[TriggerSpec], wait: bool,
    ) -> list[str]:
        """Start a step's child runs, once per (parent, step key); their ids."""
        if not step_key:
            raise errors.InvalidArgument("step_key must not be empty")
        if not specs:
            raise errors.InvalidArgument("no children to trigger")
        if len(specs) > MAX_BATCH:
            raise errors.ResourceExhausted(f"at most {MAX_BATCH} children per step")
        now = time.time()
        # Children are created once per (parent, step key) already; an
        # idempotency key of their own would only collide.
        children = [dataclasses.replace(await self._new_run(session.env, spec, now),
                                        parent_run_id=run_id, parent_step_key=step_key,
                                        child_index=i, idempotency_key=None,
                                        idempotency_expires_at=None)
                    for i, spec in enumerate(specs)]
        ids = await self.store.create_children(parent=run_id, lease_id=lease_id,
                                               step_key=step_key, children=children, wait=wait)
        if ids is None:
            self._forget_lease(lease_id)
            raise errors.StaleLease(f"lease {lease_id!r} of run {run_id!r} is no longer current")
        self._wake.set()
        return ids

    async def complete_failure(
        self, session: Session, *, run_id: str, lease_id: str, error: model.ErrorInfo,
        state: bytes | None, retry_at: float | None = None, retry_after: float | None = None,
    ) -> None:
        """End a failed attempt. `retry_after` (a duration, counted on this
        coordinator's clock) or, from older workers, `retry_at` (absolute, on
        the worker's clock) replaces the policy's backoff."""
        retry_at = _due(retry_after, retry_at)
        ref = await self.store.get_lease(run_id, lease_id)
        expect = model.RunStatus.RUNNING
        if ref is None:
            run = await self.store.get_run(session.env, run_id)
            if run is None or not policy.lost_before_its_report(run, lease_id):
                await self._check_already_finished(session, run_id, lease_id,
                                                   model.RunStatus.FAILED)
                return
            # The reaper requeued the run a moment before the worker's own
            # failure arrived: the worker's error (and its non_retryable flag)
            # decides, not the guess "lease lost".
            ref = model.LeaseRef(run_id=run.id, lease_id=lease_id, attempt=run.attempt,
                                 retry=run.retry, lease_owner=None)
            expect = model.RunStatus.QUEUED
        write = dataclasses.replace(
            self._failure_transition(ref, error, state=self._state(state), immediate=False,
                                     retry_at=retry_at),
            env=session.env, expect_status=expect,
            expect_owner=session.id if expect is model.RunStatus.RUNNING else None)
        await self._finish(session, write, write.status)

    async def release(self, session: Session, *, run_id: str, lease_id: str,
                      reason: str = "") -> None:
        """Give a run back without counting the attempt (a draining worker, or
        a session whose API key was revoked)."""
        write = model.RunTransition(
            run_id=run_id, lease_id=lease_id, status=model.RunStatus.QUEUED,
            run_at=time.time(), refund_attempt=True, env=session.env, expect_owner=session.id,
            events=(model.Event(run_id=run_id, type=model.EventType.LEASE_RELEASED,
                                at=time.time(), lease_id=lease_id,
                                data=json.dumps({"reason": reason}) if reason else None),))
        await self._finish(session, write, model.RunStatus.QUEUED)

    async def _finish(
        self, session: Session, write: model.RunTransition, status: model.RunStatus
    ) -> None:
        applied = await self._write(write)
        self._forget_lease(write.lease_id)
        self._wake.set()
        if not applied:
            await self._check_already_finished(session, write.run_id, write.lease_id, status)

    async def _check_already_finished(
        self, session: Session, run_id: str, lease_id: str, status: model.RunStatus
    ) -> None:
        """A resent completion (after a reconnect) whose first copy was committed is fine."""
        # Either way the lease is over for this session: its slot is free.
        self._forget_lease(lease_id)
        run = await self.store.get_run(session.env, run_id)
        if run is not None and run.lease_id == lease_id and (
            run.status is status
            or (status in (model.RunStatus.FAILED, model.RunStatus.WAITING)
                and run.status is model.RunStatus.QUEUED)
        ):
            return
        raise errors.StaleLease(f"lease {lease_id!r} of run {run_id!r} is no longer current")

    def _failure_transition(
        self, ref: model.LeaseRef, error: model.ErrorInfo, *, state: str | None,
        immediate: bool, retry_at: float | None = None,
    ) -> model.RunTransition:
        """Apply the run's retry policy to a failed attempt (DESIGN §7). A
        `retry_at` from the worker (catch_error) replaces the policy's backoff."""
        now = time.time()
        error = dataclasses.replace(error, attempt=error.attempt or ref.attempt)
        if not error.non_retryable and ref.retry.allows_another(ref.attempt):
            delay = 0.0 if immediate else ref.retry.delay_after(ref.attempt)
            if retry_at is not None:
                delay = max(0.0, retry_at - now)
            return model.RunTransition(
                run_id=ref.run_id, lease_id=ref.lease_id, status=model.RunStatus.QUEUED,
                error=error, state=state, run_at=now + delay,
                events=(model.Event(
                    run_id=ref.run_id, type=model.EventType.RETRY_SCHEDULED, at=now,
                    attempt=ref.attempt, lease_id=ref.lease_id,
                    data=json.dumps({"delay": delay, "error": error.type,
                                     "message": error.message})),))
        return model.RunTransition(
            run_id=ref.run_id, lease_id=ref.lease_id, status=model.RunStatus.FAILED,
            error=error, state=state,
            events=(model.Event(
                run_id=ref.run_id, type=model.EventType.FINISHED, at=now, attempt=ref.attempt,
                lease_id=ref.lease_id,
                data=json.dumps({"status": "FAILED", "error": error.type,
                                 "message": error.message})),))

    async def _lose_leases(
        self, refs: Sequence[model.LeaseRef], why: str, *, expired_before: float | None
    ) -> None:
        """Leases whose holder is gone: the attempt counts as failed (DESIGN §3).

        Each write is fenced by the owner read with the lease (and, for expiry,
        by the expiry), so a lease renewed or adopted meanwhile is left alone.
        """

        async def lose(ref: model.LeaseRef) -> None:
            error = model.ErrorInfo(type=policy.LEASE_LOST, message=why, attempt=ref.attempt)
            transition = self._failure_transition(ref, error, state=None, immediate=True)
            lost = model.Event(run_id=ref.run_id, type=model.EventType.LEASE_LOST,
                               at=time.time(), attempt=ref.attempt, lease_id=ref.lease_id,
                               data=json.dumps({"reason": why}))
            applied = await self._write(dataclasses.replace(
                transition, events=(lost, *transition.events), expect_owner=ref.lease_owner,
                expired_before=expired_before))
            if applied:
                log.warning("run %s: lease %s lost (%s)", ref.run_id, ref.lease_id, why)
                self._forget_lease(ref.lease_id)

        await asyncio.gather(*(lose(ref) for ref in refs))
        if refs:
            self._wake.set()

    def _forget_lease(self, lease_id: str) -> None:
        session = self._lease_session.pop(lease_id, None)
        if session is not None:
            session.active.discard(lease_id)

    def _state(self, state: bytes | None) -> str | None:
        if state is None:
            return None
        return decode_json(state, "state", MAX_STATE_BYTES)

    # --- group commit -------------------------------------------------------------

    async def _write(self, write: model.FencedWrite) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._writes.put_nowait(_Pending(write, future))
        return await future

    async def _write_loop(self) -> None:
        """Group commit: whatever is queued goes in one transaction; up to
        `write_concurrency` transactions are in flight, so a slow commit does
        not hold back the next batch. A run has at most one write in flight
        (its worker awaits each acknowledgement), so batches rarely touch the
        same rows; the store retries the rare deadlock."""
        slots = asyncio.Semaphore(self.config.write_concurrency)
        while True:
            first = await self._writes.get()
            await slots.acquire()
            batch = [first]
            while not self._writes.empty() and len(batch) < self.config.max_write_batch:
                batch.append(self._writes.get_nowait())
            task = asyncio.create_task(self._commit(batch))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = await self.store.apply([p.write for p in batch])
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        except Exception as exc:
            log.exception("group commit of %d writes failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, ok in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(ok)

    # --- dispatcher and timers -----------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                more, next_due = await self._dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatch failed; retrying")
                more, next_due = False, time.time() + 0.5
            if more:
                continue
            timeout = 1.0 if next_due is None else min(1.0, max(0.005, next_due - time.time()))
            # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that
            # arrives as the event fires, and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _dispatch_once(self) -> tuple[bool, float | None]:
        if self._closing:
            return False, None
        more = False
        next_due: float | None = None
        # A session silent for two heartbeat intervals may belong to a stopped
        # process: lease nothing to it until it speaks again.
        silent_after = time.monotonic() - 2 * self.config.heartbeat_interval
        for session in list(self._sessions.values()):
            if session.closed or session.free == 0 or not session.task_ids:
                continue
            if session.last_seen < silent_after:
                continue
            want = session.free
            leased = await self.store.lease_ready(
                env=session.env, task_ids=session.task_ids, limit=want, owner=session.id,
                nonce=secrets.token_hex(6), ttl=self.config.lease_ttl)
            if session.closed:
                # Closed while we leased: the grace timer will release these.
                continue
            for item in leased:
                assert item.run.lease_id is not None
                session.active.add(item.run.lease_id)
                self._lease_session[item.run.lease_id] = session
                session.outbox.put_nowait(LeasePush(item))
            if len(leased) == want:
                more = True
            elif not leased:
                due = await self.store.next_run_at(session.env, session.task_ids)
                if due is not None and (next_due is None or due < next_due):
                    next_due = due
        return more, next_due

    async def _retention_loop(self) -> None:
        """Delete finished runs past the retention period, in small batches."""
        if self.config.retention is None:
            return
        while True:
            try:
                deleted = await self._retention_loop_body()
                if deleted:
                    log.info("retention: deleted %d finished run(s)", deleted)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention failed; retrying")
            await asyncio.sleep(self.config.retention_interval)

    async def _reconcile_loop(self) -> None:
        """The safety net under every wake-up path (DESIGN §3)."""
        if not self.config.reconcile_interval:
            return
        while True:
            await asyncio.sleep(self.config.reconcile_interval)
            try:
                if await self.reconciler.tick():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciler failed; retrying")

    async def _timer_loop(self) -> None:
        """Every due time that needs an action goes through here: lease
        expiry, sleeps, token timeouts, TTL, max duration, and child-run waits
        whose children have all finished. (Delays and retry backoff need no
        action: a run is ready once its run_at has passed, and the dispatcher
        wakes for the next one.) Each is claimed in the database, with SKIP
        LOCKED on Postgres, so with several coordinators each fires once, and
        none is lost when a coordinator restarts."""
        interval = min(self.config.timer_interval, self.config.reap_interval,
                       self.config.lease_ttl / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                refs = await self.store.expired_leases(limit=200)
                if refs:
                    await self._lose_leases(refs, "the lease expired without a heartbeat",
                                            expired_before=time.time())
                if await timers.fire_due_timers(self.store, limit=500):
                    self._wake.set()
                if await timers.finish_child_waits(self.store, limit=500):
                    self._wake.set()
                await self.store.expire_runs(limit=500)
                for ref in await self.store.time_out_runs(500, policy.MAX_DURATION_EXCEEDED):
                    self._tell_worker(ref.run_id, ref.lease_id,
                                      "the run exceeded its max duration")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timers failed; retrying")


    async def _retention_loop_body(self) -> int:
        assert self.config.retention is not None
        cutoff = time.time() - self.config.retention
        deleted = 0
        while True:
            n = await self.store.delete_finished(cutoff, self.config.retention_batch)
            deleted += n
            if n < self.config.retention_batch:
                return deleted
            await asyncio.sleep(0)  # small batches: let other work in between


# A wait a worker asks for may be long (sleep_until a date), not absurd: the
# due time must stay a valid timestamp (the same bound as a trigger's delay).
MAX_WAIT_SECONDS = 10 * 365.25 * 24 * 3600.0


def _due(after: float | None, at: float | None) -> float | None:
    """A due time on the coordinator's clock from a worker's duration (DESIGN
    §3: a worker whose clock is off must not move a wake-up); `at`, an
    absolute time from a worker older than the duration fields, otherwise."""
    if after is None:
        return at
    if not 0.0 <= after <= MAX_WAIT_SECONDS:  # also refuses NaN
        raise errors.InvalidArgument(
            f"a wait must be between 0 and {MAX_WAIT_SECONDS:.0f}s (10 years); got {after:g}s")
    return time.time() + after


def _wake_at(kind: model.StepKind, event: model.StepEvent, wake_at: float | None,
             retry_at: float | None) -> float | None:
    """When the timers must act on a step: a wait's end (sleep due, token
    timeout), or a retrying step's next attempt (to wake a run that suspended
    for its backoff). Nothing for other steps."""
    if event is model.StepEvent.STARTED and kind in (model.StepKind.SLEEP,
                                                      model.StepKind.TOKEN):
        return wake_at
    if event is model.StepEvent.RETRYING:
        return retry_at
    return None


def check_slots(slots: int) -> None:
    if not 0 <= slots <= MAX_SLOTS:
        raise errors.InvalidArgument(f"slots must be between 0 and {MAX_SLOTS}")


def decode_json(data: bytes, what: str, limit: int) -> str:
    """Check that `data` is one UTF-8 JSON document within `limit` bytes (validate.py)."""
    return validate.json_document(data, what, limit)

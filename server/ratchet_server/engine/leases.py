"""Progress under a lease: checkpoints, completions, suspension, child
runs, release. Every write is fenced by the lease id, the environment and
the session holding the lease; a stale one raises StaleLease.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

from ratchet_server import clock, model
from ratchet_server.engine import core, errors, policy, validate
from ratchet_server.engine.core import (
    MAX_BATCH,
    MAX_PAYLOAD_BYTES,
    Session,
    TriggerSpec,
    decode_json,
)

log = logging.getLogger("ratchet.engine")

def _due(after: float | None, at: float | None) -> float | None:
    """A due time on the coordinator's clock from a worker's duration (DESIGN
    §3: a worker whose clock is off must not move a wake-up); `at`, an
    absolute time from a worker older than the duration fields, otherwise."""
    if after is None:
        return at
    validate.duration(after, "a wait")
    return clock.now() + after


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


class LeasesMixin(core.EngineBase):
    """The WorkerService writes."""

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
                run_id=run_id, type=event_type, at=clock.now(),
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
        now = clock.now()
        write = model.RunTransition(
            run_id=run_id, lease_id=lease_id, status=model.RunStatus.COMPLETED, output=out,
            # A COMPLETED run carries no error, whatever earlier attempts hit.
            clear_error=True, finishing=False,
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
            refund_attempt=True, env=session.env, expect_owner=session.id, finishing=False,
            wake_rule=policy.counts_as_woken,
            events=(model.Event(run_id=run_id, type=model.EventType.SUSPENDED, at=clock.now(),
                                lease_id=lease_id,
                                data=json.dumps({"waiting_on": list(step_keys)})),))
        await self._finish(session, write, model.RunStatus.WAITING)

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
        now = clock.now()
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
        write = await self._failure_write(session, run_id, lease_id, error, state, retry_at)
        if write is None:
            await self._check_already_finished(session, run_id, lease_id,
                                               model.RunStatus.FAILED)
            return
        applied = await self._write(write)
        if not applied and not write.undo_lease_loss:
            # The reaper may have taken the lease back between the read above
            # and this write: then the late path below decides, as it would
            # have had the report come a moment later.
            late = await self._failure_write(session, run_id, lease_id, error, state, retry_at)
            if late is not None and late.undo_lease_loss:
                write, applied = late, await self._write(late)
        await self._finish(session, write, write.status, applied=applied)

    async def _failure_write(
        self, session: Session, run_id: str, lease_id: str, error: model.ErrorInfo,
        state: bytes | None, retry_at: float | None,
    ) -> model.RunTransition | None:
        """The write that records a failed attempt under `lease_id`: fenced on
        the lease still being held, or, when the reaper has just requeued the
        run under that lease, on the run still waiting unleased (None when
        neither holds)."""
        ref = await self.store.get_lease(run_id, lease_id)
        expect = model.RunStatus.RUNNING
        late = False
        if ref is None:
            run = await self.store.get_run(session.env, run_id)
            if run is None or not policy.lost_before_its_report(run, lease_id):
                return None
            # The reaper requeued the run a moment before the worker's own
            # failure arrived: the worker's error (and its non_retryable flag)
            # decides, not the guess "lease lost". The guess is taken back
            # whole: the loss is not counted, the attempt it gave back is
            # charged again, and a final error it set is cleared (unless the
            # lost lease was itself a finishing lease).
            ref = model.LeaseRef(
                run_id=run.id, lease_id=lease_id, attempt=run.attempt + 1, retry=run.retry,
                lease_owner=None, lease_losses=run.lease_losses - 1,
                final_error=run.final_error if policy.lost_lease_was_finishing(run) else None)
            expect = model.RunStatus.QUEUED
            late = True
        now = clock.now()
        if ref.final_error is not None:
            write = policy.finishing_outcome(run_id, lease_id, ref.attempt, ref.final_error,
                                             "Failed", state=self._state(state), now=now)
        else:
            write = dataclasses.replace(
                policy.failure_transition(ref, error, state=self._state(state),
                                          immediate=False, now=now, retry_at=retry_at),
                finishing=None if late else False, clear_final_error=late)
        return dataclasses.replace(
            write, env=session.env, expect_status=expect, undo_lease_loss=late,
            expect_owner=session.id if expect is model.RunStatus.RUNNING else None)

    async def release(self, session: Session, *, run_id: str, lease_id: str,
                      reason: str = "") -> None:
        """Give a run back without counting the attempt (a draining worker, or
        a session whose API key was revoked)."""
        write = model.RunTransition(
            run_id=run_id, lease_id=lease_id, status=model.RunStatus.QUEUED,
            run_at=clock.now(), refund_attempt=True, env=session.env, expect_owner=session.id,
            events=(model.Event(run_id=run_id, type=model.EventType.LEASE_RELEASED,
                                at=clock.now(), lease_id=lease_id,
                                data=json.dumps({"reason": reason}) if reason else None),))
        await self._finish(session, write, model.RunStatus.QUEUED)

    async def _finish(
        self, session: Session, write: model.RunTransition, status: model.RunStatus,
        *, applied: bool | None = None,
    ) -> None:
        """After an outcome's write (made here unless `applied` says how it went)."""
        if applied is None:
            applied = await self._write(write)
        if not applied and write.finishing is False:
            applied = await self._finish_finishing(session, write, status)
        self._forget_lease(write.lease_id)
        self._wake.set()
        if not applied:
            await self._check_already_finished(session, write.run_id, write.lease_id, status)

    async def _finish_finishing(
        self, session: Session, write: model.RunTransition, status: model.RunStatus
    ) -> bool:
        """An outcome fenced as an ordinary lease's found the lease still held
        but finishing (LeaseGrant.final_error): the run ends FAILED with its
        final error, whatever was reported. Rare, so it costs a read only here."""
        ref = await self.store.get_lease(write.run_id, write.lease_id)
        if ref is None or ref.final_error is None or ref.lease_owner != session.id:
            return False
        reported = {model.RunStatus.COMPLETED: "Succeeded",
                    model.RunStatus.WAITING: "Suspended"}.get(status, "Failed")
        return await self._write(dataclasses.replace(
            policy.finishing_outcome(write.run_id, write.lease_id, ref.attempt, ref.final_error,
                                     reported, state=write.state, now=clock.now()),
            env=session.env, expect_owner=session.id))

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
            # a finishing lease ends FAILED whatever its worker reported
            or (run.status is model.RunStatus.FAILED and run.final_error is not None)
        ):
            return
        raise errors.StaleLease(f"lease {lease_id!r} of run {run_id!r} is no longer current")

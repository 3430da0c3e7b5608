"""One lease, from grant to outcome.

An `Execution` is made for each lease the coordinator pushes. It builds the
run's `Context` from the snapshot, runs the task's function until it
returns, fails, or suspends (every branch blocked on a durable wait: the
task is stopped and the keys it waits on are reported), lets the
`catch_error` and `on_failure` hooks act on a failure, and reports the
outcome through the session until the coordinator has recorded it. Canceled
while the worker drains, it gives the run back; on a lost lease it stops.

The session (`_session.py`) owns the asyncio task an execution runs in and
the table of executions; the durable calls themselves are `_context.py`
(the API) over `_steps.py` (keys, checkpoints, retries, suspension).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable
from typing import Any

from ratchet import _context, _process, _saga
from ratchet._codec import (
    duration,
    error_from_exception,
    error_from_pb,
    error_to_pb,
    timestamp,
)
from ratchet._context import Context
from ratchet._errors import LeaseLostError, RatchetError, WriteRefusedError
from ratchet._session import RELEASE_TIMEOUT, Session
from ratchet._task import Task
from ratchet._types import RunError
from ratchet.v1 import worker_pb2

log = logging.getLogger("ratchet.worker")


class Execution:
    """The execution of one run under one lease (one run attempt, or part of
    one when it suspends)."""

    def __init__(
        self,
        grant: worker_pb2.LeaseGrant,
        definition: Task[Any, Any] | None,
        session: Session,
        *,
        threads: concurrent.futures.Executor | None,
        processes: _process.ProcessPool | None,
        sleep_threshold: float,
    ) -> None:
        self.lease_id = grant.lease_id
        self.run_id = grant.run_id
        # The task's declaration; None when this worker does not serve it.
        self.definition = definition
        self.ctx: Context | None = None
        # The asyncio task this runs in (set by the session).
        self.task: asyncio.Task[None] | None = None
        # A cancel then means: give the run back (the worker is draining).
        self.release_on_cancel = False
        # Read as the grant arrives: the coordinator's clock minus ours.
        self.clock_offset = grant.sent_at.ToNanoseconds() / 1e9 - time.time() \
            if grant.HasField("sent_at") else 0.0
        self._grant = grant
        self._session = session
        self._threads = threads
        self._processes = processes
        self._sleep_threshold = sleep_threshold

    def cancel(self, reason: str) -> None:
        """The coordinator canceled the run: stop its task function."""
        if self.task is None:
            return
        log.info("run %s canceled by the coordinator: %s", self.run_id, reason)
        if self.ctx is not None:
            self.ctx._cancel()
        self.task.cancel()

    async def run(self) -> None:
        """Run the task under this lease and report its outcome, or give the run back."""
        grant = self._grant
        lease_id, run_id = self.lease_id, self.run_id
        journal = _LeaseJournal(self._session, lease_id)
        try:
            if self.release_on_cancel:
                raise asyncio.CancelledError
            task = self.definition
            snapshot = grant.snapshot
            ctx = Context(run_id=run_id, task_id=grant.task_id, attempt=grant.attempt,
                          lease_id=lease_id, steps={s.key: s for s in snapshot.steps},
                          state=json.loads(snapshot.state) if snapshot.state else {},
                          journal=journal, executor=self._threads,
                          sleep_threshold=self._sleep_threshold, processes=self._processes,
                          clock_offset=self.clock_offset,
                          rerun_failed_steps=grant.retry.rerun_failed_steps)
            # The code runs again from the top: ctx.state starts as it was
            # there ({}) and each completed step the replay passes restores
            # the state saved with it (Context._replayed). The stored document
            # above stays what a change is compared with before it is sent.
            ctx._restart_state()
            if grant.HasField("final_error") or _saga.started(ctx._steps.records):
                # The run is finishing (_saga.py): replay only to learn its undos.
                ctx._steps.finishing = True
            if grant.HasField("final_error"):
                # A finishing lease ends the run whatever is reported: an
                # undo's retry waits here rather than suspend the run.
                ctx._steps.sleep_threshold = math.inf
            self.ctx = ctx
            _context._current_context.set(ctx)
            try:
                if task is None:
                    raise RatchetError(f"this worker does not serve task {grant.task_id!r}")
                waiting_on, result = await _until_done_or_suspended(
                    ctx, task.fn(ctx, task.parse_payload(snapshot.payload)))
                if ctx._steps.finishing:
                    # The replay of a finishing run went through: still no success.
                    outcome = await self._finish(ctx, task, None)
                elif waiting_on:
                    log.info("run %s suspended, waiting on %s", run_id, ", ".join(waiting_on))
                    outcome = worker_pb2.Complete(
                        lease_id=lease_id, run_id=run_id,
                        suspended=worker_pb2.Suspended(step_keys=waiting_on))
                else:
                    outcome = worker_pb2.Complete(
                        lease_id=lease_id, run_id=run_id,
                        succeeded=worker_pb2.Succeeded(output=task.dump_output(result)))
                state = ctx._state_update()
                if state is not None:
                    outcome.state = state
            except (asyncio.CancelledError, LeaseLostError):
                raise
            except Exception as exc:
                outcome = await self._failed(ctx, task, exc)
            except BaseException as exc:
                if not (ctx._steps.finishing and _saga.is_finishing(exc)):
                    raise
                # Finishing mode stopped the task function at a call that
                # has not completed: the undos it registered run now.
                assert task is not None
                outcome = await self._finish(ctx, task, None)
            await self._complete(outcome)
        except LeaseLostError as exc:
            log.warning("run %s: lease %s lost (%s); dropping this execution",
                        run_id, lease_id, exc)
        except asyncio.CancelledError:
            if self.release_on_cancel:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self._release()
                    log.info("run %s released for another worker", run_id)
        except Exception:
            # No outcome could be recorded: give the run back rather than hold it.
            log.exception("run %s: could not report its outcome; releasing it", run_id)
            with contextlib.suppress(Exception):
                await self._release()

    async def _failed(
        self, ctx: Context, task: Task[Any, Any] | None, exc: Exception
    ) -> worker_pb2.Complete:
        """The outcome of an attempt that raised, after the hooks had their say."""
        grant = self._grant
        if ctx._steps.finishing and task is not None:
            return await self._finish(ctx, task, None)  # the recorded error decides
        # The attempt is over: other branches of the task start no step now,
        # and a step in flight ends its attempt first, so that its result is
        # recorded (and its undo registered) before the outcome is decided.
        ctx._steps.finishing = True
        await ctx._steps.settle()
        error = error_from_exception(exc, attempt=grant.attempt)
        log.warning("run %s attempt %d failed: %s: %s", self.run_id, grant.attempt,
                    error.type, error.message)
        retry_after: float | None = None
        if task is not None and task.catch_error is not None:
            error, retry_after = await _catch_error(ctx, task, error)
        if task is not None and ctx._saga.undos:
            if retry_after is not None:
                log.warning("run %s: catch_error asked for a retry, but the run has "
                            "compensations registered: its failure is final", self.run_id)
            return await self._finish(ctx, task, error)
        last = error.non_retryable or (
            grant.HasField("retry") and not grant.retry.unlimited_attempts
            and grant.attempt >= grant.retry.max_attempts)
        if last and task is not None and task.on_failure is not None:
            await _on_failure(ctx, task, error)
        failed = worker_pb2.Failed(error=error_to_pb(error))
        if retry_after is not None:
            # A duration: the coordinator's clock decides when it is
            # due. retry_at is for coordinators older than retry_after.
            failed.retry_after.CopyFrom(duration(retry_after))
            failed.retry_at.CopyFrom(timestamp(time.time() + retry_after))
        outcome = worker_pb2.Complete(lease_id=self.lease_id, run_id=self.run_id, failed=failed)
        with contextlib.suppress(TypeError):  # a state that cannot be saved stays behind
            state = ctx._state_update()
            if state is not None:
                outcome.state = state
        return outcome

    async def _finish(
        self, ctx: Context, task: Task[Any, Any], error: RunError | None
    ) -> worker_pb2.Complete:
        """Finish a run that failed for good (_saga.py): run its undos in
        reverse order, then on_failure, and report Failed (non-retryable).

        `error` is this attempt's failure when it starts finishing now; None
        when the run was finishing already: the finishing lease's final error
        then decides, else the error recorded in ``ratchet:failure``. The
        compensations may suspend the run (an undo's long retry wait) unless
        this is a finishing lease."""
        grant = self._grant
        steps = ctx._steps
        steps.finishing = True
        await steps.settle()  # steps in flight in other branches end first
        if grant.HasField("final_error"):
            error = error_from_pb(grant.final_error)
        elif error is None:
            error = _saga.recorded_error(steps.records)
        else:
            error = dataclasses.replace(error, non_retryable=True)
            # Recorded before any undo runs: a worker that takes over after a
            # crash finishes the run too, and reports this error.
            await _saga.record_failure(steps, error)
        final = dataclasses.replace(error, non_retryable=True)
        log.warning("run %s is finishing (%s: %s): %d compensation(s) to run", self.run_id,
                    final.type, final.message, len(ctx._saga.undos))

        async def compensate_then_hook() -> None:
            await ctx._saga.compensate(ctx)
            if task.on_failure is not None:
                await _on_failure(ctx, task, final)

        waiting_on, _ = await _until_done_or_suspended(ctx, compensate_then_hook())
        if waiting_on:
            log.info("run %s suspended while compensating, waiting on %s", self.run_id,
                     ", ".join(waiting_on))
            outcome = worker_pb2.Complete(
                lease_id=self.lease_id, run_id=self.run_id,
                suspended=worker_pb2.Suspended(step_keys=waiting_on))
        else:
            outcome = worker_pb2.Complete(
                lease_id=self.lease_id, run_id=self.run_id,
                failed=worker_pb2.Failed(error=error_to_pb(final)))
        with contextlib.suppress(TypeError):  # a state that cannot be saved stays behind
            state = ctx._state_update()
            if state is not None:
                outcome.state = state
        return outcome

    async def _complete(self, outcome: worker_pb2.Complete) -> None:
        """Report the outcome until the coordinator records it: a refused output
        becomes a non-retryable failure and a transient error is tried again,
        so no run is left RUNNING by a worker that has finished with it."""
        try:
            await self._session.request_patiently(
                worker_pb2.SessionRequest(complete=outcome), self.lease_id)
        except WriteRefusedError as exc:
            if outcome.WhichOneof("outcome") == "failed":
                raise
            log.warning("run %s: outcome refused (%s); failing the run", outcome.run_id, exc)
            error = error_to_pb(error_from_exception(exc))
            failed = worker_pb2.Complete(lease_id=outcome.lease_id, run_id=outcome.run_id,
                                         failed=worker_pb2.Failed(error=error))
            await self._session.request_patiently(
                worker_pb2.SessionRequest(complete=failed), self.lease_id)

    async def _release(self) -> None:
        """Give the run back (no attempt is counted), waiting a bounded time."""
        await asyncio.wait_for(self._session.request(worker_pb2.SessionRequest(
            release=worker_pb2.ReleaseLease(lease_id=self.lease_id, run_id=self.run_id)),
            self.lease_id), RELEASE_TIMEOUT)


async def _until_done_or_suspended(
    ctx: Context, coro: Awaitable[Any]
) -> tuple[list[str], Any]:
    """Run the task until it returns, or until every branch waits durably:
    then stop it and return the keys it waits on (the run will suspend)."""
    main = asyncio.ensure_future(coro)
    suspended = asyncio.ensure_future(ctx.suspended.wait())
    try:
        await asyncio.wait({main, suspended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        suspended.cancel()
        if not main.done() and not ctx.suspended.is_set():
            main.cancel()  # the execution itself was cancelled
    if main.done():
        return [], main.result()
    waiting_on = ctx.waiting_on
    main.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await main
    return waiting_on, None


# --- failure hooks ----------------------------------------------------------------------


async def _catch_error(
    ctx: Context, task: Task[Any, Any], error: RunError
) -> tuple[RunError, float | None]:
    """Let the task's catch_error hook decide about a failed attempt: the
    error to record, and how long until the next attempt (None: the policy's
    backoff). A time the hook names is turned into a delay on this worker's
    clock now, as `ctx.sleep_until` does."""
    hook = task.catch_error
    assert hook is not None
    try:
        decision = await hook(ctx, error)
    except (asyncio.CancelledError, LeaseLostError):
        raise
    except Exception:
        log.exception("run %s: the catch_error hook failed; keeping the policy's choice",
                      ctx.run_id)
        return error, None
    except _saga.Finishing as exc:
        log.error("run %s: the catch_error hook may not start durable calls (%s); keeping "
                  "the policy's choice", ctx.run_id, exc.key)
        return error, None
    if decision is None:
        return error, None
    now = time.time()
    if decision.action == "fail":
        return dataclasses.replace(error, non_retryable=True), None
    if decision.action == "replace" and decision.error is not None:
        return decision.error, None
    if decision.action == "retry_in":
        return error, max(0.0, decision.at or 0.0)
    if decision.action == "retry":
        return error, 0.0 if not decision.at else max(0.0, decision.at - now)
    return error, None


async def _on_failure(ctx: Context, task: Task[Any, Any], error: RunError) -> None:
    """The task's on-failure hook, once per run: a durable step, so a replay of
    this last attempt does not call it again."""
    hook = task.on_failure
    assert hook is not None
    try:
        await ctx._internal_step("ratchet:on_failure", hook, (ctx, error), None)
    except (asyncio.CancelledError, LeaseLostError):
        raise
    except Exception:
        log.exception("run %s: the on_failure hook failed", ctx.run_id)


class _LeaseJournal:
    """The Context's writes, sent through the session under this lease."""

    def __init__(self, session: Session, lease_id: str) -> None:
        self._session = session
        self._lease_id = lease_id

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None:
        await self._session.request_patiently(
            worker_pb2.SessionRequest(checkpoint=checkpoint), self._lease_id)

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]:
        ack = await self._session.request_patiently(
            worker_pb2.SessionRequest(children=request), self._lease_id)
        return list(ack.run_ids)

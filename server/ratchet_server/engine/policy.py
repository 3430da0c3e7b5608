"""Every decision about how a wait ends and whether a run can progress.

Pure functions over the model: no I/O, no SQL, no protobuf. The store calls
some of them back inside its transactions (so that the rule and the row
locks meet in one place), and the reconciler uses `stuck_reason` to find
runs that nothing would ever move again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

from ratchet_server import model

TOKEN_TIMEOUT = model.ErrorInfo(type="ratchet.TokenTimeoutError",
                                message="the wait token timed out")
MAX_DURATION_EXCEEDED = model.ErrorInfo(
    type="ratchet.MaxDurationExceeded", message="the run took longer than its max duration",
    non_retryable=True)

# The error type of an attempt whose lease was lost (worker gone or silent).
LEASE_LOST = "LeaseLost"
# The final error of a run whose leases were lost more often than its policy's
# max_lease_losses allows.
LEASE_LOSS_LIMIT = "ratchet.LeaseLossLimit"
# A lost finishing lease is granted again this many times; then the run fails
# without it, and its final error's message says so.
FINISHING_RETRIES = 3
FINISHING_LOST = "; its on_failure hook and compensations could not run"


def lease_loss_transition(ref: model.LeaseRef, why: str, now: float) -> model.RunTransition:
    """A lease whose holder is gone (its session closed, or it expired
    without heartbeats). A lost lease is not a failure of the run's code: the
    run is queued again at once with its attempt given back, and the loss is
    counted (runs.lease_losses). Past the policy's max_lease_losses the
    run's failure is final (LEASE_LOSS_LIMIT): when its task handles final
    errors it is queued for a finishing lease (its compensations and
    on_failure hook still run), otherwise it is FAILED at once. A finishing
    lease that is lost too is granted again FINISHING_RETRIES times, then the
    run is FAILED without it.

    The caller adds the fences that say the holder is still gone (owner,
    expiry); `finishing` fences on the lease kind this decision assumed."""
    losses = ref.lease_losses + 1
    limit = ref.retry.max_lease_losses
    lost = model.ErrorInfo(type=LEASE_LOST, message=why, attempt=ref.attempt)
    finishing = ref.final_error is not None
    if finishing:
        assert ref.final_error is not None
        if losses - limit - 1 <= FINISHING_RETRIES:
            return _requeue_lost(ref, lost, losses, now, finishing=True)
        final = dataclasses.replace(ref.final_error,
                                    message=ref.final_error.message + FINISHING_LOST)
        return _fail_lost(ref, lost, final, losses, now)
    if losses <= limit:
        return _requeue_lost(ref, lost, losses, now, finishing=False)
    final = model.ErrorInfo(
        type=LEASE_LOSS_LIMIT, non_retryable=True, attempt=ref.attempt,
        message=(f"the run's lease was lost {losses} times (limit {limit}): its worker died "
                 f"or went silent each time; last: {why}"))
    if ref.handles_final_error:
        return _requeue_lost(ref, lost, losses, now, finishing=False, final_error=final)
    return _fail_lost(ref, lost, final, losses, now)


def _lost_event(ref: model.LeaseRef, lost: model.ErrorInfo, losses: int, now: float,
                **extra: object) -> model.Event:
    return model.Event(run_id=ref.run_id, type=model.EventType.LEASE_LOST, at=now,
                       attempt=ref.attempt, lease_id=ref.lease_id,
                       data=json.dumps({"reason": lost.message, "lease_losses": losses,
                                        **extra}))


def _requeue_lost(ref: model.LeaseRef, lost: model.ErrorInfo, losses: int, now: float, *,
                  finishing: bool, final_error: model.ErrorInfo | None = None,
                  ) -> model.RunTransition:
    """Queued again at once, the attempt given back. The run's error says
    LEASE_LOST until a later lease reports (see lost_before_its_report)."""
    extra: dict[str, object] = {}
    if final_error is not None:  # the next lease is a finishing lease
        extra = {"final_error": final_error.type, "message": final_error.message}
    elif finishing:  # the lost lease was one
        extra = {"finishing": True}
    return model.RunTransition(
        run_id=ref.run_id, lease_id=ref.lease_id, status=model.RunStatus.QUEUED, error=lost,
        run_at=now, refund_attempt=True, count_lease_loss=True, final_error=final_error,
        finishing=finishing, events=(_lost_event(ref, lost, losses, now, **extra),))


def _fail_lost(ref: model.LeaseRef, lost: model.ErrorInfo, final: model.ErrorInfo,
               losses: int, now: float) -> model.RunTransition:
    return model.RunTransition(
        run_id=ref.run_id, lease_id=ref.lease_id, status=model.RunStatus.FAILED, error=final,
        count_lease_loss=True, finishing=ref.final_error is not None,
        events=(_lost_event(ref, lost, losses, now),
                model.Event(run_id=ref.run_id, type=model.EventType.FINISHED, at=now,
                            attempt=ref.attempt, lease_id=ref.lease_id,
                            data=json.dumps({"status": "FAILED", "error": final.type,
                                             "message": final.message}))))


def finishing_outcome(run_id: str, lease_id: str, attempt: int, final: model.ErrorInfo,
                      reported: str, *, state: str | None, now: float) -> model.RunTransition:
    """The end of a finishing lease: whatever its worker reported
    (`reported`: Succeeded, Suspended or Failed), the run is FAILED with its
    final error."""
    return model.RunTransition(
        run_id=run_id, lease_id=lease_id, status=model.RunStatus.FAILED, error=final,
        state=state, finishing=True,
        events=(model.Event(run_id=run_id, type=model.EventType.FINISHED, at=now,
                            attempt=attempt, lease_id=lease_id,
                            data=json.dumps({"status": "FAILED", "error": final.type,
                                             "message": final.message, "finishing": True,
                                             "reported": reported})),))


def lost_lease_was_finishing(run: model.Run) -> bool:
    """Whether the lease this QUEUED run lost last was a finishing lease (the
    run already had its final error before that loss), as opposed to the
    ordinary lease whose loss crossed the bound and set it."""
    return (run.final_error is not None
            and run.lease_losses > run.retry.max_lease_losses + 1)


def failure_transition(
    ref: model.LeaseRef, error: model.ErrorInfo, *, state: str | None, immediate: bool,
    now: float, retry_at: float | None = None,
) -> model.RunTransition:
    """A failed attempt under the run's retry policy (DESIGN §7): QUEUED after
    the policy's backoff (none if `immediate`, as for a lost lease; `retry_at`
    from the worker's catch_error replaces it) while attempts are left and the
    error is retryable, FAILED otherwise."""
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


def lost_before_its_report(run: model.Run, lease_id: str) -> bool:
    """The run's lease `lease_id` was taken back as lost and nobody has leased
    the run since: a failure the worker reports now under that lease is the
    truth about the attempt and replaces the lease-loss guess."""
    return (run.status is model.RunStatus.QUEUED and run.lease_id == lease_id
            and run.error is not None and run.error.type == LEASE_LOST)


# The key prefix of a compensation step (the SDK's ctx.step(compensate=...)
# runs each undo as the step `ratchet:undo:<step key>`).
UNDO_PREFIX = "ratchet:undo:"


def compensated(steps: Sequence[model.Step]) -> bool:
    """Whether the run's compensations have run (or begun): such a run is not
    replayed from its last checkpoint unless the request insists, as that
    could redo forward steps whose effects were undone."""
    return any(s.key.startswith(UNDO_PREFIX) for s in steps)


def rerun_on_replay(steps: Sequence[model.Step]) -> list[str]:
    """The keys of the steps a replay gives a fresh budget: the FAILED steps
    that run code (a later run attempt otherwise raises their recorded error
    again). Sleeps, tokens, children and values keep their outcome."""
    return sorted(s.key for s in steps
                  if s.kind is model.StepKind.RUN and s.status is model.StepStatus.FAILED)


def counts_as_woken(waiting_on: Sequence[str], steps: Mapping[str, model.Step],
                    now: float) -> bool:
    """A WAITING run goes back to the queue once one of the waits it named has
    ended: a sleep or token step that is no longer RUNNING, a child wait whose
    result is in, or a retrying step whose next attempt is due. A named step
    that does not exist cannot be waited on, so it wakes the run too (the
    worker will find out what it meant)."""
    for key in waiting_on:
        step = steps.get(key)
        if step is None or step.status is not model.StepStatus.RUNNING:
            return True
        if step.kind is model.StepKind.RUN and (step.wake_at is None or step.wake_at <= now):
            return True
    return False


def timer_outcome(step: model.Step, now: float) -> model.WaitResolution:
    """What a due timer does to its step: a sleep completes with null, a token
    times out, a retrying step stays RUNNING with its due time cleared (its
    run wakes to make the next attempt)."""
    fence = step.wake_at
    if step.kind is model.StepKind.SLEEP:
        return model.WaitResolution(
            run_id=step.run_id, key=step.key, status=model.StepStatus.COMPLETED,
            output="null", finished_at=now, expect_wake_at=fence,
            events=(model.Event(run_id=step.run_id, type=model.EventType.WAIT_COMPLETED,
                                at=now, step_key=step.key),))
    if step.kind is model.StepKind.TOKEN:
        # TIMED_OUT, not FAILED: the task decides whether a timeout is a
        # failure (wait_for_token raises, or returns it as a value).
        return model.WaitResolution(
            run_id=step.run_id, key=step.key, status=model.StepStatus.TIMED_OUT,
            error=TOKEN_TIMEOUT, finished_at=now, expect_wake_at=fence,
            events=(model.Event(run_id=step.run_id, type=model.EventType.WAIT_COMPLETED,
                                at=now, step_key=step.key,
                                data=json.dumps({"timed_out": True})),))
    return model.WaitResolution(
        run_id=step.run_id, key=step.key, status=model.StepStatus.RUNNING,
        expect_wake_at=fence, clear_wake_at=True,
        events=(model.Event(run_id=step.run_id, type=model.EventType.RETRY_DUE, at=now,
                            step_key=step.key),))


def token_outcome(step: model.Step, data: str, now: float) -> model.WaitResolution:
    """A token completed from outside: its step completes with the data."""
    return model.WaitResolution(
        run_id=step.run_id, key=step.key, status=model.StepStatus.COMPLETED, output=data,
        finished_at=now,
        events=(model.Event(run_id=step.run_id, type=model.EventType.WAIT_COMPLETED, at=now,
                            step_key=step.key, data=json.dumps({"token_id": step.token_id})),))


def token_status(token: model.Token, now: float) -> model.TokenStatus:
    """A token's status now: a WAITING token past its timeout has timed out
    (whether or not a run's timer has fired on it yet)."""
    if (token.status is model.TokenStatus.WAITING and token.expires_at is not None
            and token.expires_at <= now):
        return model.TokenStatus.TIMED_OUT
    return token.status


def token_wait(base: model.StepWrite) -> model.TokenWaitRule:
    """How a run's wait on an existing token (CreateToken) starts, decided
    under the run's and the token's row locks: refused for a token unknown in
    the environment or waited on by another step; otherwise the token step is
    recorded RUNNING until the token's own timeout, or at once COMPLETED with
    the data of a token completed earlier (the run resumes with it as soon as
    it suspends), or TIMED_OUT for a token past its timeout."""
    def rule(token: model.Token | None, now: float) -> model.StepWrite | str:
        if token is None:
            return f"token {base.token_id!r} not found"
        if token.run_id is not None and (token.run_id, token.step_key) != (base.run_id,
                                                                            base.key):
            return (f"token {token.id!r} is already waited on by run {token.run_id!r} "
                    f"(step {token.step_key!r}); a token wakes one run")
        status = token_status(token, now)
        if status is model.TokenStatus.COMPLETED:
            return dataclasses.replace(
                base, status=model.StepStatus.COMPLETED, output=token.data or "null",
                finished_at=now, wake_at=None,
                events=(model.Event(run_id=base.run_id, type=model.EventType.WAIT_COMPLETED,
                                    at=now, step_key=base.key,
                                    data=json.dumps({"token_id": token.id,
                                                     "completed_before_wait": True})),))
        if status is model.TokenStatus.TIMED_OUT:
            return dataclasses.replace(
                base, status=model.StepStatus.TIMED_OUT, error=TOKEN_TIMEOUT,
                finished_at=now, wake_at=None,
                events=(model.Event(run_id=base.run_id, type=model.EventType.WAIT_COMPLETED,
                                    at=now, step_key=base.key,
                                    data=json.dumps({"token_id": token.id,
                                                     "timed_out": True})),))
        return dataclasses.replace(base, status=model.StepStatus.RUNNING,
                                   wake_at=token.expires_at)
    return rule


def child_results(children: Sequence[model.Run] | Sequence[model.ChildRun]) -> str | None:
    """The output of a child-wait step: one entry per child, in trigger
    order, or None while any child is unfinished."""
    if any(not c.status.is_final for c in children):
        return None
    return json.dumps([{
        "run_id": c.id, "status": c.status.value,
        "output": None if c.output is None else json.loads(c.output),
        "error": None if c.error is None else {
            "type": c.error.type, "message": c.error.message, "stack": c.error.stack,
            "non_retryable": c.error.non_retryable, "step_key": c.error.step_key,
            "attempt": c.error.attempt},
    } for c in children])


def children_outcome(run_id: str, key: str, results: str,
                     now: float) -> model.WaitResolution:
    return model.WaitResolution(
        run_id=run_id, key=key, status=model.StepStatus.COMPLETED, output=results,
        finished_at=now,
        events=(model.Event(run_id=run_id, type=model.EventType.WAIT_COMPLETED, at=now,
                            step_key=key),))


def child_wait_outcome(run_id: str, key: str,
                       children: Sequence[model.Run] | Sequence[model.ChildRun],
                       now: float) -> model.WaitResolution | None:
    """What a child-wait step becomes (a `model.ChildWaitRule`): completed
    with the children's results once all are final, else None."""
    results = child_results(children)
    return None if results is None else children_outcome(run_id, key, results, now)


def stuck_reason(run: model.Run, waiting_on: Sequence[str],
                 steps: Mapping[str, model.Step], now: float) -> str | None:
    """Why nothing would ever move this non-final run again, or None when it
    has a way to progress (the invariant of DESIGN §3):

    - QUEUED: always ready at its run_at;
    - RUNNING: its lease is live or will be reaped when it expires;
    - WAITING: it names at least one wait, none of which has ended yet (an
      ended wait must already have woken it), and each pending wait can end
      (a sleep or retry has a due time, a token can be completed or time out,
      a child wait finishes when its children do).
    """
    if run.status is model.RunStatus.RUNNING and run.lease_expires_at is None:
        return "RUNNING without a lease expiry: no reaper would ever take it back"
    if run.status is not model.RunStatus.WAITING:
        return None
    if not waiting_on:
        return "WAITING on nothing"
    if counts_as_woken(waiting_on, steps, now):
        ended = [k for k in waiting_on
                 if k not in steps or steps[k].status is not model.StepStatus.RUNNING]
        return ("WAITING although its wait ended: " + ", ".join(ended)) if ended else (
            "WAITING although a retry it waits for is due")
    for key in waiting_on:
        step = steps[key]
        if step.kind is model.StepKind.SLEEP and step.wake_at is None:
            return f"WAITING on {key!r}, a {step.kind.value} step with no due time"
        if step.kind is model.StepKind.TOKEN and not step.token_id:
            return f"WAITING on {key!r}, a token step without a token id"
        if step.kind is model.StepKind.VALUE:
            return f"WAITING on {key!r}, a value step (values never wait)"
    return None

"""FAILED steps on the coordinator: the run policy's rerun_failed_steps travels
and is stored; a replay gives FAILED steps that run code a fresh budget; a run
whose compensations have run is not replayed unless the request insists."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.api import convert
from ratchet_server.engine import errors, policy
from ratchet_server.engine.engine import Engine, LeasePush, Session, TriggerSpec

pytestmark = pytest.mark.timeout(30)

ENV = "dev"
ONE_ATTEMPT = Retry(max_attempts=1, min_delay=0.0, max_delay=0.0)


def task_def(retry: Retry = ONE_ATTEMPT) -> model.TaskDef:
    return model.TaskDef(env=ENV, id="t", version="1", queue="t", retry=retry,
                         payload_schema=None, output_schema=None, max_duration=None)


async def lease(engine: Engine, retry: Retry = ONE_ATTEMPT) -> tuple[Session, model.Run]:
    """A session serving task "t", and a run of it leased to that session."""
    session, _ = await engine.open_session(ENV, "worker-1", [task_def(retry)], 4, [])
    [(run, _)] = await engine.trigger(ENV, [TriggerSpec(task_id="t", payload=b"{}")])
    push = await asyncio.wait_for(session.outbox.get(), 2.0)
    assert isinstance(push, LeasePush)
    assert push.leased.run.id == run.id
    return session, push.leased.run


async def step(engine: Engine, session: Session, run: model.Run, key: str,
               event: model.StepEvent, *, kind: model.StepKind = model.StepKind.RUN,
               attempt: int = 1, retry_base: int = 0) -> None:
    now = time.time()
    failed = event in (model.StepEvent.FAILED, model.StepEvent.RETRYING)
    await engine.checkpoint(
        session, run_id=run.id, lease_id=str(run.lease_id), key=key, kind=kind, event=event,
        attempt=attempt, retry_base=retry_base,
        output=b"null" if event is model.StepEvent.COMPLETED else None,
        error=model.ErrorInfo(type="ValueError", message=f"{key} failed", step_key=key,
                              attempt=attempt) if failed else None,
        started_at=now, finished_at=now, state=None)


async def fail(engine: Engine, session: Session, run: model.Run) -> None:
    await engine.complete_failure(session, run_id=run.id, lease_id=str(run.lease_id),
                                  error=model.ErrorInfo(type="ValueError", message="boom"),
                                  state=None)
    assert (await engine.get_run(ENV, run.id))[0].status is model.RunStatus.FAILED


def by_key(steps: list[model.Step]) -> dict[str, model.Step]:
    return {s.key: s for s in steps}


# --- the policy's flag ----------------------------------------------------------------


def test_rerun_failed_steps_round_trips_through_the_protocol_and_the_store_row() -> None:
    from ratchet_server.store import _rows

    for flag in (False, True):
        retry = Retry(max_attempts=4, rerun_failed_steps=flag)
        pb = convert.retry_to_pb(retry)
        assert pb.rerun_failed_steps is flag
        assert convert.retry_from_pb(pb, Retry()).rerun_failed_steps is flag
        assert _rows.retry_from_json(_rows.retry_to_json(retry)) == retry
    # A policy stored before the field existed reads as the default.
    old = '{"max_attempts":3,"factor":2.0,"min_delay":1.0,"max_delay":60.0,"jitter":false}'
    assert _rows.retry_from_json(old).rerun_failed_steps is False


async def test_the_lease_carries_the_tasks_rerun_failed_steps(engine: Engine) -> None:
    _, run = await lease(engine, Retry(max_attempts=2, rerun_failed_steps=True))
    assert run.retry.rerun_failed_steps
    grant = convert.lease_to_pb(model.LeasedRun(run=run, steps=()), 30.0)
    assert grant.retry.rerun_failed_steps


# --- replay resets FAILED steps ---------------------------------------------------------


def test_rerun_on_replay_picks_failed_run_steps_only() -> None:
    def s(key: str, kind: model.StepKind, status: model.StepStatus) -> model.Step:
        return model.Step(run_id="r", key=key, kind=kind, status=status, attempts=1,
                          retry_base=0, output=None, error=None, started_at=None,
                          finished_at=None)

    steps = [s("b", model.StepKind.RUN, model.StepStatus.FAILED),
             s("a", model.StepKind.RUN, model.StepStatus.FAILED),
             s("ok", model.StepKind.RUN, model.StepStatus.COMPLETED),
             s("retrying", model.StepKind.RUN, model.StepStatus.RUNNING),
             s("token", model.StepKind.TOKEN, model.StepStatus.FAILED),
             s("nap", model.StepKind.SLEEP, model.StepStatus.COMPLETED),
             s("kids", model.StepKind.CHILD, model.StepStatus.FAILED)]
    assert policy.rerun_on_replay(steps) == ["a", "b"]
    assert not policy.compensated(steps)
    assert policy.compensated([*steps, s("ratchet:undo:a", model.StepKind.RUN,
                                         model.StepStatus.COMPLETED)])
    assert not policy.compensated([s("ratchet:on_failure", model.StepKind.RUN,
                                     model.StepStatus.COMPLETED)])


async def test_replay_gives_failed_steps_a_fresh_budget(engine: Engine) -> None:
    session, run = await lease(engine)
    await step(engine, session, run, "withdraw", model.StepEvent.COMPLETED)
    await step(engine, session, run, "deposit", model.StepEvent.RETRYING, attempt=1)
    await step(engine, session, run, "deposit", model.StepEvent.RETRYING, attempt=2)
    await step(engine, session, run, "deposit", model.StepEvent.FAILED, attempt=3)
    await step(engine, session, run, "nap", model.StepEvent.COMPLETED,
               kind=model.StepKind.SLEEP)
    await fail(engine, session, run)

    replayed = await engine.replay(ENV, run.id, from_scratch=False)
    assert replayed.status is model.RunStatus.QUEUED
    steps = by_key((await engine.get_run(ENV, run.id))[1])
    deposit = steps["deposit"]
    assert deposit.status is model.StepStatus.RUNNING
    assert deposit.attempts == 3 and deposit.retry_base == 3  # three more attempts
    assert deposit.wake_at is None and deposit.finished_at is None
    assert deposit.error is not None and deposit.error.message == "deposit failed"
    assert steps["withdraw"].status is model.StepStatus.COMPLETED
    assert steps["nap"].status is model.StepStatus.COMPLETED
    [event] = [e for e in await engine.store.get_events(run.id) if e["type"] == "replayed"]
    assert json.loads(event["data"])["rerun_steps"] == ["deposit"]

    # The next lease's snapshot shows it RUNNING: the worker runs it again.
    push = await asyncio.wait_for(session.outbox.get(), 2.0)
    assert isinstance(push, LeasePush)
    assert by_key(list(push.leased.steps))["deposit"].status is model.StepStatus.RUNNING


# --- compensated runs ---------------------------------------------------------------


async def compensated_run(engine: Engine) -> model.Run:
    session, run = await lease(engine)
    await step(engine, session, run, "withdraw", model.StepEvent.COMPLETED)
    await step(engine, session, run, "deposit", model.StepEvent.FAILED)
    await step(engine, session, run, "ratchet:undo:withdraw", model.StepEvent.COMPLETED)
    await fail(engine, session, run)
    return run


async def test_replay_refuses_a_compensated_run(engine: Engine) -> None:
    run = await compensated_run(engine)
    with pytest.raises(errors.FailedPrecondition) as info:
        await engine.replay(ENV, run.id, from_scratch=False)
    message = str(info.value)
    assert "compensated" in message and "--from-scratch" in message
    assert "--rerun-compensated" in message
    # Nothing changed.
    after, steps = await engine.get_run(ENV, run.id)
    assert after.status is model.RunStatus.FAILED
    assert by_key(steps)["deposit"].status is model.StepStatus.FAILED


async def test_replay_of_a_compensated_run_with_the_flag(engine: Engine) -> None:
    run = await compensated_run(engine)
    replayed = await engine.replay(ENV, run.id, from_scratch=False, rerun_compensated=True)
    assert replayed.status is model.RunStatus.QUEUED
    steps = by_key((await engine.get_run(ENV, run.id))[1])
    assert steps["deposit"].status is model.StepStatus.RUNNING
    assert steps["ratchet:undo:withdraw"].status is model.StepStatus.COMPLETED


async def test_a_compensated_run_can_start_over_from_scratch(engine: Engine) -> None:
    run = await compensated_run(engine)
    new = await engine.replay(ENV, run.id, from_scratch=True)
    assert new.id != run.id and new.replay_of == run.id
    assert (await engine.get_run(ENV, run.id))[0].status is model.RunStatus.FAILED

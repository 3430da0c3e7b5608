"""Lost leases are counted apart from attempts, up to a bound; past it a run
whose task handles final errors gets a finishing lease (issue 10, part B).

The engine runs on each store (SQLite in memory, Postgres: its writes are
batched there), driven through in-process sessions as in test_engine.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.api import convert
from ratchet_server.engine import errors, policy
from ratchet_server.engine.engine import Engine, EngineConfig, LeasePush, Session, TriggerSpec
from ratchet_server.store import Store

pytestmark = pytest.mark.timeout(60)

ENV = "dev"
WAIT = 5.0
FINISHING_LOST = "; its on_failure hook and compensations could not run"


def task_def(*, handles_final_error: bool, max_lease_losses: int = 2,
             max_attempts: int = 2) -> model.TaskDef:
    return model.TaskDef(
        env=ENV, id="t", version="1", queue="t",
        retry=Retry(max_attempts=max_attempts, min_delay=30, max_delay=30,
                    max_lease_losses=max_lease_losses),
        payload_schema=None, output_schema=None, max_duration=None,
        handles_final_error=handles_final_error)


@pytest.fixture
async def engine(store: Store) -> AsyncIterator[Engine]:
    e = Engine(store, EngineConfig(lease_ttl=30.0, heartbeat_interval=5.0, session_grace=0.02,
                                   reap_interval=0.05, reconcile_interval=0))
    await e.start()
    try:
        yield e
    finally:
        await asyncio.wait_for(e.stop(), 5.0)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    async def poll() -> None:
        while not await check():  # noqa: ASYNC110 - the store offers no event to wait on
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), WAIT)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def get(engine: Engine, run_id: str) -> model.Run:
    run, _ = await engine.get_run(ENV, run_id)
    return run


async def trigger(engine: Engine, task: model.TaskDef) -> model.Run:
    """A run of `task`, with its policy (a worker registers tasks as it connects)."""
    await engine.register_tasks([task])
    [(run, _)] = await engine.trigger(ENV, [TriggerSpec(task_id="t", payload=b"{}")])
    return run


async def lease(engine: Engine, task: model.TaskDef) -> tuple[Session, model.LeasedRun]:
    session, _ = await engine.open_session(ENV, "w-" + secrets.token_hex(3), [task], 1, [])
    push = await asyncio.wait_for(session.outbox.get(), WAIT)
    assert isinstance(push, LeasePush), push
    return session, push.leased


async def lose(engine: Engine, task: model.TaskDef, run_id: str,
               status: model.RunStatus = model.RunStatus.QUEUED) -> model.LeasedRun:
    """Lease the run, then close the session (the worker died): one lost lease."""
    before = (await get(engine, run_id)).lease_losses
    session, leased = await lease(engine, task)
    assert leased.run.id == run_id
    engine.close_session(session)

    async def counted() -> bool:
        run = await get(engine, run_id)
        return run.lease_losses == before + 1 and run.status is status

    await eventually(counted, f"loss {before + 1} of run {run_id} ({status.value})")
    return leased


async def test_a_lost_lease_gives_the_attempt_back_and_is_counted(engine: Engine) -> None:
    task = task_def(handles_final_error=False, max_lease_losses=5, max_attempts=1)
    run = await trigger(engine, task)
    for n in (1, 2, 3):
        leased = await lose(engine, task, run.id)
        assert leased.run.attempt == 1  # every lease makes the first attempt again
        queued = await get(engine, run.id)
        assert queued.attempt == 0 and queued.lease_losses == n
        assert queued.error is not None and queued.error.type == policy.LEASE_LOST
        assert queued.final_error is None
    # The one attempt the policy allows is still there: the run completes.
    session, leased = await lease(engine, task)
    assert leased.run.attempt == 1 and leased.run.lease_losses == 3
    await engine.complete_success(session, run_id=run.id, lease_id=str(leased.run.lease_id),
                                  output=b'"ok"', state=None)
    done = await get(engine, run.id)
    assert done.status is model.RunStatus.COMPLETED and done.lease_losses == 3
    lost = [json.loads(e["data"]) for e in await engine.store.get_events(run.id)
            if e["type"] == "lease_lost"]
    assert [e["lease_losses"] for e in lost] == [1, 2, 3]
    # GetRun shows the count.
    assert convert.run_to_pb(done).lease_losses == 3


async def test_past_the_bound_a_task_without_final_error_handling_fails_at_once(
        engine: Engine) -> None:
    task = task_def(handles_final_error=False, max_lease_losses=2)
    run = await trigger(engine, task)
    await lose(engine, task, run.id)
    await lose(engine, task, run.id)
    await lose(engine, task, run.id, model.RunStatus.FAILED)
    failed = await get(engine, run.id)
    assert failed.error is not None and failed.error.type == "ratchet.LeaseLossLimit"
    assert failed.error.non_retryable
    assert failed.error.message.startswith(
        "the run's lease was lost 3 times (limit 2): its worker died or went silent each "
        "time; last: the worker's session closed")
    assert failed.final_error is None and failed.attempt == 1 and failed.lease_losses == 3


async def test_past_the_bound_the_run_gets_a_finishing_lease(engine: Engine) -> None:
    task = task_def(handles_final_error=True, max_lease_losses=2)
    run = await trigger(engine, task)
    for _ in range(3):
        await lose(engine, task, run.id)
    queued = await get(engine, run.id)
    assert queued.status is model.RunStatus.QUEUED and queued.attempt == 0
    assert queued.final_error is not None
    assert queued.final_error.type == "ratchet.LeaseLossLimit"
    assert "lost 3 times (limit 2)" in queued.final_error.message

    _, leased = await lease(engine, task)
    assert leased.run.attempt == 1  # the same attempt, finishing
    grant = convert.lease_to_pb(leased, 30.0)
    assert grant.HasField("final_error")
    assert grant.final_error.type == "ratchet.LeaseLossLimit"
    assert grant.final_error.non_retryable
    assert "lost 3 times (limit 2)" in grant.final_error.message


async def test_an_ordinary_lease_carries_no_final_error(engine: Engine) -> None:
    task = task_def(handles_final_error=True)
    await trigger(engine, task)
    _, leased = await lease(engine, task)
    assert not convert.lease_to_pb(leased, 30.0).HasField("final_error")


@pytest.mark.parametrize("outcome", ["succeeded", "suspended", "failed", "retryable"])
async def test_any_outcome_of_a_finishing_lease_fails_the_run_with_its_final_error(
        engine: Engine, outcome: str) -> None:
    task = task_def(handles_final_error=True, max_lease_losses=1)
    run = await trigger(engine, task)
    await lose(engine, task, run.id)
    await lose(engine, task, run.id)
    session, leased = await lease(engine, task)
    final = leased.run.final_error
    assert final is not None and final.type == "ratchet.LeaseLossLimit"
    lease_id = str(leased.run.lease_id)
    if outcome == "succeeded":
        await engine.complete_success(session, run_id=run.id, lease_id=lease_id,
                                      output=b'"done anyway"', state=b'{"s": 1}')
    elif outcome == "suspended":
        await engine.complete_suspended(session, run_id=run.id, lease_id=lease_id,
                                        step_keys=["nap"], state=None)
    else:
        await engine.complete_failure(
            session, run_id=run.id, lease_id=lease_id, state=None,
            error=model.ErrorInfo(type="ValueError", message="from the worker",
                                  non_retryable=outcome == "failed"))
    failed = await get(engine, run.id)
    assert failed.status is model.RunStatus.FAILED
    assert failed.error == final
    assert failed.output is None and failed.attempt == 1
    assert session.free == 1  # the slot is free again
    if outcome == "succeeded":
        assert failed.state == '{"s": 1}'
    finished = [json.loads(e["data"]) for e in await engine.store.get_events(run.id)
                if e["type"] == "finished"]
    assert finished[-1]["status"] == "FAILED" and finished[-1]["finishing"] is True
    # A resent outcome (after a reconnect) is acknowledged, not refused.
    if outcome == "succeeded":
        await engine.complete_success(session, run_id=run.id, lease_id=lease_id,
                                      output=b'"done anyway"', state=None)


async def test_a_lost_finishing_lease_is_granted_three_more_times_then_the_run_fails(
        engine: Engine) -> None:
    task = task_def(handles_final_error=True, max_lease_losses=1)
    run = await trigger(engine, task)
    await lose(engine, task, run.id)
    await lose(engine, task, run.id)  # past the bound: finishing from here on
    final = (await get(engine, run.id)).final_error
    assert final is not None
    for _ in range(policy.FINISHING_RETRIES):
        leased = await lose(engine, task, run.id)
        assert leased.run.final_error == final
        assert (await get(engine, run.id)).final_error == final
    leased = await lose(engine, task, run.id, model.RunStatus.FAILED)
    assert leased.run.final_error == final
    failed = await get(engine, run.id)
    assert failed.error is not None and failed.error.type == "ratchet.LeaseLossLimit"
    assert failed.error.message == final.message + FINISHING_LOST
    assert failed.lease_losses == 2 + 1 + policy.FINISHING_RETRIES
    assert failed.attempt == 1


async def test_a_failure_reported_after_the_loss_takes_the_loss_back(engine: Engine) -> None:
    """The reaper's guess "lease lost" is replaced by the worker's own report:
    the attempt is charged, the loss is not counted."""
    task = task_def(handles_final_error=False, max_lease_losses=3, max_attempts=2)
    run = await trigger(engine, task)
    session, leased = await lease(engine, task)
    lease_id = str(leased.run.lease_id)
    # The worker's session is gone as far as the coordinator knows...
    engine.close_session(session)

    async def lost() -> bool:
        return (await get(engine, run.id)).lease_losses == 1

    await eventually(lost, "the lease loss")
    # ...but its failure report still arrives (same lease, not leased since).
    await engine.complete_failure(session, run_id=run.id, lease_id=lease_id, state=None,
                                  error=model.ErrorInfo(type="ValueError", message="real"))
    queued = await get(engine, run.id)
    assert queued.status is model.RunStatus.QUEUED
    assert queued.attempt == 1 and queued.lease_losses == 0
    assert queued.error is not None and queued.error.type == "ValueError"


async def test_a_late_report_undoes_the_loss_that_crossed_the_bound(engine: Engine) -> None:
    task = task_def(handles_final_error=True, max_lease_losses=1, max_attempts=3)
    run = await trigger(engine, task)
    await lose(engine, task, run.id)
    session, leased = await lease(engine, task)
    engine.close_session(session)

    async def finishing() -> bool:
        return (await get(engine, run.id)).final_error is not None

    await eventually(finishing, "the finishing requeue")
    await engine.complete_failure(session, run_id=run.id, lease_id=str(leased.run.lease_id),
                                  state=None,
                                  error=model.ErrorInfo(type="ValueError", message="real"))
    queued = await get(engine, run.id)
    assert queued.status is model.RunStatus.QUEUED and queued.final_error is None
    assert queued.lease_losses == 1 and queued.attempt == 1
    # An ordinary retry after the policy's backoff, not a finishing lease.
    assert queued.error is not None and queued.error.type == "ValueError"
    assert queued.run_at > time.time() + 20


async def test_a_late_report_of_a_lost_finishing_lease_ends_the_run(engine: Engine) -> None:
    task = task_def(handles_final_error=True, max_lease_losses=1)
    run = await trigger(engine, task)
    await lose(engine, task, run.id)
    await lose(engine, task, run.id)
    session, leased = await lease(engine, task)  # a finishing lease
    final = leased.run.final_error
    engine.close_session(session)

    async def lost() -> bool:
        return (await get(engine, run.id)).lease_losses == 3

    await eventually(lost, "the finishing lease's loss")
    await engine.complete_failure(session, run_id=run.id, lease_id=str(leased.run.lease_id),
                                  state=None, error=final or policy.MAX_DURATION_EXCEEDED)
    failed = await get(engine, run.id)
    assert failed.status is model.RunStatus.FAILED and failed.error == final
    assert failed.lease_losses == 2 and failed.attempt == 1


async def test_a_stale_lease_is_still_refused_under_a_finishing_lease(engine: Engine) -> None:
    task = task_def(handles_final_error=True, max_lease_losses=1)
    run = await trigger(engine, task)
    await lose(engine, task, run.id)
    await lose(engine, task, run.id)
    session, leased = await lease(engine, task)
    other, _ = await engine.open_session(ENV, "w-other", [task], 0, [])
    with pytest.raises(errors.StaleLease):
        await engine.complete_success(other, run_id=run.id, lease_id=str(leased.run.lease_id),
                                      output=b"1", state=None)
    assert (await get(engine, run.id)).status is model.RunStatus.RUNNING
    await engine.complete_success(session, run_id=run.id, lease_id=str(leased.run.lease_id),
                                  output=b"1", state=None)
    assert (await get(engine, run.id)).status is model.RunStatus.FAILED


async def test_replay_clears_the_final_error_and_gives_a_fresh_loss_budget(
        engine: Engine) -> None:
    task = task_def(handles_final_error=False, max_lease_losses=1)
    run = await trigger(engine, task)
    await lose(engine, task, run.id)
    await lose(engine, task, run.id, model.RunStatus.FAILED)
    replayed = await engine.replay(ENV, run.id, from_scratch=False)
    assert replayed.status is model.RunStatus.QUEUED and replayed.final_error is None
    assert replayed.retry.max_lease_losses == 2 + 1
    await lose(engine, task, run.id)  # one more loss is allowed again


async def test_a_finishing_lease_is_not_timed_out_by_the_max_duration(engine: Engine) -> None:
    """The run has failed already; its finishing lease must be able to run the
    compensations and the on_failure hook even past the run's max duration."""
    task = dataclasses.replace(task_def(handles_final_error=True, max_lease_losses=1),
                               max_duration=1.5)
    run = await trigger(engine, task)
    await lose(engine, task, run.id)
    await lose(engine, task, run.id)
    session, leased = await lease(engine, task)
    assert leased.run.final_error is not None
    started = leased.run.started_at
    assert started is not None

    async def past_the_deadline() -> bool:
        return time.time() > started + 1.5 + 0.2  # a few timer sweeps (0.05 s) later

    await eventually(past_the_deadline, "the max duration to pass")
    assert await engine.store.time_out_runs(500, policy.MAX_DURATION_EXCEEDED) == []
    assert (await get(engine, run.id)).status is model.RunStatus.RUNNING
    await engine.complete_failure(session, run_id=run.id, lease_id=str(leased.run.lease_id),
                                  state=None, error=leased.run.final_error)
    failed = await get(engine, run.id)
    assert failed.status is model.RunStatus.FAILED
    assert failed.error == leased.run.final_error


def test_max_lease_losses_travels_from_the_sdk_to_the_coordinator() -> None:
    from ratchet import _codec
    from ratchet.v1 import common_pb2

    sent = _codec.retry_to_pb(Retry(max_attempts=2, max_lease_losses=4))
    assert sent.max_lease_losses == 4
    assert convert.retry_from_pb(sent, Retry()).max_lease_losses == 4
    # 0 (unset, an older SDK) means the coordinator's default, 10.
    assert convert.retry_from_pb(common_pb2.RetryPolicy(), Retry()).max_lease_losses == 10
    assert convert.retry_to_pb(Retry(max_lease_losses=7)).max_lease_losses == 7
    with pytest.raises(ValueError, match="max_lease_losses must be at least 1"):
        Retry(max_lease_losses=0)

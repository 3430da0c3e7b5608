"""Writes under a lease, when another replica or the reaper got there first."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import errors, timers
from ratchet_server.engine.engine import Engine, EngineConfig, LeasePush, Session, TriggerSpec
from ratchet_server.store import Store
from tests.harness import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


def task_def(env: str) -> model.TaskDef:
    return model.TaskDef(env=env, id="t", version="1", queue="t",
                         retry=Retry(max_attempts=5, min_delay=0.01, max_delay=0.01),
                         payload_schema=None, output_schema=None, max_duration=None)




@asynccontextmanager
async def running(store: Store, **config: float) -> AsyncIterator[Engine]:
    engine = Engine(store, EngineConfig(reconcile_interval=0, **config))
    await engine.start()
    try:
        yield engine
    finally:
        await asyncio.wait_for(engine.stop(), 10.0)
        assert await timers.find_stuck(store) == []


async def leased(engine: Engine, env: str, slots: int = 2) -> tuple[Session, model.Run]:
    session, _ = await engine.open_session(env, "w-" + secrets.token_hex(3), [task_def(env)],
                                           slots, [])
    [(run, _)] = await engine.trigger(env, [TriggerSpec(task_id="t", payload=b"{}")])
    push = await asyncio.wait_for(session.outbox.get(), 5.0)
    assert isinstance(push, LeasePush) and push.leased.run.id == run.id
    return session, push.leased.run


async def test_a_lease_ended_elsewhere_frees_the_slot_when_the_worker_fails(
        pg_store: Store) -> None:
    async with running(pg_store) as engine:
        session, run = await leased(engine, "dev")
        assert session.free == 1
        # Another replica cancels the run; this one never hears of it.
        assert await pg_store.cancel_run("dev", run.id) is not None
        with pytest.raises(errors.StaleLease):
            await engine.complete_failure(
                session, run_id=run.id, lease_id=str(run.lease_id), state=None,
                error=model.ErrorInfo(type="Boom", message="late"))
        assert session.free == 2


async def test_a_failure_reported_just_after_the_reaper_decides_the_attempt(
        pg_store: Store) -> None:
    # No heartbeats in process: the lease expires, the reaper requeues the run
    # (same lease id), and the silent session is leased nothing more.
    async with running(pg_store, lease_ttl=0.5, heartbeat_interval=0.1) as engine:
        session, run = await leased(engine, "dev")

        async def requeued() -> bool:
            got = await pg_store.get_run("dev", run.id)
            return got is not None and got.status is model.RunStatus.QUEUED

        await eventually(requeued, timeout=5, what="the reaper to requeue the run")
        await engine.complete_failure(
            session, run_id=run.id, lease_id=str(run.lease_id), state=None,
            error=model.ErrorInfo(type="BadInput", message="never again", non_retryable=True))
        got = await pg_store.get_run("dev", run.id)
        assert got is not None and got.status is model.RunStatus.FAILED
        assert got.error is not None and got.error.type == "BadInput"
        assert got.attempt == 1  # the loss and the report are one attempt
        assert session.free == 2


async def test_a_lease_id_does_not_cross_environments(pg_store: Store) -> None:
    async with running(pg_store) as engine:
        _, run = await leased(engine, "victim")
        intruder, _ = await engine.open_session("intruder", "w-x", [task_def("intruder")], 0,
                                                [])
        with pytest.raises(errors.StaleLease):
            await engine.checkpoint(
                intruder, run_id=run.id, lease_id=str(run.lease_id), key="evil",
                kind=model.StepKind.RUN, event=model.StepEvent.COMPLETED, attempt=1,
                retry_base=0, output=b"1", error=None, started_at=time.time(),
                finished_at=time.time(), state=b'{"owned": true}')
        with pytest.raises(errors.StaleLease):
            await engine.complete_success(intruder, run_id=run.id, lease_id=str(run.lease_id),
                                          output=b'"stolen"', state=None)
        got = await pg_store.get_run("victim", run.id)
        assert got is not None and got.status is model.RunStatus.RUNNING and got.state is None
        assert await pg_store.get_steps(run.id) == []


async def test_a_lease_id_is_fenced_by_the_session_that_holds_it(pg_store: Store) -> None:
    async with running(pg_store) as engine:
        _, run = await leased(engine, "dev")
        other, _ = await engine.open_session("dev", "w-other", [task_def("dev")], 0, [])
        with pytest.raises(errors.StaleLease):
            await engine.complete_success(other, run_id=run.id, lease_id=str(run.lease_id),
                                          output=b'"mine"', state=None)
        got = await pg_store.get_run("dev", run.id)
        assert got is not None and got.status is model.RunStatus.RUNNING


async def test_a_failure_report_racing_the_reaper_is_one_attempt_either_way(
        pg_store: Store) -> None:
    """Both sides at once, many times: the worker reports a non-retryable
    failure just before, during or just after the reaper takes its expired
    lease. Whichever commits first, the attempt is counted once and the lease
    loss is either never counted or taken back; a report the run has moved
    past is refused and changes nothing."""
    async with running(pg_store, lease_ttl=0.3, heartbeat_interval=0.1,
                       reap_interval=0.02) as engine:
        session, _ = await engine.open_session("dev", "w-silent", [task_def("dev")], 40, [])
        specs = [TriggerSpec(task_id="t", payload=b"{}") for _ in range(40)]
        runs = [run for run, _ in await engine.trigger("dev", specs)]
        grants: dict[str, model.Run] = {}
        while len(grants) < len(runs):
            push = await asyncio.wait_for(session.outbox.get(), 5.0)
            assert isinstance(push, LeasePush)
            grants[push.leased.run.id] = push.leased.run
        leased_at = time.monotonic()
        rng = secrets.SystemRandom()

        async def report(run: model.Run) -> bool:
            await asyncio.sleep(max(0.0, leased_at + rng.uniform(0.2, 0.45) - time.monotonic()))
            try:
                await engine.complete_failure(
                    session, run_id=run.id, lease_id=str(run.lease_id), state=None,
                    error=model.ErrorInfo(type="BadInput", message="no", non_retryable=True))
            except errors.StaleLease:
                return False
            return True

        accepted = await asyncio.gather(*(report(grants[r.id]) for r in runs))
        for run, ok in zip(runs, accepted, strict=True):
            got = await pg_store.get_run("dev", run.id)
            assert got is not None
            if ok:
                assert got.status is model.RunStatus.FAILED, got
                assert got.error is not None and got.error.type == "BadInput"
                assert (got.attempt, got.lease_losses) == (1, 0), got
            else:
                assert got.status is not model.RunStatus.FAILED or \
                    got.error is None or got.error.type != "BadInput", got
                assert got.lease_losses >= 1, got
        assert any(accepted)

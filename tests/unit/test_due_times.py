"""Due times: workers send durations, the coordinator's clock decides (issue 9)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest

from ratchet import Context, Retry
from ratchet.v1 import common_pb2, worker_pb2
from ratchet_server import model
from ratchet_server.engine import errors
from ratchet_server.engine.engine import Engine, Session, TriggerSpec

pytestmark = pytest.mark.timeout(20)

ENV = "dev"


class Journal:
    def __init__(self) -> None:
        self.checkpoints: list[worker_pb2.Checkpoint] = []

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None:
        self.checkpoints.append(checkpoint)

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]:
        raise AssertionError("not used")


def make_ctx(journal: Journal, steps: dict[str, common_pb2.Step] | None = None,
             clock_offset: float = 0.0) -> Context:
    return Context(run_id="run_1", task_id="t", attempt=1, lease_id="lease-1",
                   steps=steps or {}, state={}, journal=journal, sleep_threshold=1.0,
                   clock_offset=clock_offset)


def seconds(d: Any) -> float:
    return float(d.ToNanoseconds()) / 1e9


async def until_suspended(ctx: Context, work: Any) -> None:
    """Run `work` until the run would suspend, then stop it."""
    task = asyncio.ensure_future(work)
    await asyncio.wait_for(ctx.suspended.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- the worker sends durations --------------------------------------------------------


async def test_a_long_sleep_sends_its_length() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    await until_suspended(ctx, ctx.sleep("nap", 60))
    [cp] = journal.checkpoints
    assert cp.event == worker_pb2.STEP_EVENT_STARTED and cp.kind == common_pb2.STEP_KIND_SLEEP
    assert seconds(cp.wake_after) == pytest.approx(60)
    # The deprecated absolute time still goes along, for older coordinators.
    assert cp.wake_at.ToNanoseconds() / 1e9 == pytest.approx(time.time() + 60, abs=2)


async def test_sleep_until_becomes_a_duration_at_the_call() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    when = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    await until_suspended(ctx, ctx.sleep_until("nap", when))
    assert seconds(journal.checkpoints[0].wake_after) == pytest.approx(600, abs=2)


async def test_a_token_timeout_is_a_duration() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    await ctx.create_token("approve", timeout=dt.timedelta(hours=1))
    assert seconds(journal.checkpoints[0].wake_after) == pytest.approx(3600)
    await ctx.create_token("forever")
    assert not journal.checkpoints[1].HasField("wake_after")
    with pytest.raises(ValueError, match="negative"):
        await ctx.create_token("never", timeout=-1)


async def test_a_long_step_backoff_sends_retry_after() -> None:
    journal = Journal()
    ctx = make_ctx(journal)

    def fails() -> None:
        raise ConnectionError("down")

    await until_suspended(ctx, ctx.step("s", fails, retry=Retry(max_attempts=2, min_delay=30,
                                                                 max_delay=30)))
    [cp] = journal.checkpoints
    assert cp.event == worker_pb2.STEP_EVENT_RETRYING
    assert seconds(cp.retry_after) == pytest.approx(30)


async def test_a_resumed_run_measures_a_pending_sleep_on_the_coordinators_clock() -> None:
    """The worker's clock is 10 minutes slow: the snapshot's wake_at (the
    coordinator's time) is 0.2 s away, not 10 minutes."""
    journal = Journal()
    offset = 600.0  # coordinator minus worker
    due = common_pb2.Step(key="nap", kind=common_pb2.STEP_KIND_SLEEP,
                          status=common_pb2.STEP_STATUS_RUNNING, attempts=1)
    due.wake_at.FromNanoseconds(int((time.time() + offset + 0.2) * 1e9))
    ctx = make_ctx(journal, {"nap": due}, clock_offset=offset)
    started = time.monotonic()
    await asyncio.wait_for(ctx.sleep("nap", 3600), 5)
    assert 0.1 <= time.monotonic() - started < 2
    assert journal.checkpoints[-1].event == worker_pb2.STEP_EVENT_COMPLETED


# --- the coordinator adds them to its own clock ----------------------------------------


async def leased(engine: Engine) -> tuple[Session, model.Run]:
    task = model.TaskDef(env=ENV, id="t", version="1", queue="t",
                         retry=Retry(max_attempts=3, min_delay=30, max_delay=30),
                         payload_schema=None, output_schema=None, max_duration=None)
    session, _ = await engine.open_session(ENV, "worker-1", [task], 4, [])
    await engine.trigger(ENV, [TriggerSpec(task_id="t", payload=b"{}")])
    push = await asyncio.wait_for(session.outbox.get(), 2)
    return session, push.leased.run  # type: ignore[union-attr]


async def step_wake_at(engine: Engine, run_id: str, key: str) -> float | None:
    _, steps = await engine.get_run(ENV, run_id)
    return next(s.wake_at for s in steps if s.key == key)


async def start_sleep(engine: Engine, session: Session, run: model.Run, key: str,
                      **times: Any) -> None:
    await engine.checkpoint(
        session, run_id=run.id, lease_id=str(run.lease_id), key=key, kind=model.StepKind.SLEEP,
        event=model.StepEvent.STARTED, attempt=1, retry_base=0, output=None, error=None,
        started_at=time.time(), finished_at=None, state=None, **times)


async def test_wake_after_counts_on_the_coordinators_clock(engine: Engine) -> None:
    session, run = await leased(engine)
    slow_worker_now = time.time() - 600
    await start_sleep(engine, session, run, "nap", wake_after=60.0,
                      wake_at=slow_worker_now + 60)
    assert await step_wake_at(engine, run.id, "nap") == pytest.approx(time.time() + 60, abs=2)


async def test_an_old_workers_absolute_wake_at_is_still_honoured(engine: Engine) -> None:
    session, run = await leased(engine)
    at = time.time() + 120
    await start_sleep(engine, session, run, "nap", wake_at=at)
    assert await step_wake_at(engine, run.id, "nap") == pytest.approx(at, abs=0.01)


async def test_retry_after_counts_on_the_coordinators_clock(engine: Engine) -> None:
    session, run = await leased(engine)
    await engine.checkpoint(
        session, run_id=run.id, lease_id=str(run.lease_id), key="s", kind=model.StepKind.RUN,
        event=model.StepEvent.RETRYING, attempt=1, retry_base=0, output=None,
        error=model.ErrorInfo(type="E", message="m"), started_at=time.time(), finished_at=None,
        state=None, retry_after=45.0, retry_at=time.time() - 600)
    assert await step_wake_at(engine, run.id, "s") == pytest.approx(time.time() + 45, abs=2)


@pytest.mark.parametrize("after", [-1.0, float("nan"), 11 * 366 * 86400.0])
async def test_a_wait_out_of_bounds_is_invalid(engine: Engine, after: float) -> None:
    session, run = await leased(engine)
    with pytest.raises(errors.InvalidArgument, match=r"^a wait "):
        await start_sleep(engine, session, run, "nap", wake_after=after)


async def test_failed_retry_after_counts_on_the_coordinators_clock(engine: Engine) -> None:
    session, run = await leased(engine)
    await engine.complete_failure(session, run_id=run.id, lease_id=str(run.lease_id),
                                  error=model.ErrorInfo(type="E", message="m"), state=None,
                                  retry_after=5.0, retry_at=time.time() - 600)
    queued, _ = await engine.get_run(ENV, run.id)
    assert queued.status is model.RunStatus.QUEUED
    assert queued.run_at == pytest.approx(time.time() + 5, abs=2)

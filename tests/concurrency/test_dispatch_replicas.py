"""Two coordinators on one Postgres (issue 11's dispatcher): runs triggered on
one for a task only the other serves, and runs of a task both serve, all reach
a session (shared leases, NOTIFY naming the task, wake-ups only where a slot
is free), none twice, and every one finishes."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine.engine import Engine, EngineConfig, LeasePush, Session, TriggerSpec
from ratchet_server.store import open_store

pytestmark = pytest.mark.timeout(120)

ENV = "dev"


def task_def(task_id: str) -> model.TaskDef:
    return model.TaskDef(env=ENV, id=task_id, version="1", queue=task_id,
                         retry=Retry(max_attempts=3), payload_schema=None, output_schema=None,
                         max_duration=None)


@pytest.fixture
async def engines(pg_url: str) -> AsyncIterator[list[Engine]]:
    stores = [await open_store(pg_url) for _ in range(2)]
    await stores[0].migrate()
    started = [Engine(s, EngineConfig(session_grace=0.05)) for s in stores]
    for e in started:
        await e.start()
    try:
        yield started
    finally:
        for e in started:
            await asyncio.wait_for(e.stop(), 10.0)
        for s in stores:
            await s.close()


async def work(engine: Engine, session: Session, done: collections.Counter[str]) -> None:
    """A worker: finish every lease pushed to the session, a moment later."""
    while True:
        push = await session.outbox.get()
        assert isinstance(push, LeasePush)
        run = push.leased.run
        assert run.lease_owner == session.id and len(session.active) <= session.slots
        await asyncio.sleep(0.002)
        await engine.complete_success(session, run_id=run.id, lease_id=str(run.lease_id),
                                      output=b"1", state=None)
        done[run.id] += 1


async def test_runs_reach_sessions_on_either_coordinator(engines: list[Engine]) -> None:
    a, b = engines
    await b.register_tasks([task_def("only_a")])
    done: collections.Counter[str] = collections.Counter()
    sessions: list[tuple[Engine, Session]] = []
    for engine, worker, task_ids, slots in ((a, "wa1", ("only_a", "both"), 2),
                                             (a, "wa2", ("only_a", "both"), 3),
                                             (b, "wb1", ("both",), 2), (b, "wb2", ("both",), 1)):
        session, _ = await engine.open_session(ENV, worker, [task_def(t) for t in task_ids],
                                               slots, [])
        sessions.append((engine, session))
    workers = [asyncio.create_task(work(e, s, done)) for e, s in sessions]
    try:
        triggered: list[str] = []
        for round_ in range(8):
            # "only_a" is triggered on the coordinator that does not serve it.
            for engine, task_id, n in ((b, "only_a", 6), (a, "both", 5), (b, "both", 5)):
                results = await engine.trigger(
                    ENV, [TriggerSpec(task_id=task_id, payload=b"{}")] * n)
                triggered += [run.id for run, _ in results]
            await asyncio.sleep(0.01 * (round_ % 3))
        for _ in range(3000):
            if len(done) == len(triggered):
                break
            await asyncio.sleep(0.01)
    finally:
        for w in workers:
            if not w.done():
                w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    for w in workers:
        assert w.cancelled(), w.exception()
    assert sorted(done) == sorted(triggered)
    assert set(done.values()) == {1}
    for run_id in triggered:
        run = await a.store.get_run(ENV, run_id)
        assert run is not None and run.status is model.RunStatus.COMPLETED and run.attempt == 1

"""The dispatcher (issue 11): sessions serving the same tasks lease together and
share the runs, different task sets lease concurrently, and a "runs ready"
notification wakes the dispatcher only for a task served here with a free slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine.engine import Engine, EngineConfig, LeasePush, Session, TriggerSpec
from ratchet_server.store import Store

pytestmark = pytest.mark.timeout(30)

ENV = "dev"
WAIT = 2.0


class Spy:
    """The store, with the engine's listen callback kept and lease_ready calls
    recorded (and optionally slowed down)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.callback: Callable[[str, str], None] | None = None
        self.leases: list[tuple[str, ...]] = []
        self.lease_delay = 0.0
        self.in_flight = 0
        self.most_in_flight = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def listen(self, callback: Callable[[str, str], None]) -> None:
        self.callback = callback

    async def lease_ready(self, **kwargs: Any) -> list[model.LeasedRun]:
        self.leases.append(tuple(kwargs["task_ids"]))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.lease_delay:
                await asyncio.sleep(self.lease_delay)
            result: list[model.LeasedRun] = await self.store.lease_ready(**kwargs)
            return result
        finally:
            self.in_flight -= 1


@pytest.fixture
async def spy(store: Store) -> Spy:
    return Spy(store)


@pytest.fixture
async def engine(spy: Spy) -> AsyncIterator[Engine]:
    e = Engine(spy, EngineConfig(session_grace=0.05, reap_interval=0.05))  # type: ignore[arg-type]
    await e.start()
    try:
        yield e
    finally:
        await asyncio.wait_for(e.stop(), 5.0)


def task_def(task_id: str) -> model.TaskDef:
    return model.TaskDef(env=ENV, id=task_id, version="1", queue=task_id,
                         retry=Retry(max_attempts=3), payload_schema=None, output_schema=None,
                         max_duration=None)


async def open_session(engine: Engine, task_ids: Sequence[str], slots: int) -> Session:
    session, _ = await engine.open_session(ENV, "w", [task_def(t) for t in task_ids], slots, [])
    return session


async def trigger(engine: Engine, task_id: str, n: int) -> list[str]:
    results = await engine.trigger(ENV, [TriggerSpec(task_id=task_id, payload=b"{}")] * n)
    return [run.id for run, _ in results]


def pushed(session: Session) -> list[model.LeasedRun]:
    items = []
    while not session.outbox.empty():
        push = session.outbox.get_nowait()
        assert isinstance(push, LeasePush)
        items.append(push.leased)
    return items


async def idle(engine: Engine) -> None:
    """Until the dispatcher waits for a wake-up (each pass clears the event)."""
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not engine._wake.is_set():
            return
    raise AssertionError("the dispatcher never went idle")


async def test_sessions_of_one_task_set_share_one_lease(engine: Engine, spy: Spy) -> None:
    sessions = [await open_session(engine, ["a", "b"], slots=2) for _ in range(3)]
    await idle(engine)
    spy.leases.clear()
    runs = await trigger(engine, "a", 3)
    for _ in range(200):
        if sum(len(s.active) for s in sessions) == 3:
            break
        await asyncio.sleep(0.01)
    got = [pushed(s) for s in sessions]
    # One run each (the first session's two free slots do not take two of
    # the three), each owned by the session it was pushed to ...
    assert sorted(len(g) for g in got) == [1, 1, 1]
    assert sorted(lr.run.id for g in got for lr in g) == sorted(runs)
    for session, items in zip(sessions, got, strict=True):
        assert all(lr.run.lease_owner == session.id for lr in items)
        assert {lr.run.lease_id for lr in items} == session.active
    # ... from one statement for the three sessions per pass.
    assert spy.leases and all(t == ("a", "b") for t in spy.leases)
    assert len(spy.leases) <= 2


async def test_different_task_sets_lease_concurrently(engine: Engine, spy: Spy) -> None:
    a = await open_session(engine, ["a"], slots=1)
    b = await open_session(engine, ["b"], slots=1)
    await idle(engine)
    spy.lease_delay = 0.2
    await engine.trigger(ENV, [TriggerSpec(task_id=t, payload=b"{}") for t in ("a", "b")])
    for _ in range(300):
        if a.active and b.active:
            break
        await asyncio.sleep(0.01)
    assert a.active and b.active
    assert spy.most_in_flight >= 2


async def test_a_notification_wakes_the_dispatcher_only_for_a_task_with_free_slots_here(
    engine: Engine, spy: Spy,
) -> None:
    assert spy.callback is not None
    session = await open_session(engine, ["a"], slots=1)
    await engine.register_tasks([task_def("b")])  # served by no session here
    await idle(engine)
    for env, task_id in ((ENV, "b"), ("other", "a"), ("other", "*")):
        spy.callback(env, task_id)
        assert not engine._wake.is_set(), (env, task_id)
    for env, task_id in ((ENV, "a"), (ENV, "*"), ("*", "*"), ("*", "a")):
        await idle(engine)
        spy.callback(env, task_id)
        assert engine._wake.is_set(), (env, task_id)
    # A local trigger of a task nobody here serves wakes nothing either.
    await idle(engine)
    await trigger(engine, "b", 1)
    assert not engine._wake.is_set()
    # No free slot: a notification for its task does not wake it; the freed
    # slot does, and the run that became ready meanwhile is leased.
    [first] = await trigger(engine, "a", 1)
    for _ in range(200):
        if session.active:
            break
        await asyncio.sleep(0.01)
    [lease] = pushed(session)
    assert lease.run.id == first and session.free == 0
    await idle(engine)
    # Made ready by "another coordinator": the store directly, then its notification.
    new = await engine._new_run(ENV, TriggerSpec(task_id="a", payload=b"{}"), lease.run.run_at)
    [(second, _)] = await spy.store.create_runs([new])
    spy.callback(ENV, "a")
    assert not engine._wake.is_set()
    await engine.complete_success(session, run_id=first, lease_id=str(lease.run.lease_id),
                                  output=b"1", state=None)
    item = await asyncio.wait_for(session.outbox.get(), WAIT)
    assert isinstance(item, LeasePush) and item.leased.run.id == second.id


async def test_the_dispatcher_polls_at_the_configured_interval(spy: Spy) -> None:
    """With no wake-up (another replica made the run ready, and no NOTIFY
    arrives) the run is found by the next poll, `poll_interval` apart."""
    engine = Engine(spy, EngineConfig(session_grace=0.05, poll_interval=0.05))  # type: ignore[arg-type]
    await engine.start()
    try:
        session = await open_session(engine, ["a"], slots=1)
        await idle(engine)
        spy.leases.clear()
        await asyncio.sleep(0.5)
        # About ten idle passes in half a second (one with the default 1 s).
        assert len(spy.leases) >= 5, spy.leases
        new = await engine._new_run(ENV, TriggerSpec(task_id="a", payload=b"{}"), 0.0)
        [(run, _)] = await spy.store.create_runs([new])  # no wake-up, no notification
        item = await asyncio.wait_for(session.outbox.get(), WAIT)
        assert isinstance(item, LeasePush) and item.leased.run.id == run.id
    finally:
        await asyncio.wait_for(engine.stop(), 5.0)


async def test_a_partial_lease_looks_again_soon(spy: Spy) -> None:
    """A lease that filled only some free slots while ready runs remained
    (a concurrent lease held them locked and left them) is followed by
    another pass within PARTIAL_LEASE_RECHECK, not the whole poll interval."""
    engine = Engine(spy, EngineConfig(session_grace=0.05, poll_interval=5.0))  # type: ignore[arg-type]
    real = spy.store.lease_ready
    held = [True]

    async def held_once(**kwargs: Any) -> list[model.LeasedRun]:
        if held and kwargs["limit"] > 1:
            held.clear()  # this pass, one run was locked by someone else
            kwargs = {**kwargs, "limit": 1, "owners": kwargs["owners"][:1]}
        result: list[model.LeasedRun] = await real(**kwargs)
        return result

    spy.store.lease_ready = held_once  # type: ignore[method-assign]
    await engine.start()
    try:
        session = await open_session(engine, ["a"], slots=2)
        await idle(engine)
        await trigger(engine, "a", 2)
        first = await asyncio.wait_for(session.outbox.get(), WAIT)
        second = await asyncio.wait_for(session.outbox.get(), 1.0)  # not the 5 s poll
        assert isinstance(first, LeasePush) and isinstance(second, LeasePush)
    finally:
        await asyncio.wait_for(engine.stop(), 5.0)

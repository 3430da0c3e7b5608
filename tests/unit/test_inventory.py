"""The engine's inventory (ListTasks, ListWorkers): the environment's
registered tasks, and the sessions on this coordinator that serve them."""

from __future__ import annotations

import pytest

from ratchet_server.engine.engine import Engine
from tests.unit.test_engine import ENV, next_push, open_session, task_def, trigger_one

pytestmark = pytest.mark.timeout(30)


async def test_workers_show_slots_used_and_free_per_environment(engine: Engine) -> None:
    first = await open_session(engine, task_def("a"), slots=3)
    second = await open_session(engine, task_def("b"), slots=2)
    other, _ = await engine.open_session("other", "w", [task_def("a")], 5, [])
    await trigger_one(engine, "a")
    await next_push(first)

    listed = engine.list_workers(ENV)
    assert [w.session_id for w in listed] == [first.id, second.id]  # oldest first
    assert (listed[0].slots, listed[0].slots_used, listed[0].task_ids) == (3, 1, ("a",))
    assert listed[0].worker_id == "worker-1" and listed[0].coordinator
    assert listed[0].last_seen_at >= listed[0].connected_at
    assert [w.session_id for w in engine.list_workers(ENV, "b")] == [second.id]
    assert [w.session_id for w in engine.list_workers("other")] == [other.id]

    engine.close_session(first)
    assert [w.session_id for w in engine.list_workers(ENV)] == [second.id]


async def test_tasks_name_the_sessions_serving_them_until_they_close(engine: Engine) -> None:
    session = await open_session(engine, task_def("a"), task_def("b"))
    a, b = await engine.list_tasks(ENV)
    assert (a.task.id, a.served_by) == ("a", (session.id,)) and b.served_by == (session.id,)
    assert a.task.retry == task_def("a").retry and a.registered_at > 0
    engine.close_session(session)
    [b] = await engine.list_tasks(ENV, "b")
    assert b.task.id == "b" and b.served_by == ()
    assert await engine.list_tasks("other") == []

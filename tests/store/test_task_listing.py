"""`Store.list_tasks` (ListTasks, `ratchet tasks`): an environment's
registered tasks in id order, each with when a hello last registered it."""

from __future__ import annotations

import pytest

from ratchet import Retry
from ratchet_server import clock, model
from ratchet_server.store import Store
from tests.store.test_conformance import ENV, store

__all__ = ["store"]  # the fixture, once per kind of store

pytestmark = pytest.mark.timeout(60)


def task(task_id: str, env: str = ENV, version: str = "1") -> model.TaskDef:
    return model.TaskDef(env=env, id=task_id, version=version, queue=task_id,
                         retry=Retry(max_attempts=4, min_delay=0.5),
                         payload_schema='{"type": "object"}', output_schema=None,
                         max_duration=60.0)


async def test_tasks_list_in_id_order_per_environment(store: Store) -> None:
    await store.upsert_tasks([task("b"), task("a"), task("c", env="other")])
    listed = await store.list_tasks(ENV)
    assert [t for t, _ in listed] == [task("a"), task("b")]
    assert [t.id for t, _ in await store.list_tasks("other")] == ["c"]
    assert await store.list_tasks("nobody") == []


async def test_one_task_and_when_it_was_last_registered(store: Store) -> None:
    before = clock.now()
    await store.upsert_tasks([task("a"), task("b")])
    [(found, first)] = await store.list_tasks(ENV, "b")
    assert found == task("b") and first >= before
    assert await store.list_tasks(ENV, "zzz") == []
    await store.upsert_tasks([task("b", version="2")])
    [(found, again)] = await store.list_tasks(ENV, "b")
    assert found.version == "2" and again >= first

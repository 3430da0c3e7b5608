"""Step writes, the per-step hot path: on Postgres a batch of step writes
alone goes as one statement committed on its own (`apply_step_writes`,
test_round_trips.py counts it); whatever the path, the results are the same
as applying the writes one by one."""

from __future__ import annotations

import time
import types
from typing import Any

import pytest

from ratchet_server import model
from ratchet_server.store import Store, _dialect, _writes
from tests.store.test_conformance import (
    create,
    event_types,
    lease,
    must_get,
    new_run,
    step_write,
    store,
    transition,
)

__all__ = ["store"]  # the fixture, once per kind of store

pytestmark = pytest.mark.timeout(60)


def completed(run: model.Run, key: str) -> model.Event:
    return model.Event(run_id=run.id, type=model.EventType.STEP_COMPLETED, at=time.time(),
                       attempt=1, lease_id=run.lease_id, step_key=key)


async def test_a_batch_of_many_runs_steps_reports_each_write(store: Store) -> None:
    await create(store, new_run(), new_run(), new_run())
    a, b, c = [leased.run for leased in await lease(store, limit=3)]
    writes = [
        step_write(b, "one", state='{"b": 1}', events=(completed(b, "one"),)),
        step_write(a, "one", events=(completed(a, "one"),)),
        step_write(c, "one", lease_id="stale", state='{"c": 1}', events=(completed(c, "one"),)),
        step_write(b, "two", state='{"b": 2}', events=(completed(b, "two"),)),
        step_write(a, "two", state='{"a": 2}', events=(completed(a, "two"),)),
        step_write(b, "three", events=(completed(b, "three"),)),
    ]
    assert await store.apply(writes) == [True, True, False, True, True, True]
    # (Steps of one batch share created_at, so get_steps lists them by key.)
    assert [s.key for s in await store.get_steps(b.id)] == ["one", "three", "two"]
    assert [s.key for s in await store.get_steps(a.id)] == ["one", "two"]
    assert await store.get_steps(c.id) == []
    # The run's state is the last one sent; a write without state keeps it.
    assert (await must_get(store, b.id)).state == '{"b": 2}'
    assert (await must_get(store, a.id)).state == '{"a": 2}'
    assert (await must_get(store, c.id)).state is None
    # Each step's state is kept with its COMPLETED checkpoint (replays restore it).
    assert [s.state for s in await store.get_steps(b.id)] == ['{"b": 1}', None, '{"b": 2}']
    # History in the order written; nothing for the stale write.
    events = await store.get_events(b.id)
    assert [(e["type"], e["step_key"]) for e in events[-3:]] == [
        ("step_completed", "one"), ("step_completed", "two"), ("step_completed", "three")]
    assert "step_completed" not in await event_types(store, c.id)


async def test_a_step_written_twice_in_one_batch(store: Store) -> None:
    """Not batchable as one statement (ON CONFLICT cannot change a row twice
    in one statement): applied one by one, with the same result."""
    await create(store, new_run())
    [leased] = await lease(store, limit=1)
    run = leased.run
    error = model.ErrorInfo(type="Boom", message="once")
    writes = [
        step_write(run, "s", status=model.StepStatus.RUNNING, attempt=1, error=error),
        step_write(run, "s", attempt=2, output="7"),
    ]
    assert await store.apply(writes) == [True, True]
    [step] = await store.get_steps(run.id)
    assert (step.status, step.attempts, step.output) == (model.StepStatus.COMPLETED, 2, "7")


async def test_a_completed_step_is_not_overwritten_by_a_late_duplicate(store: Store) -> None:
    await create(store, new_run())
    [leased] = await lease(store, limit=1)
    run = leased.run
    assert await store.apply([step_write(run, "s", output="1")]) == [True]
    # The fence passes (same lease) but the COMPLETED step stays as it was.
    assert await store.apply([step_write(run, "s", attempt=2, output="2")]) == [True]
    [step] = await store.get_steps(run.id)
    assert (step.output, step.attempts) == ("1", 1)


def test_only_step_batches_go_as_one_statement() -> None:
    # step_write and transition read only a run's id and lease id.
    run: Any = types.SimpleNamespace(id="r1", lease_id="l1")
    other: Any = types.SimpleNamespace(id="r2", lease_id="l2")
    pg = _dialect.POSTGRES
    assert _writes.one_statement(pg, [step_write(run, "a"), step_write(other, "a")])
    assert _writes.one_statement(pg, [step_write(run, "a"), step_write(run, "b")])
    assert not _writes.one_statement(pg, [])
    assert not _writes.one_statement(_dialect.SQLITE, [step_write(run, "a")])
    # The same step twice, two leases of one run, or any transition: not one statement.
    assert not _writes.one_statement(pg, [step_write(run, "a"), step_write(run, "a")])
    assert not _writes.one_statement(pg, [step_write(run, "a"),
                                          step_write(run, "b", lease_id="older")])
    assert not _writes.one_statement(
        pg, [step_write(run, "a"), transition(other, model.RunStatus.COMPLETED)])

"""Child waits end in the transaction of their last child (migration 0008).

Each test installs the engine's rules the way the engine does
(`Store.use_child_wait_rules`) and never runs the sweep
(`timers.finish_child_waits`): the count alone must end each wait, at the
last child and not before, whichever way the children end (a fenced write,
cancel, expiry, time-out) and after a final child is queued again (replay).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import policy
from ratchet_server.store import Store
from tests.store.test_conformance import (
    ENV,
    create,
    lease,
    lease_one,
    must_get,
    new_run,
    transition,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def woke(store: Store) -> list[int]:
    calls: list[int] = []
    store.use_child_wait_rules(policy.child_wait_outcome, policy.counts_as_woken,
                               lambda: calls.append(1))
    return calls


async def waiting_parent(store: Store, n: int, **child: object) -> tuple[model.Run, list[str]]:
    """A parent WAITING on step "fan" for `n` new children."""
    await create(store, new_run("parent"))
    parent = await lease_one(store, task_ids=("parent",))
    kids = [dataclasses.replace(new_run("child", **child), parent_run_id=parent.id,
                                parent_step_key="fan", child_index=i) for i in range(n)]
    ids = await store.create_children(parent=parent.id, lease_id=str(parent.lease_id),
                                      step_key="fan", children=kids, wait=True)
    assert ids is not None
    suspend = transition(parent, model.RunStatus.WAITING, waiting_on=("fan",),
                         wake_rule=policy.counts_as_woken)
    assert await store.apply([suspend]) == [True]
    return parent, ids


async def fan(store: Store, parent: model.Run) -> model.Step:
    [step] = [s for s in await store.get_steps(parent.id) if s.key == "fan"]
    return step


async def lease_children(store: Store, n: int) -> dict[str, model.Run]:
    leased = await lease(store, task_ids=("child",), limit=n)
    assert len(leased) == n
    return {item.run.id: item.run for item in leased}


async def assert_pending(store: Store, parent: model.Run) -> None:
    assert (await must_get(store, parent.id)).status is model.RunStatus.WAITING
    assert (await fan(store, parent)).status is model.StepStatus.RUNNING


async def assert_woken(store: Store, parent: model.Run, ids: Sequence[str],
                       statuses: Sequence[str]) -> list[dict[str, object]]:
    assert (await must_get(store, parent.id)).status is model.RunStatus.QUEUED
    step = await fan(store, parent)
    assert step.status is model.StepStatus.COMPLETED
    results: list[dict[str, object]] = json.loads(str(step.output))
    assert [r["run_id"] for r in results] == list(ids)
    assert [r["status"] for r in results] == list(statuses)
    return results


async def test_the_last_child_completing_ends_the_wait(store: Store, woke: list[int]) -> None:
    parent, ids = await waiting_parent(store, 3)
    kids = await lease_children(store, 3)
    # Two children end in one group commit, the last one alone.
    first = [transition(kids[i], model.RunStatus.COMPLETED, output=json.dumps(n))
             for n, i in enumerate(ids[:2])]
    assert await store.apply(first) == [True, True]
    await assert_pending(store, parent)
    assert woke == []
    failed = transition(kids[ids[2]], model.RunStatus.FAILED,
                        error=model.ErrorInfo(type="E", message="no"))
    assert await store.apply([failed]) == [True]
    results = await assert_woken(store, parent, ids, ["COMPLETED", "COMPLETED", "FAILED"])
    assert [r["output"] for r in results] == [0, 1, None]
    assert woke == [1]
    # Nothing is left for the safety net.
    assert await store.child_wait_candidates(10) == []


async def test_children_ending_in_one_batch_end_the_wait_once(store: Store,
                                                               woke: list[int]) -> None:
    parent, ids = await waiting_parent(store, 4)
    kids = await lease_children(store, 4)
    assert await store.apply([transition(kids[i], model.RunStatus.COMPLETED, output="1")
                              for i in reversed(ids)]) == [True] * 4
    await assert_woken(store, parent, ids, ["COMPLETED"] * 4)
    events = [e["type"] for e in await store.get_events(parent.id)]
    assert events.count(model.EventType.WAIT_COMPLETED.value) == 1


async def test_a_wait_ends_before_the_parent_suspends(store: Store, woke: list[int]) -> None:
    await create(store, new_run("parent"))
    parent = await lease_one(store, task_ids=("parent",))
    kid = dataclasses.replace(new_run("child"), parent_run_id=parent.id,
                              parent_step_key="fan", child_index=0)
    ids = await store.create_children(parent=parent.id, lease_id=str(parent.lease_id),
                                      step_key="fan", children=[kid], wait=True)
    assert ids is not None
    [child] = (await lease_children(store, 1)).values()
    assert await store.apply([transition(child, model.RunStatus.COMPLETED, output="7")]) == [True]
    # The step ended while the parent still ran; its suspension wakes it at once.
    assert (await fan(store, parent)).status is model.StepStatus.COMPLETED
    suspend = transition(parent, model.RunStatus.WAITING, waiting_on=("fan",),
                         wake_rule=policy.counts_as_woken)
    assert await store.apply([suspend]) == [True]
    await assert_woken(store, parent, ids, ["COMPLETED"])


async def test_cancel_expiry_and_time_out_count_too(store: Store, woke: list[int]) -> None:
    parent, ids = await waiting_parent(store, 3, expire_at=time.time() + 0.3, max_duration=0.01)
    kids = await lease_children(store, 2)  # the third stays QUEUED and expires
    running = [k for k in ids if k in kids]
    assert await store.cancel_run(ENV, running[0]) is not None
    await assert_pending(store, parent)
    await asyncio.sleep(0.35)
    timed_out = await store.time_out_runs(10, policy.MAX_DURATION_EXCEEDED)
    assert [r.run_id for r in timed_out] == [running[1]]
    await assert_pending(store, parent)
    [queued] = [k for k in ids if k not in kids]
    assert await store.expire_runs(10) == [queued]
    statuses = {running[0]: "CANCELED", running[1]: "TIMED_OUT", queued: "EXPIRED"}
    await assert_woken(store, parent, ids, [statuses[i] for i in ids])


async def test_cancel_of_the_parents_children_ends_the_wait(store: Store,
                                                            woke: list[int]) -> None:
    parent, _ = await waiting_parent(store, 3)
    assert await store.cancel_run(ENV, parent.id) is not None
    assert len(await store.cancel_children(parent.id)) == 3
    step = await fan(store, parent)
    assert step.status is model.StepStatus.COMPLETED
    assert {r["status"] for r in json.loads(str(step.output))} == {"CANCELED"}
    assert (await must_get(store, parent.id)).status is model.RunStatus.CANCELED


async def test_a_replayed_child_counts_again(store: Store, woke: list[int],
                                             caplog: pytest.LogCaptureFixture) -> None:
    parent, ids = await waiting_parent(store, 2)
    kids = await lease_children(store, 2)
    a, b = ids
    assert await store.apply([transition(kids[a], model.RunStatus.FAILED,
                                         error=model.ErrorInfo(type="E", message="x"))]) == [True]
    assert await store.replay_run(ENV, a, Retry()) is not None
    # The sibling ends: the replayed child is unfinished again, so no wake.
    assert await store.apply([transition(kids[b], model.RunStatus.COMPLETED,
                                         output="2")]) == [True]
    await assert_pending(store, parent)
    assert woke == []
    [again] = (await lease_children(store, 1)).values()
    assert again.id == a
    assert await store.apply([transition(again, model.RunStatus.COMPLETED,
                                         output="1")]) == [True]
    results = await assert_woken(store, parent, ids, ["COMPLETED", "COMPLETED"])
    assert [r["output"] for r in results] == [1, 2]
    # Counted, not found out: the count never reached 0 with a child unfinished.
    assert "unfinished children" not in caplog.text


async def test_children_that_do_not_wait_are_not_counted(store: Store, woke: list[int]) -> None:
    await create(store, new_run("parent"))
    parent = await lease_one(store, task_ids=("parent",))
    kid = dataclasses.replace(new_run("child"), parent_run_id=parent.id,
                              parent_step_key="go", child_index=0)
    ids = await store.create_children(parent=parent.id, lease_id=str(parent.lease_id),
                                      step_key="go", children=[kid], wait=False)
    assert ids is not None
    [child] = (await lease_children(store, 1)).values()
    assert await store.apply([transition(child, model.RunStatus.COMPLETED, output="1")]) == [True]
    [step] = await store.get_steps(parent.id)
    assert step.output == json.dumps(ids)  # the ids, as when it was written
    assert (await must_get(store, parent.id)).status is model.RunStatus.RUNNING
    assert woke == []

"""The store contract: one suite that every store passes (SQLite in memory, Postgres).

Each test gets a freshly migrated store from the `store` fixture, once per kind,
and once more as a distributed SQL database would run it (`postgres-distributed`):
no LISTEN/NOTIFY, and every transaction SERIALIZABLE (CockroachDB's default),
so that lost serialization checks are retried (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import policy, timers
from ratchet_server.engine.ids import new_id
from ratchet_server.store import Store, open_store

pytestmark = pytest.mark.timeout(60)

ENV = "dev"
TTL = 30.0


def new_run(task_id: str = "t", env: str = ENV, **kwargs: Any) -> model.NewRun:
    kwargs.setdefault("payload", '{"n": 1}')
    kwargs.setdefault("retry", Retry())
    return model.NewRun(id=new_id("run"), env=env, task_id=task_id, queue=task_id, **kwargs)


async def create(store: Store, *runs: model.NewRun) -> list[model.Run]:
    results = await store.create_runs(runs)
    assert all(created for _, created in results)
    return [run for run, _ in results]


async def lease(
    store: Store, *, task_ids: tuple[str, ...] = ("t",), limit: int = 10, owner: str = "o1",
    env: str = ENV, ttl: float = TTL,
) -> list[model.LeasedRun]:
    return await store.lease_ready(env=env, task_ids=task_ids, limit=limit, owner=owner,
                                   nonce=new_id("n"), ttl=ttl)


async def lease_one(store: Store, **kwargs: Any) -> model.Run:
    leased = await lease(store, limit=1, **kwargs)
    assert len(leased) == 1
    return leased[0].run


def step_write(
    run: model.Run, key: str = "s", *, lease_id: str | None = None,
    status: model.StepStatus = model.StepStatus.COMPLETED, attempt: int = 1,
    output: str | None = "1", state: str | None = None,
    events: tuple[model.Event, ...] = (), error: model.ErrorInfo | None = None,
) -> model.StepWrite:
    now = time.time()
    return model.StepWrite(
        run_id=run.id, lease_id=lease_id if lease_id is not None else str(run.lease_id),
        key=key, kind=model.StepKind.RUN, status=status, attempt=attempt, retry_base=0,
        output=output if status is model.StepStatus.COMPLETED else None, error=error,
        started_at=now, finished_at=None if status is model.StepStatus.RUNNING else now,
        state=state, events=events)


def transition(
    run: model.Run, status: model.RunStatus, *, lease_id: str | None = None,
    **kwargs: Any,
) -> model.RunTransition:
    return model.RunTransition(
        run_id=run.id, lease_id=lease_id if lease_id is not None else str(run.lease_id),
        status=status, events=kwargs.pop("events", ()), **kwargs)


async def must_get(store: Store, run_id: str) -> model.Run:
    run = await store.get_run(ENV, run_id)
    assert run is not None
    return run


async def event_types(store: Store, run_id: str) -> list[str]:
    return [e["type"] for e in await store.get_events(run_id)]


def serializable(url: str) -> str:
    """`url` with every transaction SERIALIZABLE unless it says otherwise."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["options"] = (query.get("options", "") +
                        " -cdefault_transaction_isolation=serializable").strip()
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


@pytest.fixture(params=["sqlite-memory", "postgres", "postgres-distributed"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A migrated store of each kind; `postgres-distributed` as on a distributed
    SQL database (module docstring). Overrides tests/conftest.py's `store`."""
    if request.param == "sqlite-memory":
        s = await open_store("sqlite://:memory:")
    elif request.param == "postgres":
        s = await open_store(str(request.getfixturevalue("pg_url")))
    else:
        s = await open_store(serializable(str(request.getfixturevalue("pg_url"))),
                             notify=False)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


# --- schema -------------------------------------------------------------------


async def test_migrate_is_idempotent(store: Store) -> None:
    assert await store.migrate() == []
    assert await store.migrate() == []


# --- keys and tasks ---------------------------------------------------------------


async def test_api_keys_round_trip(store: Store) -> None:
    await store.create_api_key(key_id="k1", env=ENV, role=model.Role.WORKER, name="w",
                               key_hash="h1")
    key = await store.find_api_key("h1")
    assert key == model.ApiKey(id="k1", env=ENV, role=model.Role.WORKER, name="w")
    assert await store.find_api_key("nope") is None


async def test_tasks_upsert_and_get(store: Store) -> None:
    task = model.TaskDef(env=ENV, id="t", version="1", queue="q", retry=Retry(max_attempts=5),
                         payload_schema='{"type": "object"}', output_schema=None,
                         max_duration=12.5)
    await store.upsert_tasks([task])
    assert await store.get_task(ENV, "t") == task
    newer = model.TaskDef(env=ENV, id="t", version="2", queue="q2", retry=Retry(),
                          payload_schema=None, output_schema='{"type": "string"}',
                          max_duration=None)
    await store.upsert_tasks([newer])
    assert await store.get_task(ENV, "t") == newer
    assert await store.get_task("other", "t") is None


# --- create_runs ------------------------------------------------------------------


async def test_create_run_round_trips_every_field(store: Store) -> None:
    new = new_run(priority=7, run_at=123.5, concurrency_key="ck", tags=("a", "b"),
                  metadata={"k": "v"}, parent_run_id="run_parent", ttl=60.0, max_duration=9.0,
                  retry=Retry(max_attempts=4, factor=3.0, min_delay=0.5, max_delay=7.0,
                              jitter=True))
    [(run, created)] = await store.create_runs([new])
    assert created
    assert run == await store.get_run(ENV, new.id) == await store.get_run(None, new.id)
    assert (run.id, run.env, run.task_id, run.queue) == (new.id, ENV, "t", "t")
    assert run.status is model.RunStatus.QUEUED and run.attempt == 0
    assert run.payload == '{"n": 1}' and run.output is None and run.error is None
    assert run.priority == 7 and run.run_at == 123.5 and run.concurrency_key == "ck"
    assert run.tags == ("a", "b") and run.metadata == {"k": "v"}
    assert run.parent_run_id == "run_parent" and run.retry == new.retry
    assert run.lease_id is None and run.lease_owner is None and run.started_at is None
    assert run.created_at > 0 and run.finished_at is None
    assert await store.get_run("other-env", new.id) is None
    assert await store.get_run(ENV, "run_missing") is None


async def test_create_runs_without_idempotency_keys_always_creates(store: Store) -> None:
    a, b = new_run(), new_run()
    results = await store.create_runs([a, b])
    assert [(r.id, created) for r, created in results] == [(a.id, True), (b.id, True)]


async def test_same_idempotency_key_returns_the_existing_run(store: Store) -> None:
    far = time.time() + 3600
    first = new_run(idempotency_key="k", idempotency_expires_at=far)
    [(run, created)] = await store.create_runs([first])
    assert created and run.idempotency_key == "k"

    again = new_run(idempotency_key="k", idempotency_expires_at=far, payload='{"n": 2}')
    [(existing, created)] = await store.create_runs([again])
    assert not created
    assert existing.id == first.id and existing.payload == '{"n": 1}'
    assert await store.get_run(ENV, again.id) is None
    assert await event_types(store, first.id) == ["triggered"]


async def test_idempotency_key_without_expiry_never_expires(store: Store) -> None:
    first = new_run(idempotency_key="k")
    await create(store, first)
    [(existing, created)] = await store.create_runs([new_run(idempotency_key="k")])
    assert not created and existing.id == first.id


async def test_same_idempotency_key_twice_in_one_batch(store: Store) -> None:
    a, b = new_run(idempotency_key="k"), new_run(idempotency_key="k")
    results = await store.create_runs([a, b])
    assert [(r.id, created) for r, created in results] == [(a.id, True), (a.id, False)]


async def test_idempotency_key_is_scoped_by_env_and_task(store: Store) -> None:
    runs = [new_run(idempotency_key="k"), new_run("other-task", idempotency_key="k"),
            new_run(env="other-env", idempotency_key="k")]
    results = await store.create_runs(runs)
    assert all(created for _, created in results)


async def test_expired_idempotency_key_creates_a_new_run(store: Store) -> None:
    old = new_run(idempotency_key="k", idempotency_expires_at=time.time() - 1)
    await create(store, old)
    fresh = new_run(idempotency_key="k", idempotency_expires_at=time.time() + 3600)
    [(run, created)] = await store.create_runs([fresh])
    assert created and run.id == fresh.id and run.idempotency_key == "k"
    # The old run keeps existing but no longer holds the key.
    assert (await must_get(store, old.id)).idempotency_key is None
    [(again, created)] = await store.create_runs([new_run(idempotency_key="k")])
    assert not created and again.id == fresh.id


# --- lease_ready --------------------------------------------------------------------


async def test_lease_ready_leases_at_most_limit(store: Store) -> None:
    runs = await create(store, *(new_run() for _ in range(5)))
    first = await lease(store, limit=3)
    second = await lease(store, limit=3)
    third = await lease(store, limit=3)
    assert (len(first), len(second), len(third)) == (3, 2, 0)
    assert {lr.run.id for lr in first + second} == {r.id for r in runs}


async def test_lease_ready_sets_the_lease(store: Store) -> None:
    [run] = await create(store, new_run())
    before = time.time()
    [leased] = await lease(store, owner="owner-1", ttl=30.0)
    got = leased.run
    assert got.id == run.id and got.status is model.RunStatus.RUNNING
    assert got.attempt == 1 and got.lease_owner == "owner-1" and got.lease_id
    assert got.lease_expires_at is not None and got.lease_expires_at >= before + 29
    assert got.started_at is not None and got.started_at >= before - 1
    assert await must_get(store, run.id) == got


async def test_lease_ready_honours_run_at_in_the_future(store: Store) -> None:
    later = time.time() + 3600
    await create(store, new_run(run_at=later))
    assert await lease(store) == []
    assert await store.next_run_at(ENV, ["t"]) == pytest.approx(later)
    assert await store.next_run_at(ENV, ["other"]) is None
    [due] = await create(store, new_run(run_at=time.time() - 1))
    assert [lr.run.id for lr in await lease(store)] == [due.id]


async def test_lease_ready_orders_by_priority_then_run_at(store: Store) -> None:
    now = time.time()
    low = new_run(priority=-1, run_at=now - 30)
    mid_late = new_run(priority=0, run_at=now - 10)
    mid_early = new_run(priority=0, run_at=now - 20)
    high = new_run(priority=5, run_at=now - 1)
    await create(store, low, mid_late, mid_early, high)
    assert (await lease_one(store)).id == high.id
    rest = await lease(store, limit=10)
    assert [lr.run.id for lr in rest] == [mid_early.id, mid_late.id, low.id]


async def test_lease_ready_filters_by_task(store: Store) -> None:
    a, b, c = await create(store, new_run("a"), new_run("b"), new_run("c"))
    leased = await lease(store, task_ids=("a", "c"))
    assert {lr.run.id for lr in leased} == {a.id, c.id}
    assert await lease(store, task_ids=("a", "c")) == []
    assert [lr.run.id for lr in await lease(store, task_ids=("b",))] == [b.id]


async def test_lease_ready_is_scoped_by_env(store: Store) -> None:
    [other] = await create(store, new_run(env="other"))
    assert await lease(store, env=ENV) == []
    assert [lr.run.id for lr in await lease(store, env="other")] == [other.id]


async def test_lease_ready_skips_runs_that_are_not_queued(store: Store) -> None:
    a, b = await create(store, new_run(), new_run())
    await store.cancel_run(ENV, a.id)
    assert [lr.run.id for lr in await lease(store)] == [b.id]
    assert await lease(store) == []


async def test_lease_ready_increments_attempt_and_gives_unique_lease_ids(store: Store) -> None:
    runs = await create(store, *(new_run() for _ in range(3)))
    seen: set[str] = set()
    for expected_attempt in (1, 2, 3):
        leased = await lease(store)
        assert {lr.run.id for lr in leased} == {r.id for r in runs}
        for lr in leased:
            assert lr.run.attempt == expected_attempt
            assert lr.run.lease_id is not None and lr.run.lease_id not in seen
            seen.add(lr.run.lease_id)
            [ok] = await store.apply([transition(lr.run, model.RunStatus.QUEUED,
                                                 run_at=time.time() - 1)])
            assert ok
    assert len(seen) == 9


async def test_lease_ready_returns_the_snapshot_steps(store: Store) -> None:
    [run] = await create(store, new_run())
    assert (await lease(store))[0].steps == ()
    await store.create_runs([new_run()])  # another run's steps must not leak in
    leased = await must_get(store, run.id)
    err = model.ErrorInfo(type="E", message="boom", step_key="b", attempt=2)
    assert await store.apply([
        step_write(leased, "a", output='{"x": 1}'),
        step_write(leased, "b", status=model.StepStatus.RUNNING, attempt=2, error=err),
        transition(leased, model.RunStatus.QUEUED, run_at=time.time() - 1),
    ]) == [True, True, True]
    relet = [lr for lr in await lease(store) if lr.run.id == run.id]
    assert len(relet) == 1
    steps = {s.key: s for s in relet[0].steps}
    assert set(steps) == {"a", "b"}
    assert steps["a"].status is model.StepStatus.COMPLETED and steps["a"].output == '{"x": 1}'
    assert steps["b"].status is model.StepStatus.RUNNING and steps["b"].attempts == 2
    assert steps["b"].error == err and steps["b"].output is None
    assert list(relet[0].steps) == await store.get_steps(run.id)


async def test_concurrent_lease_ready_never_leases_a_run_twice(store: Store) -> None:
    await create(store, *(new_run() for _ in range(40)))
    batches = await asyncio.gather(*(lease(store, limit=15, owner=f"o{i}") for i in range(4)))
    ids = [lr.run.id for batch in batches for lr in batch]
    assert len(ids) == 40 and len(set(ids)) == 40


# --- apply: fenced writes ------------------------------------------------------------


async def test_step_write_with_wrong_lease_changes_nothing(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    event = model.Event(run_id=run.id, type=model.EventType.STEP_COMPLETED, at=time.time(),
                        step_key="s")
    write = step_write(run, lease_id="bogus", state='{"s": 1}', events=(event,))
    assert await store.apply([write]) == [False]
    assert await store.get_steps(run.id) == []
    assert await must_get(store, run.id) == run
    assert await event_types(store, run.id) == ["triggered", "leased"]


async def test_run_transition_with_wrong_lease_changes_nothing(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    event = model.Event(run_id=run.id, type=model.EventType.FINISHED, at=time.time())
    write = transition(run, model.RunStatus.COMPLETED, lease_id="bogus", output='"x"',
                       events=(event,))
    assert await store.apply([write]) == [False]
    assert await must_get(store, run.id) == run
    assert await event_types(store, run.id) == ["triggered", "leased"]


async def test_an_old_lease_is_fenced_out_after_a_new_lease(store: Store) -> None:
    await create(store, new_run())
    first = await lease_one(store)
    assert await store.apply([transition(first, model.RunStatus.QUEUED,
                                         run_at=time.time() - 1)]) == [True]
    second = await lease_one(store)
    assert second.lease_id != first.lease_id
    assert await store.apply([step_write(first), transition(first, model.RunStatus.COMPLETED)]) \
        == [False, False]
    assert await store.get_steps(first.id) == []
    assert (await must_get(store, first.id)).status is model.RunStatus.RUNNING


async def test_writes_to_a_run_that_is_not_running_are_refused(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    assert await store.apply([transition(run, model.RunStatus.COMPLETED, output="1")]) == [True]
    assert await store.apply([step_write(run), transition(run, model.RunStatus.FAILED)]) \
        == [False, False]
    assert (await must_get(store, run.id)).status is model.RunStatus.COMPLETED


async def test_apply_reports_each_write_in_order(store: Store) -> None:
    await create(store, new_run(), new_run())
    a, b = [lr.run for lr in await lease(store)]
    result = await store.apply([step_write(a, "x"), step_write(b, "y", lease_id="bogus"),
                                step_write(b, "z")])
    assert result == [True, False, True]
    assert [s.key for s in await store.get_steps(a.id)] == ["x"]
    assert [s.key for s in await store.get_steps(b.id)] == ["z"]


async def test_step_write_records_the_step_and_state(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    assert await store.apply([step_write(run, "s", status=model.StepStatus.RUNNING,
                                         state='{"a": 1}')]) == [True]
    [step] = await store.get_steps(run.id)
    assert step.status is model.StepStatus.RUNNING and step.attempts == 1
    assert step.started_at is not None and step.finished_at is None
    assert (await must_get(store, run.id)).state == '{"a": 1}'
    # A write without state keeps the stored one.
    assert await store.apply([step_write(run, "s", attempt=2)]) == [True]
    [step] = await store.get_steps(run.id)
    assert step.status is model.StepStatus.COMPLETED and step.attempts == 2
    assert step.output == "1" and step.finished_at is not None
    assert (await must_get(store, run.id)).state == '{"a": 1}'


async def test_step_attempts_never_go_down(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    await store.apply([step_write(run, status=model.StepStatus.RUNNING, attempt=3)])
    await store.apply([step_write(run, status=model.StepStatus.RUNNING, attempt=2)])
    [step] = await store.get_steps(run.id)
    assert step.attempts == 3


async def test_completed_steps_are_never_overwritten(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    assert await store.apply([step_write(run, output='"first"')]) == [True]
    [done] = await store.get_steps(run.id)
    err = model.ErrorInfo(type="E", message="late")
    await store.apply([
        step_write(run, output='"second"', attempt=5),
        step_write(run, status=model.StepStatus.FAILED, attempt=6, error=err),
        step_write(run, status=model.StepStatus.RUNNING, attempt=7),
    ])
    assert await store.get_steps(run.id) == [done]
    # Not even under a later lease.
    await store.apply([transition(run, model.RunStatus.QUEUED, run_at=time.time() - 1)])
    relet = await lease_one(store)
    await store.apply([step_write(relet, output='"third"')])
    assert await store.get_steps(run.id) == [done]


async def test_transition_to_completed(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    assert await store.apply([transition(run, model.RunStatus.COMPLETED, output='{"ok": true}',
                                         state='{"s": 2}')]) == [True]
    done = await must_get(store, run.id)
    assert done.status is model.RunStatus.COMPLETED and done.output == '{"ok": true}'
    assert done.state == '{"s": 2}' and done.finished_at is not None
    assert done.lease_owner is None and done.lease_expires_at is None
    assert done.attempt == 1
    assert await store.get_lease(run.id, str(run.lease_id)) is None


async def test_transition_to_failed_keeps_the_error(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    err = model.ErrorInfo(type="ValueError", message="bad", stack="tb", non_retryable=True,
                          step_key="s", attempt=1)
    assert await store.apply([transition(run, model.RunStatus.FAILED, error=err)]) == [True]
    failed = await must_get(store, run.id)
    assert failed.status is model.RunStatus.FAILED and failed.error == err
    assert failed.finished_at is not None


async def test_transition_to_queued_with_refund_decrements_attempt(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    assert run.attempt == 1
    later = time.time() + 3600
    assert await store.apply([transition(run, model.RunStatus.QUEUED, run_at=later,
                                         refund_attempt=True)]) == [True]
    queued = await must_get(store, run.id)
    assert queued.status is model.RunStatus.QUEUED and queued.attempt == 0
    assert queued.run_at == pytest.approx(later) and queued.finished_at is None
    assert queued.lease_owner is None and queued.lease_expires_at is None


async def test_transition_to_queued_without_refund_keeps_attempt(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    await store.apply([transition(run, model.RunStatus.QUEUED, run_at=time.time() - 1)])
    assert (await must_get(store, run.id)).attempt == 1
    assert (await lease_one(store)).attempt == 2


# --- lease bookkeeping ---------------------------------------------------------------


async def test_renew_leases(store: Store) -> None:
    await create(store, new_run(), new_run(), new_run())
    mine = await lease(store, limit=2, owner="me", ttl=1.0)
    theirs = await lease_one(store, owner="them", ttl=1.0)
    # A finished run is not renewed.
    await store.apply([transition(mine[1].run, model.RunStatus.COMPLETED)])
    before = time.time()
    ids = [str(m.run.lease_id) for m in mine] + [str(theirs.lease_id)]
    assert await store.renew_leases("me", ids, 100.0) == 1
    renewed = await must_get(store, mine[0].run.id)
    assert renewed.lease_expires_at is not None and renewed.lease_expires_at >= before + 99
    assert (await must_get(store, theirs.id)).lease_expires_at == theirs.lease_expires_at
    assert await store.renew_leases("nobody", ids, 100.0) == 0


async def test_renew_leases_renews_only_the_listed_ones(store: Store) -> None:
    await create(store, new_run(), new_run())
    listed, forgotten = await lease(store, limit=2, owner="me", ttl=1.0)
    assert await store.renew_leases("me", [str(listed.run.lease_id)], 100.0) == 1
    assert (await must_get(store, forgotten.run.id)).lease_expires_at == \
        forgotten.run.lease_expires_at
    assert await store.renew_leases("me", [], 100.0) == 0


async def test_lease_loss_is_fenced_by_owner_and_expiry(store: Store) -> None:
    await create(store, new_run())
    held = (await lease(store, limit=1, owner="me", ttl=100.0))[0].run
    lose = dataclasses.replace(transition(held, model.RunStatus.QUEUED), expect_owner="other")
    assert await store.apply([lose]) == [False]  # adopted by another session meanwhile
    lose = dataclasses.replace(transition(held, model.RunStatus.QUEUED), expect_owner="me",
                               expired_before=time.time())
    assert await store.apply([lose]) == [False]  # renewed meanwhile: not expired
    lose = dataclasses.replace(lose, expired_before=time.time() + 1000)
    assert await store.apply([lose]) == [True]
    assert (await must_get(store, held.id)).status is model.RunStatus.QUEUED


async def test_adopt_leases(store: Store) -> None:
    await create(store, new_run(), new_run())
    a, b = [lr.run for lr in await lease(store, owner="old-session", ttl=1.0)]
    assert a.lease_id is not None and b.lease_id is not None
    adopted = await store.adopt_leases(ENV, [a.lease_id, "bogus"], "new-session", 100.0)
    assert adopted == [a.lease_id]
    got = await must_get(store, a.id)
    assert got.lease_owner == "new-session" and got.lease_id == a.lease_id
    assert got.lease_expires_at is not None and got.lease_expires_at > time.time() + 90
    assert (await must_get(store, b.id)).lease_owner == "old-session"
    events = await store.get_events(a.id)
    assert events[-1]["type"] == "lease_adopted" and events[-1]["lease_id"] == a.lease_id
    assert events[-1]["attempt"] == 1
    assert await store.adopt_leases("other-env", [b.lease_id], "x", 100.0) == []
    assert await store.adopt_leases(ENV, [], "x", 100.0) == []
    # A lease that ended cannot be adopted.
    await store.apply([transition(b, model.RunStatus.COMPLETED)])
    assert await store.adopt_leases(ENV, [b.lease_id], "x", 100.0) == []


async def test_expired_leases(store: Store) -> None:
    await create(store, new_run(), new_run(), new_run())
    older = await lease_one(store, owner="o", ttl=-20.0)
    newer = await lease_one(store, owner="o", ttl=-10.0)
    alive = await lease_one(store, owner="o", ttl=100.0)
    refs = await store.expired_leases(limit=10)
    assert [r.run_id for r in refs] == [older.id, newer.id]
    assert refs[0] == model.LeaseRef(run_id=older.id, lease_id=str(older.lease_id), attempt=1,
                                     retry=older.retry, lease_owner="o")
    assert [r.run_id for r in await store.expired_leases(limit=1)] == [older.id]
    await store.apply([transition(older, model.RunStatus.QUEUED)])
    assert [r.run_id for r in await store.expired_leases(limit=10)] == [newer.id]
    assert alive.id not in {r.run_id for r in refs}


async def test_owned_leases(store: Store) -> None:
    await create(store, new_run(), new_run(), new_run())
    mine = await lease(store, limit=2, owner="me")
    await lease_one(store, owner="them")
    refs = await store.owned_leases("me")
    assert {(r.run_id, r.lease_id) for r in refs} == {
        (lr.run.id, lr.run.lease_id) for lr in mine}
    assert all(r.lease_owner == "me" and r.attempt == 1 for r in refs)
    await store.apply([transition(mine[0].run, model.RunStatus.COMPLETED)])
    assert [r.run_id for r in await store.owned_leases("me")] == [mine[1].run.id]
    assert await store.owned_leases("nobody") == []


async def test_get_lease(store: Store) -> None:
    retry = Retry(max_attempts=7)
    await create(store, new_run(retry=retry))
    run = await lease_one(store, owner="me")
    ref = await store.get_lease(run.id, str(run.lease_id))
    assert ref == model.LeaseRef(run_id=run.id, lease_id=str(run.lease_id), attempt=1,
                                 retry=retry, lease_owner="me")
    assert await store.get_lease(run.id, "bogus") is None
    assert await store.get_lease("run_missing", str(run.lease_id)) is None


# --- cancel -------------------------------------------------------------------------


async def test_cancel_queued_and_running_runs(store: Store) -> None:
    await create(store, new_run())
    running = await lease_one(store)
    [queued] = await create(store, new_run())
    canceled = await store.cancel_run(ENV, queued.id)
    assert canceled is not None and canceled.status is model.RunStatus.CANCELED
    assert canceled.finished_at is not None
    canceled = await store.cancel_run(ENV, running.id)
    assert canceled is not None and canceled.status is model.RunStatus.CANCELED
    # The worker holding the lease is fenced out from now on.
    assert await store.apply([step_write(running)]) == [False]
    assert await store.get_lease(running.id, str(running.lease_id)) is None
    assert (await event_types(store, running.id))[-1] == "canceled"


async def test_cancel_only_non_final_runs(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    await store.apply([transition(run, model.RunStatus.COMPLETED, output="1")])
    assert await store.cancel_run(ENV, run.id) is None
    assert (await must_get(store, run.id)).status is model.RunStatus.COMPLETED
    [queued] = await create(store, new_run())
    assert await store.cancel_run(ENV, queued.id) is not None
    assert await store.cancel_run(ENV, queued.id) is None
    assert await store.cancel_run(ENV, "run_missing") is None


async def test_cancel_is_scoped_by_env(store: Store) -> None:
    [run] = await create(store, new_run())
    assert await store.cancel_run("other-env", run.id) is None
    assert (await must_get(store, run.id)).status is model.RunStatus.QUEUED


# --- list_runs ------------------------------------------------------------------------


async def test_list_runs_filters(store: Store) -> None:
    a = new_run("a", tags=("red", "big"))
    b = new_run("b", tags=("red",))
    c = new_run("a", tags=("blue",))
    other_env = new_run("a", env="other", tags=("red",))
    await create(store, a, b, c, other_env)
    [leased] = await lease(store, task_ids=("b",))

    async def ids(**kwargs: Any) -> set[str]:
        runs = await store.list_runs(model.RunFilter(env=ENV, **kwargs), 100, None)
        return {r.id for r in runs}

    assert await ids() == {a.id, b.id, c.id}
    assert await ids(task_id="a") == {a.id, c.id}
    assert await ids(tag="red") == {a.id, b.id}
    assert await ids(tag="big") == {a.id}
    assert await ids(tag="re") == set()
    assert await ids(statuses=(model.RunStatus.RUNNING,)) == {leased.run.id} == {b.id}
    assert await ids(statuses=(model.RunStatus.QUEUED, model.RunStatus.RUNNING)) == {
        a.id, b.id, c.id}
    assert await ids(statuses=(model.RunStatus.FAILED,)) == set()
    assert await ids(task_id="a", tag="red") == {a.id}
    assert await ids(task_id="a", statuses=(model.RunStatus.QUEUED,), tag="blue") == {c.id}


async def test_list_runs_newest_first_with_cursor_pagination(store: Store) -> None:
    # One batch shares created_at, so the id breaks the tie; the others differ in time.
    batch = await create(store, *(new_run() for _ in range(5)))
    singles = []
    for _ in range(3):
        await asyncio.sleep(0.002)
        singles += await create(store, new_run())
    everything = await store.list_runs(model.RunFilter(env=ENV), 100, None)
    assert len(everything) == 8
    keys = [(r.created_at, r.id) for r in everything]
    assert keys == sorted(keys, reverse=True)
    assert {r.id for r in everything} == {r.id for r in batch + singles}

    pages: list[list[str]] = []
    cursor: tuple[float, str] | None = None
    while True:
        page = await store.list_runs(model.RunFilter(env=ENV), 3, cursor)
        if not page:
            break
        pages.append([r.id for r in page])
        cursor = (page[-1].created_at, page[-1].id)
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [i for p in pages for i in p] == [r.id for r in everything]


# --- events -------------------------------------------------------------------------


async def test_events_follow_each_transition(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store, owner="o1")
    now = time.time()
    step_event = model.Event(run_id=run.id, type=model.EventType.STEP_COMPLETED, at=now,
                             attempt=1, lease_id=run.lease_id, step_key="s",
                             data='{"x": 1}')
    finished = model.Event(run_id=run.id, type=model.EventType.FINISHED, at=now,
                           lease_id=run.lease_id, data='{"status": "COMPLETED"}')
    assert await store.apply([step_write(run, events=(step_event,)),
                              transition(run, model.RunStatus.COMPLETED,
                                         events=(finished,))]) == [True, True]
    events = await store.get_events(run.id)
    assert [e["type"] for e in events] == ["triggered", "leased", "step_completed", "finished"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    leased = events[1]
    assert leased["attempt"] == 1 and leased["lease_id"] == run.lease_id
    assert json.loads(leased["data"]) == {"owner": "o1"}
    assert events[2]["step_key"] == "s" and events[2]["data"] == '{"x": 1}'
    assert await store.get_events("run_missing") == []


async def test_events_commit_with_the_writes_or_not_at_all(store: Store) -> None:
    await create(store, new_run())
    run = await lease_one(store)
    # An event for a run that does not exist violates a foreign key, so the
    # whole transaction (the step and the state with it) must roll back.
    orphan = model.Event(run_id="run_missing", type=model.EventType.STEP_COMPLETED,
                         at=time.time())
    with pytest.raises(Exception):  # noqa: B017 - the driver's IntegrityError
        await store.apply([step_write(run, state='{"x": 1}', events=(orphan,))])
    assert await store.get_steps(run.id) == []
    assert (await must_get(store, run.id)).state is None
    assert await event_types(store, run.id) == ["triggered", "leased"]


# --- waits and children ----------------------------------------------------------------


async def test_children_are_created_once_per_step(store: Store) -> None:
    await create(store, new_run())
    parent = await lease_one(store)
    assert parent.lease_id is not None

    async def trigger() -> list[str] | None:
        kids = [dataclasses.replace(new_run("child"), parent_run_id=parent.id,
                                    parent_step_key="fan", child_index=i) for i in range(3)]
        return await store.create_children(parent=parent.id, lease_id=str(parent.lease_id),
                                           step_key="fan", children=kids, wait=True)

    first = await trigger()
    assert first is not None and len(first) == 3
    assert await trigger() == first  # a replay gets the same children
    page = await store.list_runs(model.RunFilter(env=ENV, parent_run_id=parent.id), 100, None)
    assert sorted(r.id for r in page) == sorted(first)
    stale = await store.create_children(parent=parent.id, lease_id="stale", step_key="other",
                                        children=[new_run("child")], wait=False)
    assert stale is None
    # The wait is a candidate once every child is final.
    assert await store.child_wait_candidates(10) == []
    for child_id in first:
        assert await store.cancel_run(ENV, child_id) is not None
    [(run_id, key, children)] = await store.child_wait_candidates(10)
    assert (run_id, key, [c.id for c in children]) == (parent.id, "fan", first)
    assert await timers.finish_child_waits(store, 10) == 1
    [step] = [s for s in await store.get_steps(parent.id) if s.key == "fan"]
    assert step.status is model.StepStatus.COMPLETED and step.kind is model.StepKind.CHILD
    results = json.loads(str(step.output))
    assert [r["run_id"] for r in results] == first
    assert {r["status"] for r in results} == {"CANCELED"}


async def test_retention_deletes_finished_runs_in_batches(store: Store) -> None:
    await create(store, new_run(), new_run(), new_run())
    done = await lease(store, limit=2)
    for leased in done:
        assert await store.apply([transition(leased.run, model.RunStatus.COMPLETED)]) == [True]
    [waiting] = [r for r in await store.list_runs(model.RunFilter(env=ENV), 10, None)
                 if r.status is model.RunStatus.QUEUED]
    assert await store.delete_finished(time.time() - 60, 10) == (0, None)  # not old enough
    deleted, after = await store.delete_finished(time.time() + 1, 1)  # one batch of one
    assert deleted == 1 and after is not None
    assert await store.delete_finished(time.time() + 1, 10, after) == (1, None)
    assert await store.delete_finished(time.time() + 1, 10) == (0, None)
    for leased in done:
        assert await store.get_run(ENV, leased.run.id) is None
        assert await store.get_events(leased.run.id) == []
    assert await store.get_run(ENV, waiting.id) is not None  # unfinished runs stay


async def test_retention_keeps_children_of_unfinished_parents(store: Store) -> None:
    await create(store, new_run())
    parent = await lease_one(store)
    [child_id] = await store.create_children(
        parent=parent.id, lease_id=str(parent.lease_id), step_key="kid",
        children=[dataclasses.replace(new_run("child"), parent_run_id=parent.id,
                                      parent_step_key="kid", child_index=0)],
        wait=True) or []
    assert await store.cancel_run(ENV, child_id) is not None  # final
    assert await store.delete_finished(time.time() + 1, 10) == (0, None)  # the parent still runs
    assert await store.get_run(ENV, child_id) is not None


# --- waits that end from outside a lease, and the invariant -----------------------


async def _suspended_on_token(store: Store) -> tuple[model.Run, model.Step]:
    [run] = await create(store, new_run())
    run = await lease_one(store)
    write = dataclasses.replace(step_write(run, "w", status=model.StepStatus.RUNNING),
                                kind=model.StepKind.TOKEN, token_id="tok_" + run.id)
    assert await store.apply([write]) == [True]
    found = await store.find_token(ENV, "tok_" + run.id)
    assert found is not None and found[1] is model.RunStatus.RUNNING
    return run, found[0]


async def test_a_wait_resolves_once(store: Store) -> None:
    run, step = await _suspended_on_token(store)
    first = policy.token_outcome(step, '"a"', time.time())
    second = policy.token_outcome(step, '"b"', time.time())
    assert await store.resolve_waits([first, second], policy.counts_as_woken) == [True, False]
    [stored] = [s for s in await store.get_steps(run.id) if s.key == "w"]
    assert stored.status is model.StepStatus.COMPLETED and stored.output == '"a"'
    # The run was RUNNING, so nothing woke; a suspension now sees the ended wait.
    assert (await must_get(store, run.id)).status is model.RunStatus.RUNNING
    suspend = transition(run, model.RunStatus.WAITING, waiting_on=("w",),
                         wake_rule=policy.counts_as_woken)
    assert await store.apply([suspend]) == [True]
    assert (await must_get(store, run.id)).status is model.RunStatus.QUEUED
    assert (await event_types(store, run.id))[-1] == "resumed"


async def test_a_wait_ending_after_the_suspension_wakes_the_run(store: Store) -> None:
    run, step = await _suspended_on_token(store)
    suspend = transition(run, model.RunStatus.WAITING, waiting_on=("w",),
                         wake_rule=policy.counts_as_woken)
    assert await store.apply([suspend]) == [True]
    assert (await must_get(store, run.id)).status is model.RunStatus.WAITING
    assert await timers.find_stuck(store) == []
    done = policy.token_outcome(step, "1", time.time())
    assert await store.resolve_waits([done], policy.counts_as_woken) == [True]
    assert (await must_get(store, run.id)).status is model.RunStatus.QUEUED


async def test_a_timer_resolution_is_fenced_by_its_due_time(store: Store) -> None:
    _, step = await _suspended_on_token(store)
    late = dataclasses.replace(policy.timer_outcome(step, time.time()), expect_wake_at=123.0)
    assert await store.resolve_waits([late], policy.counts_as_woken) == [False]


async def test_the_invariant_finds_and_repairs_a_stranded_run(store: Store) -> None:
    run, step = await _suspended_on_token(store)
    # Strand it the way the old lost wake-up did: WAITING although the wait ended.
    never = dataclasses.replace(transition(run, model.RunStatus.WAITING, waiting_on=("w",)),
                                wake_rule=lambda *_: False)
    assert await store.apply([never]) == [True]
    assert await store.resolve_waits([policy.token_outcome(step, "1", time.time())],
                                     lambda *_: False) == [True]
    [stuck] = await timers.find_stuck(store)
    assert stuck.run.id == run.id and "wait ended" in stuck.why
    reconciler = timers.Reconciler(store, settle=0.0)
    [repaired] = await reconciler.tick()
    assert repaired.run.id == run.id and reconciler.repaired == 1
    assert (await must_get(store, run.id)).status is model.RunStatus.QUEUED
    assert (await event_types(store, run.id))[-1] == "repaired"
    assert await timers.find_stuck(store) == []
    assert await reconciler.tick() == []

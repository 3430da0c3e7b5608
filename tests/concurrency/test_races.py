"""Both sides of each race at once, on Postgres, many times.

Each test drives the engine in process against a real Postgres schema and
issues the two racing operations together (`asyncio.gather` over the store's
connection pool, so their transactions really interleave), for many runs.
Afterwards the invariant check must find no stranded run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import errors
from ratchet_server.engine.engine import Engine, Session, TriggerSpec
from ratchet_server.engine.ids import new_id
from ratchet_server.store import Store
from tests.engines import running_engine
from tests.harness import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

ENV = "dev"
ROUNDS = 200


def task_def(task_id: str = "t", env: str = ENV, retry: Retry | None = None) -> model.TaskDef:
    return model.TaskDef(env=env, id=task_id, version="1", queue=task_id,
                         retry=retry or Retry(max_attempts=3, min_delay=30, max_delay=30),
                         payload_schema=None, output_schema=None, max_duration=None)


@pytest.fixture
async def engine(pg_store: Store) -> AsyncIterator[Engine]:
    async with running_engine(pg_store, check_stuck=True, timer_interval=0.01,
                              reconcile_interval=0, lease_ttl=60.0) as eng:
        yield eng


async def session(engine: Engine, env: str = ENV, *task_ids: str) -> Session:
    """A session that the dispatcher leaves alone (no free slots): the test leases."""
    tasks = [task_def(t, env) for t in (task_ids or ("t",))]
    s, _ = await engine.open_session(env, "w-" + secrets.token_hex(3), tasks, 0, [])
    return s


async def leased_runs(engine: Engine, s: Session, n: int, task_id: str = "t") -> list[model.Run]:
    await engine.trigger(s.env, [TriggerSpec(task_id=task_id, payload=b"{}")
                                 for _ in range(n)])
    leased: list[model.Run] = []
    while len(leased) < n:
        batch = await engine.store.lease_ready(env=s.env, task_ids=(task_id,), limit=n,
                                               owner=s.id, nonce=new_id("n"), ttl=60.0)
        leased.extend(item.run for item in batch)
    return leased


async def start_step(engine: Engine, s: Session, run: model.Run, key: str,
                     kind: model.StepKind, **kwargs: object) -> None:
    assert run.lease_id is not None
    await engine.checkpoint(
        s, run_id=run.id, lease_id=run.lease_id, key=key, kind=kind,
        event=model.StepEvent.STARTED, attempt=1, retry_base=0, output=None, error=None,
        started_at=time.time(), finished_at=None, state=None, **kwargs)  # type: ignore[arg-type]


async def suspend(engine: Engine, s: Session, run: model.Run, key: str,
                  delay: float = 0.0) -> None:
    await asyncio.sleep(delay)
    assert run.lease_id is not None
    await engine.complete_suspended(s, run_id=run.id, lease_id=run.lease_id, step_keys=[key],
                                    state=None)


async def stranded(store: Store, run_ids: list[str]) -> list[str]:
    """Runs left WAITING although the wait they suspended on has ended."""
    out = []
    for run_id in run_ids:
        run = await store.get_run(ENV, run_id)
        assert run is not None
        steps = {st.key: st for st in await store.get_steps(run_id)}
        if run.status is model.RunStatus.WAITING and steps["w"].status is not (
                model.StepStatus.RUNNING):
            out.append(run_id)
    return out


async def expect_all_woken(store: Store, run_ids: list[str]) -> None:
    """Every run is queued again soon (the timer sweeps every 10 ms), and
    none is left WAITING on a wait that ended."""

    async def all_woken() -> bool:
        for run_id in run_ids:
            got = await store.get_run(ENV, run_id)
            if got is None or got.status is not model.RunStatus.QUEUED:
                return False
        return True

    with contextlib.suppress(AssertionError):
        await eventually(all_woken, timeout=5, what="every run to wake")
    assert await stranded(store, run_ids) == []
    assert await all_woken()


async def test_token_completion_and_suspension_never_miss_each_other(engine: Engine) -> None:
    s = await session(engine)
    runs = await leased_runs(engine, s, ROUNDS)
    tokens = {}
    for run in runs:
        tokens[run.id] = "tok_" + secrets.token_hex(8)
        await start_step(engine, s, run, "w", model.StepKind.TOKEN, token_id=tokens[run.id])

    async def complete(run: model.Run) -> None:
        await asyncio.sleep(random.uniform(0, 0.02))
        completed, _, why = await engine.complete_token(ENV, tokens[run.id], b'{"ok": true}')
        assert completed, why

    await asyncio.gather(*(f for run in runs for f in (
        complete(run), suspend(engine, s, run, "w", random.uniform(0, 0.02)))))
    assert await stranded(engine.store, [r.id for r in runs]) == []
    for run in runs:
        got = await engine.store.get_run(ENV, run.id)
        assert got is not None and got.status is model.RunStatus.QUEUED


async def test_timer_and_suspension_never_miss_each_other(engine: Engine) -> None:
    s = await session(engine)
    runs = await leased_runs(engine, s, ROUNDS)
    now = time.time()
    for run in runs:
        # Due around the moment the run suspends (the timer sweeps every 10 ms).
        await start_step(engine, s, run, "w", model.StepKind.SLEEP,
                         wake_at=now + 0.5 + random.uniform(0, 0.1))
    await asyncio.sleep(max(0.0, now + 0.5 - time.time()))
    await asyncio.gather(*(suspend(engine, s, run, "w", random.uniform(0, 0.1))
                           for run in runs))

    await expect_all_woken(engine.store, [r.id for r in runs])


async def test_children_finishing_as_the_parent_suspends(engine: Engine) -> None:
    parents_session = await session(engine, ENV, "parent", "child")
    parents = await leased_runs(engine, parents_session, ROUNDS // 2, "parent")
    child_of: dict[str, str] = {}
    for parent in parents:
        assert parent.lease_id is not None
        [child] = await engine.trigger_children(
            parents_session, run_id=parent.id, lease_id=parent.lease_id, step_key="w",
            specs=[TriggerSpec(task_id="child", payload=b"{}")], wait=True)
        child_of[parent.id] = child
    children: dict[str, model.Run] = {}
    while len(children) < len(parents):
        batch = await engine.store.lease_ready(
            env=ENV, task_ids=("child",), limit=len(parents), owner=parents_session.id,
            nonce=new_id("n"), ttl=60.0)
        children.update((item.run.id, item.run) for item in batch)

    async def finish_child(parent: model.Run) -> None:
        child = children[child_of[parent.id]]
        assert child.lease_id is not None
        await asyncio.sleep(random.uniform(0, 0.05))
        await engine.complete_success(parents_session, run_id=child.id,
                                      lease_id=child.lease_id, output=b'"done"', state=None)

    await asyncio.gather(*(f for p in parents for f in (
        finish_child(p), suspend(engine, parents_session, p, "w", random.uniform(0, 0.05)))))

    await expect_all_woken(engine.store, [p.id for p in parents])


async def test_an_expired_idempotency_key_gives_one_new_run(engine: Engine,
                                                            pg_url: str) -> None:
    await session(engine)
    for i in range(ROUNDS // 4):
        key = f"key-{i}"
        spec = TriggerSpec(task_id="t", payload=b"{}", idempotency_key=key,
                           idempotency_ttl=0.001)
        await engine.trigger(ENV, [spec])
        await asyncio.sleep(0.005)  # the first holder's key has expired
        fresh = TriggerSpec(task_id="t", payload=b"{}", idempotency_key=key)
        results = await asyncio.gather(*(engine.trigger(ENV, [fresh]) for _ in range(4)))
        created = {run.id for [(run, was_created)] in results if was_created}
        returned = {run.id for [(run, _)] in results}
        assert len(created) == 1 and returned == created, (key, results)
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT idempotency_key, count(*) FROM runs "
                            "WHERE idempotency_key IS NOT NULL "
                            "GROUP BY idempotency_key HAVING count(*) > 1").fetchall()
    assert rows == []


async def test_retention_never_deletes_a_run_being_replayed(engine: Engine) -> None:
    s = await session(engine)
    runs = await leased_runs(engine, s, ROUNDS)
    for run in runs:
        assert run.lease_id is not None
        await engine.complete_failure(
            s, run_id=run.id, lease_id=run.lease_id, state=None,
            error=model.ErrorInfo(type="Boom", message="no", non_retryable=True))

    async def replay(run: model.Run) -> bool:
        await asyncio.sleep(random.uniform(0, 0.01))
        try:
            await engine.replay(ENV, run.id, from_scratch=False)
            return True
        except (errors.NotFound, errors.FailedPrecondition):
            return False  # retention won: the replay changed nothing

    async def retention() -> None:
        for _ in range(20):
            await engine.store.delete_finished(time.time() + 1, 10)
            await asyncio.sleep(0.001)

    results = await asyncio.gather(retention(), *(replay(run) for run in runs))
    replayed = [run for run, ok in zip(runs, results[1:], strict=True) if ok]
    assert replayed, "no replay ran before retention: the race was not exercised"
    for run in replayed:
        got = await engine.store.get_run(ENV, run.id)
        assert got is not None, f"replayed run {run.id} was deleted"
        assert got.status is model.RunStatus.QUEUED

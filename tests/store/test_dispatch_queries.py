"""The dispatcher's statements (issue 11): which ready runs `lease_ready` takes,
in which order and for which owner, and `next_run_at`, on both stores; and on
Postgres, that both stay on the `0007_dispatch` indexes with a backlog of
delayed runs (the plan of an ANALYZEd table, not a forced one)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine.ids import new_id
from ratchet_server.store import Store, _dialect, open_store

pytestmark = pytest.mark.timeout(60)

ENV = "dev"


def new_run(task_id: str = "t", env: str = ENV, **kwargs: Any) -> model.NewRun:
    kwargs.setdefault("payload", "{}")
    kwargs.setdefault("retry", Retry())
    return model.NewRun(id=new_id("run"), env=env, task_id=task_id, queue=task_id, **kwargs)


async def create(store: Store, *runs: model.NewRun) -> None:
    results = await store.create_runs(runs)
    assert all(created for _, created in results)


async def lease(store: Store, task_ids: tuple[str, ...] = ("t",), limit: int = 100,
                owners: tuple[str, ...] = ()) -> list[model.Run]:
    shared: dict[str, Any] = {"owners": owners} if owners else {}
    leased = await store.lease_ready(env=ENV, task_ids=task_ids, limit=limit, owner="o",
                                     nonce=new_id("n"), ttl=30.0, **shared)
    return [lr.run for lr in leased]


def lease_order(runs: list[model.NewRun]) -> list[str]:
    return [r.id for r in sorted(runs, key=lambda r: (-r.priority, r.run_at, r.id))]


async def test_lease_takes_ready_runs_by_priority_then_run_at_then_id(store: Store) -> None:
    now = time.time()
    ready = [new_run(priority=p, run_at=now - age)
             for p, age in ((0, 5), (0, 50), (3, 1), (-2, 90), (0, 50), (7, 2), (3, 40),
                            (0, 20), (-2, 90), (0, 1))]
    delayed = [new_run(priority=p, run_at=now + 3600 + i)
               for i, p in enumerate((9, 0, 0, -1, 0))]
    await create(store, *ready, *delayed)
    expected = lease_order(ready)
    # In small batches the order holds across the two kinds (priority 0 and
    # the rest) at every cut, and the delayed runs are never taken.
    got: list[str] = []
    for limit in (1, 2, 3, 100):
        got += [r.id for r in await lease(store, limit=limit)]
    assert got == expected
    assert await lease(store) == []


async def test_lease_merges_several_tasks_in_one_order(store: Store) -> None:
    now = time.time()
    runs = [new_run(task, priority=p, run_at=now - age)
            for task, p, age in (("a", 0, 10), ("b", 0, 30), ("a", 1, 1), ("b", 0, 20),
                                 ("c", 5, 1), ("a", 0, 40))]
    await create(store, *runs)
    mine = [r for r in runs if r.task_id in ("a", "b")]
    got = [r.id for r in await lease(store, ("a", "b"), limit=3)]
    assert got == lease_order(mine)[:3]
    got += [r.id for r in await lease(store, ("b", "a"), limit=10)]
    assert got == lease_order(mine)


async def test_lease_shares_runs_among_owners_in_lease_order(store: Store) -> None:
    now = time.time()
    runs = [new_run(run_at=now - 10 + i) for i in range(4)]
    await create(store, *runs)
    leased = await lease(store, limit=10, owners=("s1", "s2", "s3", "s1", "s3"))
    # At most one run per owner entry; the n-th run in lease order is owners[n].
    assert [(r.id, r.lease_owner) for r in leased] == list(
        zip(lease_order(runs), ("s1", "s2", "s3", "s1"), strict=True))
    for run in leased:
        events = await store.get_events(run.id)
        assert json.loads(events[-1]["data"]) == {"owner": run.lease_owner}
    await create(store, *(new_run() for _ in range(3)))
    assert [r.lease_owner for r in await lease(store, limit=10, owners=("x", "y"))] == ["x", "y"]


async def test_next_run_at_is_the_earliest_queued_run_of_the_tasks(store: Store) -> None:
    now = time.time()
    assert await store.next_run_at(ENV, ["a", "b"]) is None
    await create(store, new_run("a", run_at=now + 300), new_run("a", run_at=now + 100),
                 new_run("b", run_at=now + 200, priority=4), new_run("c", run_at=now + 10),
                 new_run("a", env="other", run_at=now + 5))
    assert await store.next_run_at(ENV, ["a", "b"]) == pytest.approx(now + 100)
    assert await store.next_run_at(ENV, ["b"]) == pytest.approx(now + 200)
    assert await store.next_run_at(ENV, ["b", "c", "zzz"]) == pytest.approx(now + 10)
    # Leased (RUNNING) runs no longer count; a ready run does (it is due now).
    await create(store, new_run("a", run_at=now - 1))
    assert await store.next_run_at(ENV, ["a"]) == pytest.approx(now - 1)
    assert len(await lease(store, ("a",))) == 1
    assert await store.next_run_at(ENV, ["a"]) == pytest.approx(now + 100)


# --- Postgres plans with a backlog ------------------------------------------------------


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


def scans_of_runs(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in plan if n.get("Relation Name") == "runs" and "Scan" in n["Node Type"]]


def explain(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> list[
        dict[str, Any]]:
    d = _dialect.POSTGRES
    sql = d.sql(name, task_ids=d.in_list.format(param=":task_ids"))
    row = conn.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()
    assert row is not None
    return list(plan_nodes(row["QUERY PLAN"][0]["Plan"]))


async def test_postgres_dispatch_statements_use_the_ready_indexes_with_a_backlog(
    pg_store: Store, pg_url: str,
) -> None:
    now = time.time()
    with psycopg.connect(pg_url, row_factory=dict_row, autocommit=True) as conn:
        # 4,000 delayed runs over four tasks, 4,000 finished ones, a few ready.
        conn.execute("""
            INSERT INTO runs (id, env, task_id, status, payload, queue, retry, run_at,
                              created_at, updated_at, finished_at)
            SELECT 'run_' || lpad(g::text, 6, '0'), 'dev', 't' || (g %% 4),
                   CASE WHEN g <= 4000 THEN 'QUEUED' ELSE 'COMPLETED' END, '{}', 'q', '{}',
                   CASE WHEN g <= 4000 THEN %(now)s + 3600 + g ELSE %(now)s - g END,
                   %(now)s, %(now)s, CASE WHEN g > 4000 THEN %(now)s END
            FROM generate_series(1, 8000) AS g""", {"now": now})
        conn.execute("""
            UPDATE runs SET run_at = %(now)s - 1 WHERE id IN ('run_000001', 'run_000002')""",
                     {"now": now})
        conn.execute("ANALYZE runs")
        params = {"env": ENV, "task_ids": ["t0", "t1", "t2", "t3"], "limit": 10,
                  "owner": "o", "owners": ["o"] * 10, "nonce": "n", "now": now,
                  "expires_at": now + 30, "event_type": "leased"}
        with conn.transaction():
            lease_plan = explain(conn, "lease_ready", params)
            next_plan = explain(conn, "next_run_at", params)
    for plan in (lease_plan, next_plan):
        on_runs = scans_of_runs(plan)
        assert on_runs and all(n["Node Type"] != "Seq Scan" for n in on_runs), on_runs
    # Leasing reads ready runs of priority 0 on runs_due with run_at bounded
    # by now, the others on runs_ready_priority; the update finds rows by id.
    by_index: dict[str, list[dict[str, Any]]] = {}
    for n in scans_of_runs(lease_plan):
        by_index.setdefault(n.get("Index Name", ""), []).append(n)
    assert set(by_index) == {"runs_due", "runs_ready_priority", "runs_pkey"}, by_index
    assert all("run_at <=" in n["Index Cond"] for n in by_index["runs_due"])
    # The next due time: one look-up per task on runs_due, under a LIMIT 1.
    assert {n.get("Index Name") for n in scans_of_runs(next_plan)} == {"runs_due"}
    assert any(n["Node Type"] == "Limit" for n in next_plan)


async def test_postgres_concurrent_shared_leases_take_each_run_once(pg_url: str) -> None:
    """Both sides of the race, many times: coordinators leasing the same tasks
    at once, each for several owners, over runs of both index kinds."""
    stores = [await open_store(pg_url) for _ in range(4)]
    try:
        await stores[0].migrate()
        now = time.time()
        runs = [new_run(("a", "b")[i % 2], priority=(0, 0, 0, 0, 2, -1)[i % 6],
                        run_at=now - i % 7) for i in range(300)]
        await create(stores[0], *runs)

        async def drain(i: int, store: Store) -> list[model.Run]:
            got: list[model.Run] = []
            while batch := await lease(store, ("a", "b"), limit=7,
                                       owners=tuple(f"s{i}.{k % 3}" for k in range(7))):
                got += batch
            return got

        batches = await asyncio.gather(*(drain(i, s) for i, s in enumerate(stores)))
    finally:
        for s in stores:
            await s.close()
    ids = [r.id for batch in batches for r in batch]
    assert len(ids) == len(set(ids)) == len(runs)
    for i, batch in enumerate(batches):
        assert all(r.lease_owner is not None and r.lease_owner.startswith(f"s{i}.")
                   for r in batch)


async def test_postgres_notification_names_the_env_and_task_that_became_ready(
    pg_url: str,
) -> None:
    listener, other = await open_store(pg_url), await open_store(pg_url)
    heard: list[tuple[str, str]] = []
    try:
        await listener.migrate()
        await listener.listen(lambda env, task_id: heard.append((env, task_id)))
        await asyncio.sleep(0.3)  # the listener thread has run LISTEN

        async def hear(expected: set[tuple[str, str]]) -> None:
            for _ in range(300):
                if expected <= set(heard):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"heard {heard}, not {expected}")

        await create(other, new_run("a"), new_run("b", env="prod"), new_run("a"))
        await hear({(ENV, "a"), ("prod", "b")})
        heard.clear()
        await other.notify_ready("prod")
        await hear({("prod", "*")})
        # What a coordinator from before this change sends: the environment alone.
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SELECT pg_notify('ratchet_ready', 'old-env')")
        await hear({("old-env", "*")})
    finally:
        await other.close()
        await listener.close()

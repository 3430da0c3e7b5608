"""Listings and retention on indexes (issue 11, migration 0009).

ListRuns by each filter pages newest first (created_at DESC, id DESC, ties on
created_at broken by id) the same on both stores; on a seeded, analyzed table
each filter's page is an ordered index scan (no sort), also from a cursor; a
retention batch reads the next `limit` finished runs from its cursor, so a
child kept for its unfinished parent is read once per walk, not every batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import core, timers
from ratchet_server.engine.ids import new_id
from ratchet_server.store import Store, _dialect, _runs, open_store

pytestmark = pytest.mark.timeout(120)

ENV = "dev"
S = model.RunStatus


def new_run(task_id: str = "t", **kwargs: Any) -> model.NewRun:
    kwargs.setdefault("payload", "{}")
    kwargs.setdefault("retry", Retry())
    return model.NewRun(id=new_id("run"), env=ENV, task_id=task_id, queue=task_id, **kwargs)


async def finish(store: Store, task_id: str, status: S, error_type: str | None = None) -> None:
    [leased] = await store.lease_ready(env=ENV, task_ids=(task_id,), limit=1, owner="o",
                                       nonce=new_id("n"), ttl=30.0)
    error = None if error_type is None else model.ErrorInfo(type=error_type, message="m")
    assert await store.apply([model.RunTransition(
        run_id=leased.run.id, lease_id=str(leased.run.lease_id), status=status, events=(),
        error=error)]) == [True]


async def pages(store: Store, flt: model.RunFilter, size: int) -> list[model.Run]:
    got: list[model.Run] = []
    cursor: tuple[float, str] | None = None
    while True:
        page = await store.list_runs(flt, size, cursor)
        got += page
        if len(page) < size:
            return got
        cursor = (page[-1].created_at, page[-1].id)


async def test_each_filter_pages_in_order_across_ties(store: Store) -> None:
    # Batches share created_at (one create_runs call), so ids break the ties.
    for n in range(4):
        await store.create_runs([
            new_run(f"task{i % 2}", tags=("all", f"t{i % 3}", f"t{i % 3}")) for i in range(5)])
        await store.create_runs([new_run("other")])
        await asyncio.sleep(0.002)
        await finish(store, "task0", S.FAILED, f"E{n % 2}")
        await finish(store, "task1", S.COMPLETED)
    [parent] = await store.lease_ready(env=ENV, task_ids=("other",), limit=1, owner="o",
                                       nonce=new_id("n"), ttl=30.0)
    kids = [dataclasses.replace(new_run("kid", tags=("all", "kid")), parent_run_id=parent.run.id,
                                parent_step_key="k", child_index=i) for i in range(3)]
    assert await store.create_children(parent=parent.run.id, lease_id=str(parent.run.lease_id),
                                       step_key="k", children=kids, wait=False)
    everything = await store.list_runs(model.RunFilter(env=ENV), 1000, None)
    assert len(everything) == 27
    keys = [(r.created_at, r.id) for r in everything]
    assert keys == sorted(keys, reverse=True)
    times = sorted({r.created_at for r in everything})
    cases: dict[str, tuple[dict[str, Any], Callable[[model.Run], bool]]] = {
        "status": ({"statuses": (S.FAILED,)}, lambda r: r.status is S.FAILED),
        "statuses": ({"statuses": (S.FAILED, S.QUEUED)},
                     lambda r: r.status in (S.FAILED, S.QUEUED)),
        "task": ({"task_id": "task1"}, lambda r: r.task_id == "task1"),
        "error": ({"error_type": "E1"},
                  lambda r: r.error is not None and r.error.type == "E1"),
        "tag": ({"tag": "t1"}, lambda r: "t1" in r.tags),
        "tag of children": ({"tag": "kid"}, lambda r: "kid" in r.tags),
        "tag everywhere": ({"tag": "all"}, lambda r: "all" in r.tags),
        "time": ({"created_after": times[1], "created_before": times[-2]},
                 lambda r: times[1] <= r.created_at < times[-2]),
        "tag and status": ({"tag": "t0", "statuses": (S.FAILED,)},
                           lambda r: "t0" in r.tags and r.status is S.FAILED),
        "tag and time": ({"tag": "all", "created_after": times[2]},
                         lambda r: "all" in r.tags and r.created_at >= times[2]),
        "parent": ({"parent_run_id": parent.run.id}, lambda r: r.id in {k.id for k in kids}),
    }
    for name, (kwargs, keep) in cases.items():
        want = [r.id for r in everything if keep(r)]
        assert want, name
        for summary in (False, True):
            flt = model.RunFilter(env=ENV, summary=summary, **kwargs)
            assert [r.id for r in await store.list_runs(flt, 1000, None)] == want, name
            for size in (1, 2, 3):
                assert [r.id for r in await pages(store, flt, size)] == want, (name, size)


async def test_a_discarded_or_other_env_run_is_not_listed_by_tag(store: Store) -> None:
    [kept, hidden] = [r for r, _ in await store.create_runs(
        [new_run(tags=("x",)), new_run(tags=("x",))])]
    await store.create_runs([dataclasses.replace(new_run(tags=("x",)), env="elsewhere")])
    assert await store.cancel_run(ENV, hidden.id) is not None
    assert await store.discard_run(ENV, hidden.id) is not None
    assert [r.id for r in await store.list_runs(model.RunFilter(env=ENV, tag="x"), 10,
                                                None)] == [kept.id]
    assert {r.id for r in await store.list_runs(
        model.RunFilter(env=ENV, tag="x", include_discarded=True), 10, None)} == {
            kept.id, hidden.id}


async def test_retention_reads_a_kept_child_once_and_goes_on_past_it(store: Store) -> None:
    [parent] = [r for r, _ in await store.create_runs([new_run("p")])]
    [parent_leased] = await store.lease_ready(env=ENV, task_ids=("p",), limit=1, owner="o",
                                              nonce=new_id("n"), ttl=30.0)
    [child_id] = await store.create_children(
        parent=parent.id, lease_id=str(parent_leased.run.lease_id), step_key="k",
        children=[dataclasses.replace(new_run("c"), parent_run_id=parent.id,
                                      parent_step_key="k", child_index=0)], wait=True) or []
    assert await store.cancel_run(ENV, child_id) is not None  # final first: the oldest
    others = []
    for _ in range(3):
        await asyncio.sleep(0.002)
        [run] = [r for r, _ in await store.create_runs([new_run()])]
        assert await store.cancel_run(ENV, run.id) is not None
        others.append(run.id)
    cutoff = time.time() + 1
    child = await store.get_run(ENV, child_id)
    assert child is not None and child.finished_at is not None
    # The first batch of one reads the kept child and deletes nothing ...
    assert await store.delete_finished(cutoff, 1) == (0, (child.finished_at, child_id))
    # ... and the next batches start after it: each deletes a run.
    after: tuple[float, str] | None = (child.finished_at, child_id)
    for run_id in others:
        deleted, after = await store.delete_finished(cutoff, 1, after)
        assert deleted == 1 and await store.get_run(ENV, run_id) is None
        assert after is not None and after[1] == run_id
    assert await store.delete_finished(cutoff, 1, after) == (0, None)  # the end of the walk
    assert await store.get_run(ENV, child_id) is not None  # its parent still runs
    # A walk from the start still finds it kept.
    assert await store.delete_finished(cutoff, 10) == (0, None)
    assert await store.get_run(ENV, child_id) is not None


class _ScriptedStore:
    """delete_finished answers from a script, recording the cursors it got."""

    def __init__(self, answers: list[tuple[int, tuple[float, str] | None]]) -> None:
        self.answers = answers
        self.afters: list[tuple[float, str] | None] = []

    async def delete_finished(self, cutoff: float, limit: int,
                              after: tuple[float, str] | None = None
                              ) -> tuple[int, tuple[float, str] | None]:
        self.afters.append(after)
        return self.answers.pop(0)


async def test_retention_passes_go_on_from_the_cursor_and_rewalk_now_and_then() -> None:
    engine: Any = object.__new__(timers.TimersMixin)
    engine.config = core.EngineConfig(retention=1.0, retention_batch=2)
    a, b, c = (1.0, "a"), (2.0, "b"), (3.0, "c")
    engine.store = _ScriptedStore([(2, a), (1, b), (0, None),  # pass 1
                                   (2, c), (0, None)]  # pass 2
                                  + [(0, None)] * (timers.RETENTION_REWALK - 1))
    assert await engine._retention_loop_body() == 3
    assert engine.store.afters == [None, a, b]
    assert await engine._retention_loop_body() == 2
    assert engine.store.afters[3:] == [b, c]  # on from where pass 1 stopped
    for _ in range(timers.RETENTION_REWALK - 2):
        await engine._retention_loop_body()
        assert engine.store.afters[-1] == c
    await engine._retention_loop_body()
    assert engine.store.afters[-1] is None  # back to the oldest run


# --- plans on a seeded table ------------------------------------------------------------

SEED_RUNS = """
INSERT INTO runs (id, env, task_id, status, attempt, payload, queue, retry, run_at, tags,
                  metadata, created_at, updated_at, finished_at, error, parent_run_id,
                  parent_step_key, child_index)
SELECT 'run' || CAST(100000 + i AS TEXT), 'dev',
       CASE WHEN i % 100 = 3 AND i <= 6000 THEN 'rare_task' ELSE 'task' || (i % 20) END,
       CASE WHEN i <= 400 THEN 'RUNNING'
            WHEN i % 20 = 0 AND i <= 6000 THEN 'FAILED' ELSE 'COMPLETED' END,
       1, '{}', 'q', '{}', 1000.0 + i, '[]', '{}', 1000.0 + i, 1000.0 + i,
       CASE WHEN i <= 400 THEN NULL ELSE 1000.0 + i END,
       CASE WHEN i % 20 = 0 AND i <= 6000 AND i > 400
            THEN '{"type":"Err' || (i / 20 % 3) || '","message":"m"}' END,
       CASE WHEN i > 400 AND i <= 4400 THEN 'run' || CAST(100000 + i % 400 + 1 AS TEXT) END,
       CASE WHEN i > 400 AND i <= 4400 THEN 'k' END, i
FROM {series}
"""
# Runs 1-400 run, 401-4400 are their finished children (kept by retention);
# FAILED runs, error types, a rare task and a rare tag are among the oldest.
SEED_TAGS = """
INSERT INTO run_tags (run_id, run_env, tag, run_created_at)
SELECT id, env, CASE WHEN CAST(substr(id, 4) AS INTEGER) % 100 = 7
                      AND CAST(substr(id, 4) AS INTEGER) <= 106000 THEN 'rare'
                     ELSE 'common' END, created_at
FROM runs
"""
N = 30000
# Filters whose pages must come from one ordered index scan, and the index.
PLANS: dict[str, tuple[dict[str, Any], str]] = {
    "status": ({"statuses": (S.FAILED,)}, "runs_list_status"),
    "task": ({"task_id": "rare_task"}, "runs_list_task"),
    "error type": ({"error_type": "Err1"}, "runs_list_error"),
    "tag": ({"tag": "rare"}, "run_tags_listing"),
    "time": ({"created_after": 1000.0 + N / 2, "created_before": 1000.0 + N / 2 + 500},
             "runs_listing"),
}


class Explaining:
    """A connection that records each statement's plan before running it."""

    def __init__(self, conn: Any, explain: Callable[[str, Any], str]) -> None:
        self.conn = conn
        self.explain = explain
        self.plans: list[str] = []

    def execute(self, sql: str, params: Any = None) -> Any:
        self.plans.append(self.explain(sql, params))
        return self.conn.execute(sql, params)

    def cursor(self) -> Any:
        return self.conn.cursor()


async def _plans(conn: Any, d: _dialect.Dialect, explain: Callable[[str, Any], str]
                 ) -> dict[str, list[str]]:
    """The plans of each listing's first and second pages and of two retention batches."""
    found: dict[str, list[str]] = {}
    for name, (kwargs, _) in PLANS.items():
        for summary in (False, True):
            flt = model.RunFilter(env=ENV, summary=summary, **kwargs)
            w = Explaining(conn, explain)
            first = _runs.list_runs_txn(w, d, flt, 51, None)
            assert len(first) == 51, name
            _runs.list_runs_txn(w, d, flt, 51, (first[-1].created_at, first[-1].id))
            found.setdefault(name, []).extend(w.plans)
    w = Explaining(conn, explain)
    deleted, after = _runs.delete_finished_txn(w, d, 1000.0 + N, 500, None)
    assert deleted == 0 and after is not None  # the kept children come first
    deleted, after = _runs.delete_finished_txn(w, d, 1000.0 + N, 500, after)
    assert deleted == 0 and after is not None
    found["retention"] = w.plans
    return found


async def test_postgres_listings_and_retention_use_their_indexes(pg_url: str) -> None:
    store = await open_store(pg_url)
    await store.migrate()
    await store.close()
    with psycopg.connect(pg_url, row_factory=dict_row) as conn:
        conn.execute(SEED_RUNS.replace("{series}", f"generate_series(1, {N}) AS s(i)"))
        conn.execute(SEED_TAGS)
        conn.execute("ANALYZE runs")
        conn.execute("ANALYZE run_tags")

        def explain(sql: str, params: Any) -> str:
            with conn.transaction(force_rollback=True):
                rows = conn.execute("EXPLAIN " + sql, params).fetchall()
            return "\n".join(r["QUERY PLAN"] for r in rows)

        found = await _plans(conn, _dialect.POSTGRES, explain)
        conn.rollback()
    for name, (_, index) in PLANS.items():
        for plan in found[name]:
            assert f"Index Scan using {index} on" in plan or (
                f"Index Only Scan using {index} on" in plan), (name, plan)
            assert "Sort" not in plan and "Seq Scan" not in plan, (name, plan)
    for name in ("status", "task", "error type", "time"):  # the cursor bounds the scan
        assert any("Index Cond:" in p and "ROW(created_at, id) <" in p
                   for p in found[name][1::2]), found[name]
    assert any("Index Cond:" in p and "ROW(run_created_at, run_id) <" in p
               for p in found["tag"][1::2]), found["tag"]
    [page, delete, page_after, delete_after] = found["retention"]
    for plan in (page, page_after):
        assert "Index Scan using runs_finished on runs" in plan, plan
        assert "Sort" not in plan and "Seq Scan" not in plan, plan
    assert "ROW(finished_at, id) >" in page_after, page_after
    for plan in (delete, delete_after):
        assert "Seq Scan" not in plan and "runs_pkey" in plan, plan


async def test_sqlite_listings_and_retention_use_their_indexes(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = await open_store(f"sqlite:///{path}")
    await store.migrate()
    await store.close()
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    conn.execute(SEED_RUNS.replace("{series}", "(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL "
                                   f"SELECT i + 1 FROM s WHERE i < {N}) SELECT i FROM s)"))
    conn.execute(SEED_TAGS)
    conn.execute("ANALYZE")

    def explain(sql: str, params: Any) -> str:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        return "\n".join(str(r["detail"]) for r in rows)

    found = await _plans(conn, _dialect.SQLITE, explain)
    conn.rollback()
    conn.close()
    for name, (_, index) in PLANS.items():
        for plan in found[name]:
            assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, (
                name, plan)
            assert "TEMP B-TREE" not in plan, (name, plan)
    [page, _, page_after, _] = found["retention"]
    for plan in (page, page_after):
        assert "runs_finished" in plan and "TEMP B-TREE" not in plan, plan

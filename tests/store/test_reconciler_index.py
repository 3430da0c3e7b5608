"""The reconciler's page of unfinished runs reads an index, not the table:
it runs every few seconds on every replica, and finished runs pile up."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from ratchet_server.store import Store, _dialect
from tests.store.test_dispatch_queries import plan_nodes, scans_of_runs

pytestmark = pytest.mark.timeout(60)


async def test_postgres_unfinished_page_uses_an_index_with_many_finished_runs(
    pg_store: Store, pg_url: str,
) -> None:
    now = time.time()
    with psycopg.connect(pg_url, row_factory=dict_row, autocommit=True) as conn:
        # 20,000 finished runs and 20 unfinished ones.
        conn.execute("""
            INSERT INTO runs (id, env, task_id, status, payload, queue, retry, run_at,
                              created_at, updated_at, finished_at)
            SELECT 'run_' || lpad(g::text, 6, '0'), 'dev', 't',
                   CASE WHEN g %% 1000 = 0 THEN 'RUNNING'
                        WHEN g %% 1000 = 500 THEN 'WAITING' ELSE 'COMPLETED' END,
                   '{}', 'q', '{}', %(now)s, %(now)s, %(now)s - 60,
                   CASE WHEN g %% 500 <> 0 THEN %(now)s END
            FROM generate_series(1, 20000) AS g""", {"now": now})
        conn.execute("ANALYZE runs")
        sql = _dialect.POSTGRES.sql("select_unfinished_page")
        row = conn.execute("EXPLAIN (FORMAT JSON) " + sql, {
            "after": "", "updated_before": now, "env": None, "limit": 500}).fetchone()
        assert row is not None
        plan: list[dict[str, Any]] = list(plan_nodes(row["QUERY PLAN"][0]["Plan"]))
        page = conn.execute(sql, {"after": "", "updated_before": now, "env": None,
                                  "limit": 500}).fetchall()
    on_runs = scans_of_runs(plan)
    assert [n.get("Index Name") for n in on_runs] == ["runs_unfinished"], on_runs
    assert len(page) == 40 and all(r["status"] in ("RUNNING", "WAITING") for r in page)

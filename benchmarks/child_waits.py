"""Child waits with 100 parents x 1,000 children on Postgres (issue 11, item 3).

Prints one JSON line: the median execution time of the child-wait sweep's
query (`select_child_wait_candidates`, EXPLAIN ANALYZE), of a child's final
transaction (`store.apply` of one COMPLETED transition, wall clock), of a
run's without a parent, and of the last child's (which, with migration 0008,
also ends its parent's wait).

The backlog, written with SQL into a throwaway schema: 100k finished runs with
a step each; 100 parents WAITING on a child step, each with 1,000 children of
which the first 900 are COMPLETED and the last 100 RUNNING under a lease.

    RATCHET_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
        python benchmarks/child_waits.py
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import time
from urllib.parse import quote

import psycopg

from ratchet_server import model
from ratchet_server.store import _dialect, open_store

PARENTS = 100
CHILDREN = 1000
FINISHED = 900  # children already COMPLETED, per parent
BACKLOG = 100_000
PLAIN = 200  # RUNNING runs without a parent


def populate(conn: psycopg.Connection, counts: bool) -> None:
    now = time.time()
    cols = ("id, env, task_id, status, payload, queue, retry, run_at, created_at, updated_at,"
            " finished_at, output, parent_run_id, parent_step_key, child_index, lease_id,"
            " attempt, waiting_on")
    conn.execute(f"""INSERT INTO runs ({cols})
        SELECT 'done' || g, 'dev', 't', 'COMPLETED', '{{}}', 't', '{{}}', {now}, {now}, {now},
               {now}, '1', NULL, NULL, NULL, NULL, 1, NULL
        FROM generate_series(1, {BACKLOG}) g""")
    conn.execute(f"""INSERT INTO steps (run_id, key, kind, status, attempts, output, created_at)
        SELECT 'done' || g, 's', 'run', 'COMPLETED', 1, '1', {now}
        FROM generate_series(1, {BACKLOG}) g""")
    conn.execute(f"""INSERT INTO runs ({cols})
        SELECT 'p' || lpad(g::text, 4, '0'), 'dev', 'parent', 'WAITING', '{{}}', 'parent', '{{}}',
               {now}, {now}, {now}, NULL, NULL, NULL, NULL, NULL, 'lp' || g, 1, '["w"]'
        FROM generate_series(1, {PARENTS}) g""")
    conn.execute(f"""INSERT INTO steps (run_id, key, kind, status, attempts, created_at)
        SELECT 'p' || lpad(g::text, 4, '0'), 'w', 'child', 'RUNNING', 1, {now}
        FROM generate_series(1, {PARENTS}) g""")
    conn.execute(f"""INSERT INTO runs ({cols})
        SELECT 'c' || lpad(p::text, 4, '0') || '_' || lpad(j::text, 4, '0'), 'dev', 'child',
               CASE WHEN j < {FINISHED} THEN 'COMPLETED' ELSE 'RUNNING' END, '{{}}', 'child',
               '{{}}', {now}, {now}, {now},
               CASE WHEN j < {FINISHED} THEN {now} END, CASE WHEN j < {FINISHED} THEN '1' END,
               'p' || lpad(p::text, 4, '0'), 'w', j,
               'l' || lpad(p::text, 4, '0') || '_' || lpad(j::text, 4, '0'), 1, NULL
        FROM generate_series(1, {PARENTS}) p, generate_series(0, {CHILDREN - 1}) j""")
    conn.execute(f"""INSERT INTO runs ({cols})
        SELECT 'r' || g, 'dev', 't', 'RUNNING', '{{}}', 't', '{{}}', {now}, {now}, {now},
               NULL, NULL, NULL, NULL, NULL, 'lr' || g, 1, NULL
        FROM generate_series(1, {PLAIN}) g""")
    if counts:
        conn.execute(f"""INSERT INTO child_waits (parent_run_id, step_key, pending)
            SELECT 'p' || lpad(g::text, 4, '0'), 'w', {CHILDREN - FINISHED}
            FROM generate_series(1, {PARENTS}) g""")
    conn.execute("ANALYZE")


def child(p: int, j: int) -> tuple[str, str]:
    return f"c{p:04d}_{j:04d}", f"l{p:04d}_{j:04d}"


def finish(p: int, j: int) -> model.RunTransition:
    run_id, lease_id = child(p, j)
    return model.RunTransition(run_id=run_id, lease_id=lease_id,
                               status=model.RunStatus.COMPLETED, output='"ok"', events=())


async def main() -> None:
    base = os.environ["RATCHET_TEST_DATABASE_URL"]
    schema = "bench_" + secrets.token_hex(4)
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{base}?options={quote(f'-csearch_path={schema}')}"
    try:
        store = await open_store(url)
        await store.migrate()
        counts = hasattr(store, "use_child_wait_rules")
        if counts:
            from ratchet_server.engine import policy
            store.use_child_wait_rules(policy.child_wait_outcome, policy.counts_as_woken,
                                       lambda: None)
        with psycopg.connect(url, autocommit=True) as conn:
            populate(conn, counts)
            sweep_sql = _dialect.POSTGRES.sql("select_child_wait_candidates") if hasattr(
                _dialect, "POSTGRES") else None
            sweep = []
            for _ in range(7):
                plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + str(
                    sweep_sql or "").replace("%(limit)s", "500")).fetchone()[0]
                sweep.append(plan[0]["Execution Time"])
        # A child's final transaction (not the last of its wait).
        plain = []
        for j in range(FINISHED, FINISHED + 2):
            for p in range(1, PARENTS + 1):
                t = time.perf_counter()
                assert await store.apply([finish(p, j)]) == [True]
                plain.append((time.perf_counter() - t) * 1000)
        # A run without a parent.
        alone = []
        for g in range(1, PLAIN + 1):
            t = time.perf_counter()
            assert await store.apply([model.RunTransition(
                run_id=f"r{g}", lease_id=f"lr{g}", status=model.RunStatus.COMPLETED,
                output='"ok"', events=())]) == [True]
            alone.append((time.perf_counter() - t) * 1000)
        # The last child of 20 waits.
        last = []
        for p in range(1, 21):
            for j in range(FINISHED + 2, CHILDREN - 1):
                assert await store.apply([finish(p, j)]) == [True]
            t = time.perf_counter()
            assert await store.apply([finish(p, CHILDREN - 1)]) == [True]
            last.append((time.perf_counter() - t) * 1000)
        woken = 0
        for p in range(1, 21):
            run = await store.get_run("dev", f"p{p:04d}")
            woken += run is not None and run.status is model.RunStatus.QUEUED
        await store.close()
        print(json.dumps({
            "benchmark": "child_waits", "parents": PARENTS, "children": CHILDREN,
            "child_counts": counts,
            "sweep_query_ms_median": round(statistics.median(sweep), 2),
            "child_final_txn_ms_median": round(statistics.median(plain), 3),
            "parentless_final_txn_ms_median": round(statistics.median(alone), 3),
            "last_child_txn_ms_median": round(statistics.median(last), 3),
            "parents_woken_by_last_child": woken, "of": 20,
        }))
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    asyncio.run(main())

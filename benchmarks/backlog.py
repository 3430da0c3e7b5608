"""Start latency, hot-query plans and idle CPU with a large backlog (Postgres).

Phase 1, empty store: start latency (trigger → first step, single triggers at
--rate per second) and the coordinator's idle CPU. Phase 2: the store is
seeded directly with SQL (after the coordinator's own `ratchet migrate`) with
--finished COMPLETED runs (finished over the past week, one step each),
--delayed QUEUED runs of the served task due hours from now, and --parents
WAITING parents of --children children each (half finished long ago and
protected by their waiting parent, half delayed); then the same figures
again, and EXPLAIN (ANALYZE, BUFFERS) of the dispatcher's and timers' queries,
taken from queries.sql through the store's dialect loader, written to
--explain-out. The JSON says whether each plan avoids a Seq Scan on runs and
steps, and the backlog/empty ratio of the start latency.

    python benchmarks/backlog.py [--database-url URL] [--empty] [--explain-out FILE]
                                 [--finished N] [--delayed N] [--parents N] [--children N]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import string
import sys
import time
from pathlib import Path
from typing import Any

import _harness as h
import psycopg
import start_latency

from ratchet_server.store import _dialect

TASK = "bench-three-steps"
DAY = 86400.0

# The dispatcher's and timers' statements, with limits as the coordinator uses them.
HOT_QUERIES: dict[str, dict[str, Any]] = {
    "lease_ready": {"limit": 200},
    "next_run_at": {},
    "renew_leases": {},
    "select_expired_leases": {"limit": 200},
    "select_due_steps": {"limit": 500},
    "expire_runs": {"limit": 500},
    "time_out_runs": {"limit": 500},
    "select_child_wait_candidates": {"limit": 100},
    "select_finished_page": {"limit": 500},
    "delete_finished": {"limit": 500},
    # The reconciler pages through every environment (env NULL).
    "select_unfinished_page": {"limit": 500, "env": None},
}
SCAN = re.compile(r"Seq Scan on (runs|steps)\b")


def run_id_sql(prefix: str, at: str, n: str) -> str:
    """SQL for an id shaped like engine/ids.new_id: time-ordered, then random-looking."""
    return (f"'run_' || lpad(to_hex(CAST(({at}) * 1000 AS bigint)), 12, '0') "
            f"|| substr(md5('{prefix}' || {n}), 1, 16)")


def seed(url: str, finished: int, delayed: int, parents: int, children: int) -> float:
    """Fill the store; returns the seconds it took."""
    started = time.monotonic()
    now = time.time()
    p = {"env": h.ENV, "task": TASK, "now": now}
    with psycopg.connect(url, autocommit=True) as conn:
        q = "(SELECT queue, retry FROM tasks WHERE env = %(env)s AND id = %(task)s) AS q"
        if finished:
            h.log(f"seeding {finished} finished runs ...")
            conn.execute(f"""
                WITH made AS (
                    INSERT INTO runs (id, env, task_id, status, attempt, payload, output,
                                      queue, retry, run_at, created_at, started_at,
                                      finished_at, updated_at)
                    SELECT {run_id_sql('f', 'x.t', 'i')}, %(env)s, %(task)s, 'COMPLETED', 1,
                           '{{"n": 1}}', '4', q.queue, q.retry, x.t, x.t, x.t + 0.002,
                           x.t + 0.01, x.t + 0.01
                    FROM generate_series(1, %(n)s) AS i,
                         LATERAL (SELECT %(now)s - 120 - 7 * {DAY} + i * (7 * {DAY} / %(n)s)
                                  AS t) AS x, {q}
                    RETURNING id, started_at)
                INSERT INTO steps (run_id, key, kind, status, attempts, output, created_at,
                                   started_at, finished_at)
                SELECT id, 'one', 'run', 'COMPLETED', 1, '2', started_at, started_at,
                       started_at + 0.001
                FROM made""", {**p, "n": finished})
        if delayed:
            h.log(f"seeding {delayed} delayed runs ...")
            conn.execute(f"""
                INSERT INTO runs (id, env, task_id, status, payload, queue, retry, run_at,
                                  created_at, updated_at)
                SELECT {run_id_sql('d', 'x.t', 'i')}, %(env)s, %(task)s, 'QUEUED',
                       '{{"n": 1}}', q.queue, q.retry, %(now)s + 3600 + i * (20 * 3600.0 / %(n)s),
                       x.t, x.t
                FROM generate_series(1, %(n)s) AS i,
                     LATERAL (SELECT %(now)s - 120 - 3600 + i * (3600.0 / %(n)s) AS t) AS x,
                     {q}""", {**p, "n": delayed})
        if parents and children:
            h.log(f"seeding {parents} parents x {children} children ...")
            conn.execute(f"""
                INSERT INTO runs (id, env, task_id, status, attempt, payload, queue, retry,
                                  run_at, created_at, started_at, updated_at, waiting_on)
                SELECT 'run_' || lpad(to_hex(CAST((%(now)s - 50 * {DAY}) * 1000 AS bigint)),
                                      12, '0') || substr(md5('p' || i), 1, 16),
                       %(env)s, 'bench-parent', 'WAITING', 1, '{{}}', q.queue, q.retry,
                       %(now)s - 50 * {DAY}, %(now)s - 50 * {DAY}, %(now)s - 50 * {DAY},
                       %(now)s - 50 * {DAY}, '["children"]'
                FROM generate_series(1, %(n)s) AS i, {q}""", {**p, "n": parents})
            conn.execute("""
                INSERT INTO steps (run_id, key, kind, status, attempts, created_at, started_at)
                SELECT id, 'children', 'child', 'RUNNING', 1, created_at, created_at
                FROM runs WHERE env = %(env)s AND task_id = 'bench-parent'""", p)
            # Even children finished 40 days ago (past retention, kept for their
            # waiting parent); odd ones are delayed.
            conn.execute(f"""
                INSERT INTO runs (id, env, task_id, status, attempt, payload, output, queue,
                                  retry, run_at, created_at, started_at, finished_at,
                                  updated_at, parent_run_id, parent_step_key, child_index)
                SELECT {run_id_sql('c', 'par.created_at', "par.id || '.' || c")},
                       %(env)s, 'bench-child',
                       CASE WHEN c %% 2 = 0 THEN 'COMPLETED' ELSE 'QUEUED' END,
                       CASE WHEN c %% 2 = 0 THEN 1 ELSE 0 END, '{{}}',
                       CASE WHEN c %% 2 = 0 THEN '1' END, q.queue, q.retry,
                       CASE WHEN c %% 2 = 0 THEN par.created_at ELSE %(now)s + 10 * 3600 END,
                       par.created_at, CASE WHEN c %% 2 = 0 THEN par.created_at END,
                       CASE WHEN c %% 2 = 0 THEN %(now)s - 40 * {DAY} END,
                       par.created_at, par.id, 'children', c
                FROM runs AS par, generate_series(0, %(n)s - 1) AS c, {q}
                WHERE par.env = %(env)s AND par.task_id = 'bench-parent'""",
                         {**p, "n": children})
            has_child_waits = conn.execute(
                "SELECT to_regclass('child_waits') IS NOT NULL").fetchone()
            if has_child_waits and has_child_waits[0]:
                conn.execute("""
                    INSERT INTO child_waits (parent_run_id, step_key, pending)
                    SELECT parent_run_id, parent_step_key, count(*) FROM runs
                    WHERE parent_run_id IS NOT NULL AND status = 'QUEUED'
                    GROUP BY parent_run_id, parent_step_key""")
        h.log("VACUUM ANALYZE, CHECKPOINT ...")
        conn.execute("VACUUM ANALYZE")
        # Flush the bulk load's dirty pages now: otherwise the checkpointer
        # writes them out during the measurement and every commit's fsync
        # waits behind it (p99 40-130 ms), a cost of the seeding, not of
        # the backlog.
        conn.execute("CHECKPOINT")
    return time.monotonic() - started


def fill(sql: str, d: _dialect.Dialect) -> str:
    """A statement's `{fragments}` as the store fills them."""
    fragments = {}
    for _, name, _, _ in string.Formatter().parse(sql):
        if name is None:
            continue
        if name in ("skip_locked", "for_update"):
            fragments[name] = getattr(d, name)
        elif name in ("task_ids", "lease_ids", "ids", "keys", "run_ids"):
            fragments[name] = d.in_list.format(param=":" + name)
        else:
            raise KeyError(f"fragment {{{name}}}")
    return d.translate(sql.format(**fragments))


def explain(url: str, out: Path) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of each hot query, rolled back; the plans to `out`."""
    d = _dialect.POSTGRES
    now = time.time()
    with psycopg.connect(url) as conn:
        old = [r[0] for r in conn.execute(
            "SELECT id FROM runs WHERE finished_at < %s ORDER BY finished_at, id LIMIT 500",
            (now - 30 * DAY,)).fetchall()]
        base = {
            "env": h.ENV, "task_ids": [TASK], "now": now, "nonce": "explain",
            "owners": ["bench-session"] * 200, "owner": "bench-session", "event_type": "leased",
            "expires_at": now + 30, "lease_ids": ["explain.none"], "cutoff": now - 30 * DAY,
            "after": "", "after_at": 0.0, "after_id": "", "updated_before": now - 5,
            "error": '{"type": "TimedOut", "message": "explain"}', "ids": old,
        }
        result: dict[str, Any] = {}
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for name, overrides in HOT_QUERIES.items():
                try:
                    sql = fill(d.text(name), d)
                except KeyError as exc:
                    result[name] = {"skipped": f"not in queries.sql or unknown {exc}"}
                    continue
                params = {**base, **overrides}
                try:
                    rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()
                except (psycopg.Error, KeyError) as exc:
                    conn.rollback()
                    result[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
                    continue
                conn.rollback()
                plan = "\n".join(r[0] for r in rows)
                ms = re.search(r"Execution Time: ([\d.]+) ms", plan)
                result[name] = {"uses_index": SCAN.search(plan) is None,
                                "ms": float(ms.group(1)) if ms else None}
                f.write(f"-- {name} {params_note(sql, params)}\n{sql}\n{plan}\n\n")
    return result


def params_note(sql: str, params: dict[str, Any]) -> str:
    used = {k: v for k, v in params.items() if f"%({k})s" in sql}
    if "ids" in used:
        used["ids"] = f"[{len(params['ids'])} ids of the oldest finished runs]"
    if "owners" in used:
        used["owners"] = f"[{len(params['owners'])} x bench-session]"
    return repr(used)


def backend_pids(url: str) -> list[int]:
    """The Postgres backends serving this database (the coordinator's connections)."""
    return [r[0] for r in h.query(url, "SELECT pid FROM pg_stat_activity "
                                       "WHERE datname = current_database() "
                                       "AND pid <> pg_backend_pid()")]


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += h.proc_cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def db_active_ms(url: str) -> float:
    """pg_stat_database.active_time of this database: milliseconds spent running
    statements, parallel workers included."""
    return float(h.query(url, "SELECT active_time FROM pg_stat_database "
                              "WHERE datname = current_database()")[0][0])


def idle_cpu(url: str, pid: int, seconds: float) -> dict[str, float]:
    """Over `seconds`, in % of one core: the coordinator's CPU, its database
    connections' CPU (/proc; parallel workers not included), and the time the
    database spent running statements (pg_stat_database.active_time)."""
    backends = backend_pids(url)
    active = db_active_ms(url)
    before, db_before, t0 = h.proc_cpu_seconds(pid), cpu_of(backends), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    cpu, db_cpu = h.proc_cpu_seconds(pid) - before, cpu_of(backends) - db_before
    time.sleep(1.5)  # statistics reach pg_stat_database within a second
    return {"idle_cpu_pct": round(100 * cpu / elapsed, 2),
            "idle_db_cpu_pct": round(100 * db_cpu / elapsed, 2),
            "idle_db_active_pct": round((db_active_ms(url) - active) / elapsed / 10, 2)}


def phase(url: str, runs: int, rate: float, idle_s: float) -> dict[str, Any]:
    with h.system(url, slots=200) as s:
        since = asyncio.run(start_latency.trigger_at_rate(s, runs, rate))
        h.wait_finished(url, runs, since=since)
        time.sleep(2)
        cpu = idle_cpu(url, s.coordinator.pid, idle_s)
        rss = h.proc_rss_mb(s.coordinator.pid)
    lat, failed = h.start_latencies_ms(url, since)
    return {"failed": failed, **cpu, "rss_mb": round(rss, 1),
            **{f"start_ms_{k}": v for k, v in h.summary(lat).items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_store_args(parser, sqlite=False)
    parser.add_argument("--empty", action="store_true", help="the empty-store phase only")
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--delayed", type=int, default=100_000)
    parser.add_argument("--parents", type=int, default=100)
    parser.add_argument("--children", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=300, help="latency runs per phase")
    parser.add_argument("--rate", type=float, default=20.0, help="triggers per second")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--explain-out", type=Path, default=Path("backlog-explain.txt"))
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "backlog", "runs": args.runs, "rate_per_s": args.rate}
    with h.throwaway_store(args.database_url) as url:
        h.log("phase: empty store")
        result["empty"] = phase(url, args.runs, args.rate, args.idle_seconds)
        if not args.empty:
            result["seed"] = {"finished": args.finished, "delayed": args.delayed,
                              "parents": args.parents, "children": args.children,
                              "seconds": round(seed(url, args.finished, args.delayed,
                                                    args.parents, args.children), 1)}
            h.log("phase: backlog")
            result["backlog"] = phase(url, args.runs, args.rate, args.idle_seconds)
            result["explain"] = explain(url, args.explain_out)
            result["explain_out"] = str(args.explain_out)
            result["all_plans_use_indexes"] = all(
                e.get("uses_index", True) for e in result["explain"].values())
            e, b = result["empty"], result["backlog"]
            result["p50_ratio"] = round(b["start_ms_p50"] / e["start_ms_p50"], 2)
            result["p99_ratio"] = round(b["start_ms_p99"] / e["start_ms_p99"], 2)
    h.emit(result)
    return 0 if result["empty"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

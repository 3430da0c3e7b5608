"""Waits that end from outside a run's lease, and the invariant scan.

Lock order (docs/architecture.md): every transaction that changes a run and
its steps locks the run row first. A wake-up (timer, token, child wait)
locks the run, then changes the step, then asks the engine's wake rule; a
suspension locks the run by moving it to WAITING, then asks the same rule.
Whichever commits second sees the other's effect, so neither can miss the
other under READ COMMITTED.

Nothing here decides an outcome: the engine hands in what a step becomes
(`WaitResolution`) and the rule that says when a run counts as woken.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ratchet_server import model
from ratchet_server.store import _sql

LOCK_RUN = """
SELECT id, env, status, waiting_on FROM runs WHERE id = :run_id {for_update}
"""

SELECT_STEPS_BY_KEYS = "SELECT * FROM steps WHERE run_id = :run_id AND key IN {keys}"

RESOLVE_WAIT = """
UPDATE steps SET
    status = :status,
    output = COALESCE(:output, output),
    error = COALESCE(:error, error),
    finished_at = COALESCE(:finished_at, finished_at),
    wake_at = CASE WHEN :clear_wake_at = 1 THEN NULL ELSE wake_at END
WHERE run_id = :run_id AND key = :key AND status = 'RUNNING'
  AND (CAST(:expect_wake_at AS DOUBLE PRECISION) IS NULL OR wake_at = :expect_wake_at)
"""

WAKE_WAITING = """
UPDATE runs SET status = 'QUEUED', run_at = :now, waiting_on = NULL, updated_at = :now
WHERE id = :run_id AND status = 'WAITING'
"""

SELECT_DUE_STEPS = """
SELECT * FROM steps WHERE status = 'RUNNING' AND wake_at <= :now ORDER BY wake_at LIMIT :limit
"""

# Candidates only: the engine decides from the children themselves.
SELECT_CHILD_WAIT_CANDIDATES = """
SELECT s.run_id, s.key FROM steps AS s
WHERE s.status = 'RUNNING' AND s.kind = 'child'
  AND NOT EXISTS (
    SELECT 1 FROM runs AS c
    WHERE c.parent_run_id = s.run_id AND c.parent_step_key = s.key
      AND c.status IN ('QUEUED', 'RUNNING', 'WAITING'))
LIMIT :limit
"""

SELECT_CHILD_RUNS = """
SELECT * FROM runs WHERE parent_run_id = :run_id AND parent_step_key = :key
ORDER BY child_index
"""

SELECT_TOKEN_STEP = """
SELECT steps.*, runs.status AS run_status
FROM steps JOIN runs ON runs.id = steps.run_id
WHERE steps.token_id = :token_id AND runs.env = :env
"""

# The invariant scan pages through unfinished runs that may hold a lease or
# wait, in id order.
SELECT_UNFINISHED_PAGE = """
SELECT * FROM runs
WHERE status IN ('RUNNING', 'WAITING') AND id > :after AND updated_at < :updated_before
  AND (CAST(:env AS TEXT) IS NULL OR env = :env)
ORDER BY id
LIMIT :limit
"""

REPAIR_WAITING = """
UPDATE runs SET status = 'QUEUED', run_at = :now, waiting_on = NULL, updated_at = :now
WHERE id = :run_id AND status = 'WAITING'
"""

REPAIR_RUNNING = """
UPDATE runs SET lease_expires_at = :now, updated_at = :now
WHERE id = :run_id AND status = 'RUNNING' AND lease_expires_at IS NULL
"""


def waiting_on(row: _sql.Row) -> tuple[str, ...]:
    text = row["waiting_on"]
    return tuple(json.loads(text)) if text else ()


def _waiting_steps(conn: _sql.Connection, d: _sql.Dialect, run_id: str,
                   keys: Sequence[str]) -> dict[str, model.Step]:
    if not keys:
        return {}
    rows = conn.execute(d.sql(SELECT_STEPS_BY_KEYS, keys=d.in_list.format(param=":keys")),
                        {"run_id": run_id, "keys": d.in_param(list(keys))}).fetchall()
    return {r["key"]: _sql.step_from_row(r) for r in rows}


def lock_run_txn(conn: _sql.Connection, d: _sql.Dialect, run_id: str) -> Any:
    return conn.execute(d.sql(LOCK_RUN, for_update=d.for_update),
                        {"run_id": run_id}).fetchone()


def wake_if_ready_txn(conn: _sql.Connection, d: _sql.Dialect, run_id: str,
                      rule: model.WakeRule, now: float, reason: str) -> bool:
    """Queue a WAITING run again if the engine's rule says a wait of it ended.
    Locks the run row (a no-op when this transaction holds it already)."""
    row = lock_run_txn(conn, d, run_id)
    if row is None or row["status"] != model.RunStatus.WAITING.value:
        return False
    keys = waiting_on(row)
    if not rule(keys, _waiting_steps(conn, d, run_id, keys), now):
        return False
    if conn.execute(d.sql(WAKE_WAITING), {"run_id": run_id, "now": now}).rowcount != 1:
        return False
    _sql.insert_events_txn(conn, d, [model.Event(
        run_id=run_id, type=model.EventType.RESUMED, at=now,
        data=json.dumps({"reason": reason}))])
    return True


def resolve_waits_txn(
    conn: _sql.Connection, d: _sql.Dialect, resolutions: Sequence[model.WaitResolution],
    rule: model.WakeRule, now: float,
) -> tuple[list[bool], list[str]]:
    """Apply each resolution whose step is still pending; wake the runs that
    now count as woken. Runs are locked in id order (no deadlock between two
    coordinators sweeping the same timers). Returns (applied per resolution,
    ids of runs queued again)."""
    by_run: dict[str, list[int]] = {}
    for i, r in enumerate(resolutions):
        by_run.setdefault(r.run_id, []).append(i)
    applied = [False] * len(resolutions)
    woken: list[str] = []
    sql = d.sql(RESOLVE_WAIT)
    for run_id in sorted(by_run):
        if lock_run_txn(conn, d, run_id) is None:
            continue
        events: list[model.Event] = []
        for i in by_run[run_id]:
            r = resolutions[i]
            cur = conn.execute(sql, {
                "status": r.status.value, "output": r.output,
                "error": _sql.error_to_json(r.error), "finished_at": r.finished_at,
                "clear_wake_at": 1 if r.clear_wake_at else 0, "run_id": r.run_id,
                "key": r.key, "expect_wake_at": r.expect_wake_at})
            if cur.rowcount == 1:
                applied[i] = True
                events.extend(r.events)
        _sql.insert_events_txn(conn, d, events)
        if events and wake_if_ready_txn(conn, d, run_id, rule, now, "a wait ended"):
            woken.append(run_id)
    return applied, woken


def due_steps_txn(conn: _sql.Connection, d: _sql.Dialect, now: float,
                  limit: int) -> list[model.Step]:
    rows = conn.execute(d.sql(SELECT_DUE_STEPS), {"now": now, "limit": limit}).fetchall()
    return [_sql.step_from_row(r) for r in rows]


def child_wait_candidates_txn(
    conn: _sql.Connection, d: _sql.Dialect, limit: int
) -> list[tuple[str, str, list[model.Run]]]:
    waits = conn.execute(d.sql(SELECT_CHILD_WAIT_CANDIDATES), {"limit": limit}).fetchall()
    found = []
    for w in waits:
        children = conn.execute(d.sql(SELECT_CHILD_RUNS),
                                {"run_id": w["run_id"], "key": w["key"]}).fetchall()
        found.append((w["run_id"], w["key"], [_sql.run_from_row(c) for c in children]))
    return found


def find_token_txn(conn: _sql.Connection, d: _sql.Dialect, env: str,
                   token_id: str) -> tuple[model.Step, model.RunStatus] | None:
    row = conn.execute(d.sql(SELECT_TOKEN_STEP), {"token_id": token_id, "env": env}).fetchone()
    if row is None:
        return None
    return _sql.step_from_row(row), model.RunStatus(row["run_status"])


def unfinished_page_txn(
    conn: _sql.Connection, d: _sql.Dialect, env: str | None, after: str, limit: int,
    updated_before: float,
) -> list[tuple[model.Run, tuple[str, ...], dict[str, model.Step]]]:
    rows = conn.execute(d.sql(SELECT_UNFINISHED_PAGE), {
        "env": env, "after": after, "limit": limit,
        "updated_before": updated_before}).fetchall()
    page = []
    for row in rows:
        keys = waiting_on(row)
        page.append((_sql.run_from_row(row), keys, _waiting_steps(conn, d, row["id"], keys)))
    return page


# The engine's invariant check: why a run is stuck, or None.
StuckCheck = Callable[[model.Run, tuple[str, ...], Mapping[str, model.Step]], str | None]


def repair_txn(conn: _sql.Connection, d: _sql.Dialect, run_id: str,
               still_stuck: StuckCheck, now: float) -> str | None:
    """Under the run's row lock, check again that the run is stuck (the
    engine's check) and, if so, give it a way on: a WAITING run is queued
    again (its task code finds out which wait ended), a RUNNING run without
    a lease expiry gets one that is already due (the reaper takes it back).
    Returns why it was repaired, or None when it had moved meanwhile."""
    if lock_run_txn(conn, d, run_id) is None:
        return None
    row = conn.execute(d.sql(_sql.SELECT_RUN_ANY_ENV), {"id": run_id}).fetchone()
    run = _sql.run_from_row(row)
    keys = waiting_on(row)
    why: str | None = still_stuck(run, keys, _waiting_steps(conn, d, run_id, keys))
    if why is None:
        return None
    sql = REPAIR_WAITING if run.status is model.RunStatus.WAITING else REPAIR_RUNNING
    if conn.execute(d.sql(sql), {"run_id": run_id, "now": now}).rowcount != 1:
        return None
    _sql.insert_events_txn(conn, d, [model.Event(
        run_id=run_id, type=model.EventType.REPAIRED, at=now, attempt=run.attempt,
        data=json.dumps({"why": why}))])
    return why


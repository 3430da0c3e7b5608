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
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ratchet_server import model
from ratchet_server.store import _dialect, _rows

log = logging.getLogger("ratchet.store")


def waiting_on(row: _dialect.Row) -> tuple[str, ...]:
    text = row["waiting_on"]
    return tuple(json.loads(text)) if text else ()


def _waiting_steps(conn: _dialect.Connection, d: _dialect.Dialect, run_id: str,
                   keys: Sequence[str]) -> dict[str, model.Step]:
    if not keys:
        return {}
    rows = conn.execute(d.sql("select_steps_by_keys", keys=d.in_list.format(param=":keys")),
                        {"run_id": run_id, "keys": d.in_param(list(keys))}).fetchall()
    return {r["key"]: _rows.step_from_row(r) for r in rows}


def lock_run_txn(conn: _dialect.Connection, d: _dialect.Dialect, run_id: str) -> Any:
    return conn.execute(d.sql("lock_run", for_update=d.for_update),
                        {"run_id": run_id}).fetchone()


def wake_if_ready_txn(conn: _dialect.Connection, d: _dialect.Dialect, run_id: str,
                      rule: model.WakeRule, now: float, reason: str) -> bool:
    """Queue a WAITING run again if the engine's rule says a wait of it ended.
    Locks the run row (a no-op when this transaction holds it already)."""
    row = lock_run_txn(conn, d, run_id)
    if row is None or row["status"] != model.RunStatus.WAITING.value:
        return False
    keys = waiting_on(row)
    if not rule(keys, _waiting_steps(conn, d, run_id, keys), now):
        return False
    if conn.execute(d.sql("wake_waiting"), {"run_id": run_id, "now": now}).rowcount != 1:
        return False
    _rows.insert_events_txn(conn, d, [model.Event(
        run_id=run_id, type=model.EventType.RESUMED, at=now,
        data=json.dumps({"reason": reason}))])
    return True


def resolve_waits_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, resolutions: Sequence[model.WaitResolution],
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
    sql = d.sql("resolve_wait")
    for run_id in sorted(by_run):
        if lock_run_txn(conn, d, run_id) is None:
            continue
        events: list[model.Event] = []
        for i in by_run[run_id]:
            r = resolutions[i]
            cur = conn.execute(sql, {
                "status": r.status.value, "output": r.output,
                "error": _rows.error_to_json(r.error), "finished_at": r.finished_at,
                "clear_wake_at": 1 if r.clear_wake_at else 0, "run_id": r.run_id,
                "key": r.key, "expect_wake_at": r.expect_wake_at})
            if cur.rowcount == 1:
                applied[i] = True
                events.extend(r.events)
        _rows.insert_events_txn(conn, d, events)
        if events and wake_if_ready_txn(conn, d, run_id, rule, now, "a wait ended"):
            woken.append(run_id)
    return applied, woken


# The engine's rules for a child wait, installed by the engine
# (Store.use_child_wait_rules): what the step becomes, when its run wakes.
ChildRules = tuple[model.ChildWaitRule, model.WakeRule]


def _children_of(conn: _dialect.Connection, d: _dialect.Dialect,
                 run_ids: Sequence[str]) -> Counter[tuple[str, str]]:
    if not run_ids:
        return Counter()
    rows = conn.execute(d.sql("select_child_parents", ids=d.in_list.format(param=":ids")),
                        {"ids": d.in_param(list(run_ids))}).fetchall()
    return Counter((r["parent_run_id"], r["parent_step_key"]) for r in rows)


def children_reopened_txn(conn: _dialect.Connection, d: _dialect.Dialect,
                          run_ids: Sequence[str]) -> None:
    """Final runs queued again (replay): a child counts again while its
    parent's wait is pending. Call after their row update (child row first)."""
    for (parent, key), n in sorted(_children_of(conn, d, run_ids).items()):
        conn.execute(d.sql("count_child_wait"), {"run_id": parent, "key": key, "n": -n})


def children_final_txn(conn: _dialect.Connection, d: _dialect.Dialect,
                       run_ids: Sequence[str]) -> list[tuple[str, str]]:
    """Runs this transaction made final (call after their row updates): count
    their parents' waits down. Returns the waits that reached 0, for
    `end_child_wait_txn` to end right after this transaction commits.

    Lock order (docs/architecture.md): the children's rows (held already),
    then the `child_waits` rows in (parent, key) order, and no run row after
    a `child_waits` row: a group commit holding a parent's row (its own write)
    may count down a wait of another parent, so locking a parent here would
    close a cycle."""
    rows = conn.execute(d.sql("count_down_child_waits", ids=d.in_list.format(param=":ids")),
                        {"ids": d.in_param(list(run_ids))}).fetchall()
    return sorted((r["parent_run_id"], r["step_key"]) for r in rows if r["pending"] <= 0)


def end_child_wait_txn(conn: _dialect.Connection, d: _dialect.Dialect, parent: str, key: str,
                       rules: ChildRules, now: float) -> list[str]:
    """End a wait whose count reached 0 (its last child's transaction has
    committed): under the parent's row lock, then the count's, the engine's
    rule makes the step's result from the children and the parent wakes if
    it is waiting. Returns the run woken. A wait ended meanwhile (another
    call, the sweep) or counted up again (a replayed child) is left alone."""
    if lock_run_txn(conn, d, parent) is None:  # deleted by retention meanwhile
        conn.execute(d.sql("delete_child_wait"), {"run_id": parent, "key": key})
        return []
    row = conn.execute(d.sql("lock_child_wait", for_update=d.for_update),
                       {"run_id": parent, "key": key}).fetchone()
    if row is None or row["pending"] > 0:
        return []
    outcome, wake = rules
    children = [model.ChildRun(id=c["id"], status=model.RunStatus(c["status"]),
                               output=c["output"], error=_rows.error_from_json(c["error"]))
                for c in conn.execute(d.sql("select_children"),
                                      {"run_id": parent, "key": key}).fetchall()]
    resolution = outcome(parent, key, children, now)
    if resolution is None:
        # The count was off (it must not be): count again, from the children.
        pending = conn.execute(d.sql("count_unfinished_children"),
                               {"run_id": parent, "key": key}).fetchone()["n"]
        log.warning("child wait %s/%s: counted 0 with %d unfinished children",
                    parent, key, pending)
        conn.execute(d.sql("set_child_wait"), {"run_id": parent, "key": key, "pending": pending})
        return []
    conn.execute(d.sql("delete_child_wait"), {"run_id": parent, "key": key})
    return resolve_waits_txn(conn, d, [resolution], wake, now)[1]


def due_steps_txn(conn: _dialect.Connection, d: _dialect.Dialect, now: float,
                  limit: int) -> list[model.Step]:
    rows = conn.execute(d.sql("select_due_steps"), {"now": now, "limit": limit}).fetchall()
    return [_rows.step_from_row(r) for r in rows]


def child_wait_candidates_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, limit: int
) -> list[tuple[str, str, list[model.Run]]]:
    waits = conn.execute(d.sql("select_child_wait_candidates"), {"limit": limit}).fetchall()
    found = []
    for w in waits:
        children = conn.execute(d.sql("select_child_runs"),
                                {"run_id": w["run_id"], "key": w["key"]}).fetchall()
        found.append((w["run_id"], w["key"], [_rows.run_from_row(c) for c in children]))
    return found


def find_token_txn(conn: _dialect.Connection, d: _dialect.Dialect, env: str,
                   token_id: str) -> tuple[model.Step, model.RunStatus] | None:
    row = conn.execute(d.sql("select_token_step"), {"token_id": token_id, "env": env}).fetchone()
    if row is None:
        return None
    return _rows.step_from_row(row), model.RunStatus(row["run_status"])


def unfinished_page_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, env: str | None, after: str, limit: int,
    updated_before: float,
) -> list[tuple[model.Run, tuple[str, ...], dict[str, model.Step]]]:
    # One snapshot for the runs and their steps: a wake-up committing between
    # two reads would otherwise look like a run left WAITING.
    if d.consistent_read:
        conn.execute(d.consistent_read)
    rows = conn.execute(d.sql("select_unfinished_page"), {
        "env": env, "after": after, "limit": limit,
        "updated_before": updated_before}).fetchall()
    page = []
    for row in rows:
        keys = waiting_on(row)
        page.append((_rows.run_from_row(row), keys, _waiting_steps(conn, d, row["id"], keys)))
    return page


# The engine's invariant check: why a run is stuck, or None.
StuckCheck = Callable[[model.Run, tuple[str, ...], Mapping[str, model.Step]], str | None]


def repair_txn(conn: _dialect.Connection, d: _dialect.Dialect, run_id: str,
               still_stuck: StuckCheck, now: float) -> str | None:
    """Under the run's row lock, check again that the run is stuck (the
    engine's check) and, if so, give it a way on: a WAITING run is queued
    again (its task code finds out which wait ended), a RUNNING run without
    a lease expiry gets one that is already due (the reaper takes it back).
    Returns why it was repaired, or None when it had moved meanwhile."""
    if lock_run_txn(conn, d, run_id) is None:
        return None
    row = conn.execute(d.sql("select_run_any_env"), {"id": run_id}).fetchone()
    run = _rows.run_from_row(row)
    keys = waiting_on(row)
    why: str | None = still_stuck(run, keys, _waiting_steps(conn, d, run_id, keys))
    if why is None:
        return None
    sql = "repair_waiting" if run.status is model.RunStatus.WAITING else "repair_running"
    if conn.execute(d.sql(sql), {"run_id": run_id, "now": now}).rowcount != 1:
        return None
    _rows.insert_events_txn(conn, d, [model.Event(
        run_id=run_id, type=model.EventType.REPAIRED, at=now, attempt=run.attempt,
        data=json.dumps({"why": why}))])
    return why


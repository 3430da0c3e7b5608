"""Transactions that create, lease and list runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ratchet_server import model
from ratchet_server.store import _dialect, _rows


def create_runs_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, runs: Sequence[model.NewRun], now: float
) -> list[tuple[model.Run, bool]]:
    results: list[tuple[model.Run, bool]] = []
    plain: list[dict[str, Any]] = []  # no idempotency key: cannot conflict
    insert_sql = d.sql("insert_run")
    for new in runs:
        if new.idempotency_key is None:
            plain.append(_rows.new_run_params(new, now))
            results.append((_rows.created_run(new, now), True))
            continue
        key = {"env": new.env, "task_id": new.task_id, "key": new.idempotency_key}
        row = conn.execute(d.sql("select_run_by_idempotency_key"), key).fetchone()
        if row is not None:
            expires = row["idempotency_expires_at"]
            if expires is None or expires > now:
                results.append((_rows.run_from_row(row), False))
                continue
            conn.execute(d.sql("forget_idempotency_key"),
                         {"id": row["id"], "key": new.idempotency_key})
        row = conn.execute(insert_sql, _rows.new_run_params(new, now)).fetchone()
        if row is None:
            # A concurrent trigger with the same idempotency key won the race
            # (the insert waited for it to commit, so this statement sees it).
            row = conn.execute(d.sql("select_run_by_idempotency_key"), key).fetchone()
            if row is None:
                raise _dialect.TransientConflict("an idempotency key changed hands meanwhile")
            results.append((_rows.run_from_row(row), False))
            continue
        results.append((_rows.run_from_row(row), True))
    if plain:
        conn.cursor().executemany(d.sql("insert_run_plain"), plain)
    insert_tags_txn(conn, d, [new for new, (_, created) in zip(runs, results, strict=True)
                              if created], now)
    _rows.insert_events_txn(conn, d, (
        model.Event(run_id=run.id, type=model.EventType.TRIGGERED, at=now)
        for run, created in results if created))
    return results


def lease_ready_txn(
    conn: _dialect.Connection,
    d: _dialect.Dialect,
    *,
    env: str,
    task_ids: Sequence[str],
    limit: int,
    owner: str,
    nonce: str,
    now: float,
    expires_at: float,
    owners: Sequence[str] = (),
) -> list[model.LeasedRun]:
    """Lease up to `limit` ready runs, in lease order (priority DESC, run_at,
    id); the n-th goes to `owners[n]` (at most len(owners) runs), or all to
    `owner` when `owners` is empty."""
    if owners:
        limit = min(limit, len(owners))
    else:
        owners = [owner] * limit
    if limit <= 0:
        return []
    sql = d.sql("lease_ready", task_ids=d.in_list.format(param=":task_ids"))
    rows = conn.execute(
        sql,
        {
            "env": env,
            "task_ids": d.in_param(task_ids),
            "limit": limit,
            "owners": d.in_param(list(owners[:limit])),
            "nonce": nonce,
            "now": now,
            "expires_at": expires_at,
            "event_type": model.EventType.LEASED.value,
        },
    ).fetchall()
    if not rows:
        return []
    runs = sorted((_rows.run_from_row(r) for r in rows),
                  key=lambda r: (-r.priority, r.run_at, r.id))
    steps: dict[str, list[model.Step]] = {r.id: [] for r in runs}
    # A run never leased before has no steps: no read for it. The others'
    # steps are read by this later statement, whose snapshot sees what an
    # earlier lease (maybe another coordinator's) committed.
    with_steps = [r["id"] for r in rows if r["has_steps"]] if d.one_statement_lease \
        else list(steps)
    if with_steps:
        step_rows = conn.execute(
            d.sql("select_steps_of", ids=d.in_list.format(param=":ids")),
            {"ids": d.in_param(with_steps)},
        ).fetchall()
        for row in step_rows:
            steps[row["run_id"]].append(_rows.step_from_row(row))
    if d.one_statement_lease:  # the statement wrote the history
        return [model.LeasedRun(run=r, steps=tuple(steps[r.id])) for r in runs]
    _rows.insert_events_txn(
        conn,
        d,
        (
            model.Event(run_id=r.id, type=model.EventType.LEASED, at=now, attempt=r.attempt,
                        lease_id=r.lease_id, data=json.dumps({"owner": r.lease_owner}))
            for r in runs
        ),
    )
    return [model.LeasedRun(run=r, steps=tuple(steps[r.id])) for r in runs]


def insert_tags_txn(conn: _dialect.Connection, d: _dialect.Dialect,
                    runs: Sequence[model.NewRun], now: float) -> None:
    """The run_tags rows of runs just created at `now` (ListRuns by tag)."""
    rows = [{"run_id": r.id, "env": r.env, "tag": tag, "now": now}
            for r in runs for tag in r.tags]
    if rows:
        conn.cursor().executemany(d.sql("insert_run_tag"), rows)


def create_children_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, *, parent: str, lease_id: str, step_key: str,
    children: Sequence[model.NewRun], wait: bool, now: float,
) -> list[str] | None:
    """Create a step's child runs once; None if the parent's lease is not current."""
    if conn.execute(d.sql("fence_parent"), {"run_id": parent, "lease_id": lease_id,
                                          "now": now}).rowcount != 1:
        return None
    existing = conn.execute(d.sql("select_children"), {"run_id": parent, "key": step_key})
    ids = [r["id"] for r in existing.fetchall()]
    if ids:
        return ids  # a replay of the parent: the children exist already
    conn.cursor().executemany(d.sql("insert_run_plain"), [_rows.new_run_params(c, now)
                                                       for c in children])
    insert_tags_txn(conn, d, children, now)
    ids = [c.id for c in children]
    conn.execute(d.sql("upsert_step"), {
        "run_id": parent, "key": step_key, "kind": model.StepKind.CHILD.value,
        "status": (model.StepStatus.RUNNING if wait else model.StepStatus.COMPLETED).value,
        "attempts": 1, "retry_base": 0, "output": None if wait else json.dumps(ids),
        "error": None, "now": now, "started_at": now, "finished_at": None if wait else now,
        "wake_at": None, "token_id": None, "state": None})
    if wait:
        # The last child's own transaction ends the wait (_waits.children_final_txn).
        conn.execute(d.sql("insert_child_wait"),
                     {"run_id": parent, "key": step_key, "pending": len(ids)})
    _rows.insert_events_txn(conn, d, [
        *(model.Event(run_id=c.id, type=model.EventType.TRIGGERED, at=now,
                      data=json.dumps({"parent_run_id": parent, "step_key": step_key}))
          for c in children),
        model.Event(run_id=parent, type=model.EventType.CHILDREN_TRIGGERED, at=now,
                    lease_id=lease_id, step_key=step_key,
                    data=json.dumps({"children": len(ids), "wait": wait})),
    ])
    return ids


def delete_finished_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, cutoff: float, limit: int,
    after: tuple[float, str] | None,
) -> tuple[int, tuple[float, str] | None]:
    """One retention batch: the next `limit` finished runs older than `cutoff`
    after the cursor `after`, deleted but for children of unfinished parents.
    Returns the number deleted and the cursor for the next batch (the last
    row read, deleted or kept), None once the walk has reached its end."""
    after_at, after_id = after if after is not None else (-1.0, "")
    page = conn.execute(d.sql("select_finished_page"), {
        "cutoff": cutoff, "after_at": after_at, "after_id": after_id, "limit": limit,
    }).fetchall()
    if not page:
        return 0, None
    cur = conn.execute(d.sql("delete_finished", ids=d.in_list.format(param=":ids")),
                       {"ids": d.in_param([r["id"] for r in page]), "cutoff": cutoff})
    last = page[-1]
    return int(cur.rowcount), (last["finished_at"], last["id"]) if len(page) == limit else None


def list_runs_txn(
    conn: _dialect.Connection,
    d: _dialect.Dialect,
    flt: model.RunFilter,
    limit: int,
    cursor: tuple[float, str] | None,
) -> list[model.Run]:
    filters: list[str] = []
    params: dict[str, Any] = {"env": flt.env, "limit": limit}
    if len(flt.statuses) == 1:
        filters.append(d.text("list_filter_status_one"))
        params["status"] = flt.statuses[0].value
    elif flt.statuses:
        filters.append(d.text("list_filter_status").format(
            statuses=d.in_list.format(param=":statuses")))
        params["statuses"] = d.in_param([s.value for s in flt.statuses])
    if flt.task_id:
        filters.append(d.text("list_filter_task"))
        params["task_id"] = flt.task_id
    if flt.parent_run_id:
        filters.append(d.text("list_filter_parent"))
        params["parent_run_id"] = flt.parent_run_id
    if flt.error_type:
        filters.append(d.text("list_filter_error"))
        params["error_type"] = flt.error_type
    if flt.created_after is not None:
        filters.append(d.text("list_filter_after"))
        params["created_after"] = flt.created_after
    if flt.created_before is not None:
        filters.append(d.text("list_filter_before"))
        params["created_before"] = flt.created_before
    if not flt.include_discarded:
        filters.append(d.text("list_filter_not_discarded"))
    shape = "tagged" if flt.tag else "runs"  # a tag's runs are walked on run_tags
    if flt.tag:
        params["tag"] = flt.tag
    if cursor is not None:
        filters.append(d.text("list_filter_tagged_cursor" if flt.tag else "list_filter_cursor"))
        params["c_at"], params["c_id"] = cursor
    sql = d.sql("list_run_summaries" if flt.summary else "list_runs", filters=" ".join(filters),
                source=d.text(f"list_source_{shape}"), order=d.text(f"list_order_{shape}"))
    return [_rows.run_from_row(r) for r in conn.execute(sql, params).fetchall()]

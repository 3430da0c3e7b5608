"""Wait tokens created outside any run: create, read, list, a run's wait on
one, and completing one.

Lock order (docs/architecture.md): a token row is locked after the row of
the run that waits on it, never before. A run starting to wait holds its run
row (the lease fence) and then locks the token; completing a token a run
waits on locks that run's row, then the token. Completing a token no run
waits on yet is one conditional UPDATE of the token row (`run_id IS NULL`)
that takes no other lock: if a run's wait locked the token first, the UPDATE
waits for it, matches nothing, and the completion starts again on the run's
side. So the wait and the completion meet on the token row, each commit sees
the other's, and neither can miss the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ratchet_server import model
from ratchet_server.store import _dialect, _rows, _waits


class Undo(Exception):
    """Roll the transaction back and answer `result` instead."""

    def __init__(self, result: Any) -> None:
        super().__init__("transaction undone")
        self.result = result


def token_from_row(row: _dialect.Row) -> model.Token:
    return model.Token(
        id=row["id"], env=row["env"], secret=row["secret"],
        status=model.TokenStatus(row["status"]), data=row["data"],
        tags=tuple(json.loads(row["tags"])), idempotency_key=row["idempotency_key"],
        created_at=row["created_at"], expires_at=row["expires_at"],
        completed_at=row["completed_at"], run_id=row["run_id"], step_key=row["step_key"])


def create_token_txn(conn: _dialect.Connection, d: _dialect.Dialect,
                     token: model.Token) -> tuple[model.Token, bool]:
    """Insert the token, or return the one its idempotency key names (created False)."""
    by_key = {"env": token.env, "idempotency_key": token.idempotency_key}
    if token.idempotency_key:
        row = conn.execute(d.sql("select_token_by_key"), by_key).fetchone()
        if row is not None:
            return token_from_row(row), False
    cur = conn.execute(d.sql("insert_token"), {
        "id": token.id, "env": token.env, "secret": token.secret,
        "tags": json.dumps(list(token.tags)), "idempotency_key": token.idempotency_key,
        "created_at": token.created_at, "expires_at": token.expires_at})
    if cur.rowcount == 1:
        return token, True
    # A concurrent create with the same key committed first.
    row = conn.execute(d.sql("select_token_by_key"), by_key).fetchone()
    if row is None:
        raise _dialect.TransientConflict("token insert conflicted with nothing visible")
    return token_from_row(row), False


def get_token_txn(conn: _dialect.Connection, d: _dialect.Dialect, env: str | None,
                  token_id: str) -> model.Token | None:
    if env is None:
        row = conn.execute(d.sql("select_token_any_env"), {"id": token_id}).fetchone()
    else:
        row = conn.execute(d.sql("select_token"), {"id": token_id, "env": env}).fetchone()
    return None if row is None else token_from_row(row)


def list_tokens_txn(conn: _dialect.Connection, d: _dialect.Dialect, flt: model.TokenFilter,
                    limit: int, cursor: tuple[float, str] | None,
                    now: float) -> list[model.Token]:
    filters: list[str] = []
    params: dict[str, Any] = {"env": flt.env, "limit": limit, "now": now}
    if flt.run_id:
        filters.append(d.text("token_filter_run"))
        params["run_id"] = flt.run_id
    if flt.statuses:
        parts = [d.text(f"token_status_{s.value.lower()}").strip() for s in flt.statuses]
        filters.append(d.text("token_filter_statuses").format(statuses=" OR ".join(parts)))
    for i, tag in enumerate(flt.tags):
        filters.append(d.text("token_filter_tag").format(param=f":tag{i}"))
        params[f"tag{i}"] = tag
    if cursor is not None:
        filters.append(d.text("token_filter_cursor"))
        params["c_at"], params["c_id"] = cursor
    sql = d.sql("list_tokens", filters=" ".join(f.strip() for f in filters))
    return [token_from_row(r) for r in conn.execute(sql, params).fetchall()]


def wait_on_token_txn(conn: _dialect.Connection, d: _dialect.Dialect, w: model.StepWrite,
                      rule: model.TokenWaitRule, now: float) -> bool | str:
    """A run starts waiting on an existing token: fence the lease (locks the
    run row), lock the token, record the step the engine's rule says (and
    the run on the token). False for a stale lease; the rule's refusal as a
    string (nothing changes)."""
    if conn.execute(d.sql("fence_run_state"), _rows.fence_params(w, now)).rowcount != 1:
        return False
    row = conn.execute(d.sql("lock_token", for_update=d.for_update),
                       {"id": w.token_id, "env": w.env}).fetchone()
    token = None if row is None else token_from_row(row)
    decided = rule(token, now)
    if isinstance(decided, str):
        raise Undo(decided)
    assert token is not None
    conn.execute(d.sql("upsert_step"), _rows.step_params(decided, now))
    if token.run_id is None:
        conn.execute(d.sql("link_token"),
                     {"id": token.id, "run_id": w.run_id, "step_key": w.key})
    _rows.insert_events_txn(conn, d, decided.events)
    return True


def complete_token_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, env: str, token_id: str, data: str,
    now: float, outcome: Callable[[model.Step], model.WaitResolution], rule: model.WakeRule,
) -> model.TokenCompletion | None:
    """Complete a token (None if unknown). With no run waiting on it: one
    conditional UPDATE. With one: lock the run, then the token, complete
    both the token and the run's step (`outcome`, the engine's), and queue
    the run if the engine's wake rule says so; if the step is no longer
    pending (it timed out), nothing changes."""
    params = {"id": token_id, "env": env, "data": data, "now": now, "run_id": None}
    token = get_token_txn(conn, d, env, token_id)
    if token is None:
        return None
    if token.run_id is None:
        if conn.execute(d.sql("complete_token"), params).rowcount == 1:
            done = get_token_txn(conn, d, env, token_id)
            assert done is not None
            return model.TokenCompletion(completed=True, token=done)
        # Completed, timed out, or a run started waiting meanwhile.
        token = get_token_txn(conn, d, env, token_id)
        assert token is not None
        if token.run_id is None:
            return model.TokenCompletion(completed=False, token=token)
    run_id = token.run_id
    run_row = _waits.lock_run_txn(conn, d, run_id)
    row = conn.execute(d.sql("lock_token", for_update=d.for_update),
                       {"id": token_id, "env": env}).fetchone()
    token = token_from_row(row)
    if run_row is None:  # the run is gone (retention): the token still completes
        params["run_id"] = run_id
        done = conn.execute(d.sql("complete_token"), params).rowcount == 1
        return model.TokenCompletion(completed=done,
                                     token=get_token_txn(conn, d, env, token_id) or token)
    run_status = model.RunStatus(run_row["status"])
    steps = conn.execute(d.sql("select_steps_by_keys", keys=d.in_list.format(param=":keys")),
                         {"run_id": run_id, "keys": d.in_param([token.step_key or ""])}
                         ).fetchall()
    step = _rows.step_from_row(steps[0]) if steps else None
    refused = model.TokenCompletion(completed=False, token=token, run_status=run_status,
                                    step=step)
    if run_status.is_final or step is None:
        return refused
    params["run_id"] = run_id
    if conn.execute(d.sql("complete_token"), params).rowcount != 1:
        return refused
    applied, woken = _waits.resolve_waits_txn(conn, d, [outcome(step)], rule, now)
    if not applied[0]:
        raise Undo(refused)
    done = get_token_txn(conn, d, env, token_id)
    assert done is not None
    return model.TokenCompletion(completed=True, token=done, woken=bool(woken),
                                 run_status=run_status, step=step)

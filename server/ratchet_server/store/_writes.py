"""Fenced writes under a lease, applied many at a time (group commit).

Each write names its lease (and its environment and session); a write
whose lease is no longer current changes nothing and is reported as not
applied. On Postgres a batch without extra fences runs as a constant number
of set-based statements, whatever its size.
"""

from __future__ import annotations

from collections.abc import Sequence

from ratchet_server import model
from ratchet_server.store import _dialect, _rows, _waits


def apply_writes_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, writes: Sequence[model.FencedWrite], now: float,
    children: set[str] | None = None,
) -> list[bool]:
    """Apply fenced writes; True for each one whose lease was current.

    Runs are locked in id order (each run's writes keep their order), the
    same order every multi-run transaction uses, so two group commits and a
    timer sweep never deadlock on each other. The runs with a parent that an
    applied transition moved are added to `children`: the caller then counts
    down the waits of those made final (`made_final`,
    `_waits.children_final_txn`), after every run row of the batch."""
    found: set[str] = set() if children is None else children
    if d.batch_writes and _batchable(writes):
        return _apply_batched_txn(conn, d, writes, now, found)
    return _apply_each_txn(conn, d, writes, now, found)


def made_final(writes: Sequence[model.FencedWrite], applied: Sequence[bool],
               children: set[str]) -> list[str]:
    """The runs among `children` that the applied writes made final."""
    return [w.run_id for w, ok in zip(writes, applied, strict=True)
            if ok and isinstance(w, model.RunTransition) and w.status.is_final
            and w.run_id in children]


def _apply_each_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, writes: Sequence[model.FencedWrite], now: float,
    children: set[str],
) -> list[bool]:
    applied = [False] * len(writes)
    fence_sql = d.sql("fence_run_state")
    step_sql = d.sql("upsert_step")
    transition_sql = d.sql("transition_run")
    for i in sorted(range(len(writes)), key=lambda k: writes[k].run_id):
        w = writes[i]
        if isinstance(w, model.StepWrite):
            cur = conn.execute(fence_sql, _rows.fence_params(w, now))
            if cur.rowcount == 1:
                conn.execute(step_sql, _rows.step_params(w, now))
            applied[i] = cur.rowcount == 1
        else:
            moved = conn.execute(transition_sql, _rows.transition_params(w, now)).fetchall()
            applied[i] = len(moved) == 1
            if applied[i] and moved[0]["parent_run_id"] is not None:
                children.add(w.run_id)
        if applied[i]:
            # Events first: a wake-up right after the suspension is recorded
            # after the suspension in the history.
            _rows.insert_events_txn(conn, d, w.events)
            if isinstance(w, model.RunTransition) and w.status is model.RunStatus.WAITING:
                if w.wake_rule is None:
                    raise ValueError("a suspension needs the engine's wake rule")
                # This transaction holds the run's row lock since the UPDATE
                # above, and reads the steps after it: a wait that ended before
                # (committed) is seen here; one that ends after waits for the
                # lock and then sees WAITING (docs/architecture.md, lock order).
                _waits.wake_if_ready_txn(conn, d, w.run_id, w.wake_rule, now,
                                         "a wait had ended before the run suspended")
    return applied


def _batchable(writes: Sequence[model.FencedWrite]) -> bool:
    """True when set-based statements give the same result as applying in order:
    every run's step writes name one lease, no step is written twice, and a run
    with a transition has no other write in the batch (a worker awaits each
    acknowledgement, so this is the normal case)."""
    step_lease: dict[str, str] = {}
    keys: set[tuple[str, str]] = set()
    transitions: set[str] = set()
    for w in writes:
        if isinstance(w, model.StepWrite):
            if (step_lease.setdefault(w.run_id, w.lease_id) != w.lease_id
                    or (w.run_id, w.key) in keys):
                return False
            keys.add((w.run_id, w.key))
        elif (w.run_id in transitions or w.expired_before
              or w.status is model.RunStatus.WAITING
              or w.expect_status is not model.RunStatus.RUNNING):
            return False  # extra fences or a wake check: apply one by one
        else:
            transitions.add(w.run_id)
    return not (transitions & step_lease.keys())


def _apply_batched_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, writes: Sequence[model.FencedWrite], now: float,
    children: set[str],
) -> list[bool]:
    """Group commit in a constant number of statements, whatever the batch size
    (rows in run id order, as above)."""
    ordered = sorted(writes, key=lambda w: w.run_id)
    steps = [w for w in ordered if isinstance(w, model.StepWrite)]
    transitions = [w for w in ordered if isinstance(w, model.RunTransition)]
    ok: set[str] = set()
    if steps:
        ok.update(_apply_steps(conn, d, steps, now))
    if transitions:
        params = [_rows.transition_params(w, now) for w in transitions]
        rows = conn.execute(d.sql("transition_run_batch"), {
            "now": now,
            "ids": [p["run_id"] for p in params],
            "leases": [p["lease_id"] for p in params],
            "statuses": [p["status"] for p in params],
            "outputs": [p["output"] for p in params],
            "errors": [p["error"] for p in params],
            "states": [p["state"] for p in params],
            "run_ats": [p["run_at"] for p in params],
            "refunds": [p["refund"] for p in params],
            "losses": [p["losses"] for p in params],
            "final_errors": [p["final_error"] for p in params],
            "clear_final_errors": [p["clear_final_error"] for p in params],
            "finishings": [p["finishing"] for p in params],
            "finished": [p["finished_at"] for p in params],
            "envs": [p["env"] for p in params],
            "owners": [p["owner"] for p in params],
            "clear_errors": [p["clear_error"] for p in params],
        }).fetchall()
        ok.update(r["id"] for r in rows)
        children.update(r["id"] for r in rows if r["parent_run_id"] is not None)
    applied = [w.run_id in ok for w in writes]
    events = [e for w, good in zip(writes, applied, strict=True)
              if good and isinstance(w, model.RunTransition) for e in w.events]
    if events:
        conn.cursor().executemany(d.sql("insert_event"), [_rows.event_params(e) for e in events])
    return applied


def one_statement(d: _dialect.Dialect, writes: Sequence[model.FencedWrite]) -> bool:
    """True when `writes` can go as one statement committed on its own
    (`apply_step_writes_txn`): step writes alone, each run's naming one lease,
    and no step written twice."""
    return (d.one_statement_steps and bool(writes)
            and all(isinstance(w, model.StepWrite) for w in writes) and _batchable(writes))


def quick(writes: Sequence[model.FencedWrite]) -> bool:
    """True for a batch small enough to apply without a thread hand-off where
    the store allows it (`_run_quick`): a few step writes with small values
    (counted in characters: at most 256 KiB of UTF-8)."""
    steps = [w for w in writes if isinstance(w, model.StepWrite)]
    return len(steps) == len(writes) <= QUICK_WRITES and sum(map(_size, steps)) <= QUICK_CHARS


QUICK_WRITES = 4
QUICK_CHARS = 64 * 1024


def _size(w: model.StepWrite) -> int:
    return len(w.output or "") + len(w.state or "") + (
        0 if w.error is None else len(w.error.message) + len(w.error.stack or ""))


def apply_step_writes_txn(
    conn: _dialect.Connection, d: _dialect.Dialect, writes: Sequence[model.FencedWrite], now: float
) -> list[bool]:
    """Apply a batch that `one_statement` accepted, as one statement (runs
    locked in id order); True for each write whose lease was current."""
    steps = sorted((w for w in writes if isinstance(w, model.StepWrite)), key=lambda w: w.run_id)
    ok = _apply_steps(conn, d, steps, now)
    return [w.run_id in ok for w in writes]


def _apply_steps(
    conn: _dialect.Connection, d: _dialect.Dialect, steps: Sequence[model.StepWrite], now: float
) -> set[str]:
    """Step writes (sorted by run id) as one statement, with their history;
    the ids of the runs whose lease was current."""
    last_state: dict[str, tuple[str, str | None]] = {}
    fences: dict[str, model.StepWrite] = {}
    for w in steps:
        previous = last_state.get(w.run_id, (w.lease_id, None))[1]
        last_state[w.run_id] = (w.lease_id, w.state if w.state is not None else previous)
        fences.setdefault(w.run_id, w)
    params = [_rows.step_params(w, now) for w in steps]
    events = [{**_rows.event_params(e), "writer": w.run_id} for w in steps for e in w.events]
    rows = conn.execute(d.sql("apply_step_writes"), {
        "now": now,
        "ids": list(last_state),
        "leases": [lease for lease, _ in last_state.values()],
        "states": [state for _, state in last_state.values()],
        "envs": [fences[run_id].env for run_id in last_state],
        "owners": [fences[run_id].owner for run_id in last_state],
        **{f"s_{name}": [p[column] for p in params] for name, column in _STEP_COLUMNS},
        **{f"e_{name}": [e[column] for e in events] for name, column in _EVENT_COLUMNS},
    }).fetchall()
    return {r["id"] for r in rows}


# apply_step_writes' array parameters, and the step_params / event_params
# entries they are made of.
_STEP_COLUMNS = (
    ("run_ids", "run_id"), ("keys", "key"), ("kinds", "kind"), ("statuses", "status"),
    ("attempts", "attempts"), ("retry_bases", "retry_base"), ("outputs", "output"),
    ("errors", "error"), ("started", "started_at"), ("finished", "finished_at"),
    ("wake_ats", "wake_at"), ("token_ids", "token_id"), ("states", "state"),
)
_EVENT_COLUMNS = (
    ("writers", "writer"), ("run_ids", "run_id"), ("ats", "at"), ("types", "type"),
    ("attempts", "attempt"),
    ("lease_ids", "lease_id"), ("step_keys", "step_key"), ("data", "data"),
)

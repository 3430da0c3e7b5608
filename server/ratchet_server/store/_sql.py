"""The SQL both stores share, and the transaction functions that run it.

Queries are written once with `:name` parameters (sqlite3's style); the
Postgres store rewrites them to psycopg's `%(name)s` when it loads. The few
that differ between the dialects (set membership, row locking) come from a
`Dialect`. Every transaction function takes a DB-API connection whose rows
can be indexed by column name and runs inside a transaction opened by the
store; none of them owns a rule: they store what the engine decided.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from ratchet import Retry
from ratchet_server import model
from ratchet_server.store import _waits

_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def to_pyformat(sql: str) -> str:
    """Rewrite `:name` parameters as psycopg's `%(name)s` (constant SQL only)."""
    return _PARAM.sub(r"%(\1)s", sql)


class TransientConflict(RuntimeError):
    """A concurrent transaction changed what this one relied on; running the
    whole transaction again gives the right answer."""


class Row(Protocol):
    def __getitem__(self, key: str) -> Any: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    def execute(self, sql: str, params: Mapping[str, Any] = ..., /) -> Any: ...

    def cursor(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Dialect:
    """The dialect-specific pieces of SQL, and a parameter translator."""

    name: str
    # "column IN <this>" for a list parameter `:ids` passed via `in_param`.
    in_list: str
    # "column IN <this>" for a column holding a JSON array of strings.
    in_json_column: str
    # Row locks for work that any coordinator may claim (timers).
    skip_locked: str
    # Locks the rows a SELECT returns until the transaction ends (SQLite has
    # one writer at a time, so it needs none).
    for_update: str
    translate: Any  # Callable[[str], str]
    # Translated statements, by template and fragments (the SQL is constant).
    _cache: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict, compare=False)

    def in_param(self, values: Sequence[str]) -> Any:
        return list(values) if self.name == "postgres" else json.dumps(list(values))

    def sql(self, text: str, **fragments: str) -> str:
        key = (text, *sorted(fragments.items()))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = str(self.translate(text.format(**fragments)))
        return cached


SQLITE = Dialect(
    name="sqlite",
    in_list="(SELECT value FROM json_each({param}))",
    in_json_column="(SELECT value FROM json_each({column}))",
    skip_locked="",
    for_update="",
    translate=lambda s: s,
)
POSTGRES = Dialect(
    name="postgres",
    in_list="(SELECT unnest(CAST({param} AS text[])))",
    in_json_column="(SELECT jsonb_array_elements_text(CAST({column} AS jsonb)))",
    skip_locked="FOR UPDATE SKIP LOCKED",
    for_update="FOR UPDATE",
    translate=to_pyformat,
)


# --- encoding helpers -------------------------------------------------------


RETRY_FIELDS = ("max_attempts", "factor", "min_delay", "max_delay", "jitter")


def retry_to_json(retry: Retry) -> str:
    return json.dumps({f: getattr(retry, f) for f in RETRY_FIELDS}, separators=(",", ":"))


def retry_from_json(text: str) -> Retry:
    return Retry(**json.loads(text))


def error_to_json(error: model.ErrorInfo | None) -> str | None:
    if error is None:
        return None
    return json.dumps(dataclasses.asdict(error), separators=(",", ":"))


def error_from_json(text: str | None) -> model.ErrorInfo | None:
    if not text:
        return None
    return model.ErrorInfo(**json.loads(text))


def run_from_row(row: Row) -> model.Run:
    return model.Run(
        id=row["id"],
        env=row["env"],
        task_id=row["task_id"],
        status=model.RunStatus(row["status"]),
        attempt=row["attempt"],
        payload=row["payload"],
        output=row["output"],
        error=error_from_json(row["error"]),
        queue=row["queue"],
        priority=row["priority"],
        retry=retry_from_json(row["retry"]),
        run_at=row["run_at"],
        idempotency_key=row["idempotency_key"],
        concurrency_key=row["concurrency_key"],
        tags=tuple(json.loads(row["tags"])),
        metadata=json.loads(row["metadata"]),
        parent_run_id=row["parent_run_id"],
        state=row["state"],
        lease_id=row["lease_id"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        replay_of=row["replay_of"],
        discarded_at=row["discarded_at"],
    )


def step_from_row(row: Row) -> model.Step:
    return model.Step(
        run_id=row["run_id"],
        key=row["key"],
        kind=model.StepKind(row["kind"]),
        status=model.StepStatus(row["status"]),
        attempts=row["attempts"],
        retry_base=row["retry_base"],
        output=row["output"],
        error=error_from_json(row["error"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        wake_at=row["wake_at"],
        token_id=row["token_id"],
    )


def task_from_row(row: Row) -> model.TaskDef:
    return model.TaskDef(
        env=row["env"],
        id=row["id"],
        version=row["version"],
        queue=row["queue"],
        retry=retry_from_json(row["retry"]),
        payload_schema=row["payload_schema"],
        output_schema=row["output_schema"],
        max_duration=row["max_duration"],
    )


# --- queries ------------------------------------------------------------------

INSERT_API_KEY = """
INSERT INTO api_keys (id, env, role, name, key_hash, created_at)
VALUES (:id, :env, :role, :name, :key_hash, :now)
"""

SELECT_API_KEY = """
SELECT id, env, role, name FROM api_keys WHERE key_hash = :key_hash AND revoked_at IS NULL
"""

LIST_API_KEYS = """
SELECT id, env, role, name, created_at, revoked_at FROM api_keys ORDER BY created_at, id
"""

# Only a key not revoked yet: a second revoke changes nothing (and says so).
REVOKE_API_KEY = """
UPDATE api_keys SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL RETURNING id
"""

UPSERT_TASK = """
INSERT INTO tasks (env, id, version, queue, retry, payload_schema, output_schema, max_duration,
                   updated_at)
VALUES (:env, :id, :version, :queue, :retry, :payload_schema, :output_schema, :max_duration, :now)
ON CONFLICT (env, id) DO UPDATE SET
    version = excluded.version, queue = excluded.queue, retry = excluded.retry,
    payload_schema = excluded.payload_schema, output_schema = excluded.output_schema,
    max_duration = excluded.max_duration, updated_at = excluded.updated_at
"""

SELECT_TASK = "SELECT * FROM tasks WHERE env = :env AND id = :id"

SELECT_RUN_BY_IDEMPOTENCY_KEY = """
SELECT * FROM runs WHERE env = :env AND task_id = :task_id AND idempotency_key = :key
"""

# By the expired row's id: matching by key could clear the key of a run a
# concurrent trigger has just inserted with it.
FORGET_IDEMPOTENCY_KEY = """
UPDATE runs SET idempotency_key = NULL WHERE id = :id AND idempotency_key = :key
"""

INSERT_RUN = """
INSERT INTO runs (id, env, task_id, status, attempt, payload, queue, priority, retry, run_at,
                  idempotency_key, idempotency_expires_at, concurrency_key, tags, metadata,
                  parent_run_id, parent_step_key, child_index, replay_of, ttl, max_duration,
                  expire_at, created_at, updated_at)
VALUES (:id, :env, :task_id, 'QUEUED', 0, :payload, :queue, :priority, :retry, :run_at,
        :idempotency_key, :idempotency_expires_at, :concurrency_key, :tags, :metadata,
        :parent_run_id, :parent_step_key, :child_index, :replay_of, :ttl, :max_duration,
        :expire_at, :now, :now)
ON CONFLICT DO NOTHING
RETURNING *
"""

# The same, for a batch of runs without idempotency keys (executemany).
INSERT_RUN_PLAIN = INSERT_RUN.replace("ON CONFLICT DO NOTHING\nRETURNING *\n", "")

SELECT_RUN = "SELECT * FROM runs WHERE env = :env AND id = :id"
SELECT_RUN_ANY_ENV = "SELECT * FROM runs WHERE id = :id"

SELECT_STEPS = "SELECT * FROM steps WHERE run_id = :run_id ORDER BY created_at, key"

SELECT_STEPS_OF = "SELECT * FROM steps WHERE run_id IN {ids} ORDER BY run_id, created_at, key"

# SQLite: one writer at a time, so no row locks are needed.
LEASE_READY_SQLITE = """
UPDATE runs SET
    status = 'RUNNING', attempt = attempt + 1, lease_id = :nonce || '.' || id,
    lease_owner = :owner, lease_expires_at = :expires_at,
    started_at = COALESCE(started_at, :now), updated_at = :now,
    deadline_at = COALESCE(deadline_at, :now + max_duration)
WHERE id IN (
    SELECT id FROM runs
    WHERE env = :env AND status = 'QUEUED' AND task_id IN {task_ids} AND run_at <= :now
    ORDER BY priority DESC, run_at, id
    LIMIT :limit
)
RETURNING *
"""

# Postgres: one ordered index scan per task (runs_ready), so the cost does not
# grow with the number of queued runs; rows locked but not chosen by the outer
# LIMIT stay locked only until this transaction ends.
LEASE_READY_POSTGRES = """
UPDATE runs SET
    status = 'RUNNING', attempt = attempt + 1, lease_id = :nonce || '.' || runs.id,
    lease_owner = :owner, lease_expires_at = :expires_at,
    started_at = COALESCE(started_at, :now), updated_at = :now,
    deadline_at = COALESCE(deadline_at, :now + max_duration)
WHERE runs.id IN (
    SELECT r.id FROM unnest(CAST(:task_ids AS text[])) AS t(task_id)
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at FROM runs
        WHERE env = :env AND status = 'QUEUED' AND task_id = t.task_id AND run_at <= :now
        ORDER BY priority DESC, run_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ) AS r
    ORDER BY r.priority DESC, r.run_at, r.id
    LIMIT :limit
)
RETURNING *
"""

NEXT_RUN_AT = """
SELECT MIN(run_at) AS next FROM runs
WHERE env = :env AND status = 'QUEUED' AND task_id IN {task_ids}
"""

RENEW_LEASES = """
UPDATE runs SET lease_expires_at = :expires_at
WHERE lease_owner = :owner AND status = 'RUNNING' AND lease_id IN {lease_ids}
"""

ADOPT_LEASES = """
UPDATE runs SET lease_owner = :owner, lease_expires_at = :expires_at
WHERE lease_id IN {lease_ids} AND status = 'RUNNING' AND env = :env
RETURNING id, lease_id, attempt
"""

SELECT_EXPIRED_LEASES = """
SELECT id, lease_id, attempt, retry, lease_owner FROM runs
WHERE status = 'RUNNING' AND lease_expires_at < :now
ORDER BY lease_expires_at
LIMIT :limit
"""

SELECT_OWNED_LEASES = """
SELECT id, lease_id, attempt, retry, lease_owner FROM runs
WHERE status = 'RUNNING' AND lease_owner = :owner
"""

SELECT_LEASE = """
SELECT id, lease_id, attempt, retry, lease_owner FROM runs
WHERE id = :run_id AND lease_id = :lease_id AND status = 'RUNNING'
"""

FENCE_RUN_STATE = """
UPDATE runs SET state = COALESCE(:state, state), updated_at = :now
WHERE id = :run_id AND lease_id = :lease_id AND status = 'RUNNING'
  AND (CAST(:env AS TEXT) IS NULL OR env = :env)
  AND (CAST(:owner AS TEXT) IS NULL OR lease_owner = :owner)
"""

UPSERT_STEP = """
INSERT INTO steps (run_id, key, kind, status, attempts, retry_base, output, error, created_at,
                   started_at, finished_at, wake_at, token_id)
VALUES (:run_id, :key, :kind, :status, :attempts, :retry_base, :output, :error, :now,
        :started_at, :finished_at, :wake_at, :token_id)
ON CONFLICT (run_id, key) DO UPDATE SET
    wake_at = COALESCE(excluded.wake_at, steps.wake_at),
    token_id = COALESCE(steps.token_id, excluded.token_id),
    status = excluded.status,
    attempts = CASE WHEN excluded.attempts > steps.attempts
                    THEN excluded.attempts ELSE steps.attempts END,
    retry_base = excluded.retry_base,
    output = excluded.output,
    error = COALESCE(excluded.error, steps.error),
    started_at = COALESCE(steps.started_at, excluded.started_at),
    finished_at = excluded.finished_at
WHERE steps.status <> 'COMPLETED'
"""

TRANSITION_RUN = """
UPDATE runs SET
    status = :status,
    output = COALESCE(:output, output),
    error = CASE WHEN :status = 'COMPLETED' THEN NULL ELSE COALESCE(:error, error) END,
    state = COALESCE(:state, state),
    run_at = COALESCE(:run_at, run_at),
    attempt = attempt - :refund,
    lease_owner = NULL,
    lease_expires_at = NULL,
    waiting_on = :waiting_on,
    finished_at = :finished_at,
    updated_at = :now
WHERE id = :run_id AND lease_id = :lease_id AND status = :expect_status
  AND (CAST(:env AS TEXT) IS NULL OR env = :env)
  AND (CAST(:owner AS TEXT) IS NULL OR lease_owner = :owner)
  AND (CAST(:expired_before AS DOUBLE PRECISION) IS NULL OR lease_expires_at < :expired_before)
"""

EXPIRE_RUNS = """
UPDATE runs SET status = 'EXPIRED', finished_at = :now, updated_at = :now
WHERE id IN (
    SELECT id FROM runs
    WHERE status = 'QUEUED' AND expire_at <= :now AND started_at IS NULL
    LIMIT :limit
    {skip_locked}
)
RETURNING id, attempt
"""

TIME_OUT_RUNS = """
UPDATE runs SET status = 'TIMED_OUT', finished_at = :now, updated_at = :now,
                lease_expires_at = NULL, error = :error
WHERE id IN (
    SELECT id FROM runs
    WHERE status IN ('RUNNING', 'WAITING') AND deadline_at <= :now
    LIMIT :limit
    {skip_locked}
)
RETURNING id, lease_id, lease_owner, attempt
"""

FENCE_PARENT = """
UPDATE runs SET updated_at = :now
WHERE id = :run_id AND lease_id = :lease_id AND status = 'RUNNING'
"""

SELECT_CHILDREN = """
SELECT id, status, output, error FROM runs
WHERE parent_run_id = :run_id AND parent_step_key = :key
ORDER BY child_index
"""

CANCEL_CHILDREN = """
UPDATE runs SET status = 'CANCELED', finished_at = :now, lease_expires_at = NULL,
                updated_at = :now
WHERE parent_run_id = :parent AND status IN ('QUEUED', 'RUNNING', 'WAITING')
RETURNING *
"""

CANCEL_RUN = """
UPDATE runs SET status = 'CANCELED', finished_at = :now, lease_expires_at = NULL,
                updated_at = :now
WHERE env = :env AND id = :id AND status IN ('QUEUED', 'RUNNING', 'WAITING')
RETURNING *
"""

INSERT_EVENT = """
INSERT INTO run_events (run_id, at, type, attempt, lease_id, step_key, data)
VALUES (:run_id, :at, :type, :attempt, :lease_id, :step_key, :data)
"""

SELECT_EVENTS = "SELECT * FROM run_events WHERE run_id = :run_id ORDER BY id"

SELECT_EVENTS_PAGE = """
SELECT * FROM run_events WHERE run_id = :run_id AND id > :after ORDER BY id LIMIT :limit
"""

# A person gives a final run that did not complete a new attempt.
REPLAY_RUN = """
UPDATE runs SET status = 'QUEUED', run_at = :now, finished_at = NULL, retry = :retry,
                discarded_at = NULL,
                lease_owner = NULL, lease_expires_at = NULL, waiting_on = NULL,
                deadline_at = NULL, expire_at = NULL, updated_at = :now
WHERE env = :env AND id = :id AND status IN ('FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')
RETURNING *
"""

LIST_RUNS = """
SELECT * FROM runs
WHERE env = :env {filters}
ORDER BY created_at DESC, id DESC
LIMIT :limit
"""

# The same without the documents (payload, output, state), for summaries: a
# page of runs with large outputs is not read from disk at all. Lists every
# column run_from_row reads.
LIST_RUN_SUMMARIES = """
SELECT id, env, task_id, status, attempt, '' AS payload, NULL AS output, error, queue,
       priority, retry, run_at, idempotency_key, concurrency_key, tags, metadata,
       parent_run_id, NULL AS state, lease_id, lease_owner, lease_expires_at, created_at,
       started_at, finished_at, replay_of, discarded_at
FROM runs
WHERE env = :env {filters}
ORDER BY created_at DESC, id DESC
LIMIT :limit
"""

LIST_FILTER_STATUS = "AND status IN {statuses}"
LIST_FILTER_TASK = "AND task_id = :task_id"
LIST_FILTER_PARENT = "AND parent_run_id = :parent_run_id"
LIST_FILTER_ERROR_SQLITE = "AND json_extract(error, '$.type') = :error_type"
LIST_FILTER_ERROR_POSTGRES = "AND CAST(error AS jsonb) ->> 'type' = :error_type"
LIST_FILTER_AFTER = "AND created_at >= :created_after"
LIST_FILTER_BEFORE = "AND created_at < :created_before"
LIST_FILTER_NOT_DISCARDED = "AND discarded_at IS NULL"

DISCARD_RUN = """
UPDATE runs SET discarded_at = :now, updated_at = :now
WHERE env = :env AND id = :id
  AND status IN ('COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')
RETURNING *
"""

# Retention: finished runs go in small batches (steps and history cascade).
DELETE_FINISHED = """
DELETE FROM runs WHERE id IN (
    SELECT id FROM runs
    WHERE finished_at < :cutoff
      AND status IN ('COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')
      -- a child stays while its parent may still collect its result
      AND NOT EXISTS (SELECT 1 FROM runs AS parent
                      WHERE parent.id = runs.parent_run_id
                        AND parent.status IN ('QUEUED', 'RUNNING', 'WAITING'))
    ORDER BY finished_at
    LIMIT :limit
)
-- Checked again on the row being deleted: a replay that re-queued the run
-- after the subquery read it must win (READ COMMITTED re-evaluates these).
  AND finished_at < :cutoff
  AND status IN ('COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')
"""
LIST_FILTER_TAG_SQLITE = "AND EXISTS (SELECT 1 FROM json_each(runs.tags) WHERE value = :tag)"
LIST_FILTER_TAG_POSTGRES = "AND CAST(runs.tags AS jsonb) ? :tag"
LIST_FILTER_CURSOR = "AND (created_at < :c_at OR (created_at = :c_at AND id < :c_id))"


# --- transaction functions ----------------------------------------------------


def event_params(event: model.Event) -> dict[str, Any]:
    return {
        "run_id": event.run_id,
        "at": event.at,
        "type": event.type.value,
        "attempt": event.attempt,
        "lease_id": event.lease_id,
        "step_key": event.step_key,
        "data": event.data,
    }


def insert_events_txn(conn: Connection, d: Dialect, events: Iterable[model.Event]) -> None:
    params = [event_params(e) for e in events]
    if params:
        conn.cursor().executemany(d.sql(INSERT_EVENT), params)


def _new_run_params(new: model.NewRun, now: float) -> dict[str, Any]:
    return {
        "id": new.id,
        "env": new.env,
        "task_id": new.task_id,
        "payload": new.payload,
        "queue": new.queue,
        "priority": new.priority,
        "retry": retry_to_json(new.retry),
        "run_at": new.run_at,
        "idempotency_key": new.idempotency_key,
        "idempotency_expires_at": new.idempotency_expires_at,
        "concurrency_key": new.concurrency_key,
        "tags": json.dumps(list(new.tags)),
        "metadata": json.dumps(dict(new.metadata)),
        "parent_run_id": new.parent_run_id,
        "parent_step_key": new.parent_step_key,
        "child_index": new.child_index,
        "replay_of": new.replay_of,
        "ttl": new.ttl,
        "max_duration": new.max_duration,
        "expire_at": None if new.ttl is None else new.run_at + new.ttl,
        "now": now,
    }


def _created_run(new: model.NewRun, now: float) -> model.Run:
    """The row INSERT_RUN writes, without reading it back."""
    return model.Run(
        id=new.id, env=new.env, task_id=new.task_id, status=model.RunStatus.QUEUED, attempt=0,
        payload=new.payload, output=None, error=None, queue=new.queue, priority=new.priority,
        retry=new.retry, run_at=new.run_at, idempotency_key=new.idempotency_key,
        concurrency_key=new.concurrency_key, tags=tuple(new.tags),
        metadata=dict(new.metadata), parent_run_id=new.parent_run_id, state=None,
        lease_id=None, lease_owner=None, lease_expires_at=None, created_at=now,
        started_at=None, finished_at=None, replay_of=new.replay_of)


def create_runs_txn(
    conn: Connection, d: Dialect, runs: Sequence[model.NewRun], now: float
) -> list[tuple[model.Run, bool]]:
    results: list[tuple[model.Run, bool]] = []
    plain: list[dict[str, Any]] = []  # no idempotency key: cannot conflict
    insert_sql = d.sql(INSERT_RUN)
    for new in runs:
        if new.idempotency_key is None:
            plain.append(_new_run_params(new, now))
            results.append((_created_run(new, now), True))
            continue
        key = {"env": new.env, "task_id": new.task_id, "key": new.idempotency_key}
        row = conn.execute(d.sql(SELECT_RUN_BY_IDEMPOTENCY_KEY), key).fetchone()
        if row is not None:
            expires = row["idempotency_expires_at"]
            if expires is None or expires > now:
                results.append((run_from_row(row), False))
                continue
            conn.execute(d.sql(FORGET_IDEMPOTENCY_KEY),
                         {"id": row["id"], "key": new.idempotency_key})
        row = conn.execute(insert_sql, _new_run_params(new, now)).fetchone()
        if row is None:
            # A concurrent trigger with the same idempotency key won the race
            # (the insert waited for it to commit, so this statement sees it).
            row = conn.execute(d.sql(SELECT_RUN_BY_IDEMPOTENCY_KEY), key).fetchone()
            if row is None:
                raise TransientConflict("an idempotency key changed hands meanwhile")
            results.append((run_from_row(row), False))
            continue
        results.append((run_from_row(row), True))
    if plain:
        conn.cursor().executemany(d.sql(INSERT_RUN_PLAIN), plain)
    insert_events_txn(conn, d, (
        model.Event(run_id=run.id, type=model.EventType.TRIGGERED, at=now)
        for run, created in results if created))
    return results


def lease_ready_txn(
    conn: Connection,
    d: Dialect,
    *,
    env: str,
    task_ids: Sequence[str],
    limit: int,
    owner: str,
    nonce: str,
    now: float,
    expires_at: float,
) -> list[model.LeasedRun]:
    if d.name == "postgres":
        sql = d.sql(LEASE_READY_POSTGRES)
    else:
        sql = d.sql(LEASE_READY_SQLITE, task_ids=d.in_list.format(param=":task_ids"))
    rows = conn.execute(
        sql,
        {
            "env": env,
            "task_ids": d.in_param(task_ids),
            "limit": limit,
            "owner": owner,
            "nonce": nonce,
            "now": now,
            "expires_at": expires_at,
        },
    ).fetchall()
    if not rows:
        return []
    runs = sorted((run_from_row(r) for r in rows), key=lambda r: (-r.priority, r.run_at, r.id))
    steps: dict[str, list[model.Step]] = {r.id: [] for r in runs}
    step_rows = conn.execute(
        d.sql(SELECT_STEPS_OF, ids=d.in_list.format(param=":ids")),
        {"ids": d.in_param(list(steps))},
    ).fetchall()
    for row in step_rows:
        steps[row["run_id"]].append(step_from_row(row))
    insert_events_txn(
        conn,
        d,
        (
            model.Event(run_id=r.id, type=model.EventType.LEASED, at=now, attempt=r.attempt,
                        lease_id=r.lease_id, data=json.dumps({"owner": owner}))
            for r in runs
        ),
    )
    return [model.LeasedRun(run=r, steps=tuple(steps[r.id])) for r in runs]


def lease_ref_from_row(row: Row) -> model.LeaseRef:
    return model.LeaseRef(
        run_id=row["id"],
        lease_id=row["lease_id"],
        attempt=row["attempt"],
        retry=retry_from_json(row["retry"]),
        lease_owner=row["lease_owner"],
    )


def _step_params(w: model.StepWrite, now: float) -> dict[str, Any]:
    return {
        "run_id": w.run_id,
        "key": w.key,
        "kind": w.kind.value,
        "status": w.status.value,
        "attempts": w.attempt,
        "retry_base": w.retry_base,
        "output": w.output,
        "error": error_to_json(w.error),
        "now": now,
        "started_at": w.started_at,
        "finished_at": w.finished_at,
        "wake_at": w.wake_at,
        "token_id": w.token_id,
    }


def _fence_params(w: model.StepWrite, now: float) -> dict[str, Any]:
    return {"state": w.state, "now": now, "run_id": w.run_id, "lease_id": w.lease_id,
            "env": w.env, "owner": w.owner}


def _transition_params(w: model.RunTransition, now: float) -> dict[str, Any]:
    return {
        "status": w.status.value,
        "output": w.output,
        "error": error_to_json(w.error),
        "state": w.state,
        "run_at": w.run_at,
        "refund": 1 if w.refund_attempt else 0,
        "finished_at": now if w.status.is_final else None,
        "now": now,
        "run_id": w.run_id,
        "lease_id": w.lease_id,
        "owner": w.expect_owner,
        "env": w.env,
        "expect_status": w.expect_status.value,
        "expired_before": w.expired_before,
        "waiting_on": json.dumps(list(w.waiting_on)) if w.waiting_on else None,
    }


def apply_writes_txn(
    conn: Connection, d: Dialect, writes: Sequence[model.FencedWrite], now: float
) -> list[bool]:
    """Apply fenced writes in order; True for each one whose lease was current."""
    if d.name == "postgres" and _batchable(writes):
        return _apply_batched_txn(conn, d, writes, now)
    applied: list[bool] = []
    fence_sql = d.sql(FENCE_RUN_STATE)
    step_sql = d.sql(UPSERT_STEP)
    transition_sql = d.sql(TRANSITION_RUN)
    for w in writes:
        if isinstance(w, model.StepWrite):
            cur = conn.execute(fence_sql, _fence_params(w, now))
            if cur.rowcount == 1:
                conn.execute(step_sql, _step_params(w, now))
        else:
            cur = conn.execute(transition_sql, _transition_params(w, now))
        applied.append(cur.rowcount == 1)
        if cur.rowcount == 1:
            # Events first: a wake-up right after the suspension is recorded
            # after the suspension in the history.
            insert_events_txn(conn, d, w.events)
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
    every run's step writes name one lease, and a run with a transition has no
    other write in the batch (a worker awaits each acknowledgement, so this is
    the normal case)."""
    step_lease: dict[str, str] = {}
    transitions: set[str] = set()
    for w in writes:
        if isinstance(w, model.StepWrite):
            if step_lease.setdefault(w.run_id, w.lease_id) != w.lease_id:
                return False
        elif (w.run_id in transitions or w.expired_before
              or w.status is model.RunStatus.WAITING
              or w.expect_status is not model.RunStatus.RUNNING):
            return False  # extra fences or a wake check: apply one by one
        else:
            transitions.add(w.run_id)
    return not (transitions & step_lease.keys())


FENCE_RUN_STATE_BATCH = """
UPDATE runs AS r SET state = COALESCE(v.state, r.state), updated_at = :now
FROM unnest(CAST(:ids AS text[]), CAST(:leases AS text[]), CAST(:states AS text[]),
            CAST(:envs AS text[]), CAST(:owners AS text[]))
     AS v(id, lease_id, state, env, owner)
WHERE r.id = v.id AND r.lease_id = v.lease_id AND r.status = 'RUNNING'
  AND (v.env IS NULL OR r.env = v.env) AND (v.owner IS NULL OR r.lease_owner = v.owner)
RETURNING r.id
"""

TRANSITION_RUN_BATCH = """
UPDATE runs AS r SET
    status = v.status,
    output = COALESCE(v.output, r.output),
    error = CASE WHEN v.status = 'COMPLETED' THEN NULL ELSE COALESCE(v.error, r.error) END,
    state = COALESCE(v.state, r.state),
    run_at = COALESCE(v.run_at, r.run_at),
    attempt = r.attempt - v.refund,
    lease_owner = NULL,
    lease_expires_at = NULL,
    waiting_on = NULL,
    finished_at = v.finished_at,
    updated_at = :now
FROM unnest(CAST(:ids AS text[]), CAST(:leases AS text[]), CAST(:statuses AS text[]),
            CAST(:outputs AS text[]), CAST(:errors AS text[]), CAST(:states AS text[]),
            CAST(:run_ats AS float8[]), CAST(:refunds AS int[]),
            CAST(:finished AS float8[]), CAST(:envs AS text[]), CAST(:owners AS text[]))
     AS v(id, lease_id, status, output, error, state, run_at, refund, finished_at, env, owner)
WHERE r.id = v.id AND r.lease_id = v.lease_id AND r.status = 'RUNNING'
  AND (v.env IS NULL OR r.env = v.env) AND (v.owner IS NULL OR r.lease_owner = v.owner)
RETURNING r.id
"""


def _apply_batched_txn(
    conn: Connection, d: Dialect, writes: Sequence[model.FencedWrite], now: float
) -> list[bool]:
    """Group commit in a constant number of statements, whatever the batch size."""
    steps = [w for w in writes if isinstance(w, model.StepWrite)]
    transitions = [w for w in writes if isinstance(w, model.RunTransition)]
    ok: set[str] = set()
    if steps:
        last_state: dict[str, tuple[str, str | None]] = {}
        fences: dict[str, model.StepWrite] = {}
        for w in steps:
            previous = last_state.get(w.run_id, (w.lease_id, None))[1]
            last_state[w.run_id] = (w.lease_id, w.state if w.state is not None else previous)
            fences.setdefault(w.run_id, w)
        rows = conn.execute(d.sql(FENCE_RUN_STATE_BATCH), {
            "now": now,
            "ids": list(last_state),
            "leases": [lease for lease, _ in last_state.values()],
            "states": [state for _, state in last_state.values()],
            "envs": [fences[run_id].env for run_id in last_state],
            "owners": [fences[run_id].owner for run_id in last_state],
        }).fetchall()
        ok.update(r["id"] for r in rows)
        todo = [_step_params(w, now) for w in steps if w.run_id in ok]
        if todo:
            conn.cursor().executemany(d.sql(UPSERT_STEP), todo)
    if transitions:
        params = [_transition_params(w, now) for w in transitions]
        rows = conn.execute(d.sql(TRANSITION_RUN_BATCH), {
            "now": now,
            "ids": [p["run_id"] for p in params],
            "leases": [p["lease_id"] for p in params],
            "statuses": [p["status"] for p in params],
            "outputs": [p["output"] for p in params],
            "errors": [p["error"] for p in params],
            "states": [p["state"] for p in params],
            "run_ats": [p["run_at"] for p in params],
            "refunds": [p["refund"] for p in params],
            "finished": [p["finished_at"] for p in params],
            "envs": [p["env"] for p in params],
            "owners": [p["owner"] for p in params],
        }).fetchall()
        ok.update(r["id"] for r in rows)
    applied = [w.run_id in ok for w in writes]
    events = [e for w, good in zip(writes, applied, strict=True) if good for e in w.events]
    if events:
        conn.cursor().executemany(d.sql(INSERT_EVENT), [event_params(e) for e in events])
    return applied


def create_children_txn(
    conn: Connection, d: Dialect, *, parent: str, lease_id: str, step_key: str,
    children: Sequence[model.NewRun], wait: bool, now: float,
) -> list[str] | None:
    """Create a step's child runs once; None if the parent's lease is not current."""
    if conn.execute(d.sql(FENCE_PARENT), {"run_id": parent, "lease_id": lease_id,
                                          "now": now}).rowcount != 1:
        return None
    existing = conn.execute(d.sql(SELECT_CHILDREN), {"run_id": parent, "key": step_key})
    ids = [r["id"] for r in existing.fetchall()]
    if ids:
        return ids  # a replay of the parent: the children exist already
    conn.cursor().executemany(d.sql(INSERT_RUN_PLAIN), [_new_run_params(c, now)
                                                       for c in children])
    ids = [c.id for c in children]
    conn.execute(d.sql(UPSERT_STEP), {
        "run_id": parent, "key": step_key, "kind": model.StepKind.CHILD.value,
        "status": (model.StepStatus.RUNNING if wait else model.StepStatus.COMPLETED).value,
        "attempts": 1, "retry_base": 0, "output": None if wait else json.dumps(ids),
        "error": None, "now": now, "started_at": now, "finished_at": None if wait else now,
        "wake_at": None, "token_id": None})
    insert_events_txn(conn, d, [
        *(model.Event(run_id=c.id, type=model.EventType.TRIGGERED, at=now,
                      data=json.dumps({"parent_run_id": parent, "step_key": step_key}))
          for c in children),
        model.Event(run_id=parent, type=model.EventType.CHILDREN_TRIGGERED, at=now,
                    lease_id=lease_id, step_key=step_key,
                    data=json.dumps({"children": len(ids), "wait": wait})),
    ])
    return ids


def list_runs_txn(
    conn: Connection,
    d: Dialect,
    flt: model.RunFilter,
    limit: int,
    cursor: tuple[float, str] | None,
) -> list[model.Run]:
    filters: list[str] = []
    params: dict[str, Any] = {"env": flt.env, "limit": limit}
    if flt.statuses:
        filters.append(LIST_FILTER_STATUS.format(statuses=d.in_list.format(param=":statuses")))
        params["statuses"] = d.in_param([s.value for s in flt.statuses])
    if flt.task_id:
        filters.append(LIST_FILTER_TASK)
        params["task_id"] = flt.task_id
    if flt.parent_run_id:
        filters.append(LIST_FILTER_PARENT)
        params["parent_run_id"] = flt.parent_run_id
    if flt.error_type:
        filters.append(LIST_FILTER_ERROR_POSTGRES if d.name == "postgres"
                       else LIST_FILTER_ERROR_SQLITE)
        params["error_type"] = flt.error_type
    if flt.created_after is not None:
        filters.append(LIST_FILTER_AFTER)
        params["created_after"] = flt.created_after
    if flt.created_before is not None:
        filters.append(LIST_FILTER_BEFORE)
        params["created_before"] = flt.created_before
    if not flt.include_discarded:
        filters.append(LIST_FILTER_NOT_DISCARDED)
    if flt.tag:
        filters.append(LIST_FILTER_TAG_POSTGRES if d.name == "postgres"
                       else LIST_FILTER_TAG_SQLITE)
        params["tag"] = flt.tag
    if cursor is not None:
        filters.append(LIST_FILTER_CURSOR)
        params["c_at"], params["c_id"] = cursor
    sql = d.sql(LIST_RUN_SUMMARIES if flt.summary else LIST_RUNS, filters=" ".join(filters))
    return [run_from_row(r) for r in conn.execute(sql, params).fetchall()]

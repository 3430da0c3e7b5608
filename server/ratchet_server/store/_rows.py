"""How domain objects become rows and parameters, and rows become objects again.

No SQL runs here except the history insert every transition shares.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from ratchet_server import model
from ratchet_server.store import _dialect

RETRY_FIELDS = ("max_attempts", "factor", "min_delay", "max_delay", "jitter", "max_lease_losses",
                "rerun_failed_steps")


def retry_to_json(retry: model.Retry) -> str:
    return json.dumps({f: getattr(retry, f) for f in RETRY_FIELDS}, separators=(",", ":"))


def retry_from_json(text: str) -> model.Retry:
    return model.Retry(**json.loads(text))


def error_to_json(error: model.ErrorInfo | None) -> str | None:
    if error is None:
        return None
    return json.dumps(dataclasses.asdict(error), separators=(",", ":"))


def error_from_json(text: str | None) -> model.ErrorInfo | None:
    if not text:
        return None
    return model.ErrorInfo(**json.loads(text))


def run_from_row(row: _dialect.Row) -> model.Run:
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
        lease_losses=row["lease_losses"],
        final_error=error_from_json(row["final_error"]),
    )


def step_from_row(row: _dialect.Row) -> model.Step:
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
        state=row["state"],
    )


def task_from_row(row: _dialect.Row) -> model.TaskDef:
    return model.TaskDef(
        env=row["env"],
        id=row["id"],
        version=row["version"],
        queue=row["queue"],
        retry=retry_from_json(row["retry"]),
        payload_schema=row["payload_schema"],
        output_schema=row["output_schema"],
        max_duration=row["max_duration"],
        handles_final_error=bool(row["handles_final_error"]),
    )


# --- queries ------------------------------------------------------------------


def lease_ref_from_row(row: _dialect.Row) -> model.LeaseRef:
    return model.LeaseRef(
        run_id=row["id"],
        lease_id=row["lease_id"],
        attempt=row["attempt"],
        retry=retry_from_json(row["retry"]),
        lease_owner=row["lease_owner"],
        lease_losses=row["lease_losses"],
        final_error=error_from_json(row["final_error"]),
        handles_final_error=bool(row["handles_final_error"]),
    )


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


def new_run_params(new: model.NewRun, now: float) -> dict[str, Any]:
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
        "expire_at": new.expire_at,
        "now": now,
    }


def created_run(new: model.NewRun, now: float) -> model.Run:
    """The row "insert_run" writes, without reading it back."""
    return model.Run(
        id=new.id, env=new.env, task_id=new.task_id, status=model.RunStatus.QUEUED, attempt=0,
        payload=new.payload, output=None, error=None, queue=new.queue, priority=new.priority,
        retry=new.retry, run_at=new.run_at, idempotency_key=new.idempotency_key,
        concurrency_key=new.concurrency_key, tags=tuple(new.tags),
        metadata=dict(new.metadata), parent_run_id=new.parent_run_id, state=None,
        lease_id=None, lease_owner=None, lease_expires_at=None, created_at=now,
        started_at=None, finished_at=None, replay_of=new.replay_of)


def step_params(w: model.StepWrite, now: float) -> dict[str, Any]:
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
        # Kept per step only from a COMPLETED checkpoint: a replay restores it
        # as it passes the step (issue 10, "state that replays cleanly").
        "state": w.state if w.status is model.StepStatus.COMPLETED else None,
    }


def fence_params(w: model.StepWrite, now: float) -> dict[str, Any]:
    return {"state": w.state, "now": now, "run_id": w.run_id, "lease_id": w.lease_id,
            "env": w.env, "owner": w.owner}


def transition_params(w: model.RunTransition, now: float) -> dict[str, Any]:
    return {
        "status": w.status.value,
        "output": w.output,
        "error": error_to_json(w.error),
        "state": w.state,
        "run_at": w.run_at,
        # A late report taking back a lease loss charges its attempt again.
        "refund": (1 if w.refund_attempt else 0) - (1 if w.undo_lease_loss else 0),
        "losses": (1 if w.count_lease_loss else 0) - (1 if w.undo_lease_loss else 0),
        "final_error": error_to_json(w.final_error),
        "clear_final_error": 1 if w.clear_final_error else 0,
        "finishing": None if w.finishing is None else int(w.finishing),
        "clear_error": 1 if w.clear_error else 0,
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


def insert_events_txn(conn: _dialect.Connection, d: _dialect.Dialect,
                      events: Iterable[model.Event]) -> None:
    params = [event_params(e) for e in events]
    if params:
        conn.cursor().executemany(d.sql("insert_event"), params)

"""How runs and their history read in a terminal."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from typing import Any

from ratchet._types import Run, RunEvent, RunStatus

# The coordinator's error type for an attempt whose lease was lost.
LEASE_LOST = "LeaseLost"
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (.+)$')


def render_history(events: Sequence[RunEvent]) -> str:
    """A run's history as a timeline: offset, event, attempt, lease, step, details."""
    if not events:
        return "(no history)"
    start = events[0].at
    lines = []
    for e in events:
        offset = "" if e.at is None or start is None else \
            f"+{(e.at - start).total_seconds() * 1000:9.0f}ms"
        detail = ", ".join(f"{k}={v}" for k, v in e.data.items()) if e.data else ""
        lease = lease_label(e.lease_id)
        lines.append(f"{offset:>13}  {e.type:<18} attempt {e.attempt:<3} lease {lease:<12} "
                     f"{e.step_key or '':<14} {detail}".rstrip())
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.1f}s"


def lease_label(lease_id: str) -> str:
    """What tells one lease from another: a lease id is `<nonce>.<run id>`, so
    its end is the same for every lease of a run; the nonce is what differs."""
    if not lease_id:
        return "-"
    nonce = lease_id.split(".", 1)[0]
    return nonce[-12:]


def shown_attempt(run: Run) -> int:
    """The number of the run's last attempt. `Run.attempt` counts attempts
    against the retry budget, and a suspension (or a released or lost lease)
    gives the attempt back until the next lease: a WAITING run, or one queued
    again after its first attempt was given back, ran one attempt more than it
    reads. A final run reads its last attempt (the coordinator restores a
    given-back attempt on cancel and time-out; the attempt-0 case also covers
    runs ended by older coordinators). A run queued again after a later
    attempt was given back (woken, or its lease lost) cannot be told from one
    queued for a retry, and shows one less."""
    if run.status is RunStatus.WAITING or (run.attempt == 0 and run.started_at is not None):
        return run.attempt + 1
    return run.attempt


def _when(at: dt.datetime) -> str:
    return f"{at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def _in(at: dt.datetime, now: dt.datetime) -> str:
    left = (at - now).total_seconds()
    if left <= 0:
        return "due now"
    minutes, seconds = divmod(int(left), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"))
             if n][:2]
    return "in " + (" ".join(parts) if parts else f"{seconds}s")


def complete_command(token_id: str) -> str:
    """The command that completes a token (the data is the task's to define)."""
    return f"ratchet tokens complete {token_id} --data '<JSON>'"


def pending_waits(run: Run, children: Sequence[Run] = ()) -> list[dict[str, Any]]:
    """What an unfinished run waits for: its open token, sleep and child-run
    steps, and retries whose backoff has not passed (JSON-ready)."""
    if run.status.is_final:
        return []
    waits: list[dict[str, Any]] = []
    for step in run.steps:
        if step.status != "RUNNING":
            continue
        wake = None if step.wake_at is None else step.wake_at.isoformat()
        if step.kind == "token" and step.token_id:
            waits.append({"kind": "token", "step_key": step.key, "token_id": step.token_id,
                          "times_out_at": wake,
                          "complete_with": complete_command(step.token_id)})
        elif step.kind == "sleep":
            waits.append({"kind": "sleep", "step_key": step.key, "wake_at": wake})
        elif step.kind == "child":
            # Runs do not say which of their parent's steps made them: every
            # unfinished child is listed.
            waits.append({"kind": "child", "step_key": step.key,
                          "children": [c.id for c in children if not c.status.is_final]})
        elif step.kind == "run" and step.wake_at is not None:
            waits.append({"kind": "retry", "step_key": step.key, "wake_at": wake})
    return waits


def run_json(run: Run, children: Sequence[Run] = (), cancel_reason: str = "") -> dict[str, Any]:
    """`ratchet runs show --json`: the run, what it waits for, its child runs."""
    data = run.to_dict()
    data["last_attempt"] = shown_attempt(run)
    data["cancel_reason"] = cancel_reason or None
    data["waits"] = pending_waits(run, children)
    data["children"] = [{"id": c.id, "task": c.task_id, "status": c.status.value}
                        for c in children]
    return data


def render_run(run: Run, children: Sequence[Run] = (), cancel_reason: str = "",
               now: dt.datetime | None = None) -> str:
    """A readable tree of a run and its steps, then what it waits for, its
    child runs, and why it ended."""
    now = now or dt.datetime.now(dt.UTC)
    total = None
    if run.started_at and run.finished_at:
        total = (run.finished_at - run.started_at).total_seconds()
    lost = f"lost leases {run.lease_losses}  " if run.lease_losses else ""
    attempt = shown_attempt(run)
    tried = f"attempt {attempt}" if attempt else "not started"
    lines = [f"{run.id}  {run.task_id}  {run.status.value}  {tried}  {lost}{_ms(total)}"]
    err = run.error
    failed_key = err.step_key if err is not None else ""
    for i, step in enumerate(run.steps):
        branch = "└─" if i == len(run.steps) - 1 else "├─"
        tries = f"{step.attempts} attempt" + ("s" if step.attempts != 1 else "")
        mark = "✗" if step.status == "FAILED" or step.key == failed_key else " "
        # A step left open when the run ended (canceled, timed out) did not
        # finish: it is not running.
        status = "INTERRUPTED" if run.status.is_final and step.status == "RUNNING" \
            else step.status
        line = (f"{branch}{mark}{step.key:<20} {status:<11} {tries:<11} "
                f"{_ms(step.duration)}")
        if status == "INTERRUPTED":
            line += f"  (open when the run was {run.status.value})"
        elif step.status == "RUNNING" and step.kind == "token" and step.token_id:
            line += f"  waiting on token {step.token_id}"
            if step.wake_at is not None:
                line += f" (times out {_when(step.wake_at)})"
        elif step.status == "RUNNING" and step.kind == "sleep" and step.wake_at is not None:
            line += f"  sleeping until {_when(step.wake_at)}"
        elif step.status == "RUNNING" and step.kind == "child":
            line += "  waiting on child runs"
        if step.error is not None:
            label = "last error" if step.status == "COMPLETED" else "error"
            line += f"  {label}: {step.error.type}: {step.error.message}"
        lines.append(line)
    waits = pending_waits(run, children)
    if waits:
        lines.append("waiting on:")
        for w in waits:
            if w["kind"] == "token":
                times_out = "" if w["times_out_at"] is None else \
                    f", times out {_when(dt.datetime.fromisoformat(w['times_out_at']))}"
                lines.append(f"  token {w['token_id']} (step {w['step_key']}{times_out})")
                lines.append(f"    complete it: {w['complete_with']}")
            elif w["kind"] in ("sleep", "retry"):
                what = "sleep" if w["kind"] == "sleep" else "retry of step"
                if w["wake_at"] is None:
                    lines.append(f"  {what} {w['step_key']}")
                else:
                    at = dt.datetime.fromisoformat(w["wake_at"])
                    lines.append(f"  {what} {w['step_key']} until {_when(at)} ({_in(at, now)})")
            else:
                lines.append(f"  child runs of step {w['step_key']} "
                             f"({len(w['children'])} of {len(children)} unfinished)")
    if children:
        lines.append("child runs:")
        lines += [f"  {c.id}  {c.task_id}  {c.status.value}" for c in children]
    if run.output is not None:
        lines.append(f"output: {json.dumps(run.output)}")
    if run.status is RunStatus.CANCELED:
        lines.append(f"canceled: {cancel_reason}" if cancel_reason
                     else "canceled (no reason given)")
    if err is not None and err.type == LEASE_LOST and not run.status.is_final:
        # Not an error of the run's code: the worker died or went silent, and
        # the run went on (or will) on another lease.
        state = "queued again" if run.status is RunStatus.QUEUED else "recovered"
        lines.append(f"lost a lease ({err.message}); {state}")
    elif err is not None:
        where = f" in step {err.step_key}" if err.step_key else ""
        lines.append(f"error{where}: {err.type}: {err.message}")
        if run.status is RunStatus.FAILED:
            origin = _origin(err.stack)
            if origin:
                lines.append(f"  at {origin}")
            if any(s.key.startswith("ratchet:undo:") for s in run.steps):
                lines.append(f"  (attempt {attempt}; compensated: its undo steps ran, so "
                             f"`ratchet runs replay` needs --rerun-compensated; "
                             f"`ratchet runs history {run.id}` shows every try)")
            else:
                lines.append(f"  (attempt {attempt}; `ratchet runs history {run.id}` "
                             f"shows every try, `ratchet runs replay {run.id}` tries again)")
    return "\n".join(lines)


def _origin(stack: str) -> str:
    """Where the error was raised: the innermost frame of its stack, as
    `file:line in function` (the error itself is printed already)."""
    for line in reversed(stack.splitlines()):
        found = _FRAME.match(line)
        if found:
            return f"{found.group(1)}:{found.group(2)} in {found.group(3)}"
    return ""

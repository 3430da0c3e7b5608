"""How runs and their history read in a terminal."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ratchet._types import Run, RunEvent, RunStatus


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
        lease = e.lease_id[-12:] if e.lease_id else "-"
        lines.append(f"{offset:>13}  {e.type:<18} attempt {e.attempt:<3} lease {lease:<12} "
                     f"{e.step_key or '':<14} {detail}".rstrip())
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.1f}s"


def render_run(run: Run) -> str:
    """A readable tree of a run and its steps."""
    total = None
    if run.started_at and run.finished_at:
        total = (run.finished_at - run.started_at).total_seconds()
    lost = f"lost leases {run.lease_losses}  " if run.lease_losses else ""
    lines = [f"{run.id}  {run.task_id}  {run.status.value}  attempt {run.attempt}  "
             f"{lost}{_ms(total)}"]
    failed_key = run.error.step_key if run.error is not None else ""
    for i, step in enumerate(run.steps):
        branch = "└─" if i == len(run.steps) - 1 else "├─"
        tries = f"{step.attempts} attempt" + ("s" if step.attempts != 1 else "")
        mark = "✗" if step.status == "FAILED" or step.key == failed_key else " "
        line = (f"{branch}{mark}{step.key:<20} {step.status:<10} {tries:<11} "
                f"{_ms(step.duration)}")
        if step.token_id and step.status == "RUNNING":
            line += f"  waiting on token {step.token_id}"
            if step.wake_at is not None:
                line += f" (times out {step.wake_at:%Y-%m-%d %H:%M:%S})"
        if step.error is not None:
            label = "last error" if step.status == "COMPLETED" else "error"
            line += f"  {label}: {step.error.type}: {step.error.message}"
        lines.append(line)
    if run.output is not None:
        lines.append(f"output: {json.dumps(run.output)}")
    if run.error is not None:
        where = f" in step {run.error.step_key}" if run.error.step_key else ""
        lines.append(f"error{where}: {run.error.type}: {run.error.message}")
        if run.status is RunStatus.FAILED and run.error.stack:
            lines.append("  " + run.error.stack.rstrip().splitlines()[-1])
            if any(s.key.startswith("ratchet:undo:") for s in run.steps):
                lines.append(f"  (attempt {run.attempt}; compensated: its undo steps ran, so "
                             f"`ratchet runs replay` needs --rerun-compensated; "
                             f"`ratchet runs history {run.id}` shows every try)")
            else:
                lines.append(f"  (attempt {run.attempt}; `ratchet runs history {run.id}` "
                             f"shows every try, `ratchet runs replay {run.id}` tries again)")
    return "\n".join(lines)

"""How `ratchet runs show` and `ratchet runs history` read (issue 12, items 3, 7, 10)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from ratchet._cli._render import lease_label, render_history, render_run, run_json
from ratchet._types import Run, RunError, RunEvent, RunStatus, StepInfo

NOW = dt.datetime(2026, 12, 3, 17, 0, 0, tzinfo=dt.UTC)
RUN_ID = "run_0193a1b2c3d4e5f6a7b8c9d0e1f2"


def _run(status: RunStatus, attempt: int = 0, *, steps: tuple[StepInfo, ...] = (),
         error: RunError | None = None, started: bool = True) -> Run:
    return Run(id=RUN_ID, task_id="approval", status=status, attempt=attempt, payload={},
               output=None, error=error, idempotency_key="", tags=(), metadata={},
               created_at=NOW, started_at=NOW if started else None,
               finished_at=NOW if status.is_final else None, steps=steps)


def _step(key: str, kind: str, status: str = "RUNNING", **kw: object) -> StepInfo:
    fields: dict[str, object] = {"key": key, "kind": kind, "status": status, "attempts": 1,
                                 "output": None, "error": None, "started_at": NOW,
                                 "finished_at": None, **kw}
    return StepInfo(**fields)  # type: ignore[arg-type]


def test_history_tells_two_leases_of_a_run_apart() -> None:
    events = [RunEvent(id=n, at=NOW, type="leased", attempt=n, lease_id=f"{nonce}.{RUN_ID}",
                       step_key="", data={})
              for n, nonce in ((1, "9f3c2a"), (2, "41d7e0"))]
    lines = render_history(events).splitlines()
    assert "lease 9f3c2a" in lines[0] and "lease 41d7e0" in lines[1]
    assert lease_label(f"9f3c2a.{RUN_ID}") != lease_label(f"41d7e0.{RUN_ID}")
    assert lease_label("") == "-"


def test_a_waiting_run_names_its_token_and_how_to_complete_it() -> None:
    due = NOW + dt.timedelta(hours=1)
    run = _run(RunStatus.WAITING, steps=(
        _step("announce", "run", "COMPLETED", finished_at=NOW),
        _step("approve", "token", token_id="tok_abc123", wake_at=due)))
    text = render_run(run, now=NOW)
    # A suspension gave the attempt back (Run.attempt 0): the last attempt was 1.
    assert text.splitlines()[0].startswith(f"{RUN_ID}  approval  WAITING  attempt 1")
    assert "waiting on token tok_abc123 (times out 2026-12-03 18:00:00 UTC)" in text
    assert "  token tok_abc123 (step approve, times out 2026-12-03 18:00:00 UTC)" in text
    assert "complete it: ratchet tokens complete tok_abc123 --data '<JSON>'" in text

    data = json.loads(json.dumps(run_json(run)))
    assert data["last_attempt"] == 1 and data["attempt"] == 0
    assert data["waits"] == [{
        "kind": "token", "step_key": "approve", "token_id": "tok_abc123",
        "times_out_at": due.isoformat(),
        "complete_with": "ratchet tokens complete tok_abc123 --data '<JSON>'"}]
    assert data["steps"][1]["token_id"] == "tok_abc123"
    assert data["steps"][1]["wake_at"] == due.isoformat()


def test_a_sleep_shows_when_it_ends_and_children_their_states() -> None:
    due = NOW + dt.timedelta(hours=2, minutes=5)
    run = _run(RunStatus.WAITING, steps=(_step("nap", "sleep", wake_at=due),
                                         _step("kids", "child")))
    kids = [dataclasses.replace(_run(RunStatus.RUNNING, 1), id="run_kid1", task_id="square"),
            dataclasses.replace(_run(RunStatus.COMPLETED, 1), id="run_kid2", task_id="square")]
    text = render_run(run, kids, now=NOW)
    assert "  sleep nap until 2026-12-03 19:05:00 UTC (in 2h 5m)" in text
    assert "  child runs of step kids (1 of 2 unfinished)" in text
    assert "  run_kid1  square  RUNNING" in text and "  run_kid2  square  COMPLETED" in text
    data = run_json(run, kids)
    assert data["waits"] == [{"kind": "sleep", "step_key": "nap", "wake_at": due.isoformat()},
                             {"kind": "child", "step_key": "kids", "children": ["run_kid1"]}]
    assert data["children"] == [{"id": "run_kid1", "task": "square", "status": "RUNNING"},
                                {"id": "run_kid2", "task": "square", "status": "COMPLETED"}]


def test_a_canceled_run_says_why_and_lists_no_step_as_running() -> None:
    run = _run(RunStatus.CANCELED, 1, steps=(_step("approve", "token", token_id="tok_x"),))
    text = render_run(run, cancel_reason="customer withdrew", now=NOW)
    assert "CANCELED  attempt 1" in text.splitlines()[0]
    assert "RUNNING" not in text and "waiting on" not in text
    assert "INTERRUPTED" in text and "(open when the run was CANCELED)" in text
    assert "canceled: customer withdrew" in text
    assert "canceled (no reason given)" in render_run(run, now=NOW)
    assert run_json(run, (), "customer withdrew")["cancel_reason"] == "customer withdrew"
    assert run_json(run)["waits"] == []


def test_a_run_never_started_says_so() -> None:
    text = render_run(_run(RunStatus.CANCELED, 0, started=False), now=NOW)
    assert "CANCELED  not started" in text.splitlines()[0]


def test_a_recovered_run_does_not_show_its_lost_lease_as_an_error() -> None:
    lost = RunError(type="LeaseLost", message="the worker's session closed")
    running = dataclasses.replace(_run(RunStatus.RUNNING, 1, error=lost), lease_losses=1)
    text = render_run(running, now=NOW)
    assert "error" not in text
    assert "lost a lease (the worker's session closed); recovered" in text
    queued = dataclasses.replace(running, status=RunStatus.QUEUED, attempt=0)
    assert "; queued again" in render_run(queued, now=NOW)


def test_the_failed_step_hint_says_the_error_once_and_where() -> None:
    stack = ('Traceback (most recent call last):\n'
             '  File "/srv/app/tasks.py", line 12, in three\n'
             '    raise KeyError("k")\n'
             "KeyError: 'k'\n")
    error = RunError(type="KeyError", message="'k'", stack=stack, step_key="three")
    run = _run(RunStatus.FAILED, 2, error=error,
               steps=(_step("three", "run", "FAILED", error=error, finished_at=NOW),))
    lines = render_run(run, now=NOW).splitlines()
    assert "error in step three: KeyError: 'k'" in lines
    assert "  at /srv/app/tasks.py:12 in three" in lines
    # The hint under the error line does not repeat it.
    hint = lines[lines.index("error in step three: KeyError: 'k'") + 1:]
    assert not any("KeyError" in line for line in hint)
    assert hint[-1].startswith("  (attempt 2; ")

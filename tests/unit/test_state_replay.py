"""`ctx.state` on replay: it reads the state saved with each completed step's
checkpoint as the replay passes it, so append-style updates made before a
step are not applied twice after a crash (issue 10)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ratchet import Context
from ratchet.v1 import common_pb2, worker_pb2

pytestmark = pytest.mark.timeout(10)


class Journal:
    def __init__(self) -> None:
        self.checkpoints: list[worker_pb2.Checkpoint] = []

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None:
        self.checkpoints.append(checkpoint)

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]:
        raise AssertionError("no children here")


def resumed(steps: list[common_pb2.Step], stored: dict[str, Any], journal: Journal) -> Context:
    """A Context as the worker builds it for a new lease: the stored run state is
    what changes are compared with, and the code starts from {} at the top."""
    ctx = Context(run_id="run_1", task_id="t", attempt=2, lease_id="lease-2",
                  steps={s.key: s for s in steps}, state=stored, journal=journal)
    ctx.state = {}
    return ctx


def completed(key: str, output: Any, state: dict[str, Any] | None,
              kind: int = common_pb2.STEP_KIND_RUN) -> common_pb2.Step:
    return common_pb2.Step(
        key=key, kind=kind, status=common_pb2.STEP_STATUS_COMPLETED,  # type: ignore[arg-type]
        attempts=1, output=json.dumps(output).encode(),
        state=b"" if state is None else json.dumps(state, separators=(",", ":")).encode())


async def appending(ctx: Context, seen: list[Any]) -> list[str]:
    """Appends to ctx.state before each of five steps; records what each step sees."""
    for i in range(1, 6):
        ctx.state.setdefault("events", []).append(f"before {i}")
        seen.append(list(ctx.state["events"]))

        async def step(i: int = i) -> int:
            return i

        await ctx.step(f"step{i}", step)
    return list(ctx.state["events"])


def events(n: int) -> dict[str, Any]:
    return {"events": [f"before {i}" for i in range(1, n + 1)]}


async def test_a_replay_after_a_crash_in_step_four_ends_with_five_entries() -> None:
    # Steps 1-3 completed (each saved with the state it was checkpointed with);
    # the worker died in step 4, after a STARTED/failed write saved 4 entries.
    journal = Journal()
    ctx = resumed([completed(f"step{i}", i, events(i)) for i in range(1, 4)], events(4), journal)
    seen: list[Any] = []
    assert await appending(ctx, seen) == events(5)["events"]
    # The code before each step saw what the first execution saw.
    assert seen == [events(i)["events"] for i in range(1, 6)]
    # State sent with step 4's and step 5's COMPLETED checkpoints; step 4's
    # equals the stored document, so it is not sent again.
    sent = [(c.step_key, json.loads(c.state) if c.HasField("state") else None)
            for c in journal.checkpoints]
    assert sent == [("step4", None), ("step5", events(5))]


async def test_a_step_saved_without_state_leaves_it_as_the_replay_rebuilt_it() -> None:
    # Step 2 was checkpointed without state (unchanged since it was last sent),
    # as are sleeps, tokens and children the coordinator completes.
    journal = Journal()
    steps = [completed("step1", 1, events(1)), completed("step2", 2, None),
             completed("step3", 3, events(3))]
    ctx = resumed(steps, events(3), journal)
    seen: list[Any] = []
    assert await appending(ctx, seen) == events(5)["events"]
    assert seen == [events(i)["events"] for i in range(1, 6)]


async def test_saved_state_wins_over_what_the_replay_recomputes() -> None:
    # A value that differs on every execution (a time, a random id): the
    # replay shows the one saved with the step, not a second one.
    journal = Journal()
    ctx = resumed([completed("a", 1, {"token": "first"}),
                   completed("now", 1.5, {"token": "first", "at": 1.5},
                             kind=common_pb2.STEP_KIND_VALUE),
                   completed("pause", None, None, kind=common_pb2.STEP_KIND_SLEEP)],
                  {"token": "first", "at": 1.5}, journal)

    async def one() -> int:
        return 1

    ctx.state["token"] = "second"
    await ctx.step("a", one)
    assert ctx.state == {"token": "first"}
    await ctx.now()
    assert ctx.state == {"token": "first", "at": 1.5}
    ctx.state["slept"] = True
    await ctx.sleep("pause", 0.0)
    assert ctx.state == {"token": "first", "at": 1.5, "slept": True}
    assert journal.checkpoints == []


async def test_a_fresh_run_starts_from_an_empty_state() -> None:
    journal = Journal()
    ctx = resumed([], {}, journal)
    seen: list[Any] = []
    assert await appending(ctx, seen) == events(5)["events"]
    assert [json.loads(c.state) for c in journal.checkpoints] == [events(i) for i in range(1, 6)]

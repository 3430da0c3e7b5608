"""Tasks for tests/integration/test_state_replay.py (issue 10, "State that replays cleanly")."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pydantic

import ratchet


class Work(pydantic.BaseModel):
    dir: str
    hold: float = 30.0


def mark(directory: str, name: str) -> int:
    """Append this process's pid to directory/name; return how many lines it has now."""
    path = Path(directory) / name
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


@ratchet.task(id="state-appends", retry=ratchet.Retry(max_attempts=5, min_delay=0.05))
async def state_appends(ctx: ratchet.Context, payload: Work) -> dict[str, Any]:
    """Appends to ctx.state before each of 5 steps; step 4 blocks on its first
    execution so that a test can kill its worker there."""
    for i in range(1, 6):
        # The pid differs between executions: the entries show which one made them.
        ctx.state.setdefault("events", []).append(f"{i}:{os.getpid()}")

        def step(i: int = i) -> int:
            if i == 4 and mark(payload.dir, "step4") == 1:
                time.sleep(payload.hold)
            return i

        await ctx.step(f"step{i}", step)
    return {"events": ctx.state["events"], "pid": os.getpid()}

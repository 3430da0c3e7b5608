"""Tasks whose workers die under them (issue 10, part B: lost leases are
counted apart from attempts). Side effects are lines appended to files in the
directory the payload names, as in tasks.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import ratchet


def mark(directory: str, name: str, text: str | None = None) -> int:
    """Append a line (this process's pid unless `text`) to directory/name;
    return how many lines it has now."""
    path = Path(directory) / name
    with path.open("a") as f:
        f.write(f"{os.getpid() if text is None else text}\n")
    return len(path.read_text().splitlines())


@ratchet.task(id="crash-prone", retry=ratchet.Retry(max_attempts=2, min_delay=0.05))
async def crash_prone(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Step "hold" blocks on its first `kills` executions, so that a test can
    SIGKILL the worker there each time; then it returns."""
    await ctx.step("before", mark, payload["dir"], "before")

    def hold() -> int:
        n = mark(payload["dir"], "hold")
        if n <= payload["kills"]:
            time.sleep(60)
        return n

    tries = await ctx.step("hold", hold)
    return {"tries": tries, "pid": os.getpid()}


async def _kamikaze_failed(ctx: ratchet.Context, error: ratchet.RunError) -> None:
    mark(ctx.state["dir"], "on_failure", f"{error.type}: {error.message}")


@ratchet.task(id="kamikaze",
              retry=ratchet.Retry(max_attempts=2, min_delay=0.05, max_lease_losses=2),
              on_failure=_kamikaze_failed)
async def kamikaze(ctx: ratchet.Context, payload: dict[str, Any]) -> str:
    """Step "boom" kills its own worker process, every time."""
    ctx.state["dir"] = payload["dir"]
    await ctx.step("before", mark, payload["dir"], "before")

    def boom() -> None:
        mark(payload["dir"], "boom")
        os.kill(os.getpid(), signal.SIGKILL)

    await ctx.step("boom", boom)
    return "unreachable"

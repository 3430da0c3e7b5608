"""Tasks for test_process_steps.py: a step that holds the GIL in C code.

A regular expression that backtracks catastrophically runs inside the `re`
module's C engine, which never releases the GIL: every other thread of the
process, the worker's event loop and so its heartbeats included, stands
still until the match ends.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pydantic

import ratchet

_BACKTRACKS = re.compile(r"(a+)+$")


def _match_seconds(size: int) -> float:
    started = time.perf_counter()
    _BACKTRACKS.match("a" * size + "!")
    return time.perf_counter() - started


def hold_gil(directory: str, seconds: float) -> dict[str, int]:
    """Hold the GIL for about `seconds` (at least) in one C call; record the run."""
    path = Path(directory) / "hold"
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    # Each extra character doubles the work (the ways to split a run of a's):
    # measure one size, then extrapolate so that one single match (one GIL
    # hold) lasts about `seconds` on this machine.
    size = 16
    took = _match_seconds(size)
    while took < 0.05:
        size += 1
        took = _match_seconds(size)
    took = min(took, _match_seconds(size))  # a busy machine only ever slows a match
    size += max(0, math.ceil(math.log2(seconds / took)))
    started = time.monotonic()
    _BACKTRACKS.match("a" * size + "!")
    return {"pid": os.getpid(), "held_ms": int((time.monotonic() - started) * 1000)}


def hold_gil_once(directory: str, seconds: float) -> dict[str, int]:
    """hold_gil on the step's first execution only: a lost lease does not use
    up the run's attempt, so the step runs again, and then returns at once."""
    if (Path(directory) / "hold").exists():
        return {"pid": os.getpid(), "held_ms": 0}
    return hold_gil(directory, seconds)


class Hold(pydantic.BaseModel):
    dir: str
    seconds: float


@ratchet.task(id="gil-in-process", retry=ratchet.Retry(max_attempts=1))
async def gil_in_process(ctx: ratchet.Context, payload: Hold) -> dict[str, Any]:
    held = await ctx.step("hold", hold_gil, payload.dir, payload.seconds, executor="process")
    return {**held, "worker_pid": os.getpid()}


@ratchet.task(id="gil-in-thread", retry=ratchet.Retry(max_attempts=1))
async def gil_in_thread(ctx: ratchet.Context, payload: Hold) -> dict[str, Any]:
    held = await ctx.step("hold", hold_gil_once, payload.dir, payload.seconds)
    return {**held, "worker_pid": os.getpid()}

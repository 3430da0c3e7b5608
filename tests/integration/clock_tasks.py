"""Tasks for test_clocks.py, served by a worker whose wall clock is wrong.

RATCHET_TEST_CLOCK_SKEW (seconds, may be negative) shifts `time.time()` in
the worker process that imports this module, as on a machine whose clock
drifted: every time the SDK reads is off by that much. Only tests set it;
the SDK knows nothing of it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pydantic

import ratchet

_SKEW = float(os.environ.get("RATCHET_TEST_CLOCK_SKEW", "0") or 0)
if _SKEW:
    _real_time = time.time

    def _skewed_time() -> float:
        return _real_time() + _SKEW

    time.time = _skewed_time


def mark(directory: str, name: str) -> int:
    """Append a line to directory/name; return how many lines it has now."""
    path = Path(directory) / name
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


class Wait(pydantic.BaseModel):
    dir: str
    seconds: float


@ratchet.task(id="skewed-sleep")
async def skewed_sleep(ctx: ratchet.Context, payload: Wait) -> dict[str, Any]:
    """A durable sleep longer than the worker's sleep threshold (it suspends)."""
    await ctx.sleep("nap", payload.seconds)
    return {"woke": mark(payload.dir, "woke"), "worker_clock": time.time()}


@ratchet.task(id="skewed-backoff")
async def skewed_backoff(ctx: ratchet.Context, payload: Wait) -> int:
    """A step whose first attempt fails; its backoff suspends the run."""

    def flaky() -> int:
        n = mark(payload.dir, "flaky")
        if n == 1:
            raise ConnectionError("the first attempt fails")
        return n

    return await ctx.step("flaky", flaky, retry=ratchet.Retry(
        max_attempts=2, min_delay=payload.seconds, max_delay=payload.seconds))


async def _later(ctx: ratchet.Context, error: ratchet.RunError) -> ratchet.Decision:
    return ratchet.Decision.retry_at(float(ctx.state["seconds"]))


@ratchet.task(id="skewed-catch", retry=ratchet.Retry(max_attempts=2, min_delay=0.05),
              catch_error=_later)
async def skewed_catch(ctx: ratchet.Context, payload: Wait) -> int:
    """The first attempt fails; catch_error asks for the next one `seconds` later."""
    ctx.state["seconds"] = payload.seconds
    n = mark(payload.dir, "attempts")
    if n == 1:
        raise RuntimeError("the first attempt fails")
    return n


def write(directory: str, name: str, text: str) -> None:
    (Path(directory) / name).write_text(text)


@ratchet.task(id="skewed-gather")
async def skewed_gather(ctx: ratchet.Context, payload: Wait) -> int:
    """A long sleep beside a token: the token wakes the run while the sleep
    is still pending, and the resumed run must measure what is left of the
    sleep (the snapshot's wake_at, on the coordinator's clock) correctly."""
    import asyncio

    token = await ctx.create_token("go")
    await ctx.step("announce", write, payload.dir, "token", token)
    await asyncio.gather(ctx.sleep("nap", payload.seconds), ctx.wait_for_token(token))
    return mark(payload.dir, "woke")

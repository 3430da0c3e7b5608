"""Tasks for tests/integration/test_first_hour_worker.py: a step too large to
checkpoint, a step whose value JSON cannot carry (its calls counted in a
file), a child trigger with an option that is not supported yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ratchet


@ratchet.task(id="big-step", retry=ratchet.Retry(max_attempts=3, min_delay=0.05))
async def big_step(ctx: ratchet.Context, payload: Any) -> str:
    async def big() -> str:
        return "x" * (2 * 1024 * 1024)

    await ctx.step("big", big)
    return "unreachable"


class Unencodable:
    pass


@ratchet.task(id="unencodable-step", retry=ratchet.Retry(max_attempts=3, min_delay=0.05))
async def unencodable_step(ctx: ratchet.Context, payload: dict[str, str]) -> str:
    async def produce() -> Unencodable:
        with (Path(payload["dir"]) / "calls").open("a") as f:
            f.write("call\n")
        return Unencodable()

    await ctx.step("produce", produce)
    return "unreachable"


@ratchet.task(id="child-with-key", retry=ratchet.Retry(max_attempts=3, min_delay=0.05))
async def child_with_key(ctx: ratchet.Context, payload: Any) -> str:
    return await ctx.trigger("big-step", {}, concurrency_key="customer-1")

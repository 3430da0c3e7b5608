"""The benchmark's task: three trivial steps."""

from __future__ import annotations

from typing import Any

import ratchet


async def add(a: int, b: int) -> int:
    return a + b


@ratchet.task(id="bench-three-steps", retry=ratchet.Retry(max_attempts=1))
async def three_steps(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    x = await ctx.step("one", add, payload["n"], 1)
    y = await ctx.step("two", add, x, 1)
    return await ctx.step("three", add, y, 1)


@ratchet.task(id="bench-sequential", retry=ratchet.Retry(max_attempts=1))
async def sequential(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """`payload["steps"]` trivial steps one after another (per-step overhead)."""
    x = 0
    for i in range(payload["steps"]):
        x = await ctx.step(f"s{i}", add, x, 1)
    return x


@ratchet.task(id="bench-sleep-hour", retry=ratchet.Retry(max_attempts=1))
async def sleep_hour(ctx: ratchet.Context, payload: dict[str, Any]) -> None:
    """WAITING right away, for an hour (memory with many waiting runs)."""
    await ctx.sleep("nap", 3600)

"""Tasks for tests/integration/test_first_hour_runs.py: runs that wait on a
long sleep, and a parent that waits on such children."""

from __future__ import annotations

from typing import Any

import ratchet


@ratchet.task(id="napper")
async def napper(ctx: ratchet.Context, payload: dict[str, Any]) -> str:
    """A step, then a durable sleep of `seconds`."""
    await ctx.step("before", lambda: "awake")
    await ctx.sleep("nap", payload.get("seconds", 3600))
    return "rested"


@ratchet.task(id="nap-parent")
async def nap_parent(ctx: ratchet.Context, payload: dict[str, Any]) -> list[str]:
    """Waits on `count` napping children."""
    return await ctx.batch_trigger_and_wait("napper", [{"seconds": 3600}] * payload["count"],
                                            name="kids")

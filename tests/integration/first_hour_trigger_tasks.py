"""Tasks for tests/integration/test_first_hour_trigger.py (issue 12: payloads
from a file or stdin, --metadata, idempotency keys, a run's tokens)."""

from __future__ import annotations

from typing import Any

import ratchet


@ratchet.task(id="fh-echo")
async def echo(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """What arrived: the size of the blob and the run's metadata."""
    return {"blob_len": len(payload.get("blob", "")), "keys": sorted(payload)}


@ratchet.task(id="fh-three-tokens")
async def three_tokens(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Waits on a token it creates (completed from outside), then on one of
    its own that times out, then on one created outside the run."""
    approve = await ctx.create_token("approve")
    approved = await ctx.wait_for_token(approve)
    quick = await ctx.create_token("quick", timeout=0.2)
    late = await ctx.wait_for_token(quick, timeout_as_value=True)
    given = await ctx.wait_for_token(payload["token_id"])
    return {"approved": approved, "quick_timed_out": late.timed_out, "given": given}

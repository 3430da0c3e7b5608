"""Tasks for tests/integration/test_tokens.py (issue 10, "Tokens from anywhere")."""

from __future__ import annotations

from typing import Any

import pydantic

import ratchet


class Approval(pydantic.BaseModel):
    approved: bool
    by: str


@ratchet.task(id="token-approval")
async def token_approval(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Waits on a token created by a client (its id in the payload), with
    the data validated as an Approval."""
    await ctx.step("prepare", lambda: "ready")
    approval = await ctx.wait_for_token(payload["token_id"], model=Approval)
    assert isinstance(approval, Approval)
    return {"approved": approval.approved, "by": approval.by}


@ratchet.task(id="token-or-timeout")
async def token_or_timeout(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """A timeout as a value, not an exception."""
    result = await ctx.wait_for_token(payload["token_id"], model=Approval,
                                      timeout_as_value=True)
    return {"ok": result.ok, "timed_out": result.timed_out,
            "by": None if result.data is None else result.data.by}


@ratchet.task(id="in-run-token-or-timeout")
async def in_run_token_or_timeout(ctx: ratchet.Context,
                                  payload: dict[str, Any]) -> dict[str, Any]:
    """A token the run creates itself, timing out, handled as a value."""
    token = await ctx.create_token("approve", timeout=payload["timeout"])
    result = await ctx.wait_for_token(token, timeout_as_value=True)
    return {"ok": result.ok, "timed_out": result.timed_out}

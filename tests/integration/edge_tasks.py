"""Tasks for tests/integration/test_typed_edges.py (issue 10, "Typed edges")."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pydantic

import ratchet


@ratchet.task(id="edge-unlimited",
              retry=ratchet.Retry(max_attempts=None, min_delay=0.0, max_delay=0.0))
async def edge_unlimited(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """Fails its first 7 run attempts, then completes with the attempt number."""
    if ctx.attempt <= payload["failures"]:
        raise ConnectionError(f"failure {ctx.attempt}")
    return ctx.attempt


class Summary(pydantic.BaseModel):
    words: int
    title: str


@ratchet.task(id="edge-summarise")
async def edge_summarise(ctx: ratchet.Context, payload: dict[str, Any]) -> Summary:
    """Declares Summary; with "bad" returns a dict that does not fit it."""
    if payload.get("bad"):
        return {"words": "many"}  # type: ignore[return-value]
    return Summary(words=len(payload["text"].split()), title=payload["text"][:5])


def probe_context(expected_run_id: str) -> list[Any]:
    """A sync step (in a worker thread) reaching its run without a ctx argument."""
    ctx = ratchet.current_context()
    return [ctx.run_id == expected_run_id, ctx.idempotency_key,
            threading.current_thread().name.startswith("ratchet-step")]


@ratchet.task(id="edge-typed-parent")
async def edge_typed_parent(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Children typed by their Task, plain by id; a bad output caught or not."""
    if payload.get("uncaught"):
        await ctx.trigger_and_wait(edge_summarise, {"bad": True})
    by_task, by_id, batch, bad = await asyncio.gather(
        ctx.trigger_and_wait(edge_summarise, {"text": "one two three"}),
        ctx.trigger_and_wait("edge-summarise", {"text": "four five"}, name="by-id"),
        ctx.batch_trigger_and_wait(edge_summarise, [{"text": "a"}, {"text": "b c"}]),
        ctx.trigger_and_wait(edge_summarise, {"bad": True}, name="bad"),
        return_exceptions=True)
    assert isinstance(bad, ratchet.ChildOutputError), bad
    return {"by_task": [type(by_task).__name__, by_task.words],
            "by_id": [type(by_id).__name__, by_id],
            "batch": [[type(s).__name__, s.words] for s in batch],
            "bad": [bad.run_id, bad.task_id, bad.output_type.__name__],
            "context": await ctx.step("probe", probe_context, ctx.run_id)}

"""Tasks for tests/integration/test_typed_edges.py (issue 10, "Typed edges")."""

from __future__ import annotations

from typing import Any

import ratchet


@ratchet.task(id="edge-unlimited",
              retry=ratchet.Retry(max_attempts=None, min_delay=0.0, max_delay=0.0))
async def edge_unlimited(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """Fails its first 7 run attempts, then completes with the attempt number."""
    if ctx.attempt <= payload["failures"]:
        raise ConnectionError(f"failure {ctx.attempt}")
    return ctx.attempt


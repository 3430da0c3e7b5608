"""Sequential per-step overhead: one run of N trivial steps at a time.

Triggers a run of `bench-sequential` (N steps one after another, default 200),
waits for it, and repeats K times (default 5), one run at a time. The
per-step overhead of a run is (finished_at - created_at) / N from the times
the store recorded; the figure is the median over the K runs, with min and max.

    python benchmarks/step_latency.py [--store postgres|sqlite] [--database-url URL]
                                      [--steps N] [--runs K]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import _harness as h

import ratchet


async def measure(s: h.System, steps: int, runs: int, warmup: int) -> dict[str, Any]:
    async with ratchet.Client(s.address, api_key=s.key) as client:
        for _ in range(warmup):
            await client.result(await _trigger(client, min(steps, 20)), timeout=120)
        ids = []
        for i in range(runs):
            run_id = await _trigger(client, steps)
            await client.result(run_id, timeout=600)
            ids.append(run_id)
            h.log(f"run {i + 1}/{runs} done")
    per_step = []
    for run_id in ids:
        created, finished = h.query(s.url, "SELECT created_at, finished_at FROM runs "
                                           "WHERE id = %s", (run_id,))[0]
        per_step.append((finished - created) * 1000 / steps)
    return {
        "per_step_ms": round(statistics.median(per_step), 3),
        "per_step_ms_min": round(min(per_step), 3),
        "per_step_ms_max": round(max(per_step), 3),
        "per_step_ms_all": [round(v, 3) for v in per_step],
    }


async def _trigger(client: ratchet.Client, steps: int) -> str:
    return (await client.trigger("bench-sequential", {"steps": steps})).id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_store_args(parser)
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--runs", type=int, default=5, help="runs, one at a time")
    parser.add_argument("--warmup", type=int, default=1, help="short runs first, not counted")
    args = parser.parse_args()
    with h.throwaway_store(args.database_url, args.store) as url, \
            h.system(url, slots=8) as s:
        started = time.time()
        result = asyncio.run(measure(s, args.steps, args.runs, args.warmup))
        h.log(f"took {time.time() - started:.1f}s")
    h.emit({"benchmark": "step_latency", "store": h.store_kind(url), "steps": args.steps,
            "runs": args.runs, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())

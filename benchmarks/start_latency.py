"""Start latency: trigger → first step started, single triggers at a steady rate.

Triggers `bench-three-steps` runs one at a time at --rate per second (default
20) for --runs runs (default 300), waits until all are final, and reads each
run's created_at and its first step's started_at from the store.

    python benchmarks/start_latency.py [--store postgres|sqlite] [--database-url URL]
                                       [--runs N] [--rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import _harness as h

import ratchet


async def trigger_at_rate(s: h.System, runs: int, rate: float, task: str = "bench-three-steps",
                          ) -> float:
    """Trigger `runs` runs paced at `rate` per second (open loop: the schedule does not
    slip when a trigger is slow). Returns the time the first was sent."""
    async with ratchet.Client(s.address, api_key=s.key) as client:
        await client.result((await client.trigger(task, {"n": -1})).id, timeout=60)  # warm-up
        since = time.time()
        t0 = time.monotonic()
        for i in range(runs):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.trigger(task, {"n": i})
    return since


def measure(s: h.System, runs: int, rate: float) -> dict[str, Any]:
    since = asyncio.run(trigger_at_rate(s, runs, rate))
    h.wait_finished(s.url, runs, since=since)
    lat, failed = h.start_latencies_ms(s.url, since)
    return {"runs": len(lat), "failed": failed, "rate_per_s": rate,
            **{f"start_ms_{k}": v for k, v in h.summary(lat).items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_store_args(parser)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0, help="triggers per second")
    parser.add_argument("--slots", type=int, default=200)
    args = parser.parse_args()
    with h.throwaway_store(args.database_url, args.store) as url, \
            h.system(url, slots=args.slots) as s:
        result = measure(s, args.runs, args.rate)
    h.emit({"benchmark": "start_latency", "store": h.store_kind(url), **result})
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

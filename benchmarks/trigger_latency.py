"""Trigger latency: one `Client.trigger` round trip, as a caller sees it.

Triggers `bench-three-steps` runs one at a time once the worker that
registered the task has stopped (nothing is leased: only the trigger itself
is measured, the RPC, the insert and its commit), and
times each call on the client. Two series: back to back (the next trigger as
soon as the last returned) and paced at --rate per second (the machine idles
between triggers, as it does at a low steady rate; every process and the
database then wake for each one).

    python benchmarks/trigger_latency.py [--store postgres|sqlite] [--database-url URL]
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


async def measure(s: h.System, runs: int, rate: float) -> dict[str, Any]:
    async with ratchet.Client(s.address, api_key=s.key) as client:
        for i in range(20):  # warm-up: connections, prepared statements
            await client.trigger("bench-three-steps", {"n": i})
        result: dict[str, Any] = {}
        for series, pause in (("back_to_back", 0.0), ("paced", 1 / rate)):
            times = []
            for i in range(runs):
                if pause:
                    await asyncio.sleep(pause)
                t = time.perf_counter()
                await client.trigger("bench-three-steps", {"n": i})
                times.append((time.perf_counter() - t) * 1000)
            result.update({f"{series}_ms_{k}": v for k, v in h.summary(times, 3).items()})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_store_args(parser)
    parser.add_argument("--runs", type=int, default=500, help="triggers in each series")
    parser.add_argument("--rate", type=float, default=20.0, help="the paced series' rate")
    args = parser.parse_args()
    with h.throwaway_store(args.database_url, args.store) as url, \
            h.system(url) as s:
        s.stop_workers()
        result = asyncio.run(measure(s, args.runs, args.rate))
    h.emit({"benchmark": "trigger_latency", "store": h.store_kind(url), "runs": args.runs,
            "rate_per_s": args.rate, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput and start latency of 3-step runs through real processes.

A coordinator process (`ratchet server`) and one worker process (`ratchet
worker`; --worker-processes for more, each with --slots slots), each its own
process, on Postgres by default (--store sqlite for a throwaway SQLite file). The benchmark
triggers N runs in batches, waits for all to complete, and reads the
timings the store recorded. Its last line of output is one JSON object.

    python benchmarks/throughput.py [--database-url URL] [--runs N] [--slots S]
                                    [--worker-processes P] [--store postgres|sqlite]

Without --database-url it creates a throwaway database on the local server
(RATCHET_TEST_DATABASE_URL or postgresql://postgres@127.0.0.1:5432/postgres).
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

TIMINGS_SQL = """
SELECT r.created_at, r.finished_at, r.status, MIN(s.started_at) AS first_step
FROM runs r LEFT JOIN steps s ON s.run_id = r.id
GROUP BY r.id, r.created_at, r.finished_at, r.status
"""


async def drive(s: h.System, runs: int, batch: int, latency_runs: int,
                latency_rate: float) -> tuple[float, float]:
    """Phase 1: all runs triggered in batches, until all are final. Phase 2: single
    triggers at latency_rate. Returns how long triggering took and phase 2's start."""
    async with ratchet.Client(s.address, api_key=s.key) as client:
        started = time.time()
        pending = [client.batch_trigger("bench-three-steps",
                                        [{"n": i} for i in range(lo, min(runs, lo + batch))])
                   for lo in range(0, runs, batch)]
        for chunk in pending:
            await chunk
        trigger_s = time.time() - started
        # Poll the finished count; the runs record their own timings, so the
        # polling interval does not affect the figures.
        await asyncio.to_thread(h.wait_finished, s.url, runs, 600.0)
        # Phase 2: start latency when the system is not saturated: single
        # triggers at a modest rate, one at a time.
        latency_from = time.time()
        ids = []
        for i in range(latency_runs):
            ids.append((await client.trigger("bench-three-steps", {"n": i})).id)
            await asyncio.sleep(1 / latency_rate)
        for run_id in ids:
            await client.wait(run_id, timeout=60)
    return trigger_s, latency_from


def run(url: str, runs: int, slots: int, batch: int, latency_runs: int, latency_rate: float,
        worker_processes: int) -> dict[str, Any]:
    with h.system(url, slots=slots, worker_processes=worker_processes) as s:
        trigger_s, latency_from = asyncio.run(drive(s, runs, batch, latency_runs,
                                                    latency_rate))
    all_rows = h.query(url, TIMINGS_SQL)
    rows = [r for r in all_rows if r[0] < latency_from]
    idle = [(r[3] - r[0]) * 1000 for r in all_rows if r[0] >= latency_from and r[3] is not None]
    failed = sum(1 for r in all_rows if r[2] != "COMPLETED")
    first_created = min(r[0] for r in rows)
    last_finished = max(r[1] for r in rows)
    elapsed = last_finished - first_created
    latencies = [(r[3] - r[0]) * 1000 for r in rows if r[3] is not None]
    return {
        "runs": runs,
        "failed": failed,
        "elapsed_s": round(elapsed, 3),
        "trigger_s": round(trigger_s, 3),
        "runs_per_s": round(runs / elapsed, 1),
        "steps_per_s": round(3 * runs / elapsed, 1),
        # Trigger to first step with runs arriving at latency_rate per second.
        "start_latency_ms_p50": round(statistics.median(idle), 1),
        "start_latency_ms_p99": round(h.percentile(idle, 99), 1),
        # The same while all N runs were queued at once (queueing dominates).
        "saturated_start_latency_ms_p50": round(statistics.median(latencies), 1),
        "saturated_start_latency_ms_p99": round(h.percentile(latencies, 99), 1),
        "latency_runs": latency_runs,
        "latency_rate_per_s": latency_rate,
        "slots": slots,
        "batch": batch,
        "worker_processes": worker_processes,
        "store": h.store_kind(url),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_store_args(parser)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--slots", type=int, default=200, help="slots per worker process")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--latency-rate", type=float, default=50.0)
    parser.add_argument("--worker-processes", type=int, default=1)
    args = parser.parse_args()
    with h.throwaway_store(args.database_url, args.store) as url:
        result = run(url, args.runs, args.slots, args.batch, args.latency_runs,
                     args.latency_rate, args.worker_processes)
    h.emit(result)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

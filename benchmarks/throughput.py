"""Throughput and start latency of 3-step runs through real processes.

A coordinator process (`ratchet server`) and one worker process (`ratchet
worker`), each its own process, on Postgres by default. The benchmark
triggers N runs in batches, waits for all to complete, and reads the
timings the store recorded. Its last line of output is one JSON object.

    python benchmarks/throughput.py [--database-url URL] [--runs N] [--slots S]

Without --database-url it creates a throwaway database on the local server
(RATCHET_TEST_DATABASE_URL or postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

import ratchet

ROOT = Path(__file__).resolve().parent.parent
SERVER = os.environ.get("RATCHET_TEST_DATABASE_URL",
                        "postgresql://postgres@127.0.0.1:5432/postgres")

TIMINGS_SQL = """
SELECT r.created_at, r.finished_at, r.status, MIN(s.started_at) AS first_step
FROM runs r LEFT JOIN steps s ON s.run_id = r.id
GROUP BY r.id, r.created_at, r.finished_at, r.status
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ratchet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ratchet", *args]


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sql).fetchall()
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(url: str, runs: int, slots: int, batch: int, tmp: Path, latency_runs: int,
              latency_rate: float) -> dict[str, Any]:
    key = subprocess.run(ratchet_cmd("keys", "create", "--database-url", url, "--env", "bench",
                                     "--role", "admin"), capture_output=True, text=True,
                         check=True).stdout.strip()
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RATCHET_API_KEY": key}
    stats: dict[str, float] = {}
    log = (tmp / "coordinator.log").open("w")
    coordinator = subprocess.Popen(
        ratchet_cmd("server", "--database-url", url, "--listen", address, "--http-listen",
                    f"127.0.0.1:{free_port()}"), stdout=log, stderr=subprocess.STDOUT, env=env)
    wlog = (tmp / "worker.log").open("w")
    worker = subprocess.Popen(
        ratchet_cmd("worker", str(ROOT / "benchmarks" / "bench_tasks.py"), "--coordinator",
                    address, "--slots", str(slots)),
        stdout=wlog, stderr=subprocess.STDOUT, env={**env, "PYTHONWARNINGS": "ignore"})
    try:
        async with ratchet.Client(address, api_key=key) as client:
            deadline = time.monotonic() + 30
            while "connected to" not in (tmp / "worker.log").read_text():
                if time.monotonic() > deadline:
                    raise RuntimeError("worker did not connect:\n" +
                                       (tmp / "worker.log").read_text())
                await asyncio.sleep(0.1)
            started = time.time()
            pending = [client.batch_trigger("bench-three-steps",
                                            [{"n": i} for i in range(lo, min(runs, lo + batch))])
                       for lo in range(0, runs, batch)]
            for chunk in pending:
                await chunk
            stats["trigger_s"] = time.time() - started
            # Poll the finished count through one connection; the runs record their own
            # timings, so the polling interval does not affect the figures.
            while True:
                done = query(url, "SELECT count(*) FROM runs WHERE status IN "
                                  "('COMPLETED', 'FAILED')")[0][0]
                if done >= runs:
                    break
                if time.time() - started > 600:
                    raise RuntimeError(f"only {done}/{runs} runs finished in 600s")
                await asyncio.sleep(0.25)
            # Phase 2: start latency when the system is not saturated: single
            # triggers at a modest rate, one at a time.
            latency_from = time.time()
            ids = []
            for i in range(latency_runs):
                ids.append((await client.trigger("bench-three-steps", {"n": i})).id)
                await asyncio.sleep(1 / latency_rate)
            for run_id in ids:
                await client.wait(run_id, timeout=60)
    finally:
        for proc in (worker, coordinator):
            proc.send_signal(signal.SIGTERM)
        for proc in (worker, coordinator):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        wlog.close()
    all_rows = query(url, TIMINGS_SQL)
    rows = [r for r in all_rows if r[0] < latency_from]
    idle = [(r[3] - r[0]) * 1000 for r in all_rows if r[0] >= latency_from and r[3] is not None]
    failed = sum(1 for r in all_rows if r[2] != "COMPLETED")
    trigger_s = stats["trigger_s"]
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
        "start_latency_ms_p99": round(percentile(idle, 99), 1),
        # The same while all N runs were queued at once (queueing dominates).
        "saturated_start_latency_ms_p50": round(statistics.median(latencies), 1),
        "saturated_start_latency_ms_p99": round(percentile(latencies, 99), 1),
        "latency_runs": latency_runs,
        "latency_rate_per_s": latency_rate,
        "slots": slots,
        "batch": batch,
        "store": url.split(":", 1)[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--slots", type=int, default=200)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--latency-rate", type=float, default=50.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ratchet-bench-") as tmp:
        url = args.database_url
        dropdb = None
        if url is None:
            name = "ratchet_bench_" + secrets.token_hex(4)
            with psycopg.connect(SERVER, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            url = SERVER.rsplit("/", 1)[0] + "/" + name
            dropdb = name
        try:
            result = asyncio.run(run(url, args.runs, args.slots, args.batch, Path(tmp),
                                     args.latency_runs, args.latency_rate))
        finally:
            if dropdb is not None:
                with psycopg.connect(SERVER, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{dropdb}" WITH (FORCE)')
    print(json.dumps(result))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Coordinator memory with many WAITING runs and many connected worker sessions.

Opens --sessions worker sessions (ratchet.Worker objects, --session-processes
processes of them, benchmarks/_sessions.py), triggers --waiting runs of
`bench-sleep-hour` (each sleeps an hour right away, so it is WAITING and
holds no slot), waits until all are WAITING, and reads the coordinator's RSS
(VmRSS of /proc/<pid>/status) in MB: before the runs, with them, and its peak.

    python benchmarks/memory.py [--store postgres|sqlite] [--database-url URL]
                                [--waiting N] [--sessions N] [--session-processes P]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import _harness as h

import ratchet

TASK = "bench-sleep-hour"


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def trigger_all(s: h.System, count: int, batch: int = 1000) -> None:
    async with ratchet.Client(s.address, api_key=s.key) as client:
        for lo in range(0, count, batch):
            await client.batch_trigger(TASK, [{"n": i} for i in range(lo, min(count, lo + batch))])


def wait_waiting(url: str, count: int, timeout: float) -> float:
    started = time.monotonic()
    while True:
        n = h.query(url, "SELECT count(*) FROM runs WHERE status = 'WAITING'")[0][0]
        if n >= count:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"only {n}/{count} runs WAITING after {timeout}s")
        time.sleep(0.5)


def measure(url: str, waiting: int, sessions: int, processes: int, slots: int,
            settle: float) -> dict[str, Any]:
    with h.system(url, slots=slots, worker_processes=0) as s:
        per = [sessions // processes + (1 if i < sessions % processes else 0)
               for i in range(processes)]
        for i, n in enumerate(per):
            s.start_process([sys.executable, str(h.BENCH_DIR / "_sessions.py"),
                             "--coordinator", s.address, "--count", str(n), "--slots",
                             str(slots), h.TASKS], f"sessions{i}")
        s.wait_connected(timeout=120, counts=per)
        pid = s.coordinator.pid
        time.sleep(settle)
        rss_sessions = h.proc_rss_mb(pid)
        h.log(f"{sessions} sessions connected; coordinator RSS {rss_sessions:.1f} MB")
        started = time.monotonic()
        asyncio.run(trigger_all(s, waiting))
        trigger_s = time.monotonic() - started
        to_waiting_s = wait_waiting(url, waiting, timeout=600)
        time.sleep(settle)
        rss = h.proc_rss_mb(pid)
        peak = vm_hwm_mb(pid)
        h.log(f"{waiting} runs WAITING; coordinator RSS {rss:.1f} MB (peak {peak:.1f})")
    return {"waiting": waiting, "sessions": sessions, "session_processes": processes,
            "rss_mb": round(rss, 1), "rss_mb_sessions_only": round(rss_sessions, 1),
            "rss_mb_peak": round(peak, 1), "trigger_s": round(trigger_s, 1),
            "all_waiting_s": round(trigger_s + to_waiting_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_store_args(parser)
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--session-processes", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8, help="slots per session")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait before reading RSS")
    args = parser.parse_args()
    with h.throwaway_store(args.database_url, args.store) as url:
        result = measure(url, args.waiting, args.sessions, args.session_processes,
                         args.slots, args.settle)
    h.emit({"benchmark": "memory", "store": h.store_kind(url), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())

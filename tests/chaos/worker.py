"""A worker process of the chaos suite: `python -m tests.chaos.worker --coordinator HOST:PORT`.

Not `ratchet worker`, because the suite lowers the sleep threshold so that
sleeps of 1-3 s suspend their run (the CLI keeps the 5 s default), and the
reconnect backoff so a worker finds a restarted coordinator quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import ratchet
from tests.chaos import tasks


def main() -> int:
    parser = argparse.ArgumentParser(prog="tests.chaos.worker")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--sleep-threshold", type=float, default=0.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(0.0005)  # as `ratchet worker` does (BENCHMARKS.md)
    worker = ratchet.Worker(tasks.TASKS, args.coordinator, slots=args.slots, drain_timeout=2.0,
                            max_reconnect_delay=1.0, sleep_threshold=args.sleep_threshold)
    asyncio.run(worker.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

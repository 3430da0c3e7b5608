"""Opens many worker sessions from one process (for benchmarks/memory.py).

    python benchmarks/_sessions.py --coordinator HOST:PORT --count N --slots S MODULE...

N `ratchet.Worker` objects serving the tasks of MODULE, each its own session
(worker id `bench-sessions:<pid>:<i>`), until SIGTERM. Logs "connected to"
once per session (to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

import ratchet
from ratchet._cli import load_tasks


async def serve(coordinator: str, count: int, slots: int, modules: list[str]) -> None:
    tasks = load_tasks(modules)
    workers = [ratchet.Worker(tasks, coordinator, slots=slots,
                              worker_id=f"bench-sessions:{os.getpid()}:{i}")
               for i in range(count)]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for w in workers:
            w.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(w.run(handle_signals=False) for w in workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("modules", nargs="+")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    asyncio.run(serve(args.coordinator, args.count, args.slots, args.modules))


if __name__ == "__main__":
    main()

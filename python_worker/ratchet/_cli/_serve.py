"""`ratchet worker`: import the modules named, serve their tasks."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratchet._cli._common import CLIError, client_args, duration
from ratchet._task import Task
from ratchet._worker import Worker


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="serve the tasks defined in modules")
    p.add_argument("modules", nargs="+", metavar="MODULE[:ATTR]")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--drain-timeout", type=duration, default=duration("30s"))
    client_args(p)


def load_tasks(specs: Sequence[str]) -> list[Task[Any, Any]]:
    """Import `module`, `module:attr` or `path/to/file.py` and collect its tasks."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    found: dict[str, Task[Any, Any]] = {}
    for spec in specs:
        name, _, attr = spec.partition(":")
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                loader = importlib.util.spec_from_file_location(path.stem, path)
                if loader is None or loader.loader is None:
                    raise CLIError(f"cannot load {name}")
                module = importlib.util.module_from_spec(loader)
                sys.modules[path.stem] = module
                loader.loader.exec_module(module)
            else:
                module = importlib.import_module(name)
        except (ImportError, FileNotFoundError) as exc:
            raise CLIError(f"cannot import {name!r}: {exc}") from None
        objects = [getattr(module, attr, None)] if attr else list(vars(module).values())
        if attr and objects[0] is None:
            raise CLIError(f"{name!r} has no attribute {attr!r}")
        for obj in objects:
            items = obj if isinstance(obj, list | tuple) else [obj]
            for item in items:
                if isinstance(item, Task):
                    found[item.id] = item
    if not found:
        raise CLIError(f"no @ratchet.task found in {', '.join(specs)}")
    return list(found.values())


async def run(args: argparse.Namespace) -> int:
    # gRPC hands every message between its own thread and the event loop; the
    # default 5 ms GIL switch interval makes each hand-off wait (BENCHMARKS.md).
    sys.setswitchinterval(0.0005)
    tasks = load_tasks(args.modules)
    worker = Worker(tasks, args.coordinator, slots=args.slots, api_key=args.api_key,
                    drain_timeout=args.drain_timeout)
    logging.getLogger("ratchet.worker").info(
        "serving %s with %d slots on %s", ", ".join(t.id for t in tasks), args.slots,
        worker.coordinator)
    await worker.run()
    return 0


def exit_abandoning_threads(code: int) -> int:
    """A drained worker exits even if a sync step ignores cancellation: its run
    was released (or its lease will expire), so the thread's work is moot."""
    steps = [t for t in threading.enumerate() if t.name.startswith("ratchet-step")]
    for thread in steps:
        thread.join(0.2)
    stuck = [t for t in steps if t.is_alive()]
    if stuck:
        logging.getLogger("ratchet.worker").warning(
            "exiting with %d step thread(s) still running", len(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

"""`ratchet worker`: import the modules named, serve their tasks."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import sysconfig
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratchet._cli._common import DURATION_FORMAT, CLIError, client_args, duration
from ratchet._task import Task
from ratchet._worker import Worker


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="serve the tasks defined in modules",
                       description="Import the modules named, connect to a coordinator and "
                                   "run the runs of their tasks until stopped (Ctrl-C or "
                                   "SIGTERM drains: running attempts finish or are released).")
    p.add_argument("modules", nargs="+", metavar="MODULE[:ATTR]",
                   help="a module (my_app.tasks), one attribute of it (my_app.tasks:charge, "
                        "a task or a list of tasks) or a file (tasks.py); every @ratchet.task "
                        "found is served")
    p.add_argument("--slots", type=int, default=8,
                   help="how many runs this worker runs at once (default 8)")
    p.add_argument("--drain-timeout", type=duration, default=duration("30s"),
                   help=f"on shutdown, how long running attempts may take to finish before "
                        f"they are released to other workers (default 30s; {DURATION_FORMAT})")
    client_args(p)


class UserCodeError(CLIError):
    """A module named on the command line raised while it was imported.

    One line names the module, the exception and where the user's code raised
    it; `traceback()` is the traceback from the user's code on (for `-v`),
    without the frames of Ratchet and importlib that led there.
    """

    def __init__(self, spec: str, exc: BaseException) -> None:
        where = _where(exc)
        self.line = (f"importing {spec} failed: {type(exc).__name__}: {exc}"
                     f"{f' ({where})' if where else ''}")
        super().__init__(f"{self.line}; run with -v for the traceback")
        self.exc = exc

    def traceback(self) -> str:
        """The traceback from the first frame of the user's code; the error's
        message then no longer points to -v (it was given)."""
        tb = self.exc.__traceback__
        while tb is not None and not _is_own_frame(tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
        self.args = (self.line,)
        return "".join(traceback.format_exception(
            type(self.exc), self.exc, tb or self.exc.__traceback__))


_RATCHET_DIR = str(Path(__file__).resolve().parent.parent)
_LIBRARY_DIRS = tuple({sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib",
                                                         "platlib")} - {None})


def _is_user_frame(filename: str) -> bool:
    return not filename.startswith(("<frozen", _RATCHET_DIR + os.sep))


def _is_own_frame(filename: str) -> bool:
    return _is_user_frame(filename) and not filename.startswith(_LIBRARY_DIRS)


def _where(exc: BaseException) -> str:
    """`file, line N` of the deepest frame in the user's code (not in Ratchet,
    importlib, the standard library or installed packages); the deepest frame
    of all when every frame is library code. A SyntaxError names its own."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{_shown(exc.filename)}, line {exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_user_frame(f.filename)]
    own = [f for f in frames if _is_own_frame(f.filename)]
    if not (own or frames):
        return ""
    frame = (own or frames)[-1]
    return f"{_shown(frame.filename)}, line {frame.lineno}"


def _shown(filename: str) -> str:
    """A path as the user would type it: relative to the working directory when under it."""
    try:
        return os.path.relpath(filename) if Path(filename).resolve().is_relative_to(
            Path.cwd()) else filename
    except (OSError, ValueError):
        return filename


def _raised_by_user_code(exc: ImportError | FileNotFoundError, name: str) -> bool:
    """An ImportError from inside the module (it imports what is not installed)
    is the user's to fix where it is written; the module itself missing is not."""
    if isinstance(exc, FileNotFoundError):
        return False
    missing = getattr(exc, "name", None)
    module = name.removesuffix(".py") if name.endswith(".py") else name
    if missing is not None and (module == missing or module.startswith(missing + ".")):
        return False
    return any(_is_user_frame(f.filename) for f in traceback.extract_tb(exc.__traceback__))


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
            if _raised_by_user_code(exc, name):
                raise UserCodeError(name, exc) from None
            raise CLIError(f"cannot import {name!r}: {exc}") from None
        except Exception as exc:  # the module itself raised: its file and line, not ours
            raise UserCodeError(name, exc) from None
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

"""Steps that run in a child process: `ctx.step(name, fn, ..., executor="process")`.

A sync step runs in a thread, which keeps the worker's event loop (and so its
heartbeats) going while the step computes in Python: the interpreter switches
threads every few microseconds. C code that holds the GIL for long does not
let it switch: a regular expression that backtracks, a C extension's long
call. The event loop then stands still, no heartbeat leaves, and after the
lease TTL the coordinator counts the attempt as lost and gives the run to
another worker. A step run in a child process cannot freeze the worker: the
child holds its own GIL, the worker keeps beating while it waits for the
result.

What it costs, and the rules that follow:

- `fn` travels by name: it must be a module-level function (not a lambda,
  a closure or a method of a local class), importable in a fresh interpreter.
  A module the worker loaded from a file path is loaded from that path again
  in the child. Other callables (a `functools.partial` of a module-level
  function, a builtin) are pickled as they are.
- Arguments, the result and any exception are pickled between the two
  processes: large ones cost copies, and objects that do not pickle (open
  files, connections, locks) cannot be passed.
- No shared globals: the child has its own module state, and `ctx` does not
  exist there (`ratchet.current_context()` raises RuntimeError); pass what
  the function needs as arguments (for example `ctx.idempotency_key`, read
  before the call).
- The pool starts lazily (spawn, not fork: a fork of a process that runs gRPC
  threads is not safe), one child per slot at most; the first process step
  of each child pays an interpreter start and its imports (typically a few
  hundred milliseconds). Children are reused afterwards.
- A child cannot be interrupted safely: a run canceled (or whose lease is
  lost) while its process step computes leaves that child busy until the
  function returns; its result is then dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import multiprocessing
import pickle
import signal
import sys
import typing
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ratchet.worker")


@dataclasses.dataclass(frozen=True)
class FunctionRef:
    """A module-level function, by name (and by file, for a module loaded from one)."""

    module: str
    qualname: str
    path: str | None


def reference(fn: Callable[..., Any]) -> FunctionRef | Callable[..., Any]:
    """What to send to the child for `fn`; raises TypeError if it cannot travel."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"{fn!r} is async: executor='process' runs sync functions")
    if inspect.isfunction(fn):
        if "<" in fn.__qualname__:  # <lambda>, <locals>
            raise TypeError(
                f"{fn.__qualname__!r} cannot run in a process: executor='process' needs a "
                "module-level function (the child imports it by name)")
        module = sys.modules.get(fn.__module__)
        path = getattr(module, "__file__", None)
        return FunctionRef(fn.__module__, fn.__qualname__, path)
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(f"{fn!r} cannot be sent to a process: {exc}") from None
    return fn


def _resolve(ref: FunctionRef) -> Callable[..., Any]:
    try:
        module = importlib.import_module(ref.module)
    except ModuleNotFoundError as exc:
        if exc.name != ref.module or ref.path is None:
            raise
        # Loaded from a file path in the worker (`ratchet worker app/tasks.py`).
        spec = importlib.util.spec_from_file_location(ref.module, ref.path)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[ref.module] = module
        spec.loader.exec_module(module)
    target: Any = module
    for part in ref.qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{ref.module}.{ref.qualname} is not callable in the step process")
    return typing.cast(Callable[..., Any], target)


def _call_in_child(target: FunctionRef | Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    fn = _resolve(target) if isinstance(target, FunctionRef) else target
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            # An exception that cannot cross back would break the whole pool:
            # send its description instead, keeping the retry intent.
            substitute = RuntimeError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
            substitute.non_retryable = bool(  # type: ignore[attr-defined]
                getattr(exc, "non_retryable", False))
            raise substitute from None
        raise


# True in a step process (set by the pool's initializer), so that
# ratchet.current_context() can say why there is no context there.
IN_STEP_PROCESS = False


def _child_init() -> None:
    global IN_STEP_PROCESS
    IN_STEP_PROCESS = True
    # The worker decides when its children end (Ctrl-C in a terminal reaches
    # the whole process group; the worker drains, the children must not die).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ProcessPool:
    """The worker's pool of child processes for process steps, started lazily."""

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self._max_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_init)
        return self._pool

    async def run(self, target: FunctionRef | Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        """Call the function in a child and return its result (or raise its error)."""
        pool = self._executor()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, _call_in_child, target, args, kwargs)
        except concurrent.futures.process.BrokenProcessPool:
            # A child died (killed, out of memory, crashed in C): this step
            # fails like any other and may be retried; later steps get a new pool.
            if self._pool is pool:
                log.warning("a step process died; starting a new process pool")
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise

    def shutdown(self) -> None:
        """Stop the children now: a draining worker does not wait for them."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # ProcessPoolExecutor cannot stop running work itself
            if process.is_alive():
                process.terminate()

"""Test your tasks in-process: a coordinator, a worker and a clock you move.

    import ratchet.testing

    async def test_reminder() -> None:
        async with ratchet.testing.Environment([send_reminder]) as env:
            run = await env.trigger(send_reminder, {"user": "ada"})
            await env.advance(dt.timedelta(days=1))   # the run's ctx.sleep ends now
            assert await env.result(run) == "sent"

`Environment` starts the embedded coordinator (SQLite in memory, auth off,
a free loopback port) and a `ratchet.Worker` serving the given tasks, all in
the test's event loop. Its clock is the coordinator's (ratchet_server.clock):
`advance()` moves it, so sleeps, retry backoffs, delays and token timeouts
fall due without waiting for them. The worker sleeps nothing in process
(sleep threshold 0): every wait is durable and follows that clock.

Helpers: `complete_token`, `steps`, `history`, `wait_until`, `settle`,
`fail_step` (a step raises on its n-th attempt), `crash_worker` and
`restart_worker` (replay from the checkpoints). Needs the server extra
(`pip install 'ratchet[server]'`). One Environment at a time per process:
the clock it moves is the process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib
import itertools
import time
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ratchet import _steps
from ratchet._client import Client
from ratchet._task import Task, _adapter
from ratchet._types import Run, RunEvent, RunStatus, StepInfo
from ratchet._worker import Worker

if TYPE_CHECKING:
    from ratchet_server.app import Coordinator
    from ratchet_server.store import Store

__all__ = ["Environment", "InjectedFault"]

# How long the helpers wait by default (real seconds) before giving up.
DEFAULT_TIMEOUT = 10.0
# The coordinator's timing in a test: a crashed worker's runs go back at once
# after its stream ends; finished runs are kept however far the clock moves.
SESSION_GRACE = 0.05
POLL = 0.005
# Due waits are acted on when the test moves the clock (or settles with one
# due), not by the timer loop's tick: the loop is only a slow safety net here.
TIMER_INTERVAL = 60.0

_open: Environment | None = None
_worker_ids = itertools.count(1)


class InjectedFault(Exception):
    """The default error a step raises when `Environment.fail_step` makes it fail."""


@dataclasses.dataclass
class _Fault:
    step: str
    attempt: int
    error: Exception | type[Exception] | None
    fired: int = 0


class Environment:
    """A coordinator and a worker for tests, in this event loop.

    `tasks`: `@ratchet.task` objects, modules (their tasks are collected) or
    module names. Use as `async with Environment(tasks) as env:`; leaving it
    stops the worker and the coordinator and puts the clock back. Runs are
    passed to the helpers as a `Run` or a run id.
    """

    def __init__(self, tasks: Iterable[Task[Any, Any] | types.ModuleType | str], *,
                 slots: int = 8, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.tasks = _collect(tasks)
        self.slots = slots
        self.timeout = timeout
        self._coordinator: Coordinator | None = None
        self._store: Store | None = None
        self._client: Client | None = None
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._faults: list[_Fault] = []
        self.address = ""

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Environment:
        global _open
        _, app, store_mod, engine_mod = _server()
        if _open is not None:
            raise RuntimeError("a ratchet.testing.Environment is already open in this process "
                               "(they share the clock): leave it before opening another")
        _open = self
        try:
            self._store = await store_mod.open_store("sqlite://:memory:")
            await self._store.migrate()
            config = engine_mod.EngineConfig(session_grace=SESSION_GRACE, retention=None,
                                             timer_interval=TIMER_INTERVAL,
                                             reap_interval=TIMER_INTERVAL)
            self._coordinator = app.Coordinator(self._store, app.ServerOptions(
                listen="127.0.0.1:0", http_listen=None, auth=False, engine=config))
            await self._coordinator.start()
            self.address = f"127.0.0.1:{self._coordinator.port}"
            self._client = Client(self.address, api_key="")
            self._start_worker()
            await self._connected()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        global _open
        try:
            if self._worker is not None and self._worker_task is not None:
                self._worker.stop()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(self._worker_task, 2.0)
            if self._client is not None:
                await self._client.close()
            if self._coordinator is not None:
                await self._coordinator.stop(drain=0.1)
            elif self._store is not None:
                await self._store.close()
        finally:
            self._worker = self._worker_task = None
            self._coordinator = self._store = self._client = None
            _steps.fault_hook = None
            if _open is self:
                _open = None
                _server()[0].reset()

    # --- runs -----------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """A `ratchet.Client` connected to this environment's coordinator."""
        if self._client is None:
            raise RuntimeError("the Environment is not open: use `async with Environment(...)`")
        return self._client

    async def trigger(self, task: Task[Any, Any] | str, payload: Any = None,
                      **options: Any) -> Run:
        """Start a run (options as `ratchet.Client.trigger`); returns it QUEUED."""
        return await self.client.trigger(task, payload, **options)

    async def run(self, run: Run | str) -> Run:
        """The run as the coordinator has it now, with its steps."""
        return await self.client.get(_id(run))

    async def result(self, run: Run | str, *, timeout: float | None = None,
                     skip_time: bool = False) -> Any:
        """The run's output once it COMPLETED, as the task's output type when it
        has one; raises `ratchet.RunFailedError` for another final status and
        TimeoutError when it is not final within `timeout` real seconds.

        Time does not move by itself: `advance()` what the run sleeps, or pass
        `skip_time=True` to move the clock, whenever everything has settled,
        to the next due time (a sleep, a backoff, a token's timeout, a delayed
        run) until the run is final."""
        limit = timeout or self.timeout
        if skip_time:
            await self._skip_until_final(_id(run), limit)
        done = await self.client.wait(_id(run), timeout=limit)
        output = await self.client.result(done.id, timeout=0.1)
        task = self.tasks.get(done.task_id)
        if task is not None and task.output_type is not None:
            return _adapter(task.output_type).validate_python(output)
        return output

    async def wait_until(self, run: Run | str, *statuses: RunStatus | str,
                         timeout: float | None = None) -> Run:
        """Wait until the run has one of `statuses` (default: any final one).
        Raises TimeoutError, naming the status it has, when it does not in
        `timeout` real seconds, or at once when it ends in another final status."""
        wanted = {RunStatus(s) for s in statuses}
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            current = await self.run(run)
            if current.status in wanted or (not wanted and current.status.is_final):
                return current
            if current.status.is_final or time.monotonic() > deadline:
                names = ", ".join(sorted(wanted)) or "final"
                raise TimeoutError(f"run {current.id} is {current.status}, not {names}"
                                   + ("" if current.status.is_final else
                                      f" after {timeout or self.timeout}s")
                                   + _error_note(current))
            await asyncio.sleep(POLL)

    async def steps(self, run: Run | str) -> dict[str, StepInfo]:
        """The run's journal by step key (`name`, `name#2`, ...), in order."""
        return {s.key: s for s in (await self.run(run)).steps}

    async def history(self, run: Run | str) -> list[RunEvent]:
        """Every entry of the run's history, oldest first."""
        return await self.client.history(_id(run))

    async def complete_token(self, token: Run | str, data: Any = None, *,
                             step: str | None = None) -> bool:
        """Complete a wait token: by its id, or by the run waiting on it (after
        `settle()`, so the run has reached the wait) and the name of its token
        step (`step=`; may be left out when the run has one pending token).
        Returns False when it was already completed or timed out."""
        token_id = token if isinstance(token, str) and token.startswith("tok_") else ""
        if not token_id:
            await self.settle()
            pending = [s for s in (await self.run(token)).steps
                       if s.token_id and s.status == "RUNNING"
                       and (step is None or s.key == step)]
            if len(pending) != 1:
                what = f"token step {step!r}" if step else "one pending token step"
                found = ", ".join(s.key for s in pending) or "none"
                raise LookupError(f"run {_id(token)} has not {what} waiting (found: {found}); "
                                  "pass step= or the token id")
            token_id = pending[0].token_id
        return await self.client.complete_token(token_id, data)

    # --- time -----------------------------------------------------------------------

    async def settle(self, *, timeout: float | None = None) -> None:
        """Wait until nothing moves without the clock: no run executing or
        leased, none ready to lease, no wait already due. Raises TimeoutError
        (naming what still moves) after `timeout` real seconds."""
        deadline = time.monotonic() + (timeout or self.timeout)
        calm = 0
        while True:
            busy = await self._busy()
            calm = 0 if busy else calm + 1
            if calm >= 2:  # twice in a row: nothing was between two states
                return
            if busy and time.monotonic() > deadline:
                raise TimeoutError(f"the environment did not settle in {timeout or self.timeout}"
                                   f"s: {busy} (a step that never returns? a task no worker "
                                   "here serves?)")
            await asyncio.sleep(POLL)

    async def advance(self, duration: float | dt.timedelta) -> None:
        """Let runs reach their waits (`settle()`), move the clock forward by
        `duration`, and act at once on what fell due: sleeps end, tokens time
        out, retries and delayed runs start. Returns without waiting for them
        to finish (`result()`, `wait_until()` or `settle()` do)."""
        seconds = duration.total_seconds() if isinstance(duration, dt.timedelta) else duration
        if seconds < 0:
            raise ValueError("time only moves forward")
        await self.settle()
        _server()[0].advance(seconds)
        assert self._coordinator is not None
        await self._coordinator.engine.fire_timers()

    async def _skip_until_final(self, run_id: str, timeout: float) -> None:
        from ratchet_server import clock

        deadline = time.monotonic() + timeout
        while not (await self.run(run_id)).status.is_final:
            await self.settle(timeout=max(0.0, deadline - time.monotonic()))
            due = await self._next_due()
            if due is None:  # a wait that no time ends (a token without a timeout)
                if time.monotonic() > deadline:
                    return  # the caller's wait raises TimeoutError, naming the status
                await asyncio.sleep(POLL)
                continue
            await self.advance(max(0.0, due - clock.now()))

    async def _next_due(self) -> float | None:
        """The earliest due time of a pending wait or a queued run (coordinator's clock)."""
        from ratchet_server import clock, model
        from ratchet_server.api.auth import DEV_ENV

        store = self._store
        assert store is not None
        pending = await store.unfinished_runs(DEV_ENV, "", 10_000, clock.now() + 1e12)
        dues = [step.wake_at for _, _, steps in pending for step in steps.values()
                if step.wake_at is not None and step.status is model.StepStatus.RUNNING]
        queued = await store.next_run_at(DEV_ENV, list(self.tasks))
        if queued is not None:
            dues.append(queued)
        return min(dues, default=None)

    async def _busy(self) -> str:
        """What still moves without the clock ("" when nothing)."""
        from ratchet_server import clock, model
        from ratchet_server.api.auth import DEV_ENV

        store = self._store
        assert store is not None
        if self._worker is not None and self._worker.running:
            return f"{self._worker.running} run(s) executing"
        running = await store.list_runs(
            model.RunFilter(env=DEV_ENV, statuses=(model.RunStatus.RUNNING,), summary=True),
            1, None)
        if running:
            return f"run {running[0].id} is leased"
        if self._worker is not None:
            due = await store.next_run_at(DEV_ENV, list(self.tasks))
            if due is not None and due <= clock.now():
                return "a run is ready to start"
        if await store.due_steps(1):
            assert self._coordinator is not None
            await self._coordinator.engine.fire_timers()
            return "a wait is due"
        return ""

    # --- faults ---------------------------------------------------------------------

    def fail_step(self, step: str, *, on_attempt: int = 1,
                  error: Exception | type[Exception] | None = None) -> None:
        """Make the step named `step` (every call of it: `step`, `step#2`, ...,
        or one key when given with `#`) raise `error` (default
        `InjectedFault`) on its `on_attempt`-th attempt, in every run, before
        its function is called. The attempt then counts and retries as any
        failure would (the step's retry policy decides)."""
        if on_attempt < 1:
            raise ValueError("on_attempt counts from 1")
        self._faults.append(_Fault(step, on_attempt, error))
        _steps.fault_hook = self._inject

    def _inject(self, run_id: str, key: str, attempt: int) -> None:
        name = key.partition("#")[0]
        for fault in self._faults:
            if fault.attempt == attempt and fault.step in (key, name):
                fault.fired += 1
                error = fault.error
                if error is None:
                    raise InjectedFault(f"injected failure: step {key} attempt {attempt} "
                                        f"(run {run_id})")
                raise error() if isinstance(error, type) else error

    # --- the worker -----------------------------------------------------------------

    @property
    def worker(self) -> Worker | None:
        """The worker serving the tasks (None between crash and restart)."""
        return self._worker

    def _start_worker(self) -> None:
        self._worker = Worker(self.tasks.values(), self.address, slots=self.slots, api_key="",
                              worker_id=f"ratchet-testing-{next(_worker_ids)}",
                              sleep_threshold=0.0, drain_timeout=0.5, max_reconnect_delay=0.1)
        self._worker_task = asyncio.create_task(self._worker.run(handle_signals=False),
                                                name="ratchet-testing-worker")

    async def _connected(self) -> None:
        """Wait until the worker's session is open (its tasks registered)."""
        assert self._worker is not None and self._worker_task is not None
        connected = asyncio.ensure_future(self._worker.connected.wait())
        done, _ = await asyncio.wait({connected, self._worker_task}, timeout=self.timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        if self._worker_task in done:
            self._worker_task.result()  # raises what stopped it
        if connected not in done:
            raise TimeoutError(f"the worker did not connect to {self.address} in "
                               f"{self.timeout}s")

    async def crash_worker(self) -> None:
        """Stop the worker at once, as if its process died: steps in flight
        are cancelled, nothing is checkpointed or drained. Its runs go back
        to the queue (a lease loss, not an attempt) for `restart_worker()`."""
        worker, task = self._worker, self._worker_task
        if worker is None or task is None:
            raise RuntimeError("the worker is not running")
        self._worker = self._worker_task = None
        executions = [e.task for e in worker._session.executions.values() if e.task]
        task.cancel()  # its stream ends, then its executions are cancelled
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await asyncio.gather(*executions, return_exceptions=True)

    async def restart_worker(self) -> None:
        """Start a new worker (after `crash_worker()`); its runs replay from
        their checkpoints: completed steps return their recorded results."""
        if self._worker is not None:
            raise RuntimeError("the worker is running: crash_worker() first")
        self._start_worker()
        await self._connected()


def _id(run: Run | str) -> str:
    return run if isinstance(run, str) else run.id


def _error_note(run: Run) -> str:
    return "" if run.error is None else f" ({run.error.type}: {run.error.message})"


def _collect(items: Iterable[Task[Any, Any] | types.ModuleType | str]) -> dict[str, Task[Any, Any]]:
    found: dict[str, Task[Any, Any]] = {}
    for item in items:
        module = importlib.import_module(item) if isinstance(item, str) else item
        if isinstance(module, Task):
            found[module.id] = module
        elif isinstance(module, types.ModuleType):
            found.update((t.id, t) for t in vars(module).values() if isinstance(t, Task))
        else:
            raise TypeError(f"not a task or module: {item!r}")
    if not found:
        raise ValueError("an Environment needs at least one task")
    return found


def _server() -> tuple[Any, Any, Any, Any]:
    """The coordinator's modules, imported on first use (the server extra)."""
    try:
        return tuple(importlib.import_module(f"ratchet_server.{name}")  # type: ignore[return-value]
                     for name in ("clock", "app", "store", "engine.engine"))
    except ImportError as exc:
        raise ImportError(f"ratchet.testing needs the coordinator ({exc}): install "
                          "it with pip install 'ratchet[server]'") from exc

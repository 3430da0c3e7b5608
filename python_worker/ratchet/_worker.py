"""`ratchet.Worker`: dials out to the coordinator and executes leased runs.

The worker assembles the pieces: a `Session` (`_session.py`, the transport:
stream, acks, reconnects, heartbeats, drain) that starts an `Execution`
(`_execution.py`, one lease: the task, its hooks, its outcome) for each
lease, and the thread and process pools that steps run on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
from collections.abc import Iterable
from typing import Any

from ratchet import _process
from ratchet._errors import WorkerError
from ratchet._execution import Execution
from ratchet._session import Session
from ratchet._task import Task
from ratchet.v1 import worker_pb2

DEFAULT_COORDINATOR = "127.0.0.1:7420"


class Worker:
    """Serves tasks: connects out to the coordinator, runs what it is leased.

    The worker reconnects with exponential backoff when the connection drops,
    keeps executing meanwhile, and on reconnect asks the coordinator to adopt
    the leases it still holds; unacknowledged checkpoints are sent again. On
    SIGTERM (or `stop()`) it drains: takes no new runs, lets running ones
    finish for up to `drain_timeout` seconds, and gives the rest back.
    """

    def __init__(
        self,
        tasks: Iterable[Task[Any, Any]],
        coordinator: str | None = None,
        *,
        slots: int = 8,
        api_key: str | None = None,
        worker_id: str | None = None,
        drain_timeout: float = 30.0,
        max_reconnect_delay: float = 5.0,
        sleep_threshold: float = 5.0,
    ) -> None:
        self._tasks = {t.id: t for t in tasks}
        if not self._tasks:
            raise ValueError("a worker needs at least one task")
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.coordinator = coordinator or os.environ.get("RATCHET_COORDINATOR") \
            or DEFAULT_COORDINATOR
        api_key = api_key if api_key is not None else os.environ.get("RATCHET_API_KEY")
        self.slots = slots
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._drain_timeout = drain_timeout
        # Durable sleeps up to this long happen in process (keeping the lease);
        # longer ones suspend the run and free the slot.
        self._sleep_threshold = sleep_threshold
        self._session = Session(
            coordinator=self.coordinator, api_key=api_key, worker_id=self.worker_id,
            slots=slots, tasks=self._tasks, max_reconnect_delay=max_reconnect_delay,
            start=self._new_execution)
        self.connected = self._session.connected
        self._stop_event: asyncio.Event | None = None
        # Sync steps run here. Not the loop's default executor: a step that
        # ignores cancellation must not keep a drained worker from exiting.
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        # Steps with executor="process"; its children start on first use.
        self._processes: _process.ProcessPool | None = None

    @property
    def running(self) -> int:
        """How many runs this worker is executing now."""
        return len(self._session.executions)

    def stop(self) -> None:
        """Begin a graceful drain; `run()` returns when it is done."""
        self._session.stop()
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Serve until `stop()` (or SIGTERM/SIGINT when `handle_signals`)."""
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._session.stopping:
            self._stop_event.set()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, 2 * self.slots), thread_name_prefix="ratchet-step")
        self._processes = _process.ProcessPool(max_workers=self.slots)
        connection = asyncio.create_task(self._session.serve(),
                                         name="ratchet-worker-connection")
        stopper = asyncio.create_task(self._stop_event.wait())
        try:
            done, _ = await asyncio.wait({connection, stopper},
                                         return_when=asyncio.FIRST_COMPLETED)
            if connection in done:
                connection.result()  # raises WorkerError
                return
            await self._session.drain(self._drain_timeout)
        finally:
            stopper.cancel()
            self._session.close()
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError, WorkerError):
                await connection
            for execution in list(self._session.executions.values()):
                if execution.task is not None:
                    execution.task.cancel()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._processes.shutdown()

    def _new_execution(self, grant: worker_pb2.LeaseGrant) -> Execution:
        """What the session starts for a lease pushed to this worker."""
        return Execution(grant, self._tasks.get(grant.task_id), self._session,
                         threads=self._threads, processes=self._processes,
                         sleep_threshold=self._sleep_threshold)

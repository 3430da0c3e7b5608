"""`ratchet.Worker`: dials out to the coordinator and executes leased runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

import grpc

from ratchet import __version__, _context, _process
from ratchet._codec import duration, error_from_exception, error_to_pb, retry_to_pb, timestamp
from ratchet._context import Context
from ratchet._errors import LeaseLostError, NonRetryableError, RatchetError
from ratchet._task import Task
from ratchet._types import RunError
from ratchet.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("ratchet.worker")

PROTOCOL_VERSION = 1
DEFAULT_COORDINATOR = "127.0.0.1:7420"
# Failures that reconnecting cannot fix.
FATAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                         grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                         grpc.StatusCode.UNIMPLEMENTED})
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


REFUSED_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT.value[0],
                           grpc.StatusCode.NOT_FOUND.value[0],
                           grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]})
WRITE_ATTEMPTS = 6
RELEASE_TIMEOUT = 5.0
# Below gRPC's 16 MiB receive limit: a larger message would break the stream
# for every run of the session, not just fail this one.
MAX_MESSAGE_BYTES = 15 * 1024 * 1024


class TransientWriteError(RatchetError):
    """The coordinator could not record a write now (e.g. its database is down)."""


class WriteRefusedError(NonRetryableError):
    """The coordinator refused a checkpoint or completion as invalid (e.g. too large)."""


class WorkerError(RatchetError):
    """The worker cannot go on (for example, its API key was refused)."""


@dataclasses.dataclass(eq=False)
class _Execution:
    lease_id: str
    run_id: str
    ctx: Context | None = None
    task: asyncio.Task[None] | None = None
    release_on_cancel: bool = False
    clock_offset: float = 0.0


@dataclasses.dataclass(eq=False)
class _Pending:
    message: worker_pb2.SessionRequest
    future: asyncio.Future[worker_pb2.Ack]
    lease_id: str


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
        self._api_key = api_key if api_key is not None else os.environ.get("RATCHET_API_KEY")
        self.slots = slots
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._drain_timeout = drain_timeout
        # Durable sleeps up to this long happen in process (keeping the lease);
        # longer ones suspend the run and free the slot.
        self._sleep_threshold = sleep_threshold
        self._max_reconnect_delay = max_reconnect_delay
        self._executions: dict[str, _Execution] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._outbound: asyncio.Queue[worker_pb2.SessionRequest | None] | None = None
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self.connected = asyncio.Event()
        # Sync steps run here. Not the loop's default executor: a step that
        # ignores cancellation must not keep a drained worker from exiting.
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        # Steps with executor="process"; its children start on first use.
        self._processes: _process.ProcessPool | None = None

    @property
    def running(self) -> int:
        """How many runs this worker is executing now."""
        return len(self._executions)

    def stop(self) -> None:
        """Begin a graceful drain; `run()` returns when it is done."""
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Serve until `stop()` (or SIGTERM/SIGINT when `handle_signals`)."""
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, 2 * self.slots), thread_name_prefix="ratchet-step")
        self._processes = _process.ProcessPool(max_workers=self.slots)
        connection = asyncio.create_task(self._connect_loop(), name="ratchet-worker-connection")
        stopper = asyncio.create_task(self._stop_event.wait())
        try:
            done, _ = await asyncio.wait({connection, stopper},
                                         return_when=asyncio.FIRST_COMPLETED)
            if connection in done:
                connection.result()  # raises WorkerError
                return
            await self._drain()
        finally:
            stopper.cancel()
            if self._outbound is not None:
                self._outbound.put_nowait(None)
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError, WorkerError):
                await connection
            for execution in list(self._executions.values()):
                if execution.task is not None:
                    execution.task.cancel()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._processes.shutdown()

    async def _drain(self) -> None:
        """Stop taking runs, let running ones finish, give the rest back.

        Loops until nothing executes: a lease pushed while draining is
        released at once, and the connection stays up (reconnecting if need
        be) until every outcome or release is acknowledged.
        """
        log.info("draining: %d run(s) still executing", len(self._executions))
        self._send(worker_pb2.SessionRequest(slots=worker_pb2.SlotsUpdate(slots=0)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout
        while self._executions:
            tasks = {e.task for e in self._executions.values() if e.task is not None}
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.wait(tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                continue
            for execution in list(self._executions.values()):
                if execution.task is not None and not execution.release_on_cancel:
                    execution.release_on_cancel = True
                    execution.task.cancel()
            _, late = await asyncio.wait(tasks, timeout=RELEASE_TIMEOUT)
            if late:
                log.warning("%d run(s) could not be released; their leases will expire",
                            len(late))
                break
        log.info("drained")

    # --- connection -----------------------------------------------------------------

    async def _connect_loop(self) -> None:
        failures = 0
        # While draining, stay connected until every execution has reported.
        while not self._stopping or self._executions:
            established = False
            try:
                async with grpc.aio.insecure_channel(self.coordinator,
                                                     options=CHANNEL_OPTIONS) as channel:
                    established = await self._session(channel)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise WorkerError(
                        f"the coordinator refused this worker: {exc.code().name}: "
                        f"{exc.details()}") from None
                log.warning("connection to %s lost: %s", self.coordinator,
                            exc.details() or exc.code().name)
            except (TimeoutError, OSError) as exc:
                log.warning("connection to %s failed: %s", self.coordinator, exc)
            finally:
                self._outbound = None
                self.connected.clear()
            if self._stopping and not self._executions:
                return
            failures = 0 if established else failures + 1
            delay = min(self._max_reconnect_delay, 0.1 * 2 ** failures) * random.uniform(0.8, 1.2)
            await asyncio.sleep(delay)

    async def _session(self, channel: grpc.aio.Channel) -> bool:
        """One session: hello, welcome, then serve until the stream ends."""
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        outbound: asyncio.Queue[worker_pb2.SessionRequest | None] = asyncio.Queue()
        hello = worker_pb2.SessionRequest(hello=worker_pb2.Hello(
            worker_id=self.worker_id, sdk_name="ratchet-python", sdk_version=__version__,
            protocol_version=PROTOCOL_VERSION, slots=0 if self._stopping else self.slots,
            tasks=[self._definition(t) for t in self._tasks.values()],
            active_lease_ids=list(self._executions)))

        async def requests() -> AsyncIterator[worker_pb2.SessionRequest]:
            yield hello
            while (message := await outbound.get()) is not None:
                yield message

        metadata = (("authorization", f"Bearer {self._api_key}"),) if self._api_key else None
        call = stub.Session(requests(), metadata=metadata)
        heartbeat: asyncio.Task[None] | None = None
        watch: asyncio.Task[None] | None = None
        try:
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
                return False
            welcome = first.welcome
            self._adopt(set(welcome.adopted_lease_ids))
            self._outbound = outbound
            for pending in sorted(self._pending.items()):
                outbound.put_nowait(pending[1].message)
            self.connected.set()
            log.info("connected to %s as session %s", self.coordinator, welcome.session_id)
            interval = welcome.heartbeat_interval.ToNanoseconds() / 1e9 or 5.0
            heartbeat = asyncio.create_task(self._heartbeat(outbound, interval))
            lease_ttl = welcome.lease_ttl.ToNanoseconds() / 1e9 or 30.0
            watch = asyncio.create_task(_watch_loop(lease_ttl))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return True
                self._handle(response)
        finally:
            self._outbound = None
            self.connected.clear()
            if heartbeat is not None:
                heartbeat.cancel()
            if watch is not None:
                watch.cancel()
            outbound.put_nowait(None)
            call.cancel()

    def _definition(self, task: Task[Any, Any]) -> worker_pb2.TaskDefinition:
        return worker_pb2.TaskDefinition(
            id=task.id, version=task.version, queue=task.queue, retry=retry_to_pb(task.retry),
            payload_schema=task.payload_schema(), output_schema=task.output_schema(),
            max_duration=None if task.max_duration is None else duration(task.max_duration))

    def _adopt(self, adopted: set[str]) -> None:
        """After a reconnect: drop every execution whose lease was not adopted."""
        for lease_id, execution in list(self._executions.items()):
            if lease_id not in adopted and execution.task is not None:
                log.warning("run %s: lease %s was not adopted after reconnecting; "
                            "dropping the run here", execution.run_id, lease_id)
                execution.task.cancel()
        for request_id, pending in list(self._pending.items()):
            if pending.lease_id not in adopted and not pending.future.done():
                pending.future.set_exception(LeaseLostError("lease not adopted on reconnect"))
                del self._pending[request_id]

    async def _heartbeat(self, outbound: asyncio.Queue[Any], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            outbound.put_nowait(worker_pb2.SessionRequest(heartbeat=worker_pb2.Heartbeat(
                active_lease_ids=list(self._executions))))

    def _handle(self, response: worker_pb2.SessionResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "ack":
            pending = self._pending.pop(response.request_id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(response.ack)
        elif kind == "lease":
            self._start(response.lease)
        elif kind == "cancel":
            execution = self._executions.get(response.cancel.lease_id)
            if execution is not None and execution.task is not None:
                log.info("run %s canceled by the coordinator: %s", execution.run_id,
                         response.cancel.reason)
                if execution.ctx is not None:
                    execution.ctx._cancel()
                execution.task.cancel()

    def _send(self, message: worker_pb2.SessionRequest) -> None:
        if self._outbound is not None:
            self._outbound.put_nowait(message)

    async def _request(
        self, message: worker_pb2.SessionRequest, lease_id: str
    ) -> worker_pb2.Ack:
        """Send a request and wait for its acknowledgement, across reconnects."""
        if message.ByteSize() > MAX_MESSAGE_BYTES:
            raise WriteRefusedError(
                f"a {message.WhichOneof('kind')} of {message.ByteSize()} bytes is over the "
                f"{MAX_MESSAGE_BYTES}-byte message limit")
        message.request_id = next(self._ids)
        future: asyncio.Future[worker_pb2.Ack] = asyncio.get_running_loop().create_future()
        self._pending[message.request_id] = _Pending(message, future, lease_id)
        self._send(message)
        try:
            ack = await future
        finally:
            self._pending.pop(message.request_id, None)
        if ack.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]:
            raise LeaseLostError(ack.message)
        if ack.code in REFUSED_CODES:
            # Sending it again cannot help (too large, not JSON, ...).
            raise WriteRefusedError(f"the coordinator refused a write: {ack.message}")
        if ack.code != 0:
            raise TransientWriteError(f"the coordinator could not record a write: "
                                      f"{ack.message} (code {ack.code})")
        return ack

    async def _request_patiently(
        self, message: worker_pb2.SessionRequest, lease_id: str
    ) -> worker_pb2.Ack:
        """`_request`, trying again with backoff while the coordinator's store is down."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return await self._request(message, lease_id)
            except TransientWriteError as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.warning("%s; trying again", exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt))
        raise AssertionError("unreachable")

    # --- executions -------------------------------------------------------------------

    def _start(self, grant: worker_pb2.LeaseGrant) -> None:
        # Read as the grant arrives: the coordinator's clock minus ours.
        offset = grant.sent_at.ToNanoseconds() / 1e9 - time.time() \
            if grant.HasField("sent_at") else 0.0
        execution = _Execution(lease_id=grant.lease_id, run_id=grant.run_id,
                               clock_offset=offset)
        self._executions[grant.lease_id] = execution
        if self._stopping:
            execution.release_on_cancel = True
        execution.task = asyncio.create_task(self._execute(grant, execution),
                                             name=f"ratchet-run-{grant.run_id}")

    async def _execute(self, grant: worker_pb2.LeaseGrant, execution: _Execution) -> None:
        lease_id, run_id = grant.lease_id, grant.run_id
        journal = _LeaseJournal(self, lease_id)
        try:
            if execution.release_on_cancel:
                raise asyncio.CancelledError
            task = self._tasks.get(grant.task_id)
            snapshot = grant.snapshot
            ctx = Context(run_id=run_id, task_id=grant.task_id, attempt=grant.attempt,
                          lease_id=lease_id, steps={s.key: s for s in snapshot.steps},
                          state=json.loads(snapshot.state) if snapshot.state else {},
                          journal=journal, executor=self._threads,
                          sleep_threshold=self._sleep_threshold, processes=self._processes,
                          clock_offset=execution.clock_offset)
            execution.ctx = ctx
            _context._current_context.set(ctx)
            try:
                if task is None:
                    raise RatchetError(f"this worker does not serve task {grant.task_id!r}")
                waiting_on, result = await _until_done_or_suspended(
                    ctx, task.fn(ctx, task.parse_payload(snapshot.payload)))
                if waiting_on:
                    log.info("run %s suspended, waiting on %s", run_id, ", ".join(waiting_on))
                    outcome = worker_pb2.Complete(
                        lease_id=lease_id, run_id=run_id,
                        suspended=worker_pb2.Suspended(step_keys=waiting_on))
                else:
                    outcome = worker_pb2.Complete(
                        lease_id=lease_id, run_id=run_id,
                        succeeded=worker_pb2.Succeeded(output=task.dump_output(result)))
                state = ctx._state_update()
                if state is not None:
                    outcome.state = state
            except (asyncio.CancelledError, LeaseLostError):
                raise
            except Exception as exc:
                error = error_from_exception(exc, attempt=grant.attempt)
                log.warning("run %s attempt %d failed: %s: %s", run_id, grant.attempt,
                            error.type, error.message)
                retry_after: float | None = None
                if task is not None and task.catch_error is not None:
                    error, retry_after = await _catch_error(ctx, task, error)
                last = error.non_retryable or (
                    grant.HasField("retry") and grant.attempt >= grant.retry.max_attempts)
                if last and task is not None and task.on_failure is not None:
                    await _on_failure(ctx, task, error)
                failed = worker_pb2.Failed(error=error_to_pb(error))
                if retry_after is not None:
                    # A duration: the coordinator's clock decides when it is
                    # due. retry_at is for coordinators older than retry_after.
                    failed.retry_after.CopyFrom(duration(retry_after))
                    failed.retry_at.CopyFrom(timestamp(time.time() + retry_after))
                outcome = worker_pb2.Complete(lease_id=lease_id, run_id=run_id, failed=failed)
                with contextlib.suppress(TypeError):  # a state that cannot be saved stays behind
                    state = ctx._state_update()
                    if state is not None:
                        outcome.state = state
            await self._complete(outcome, lease_id)
        except LeaseLostError as exc:
            log.warning("run %s: lease %s lost (%s); dropping this execution",
                        run_id, lease_id, exc)
        except asyncio.CancelledError:
            if execution.release_on_cancel:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(self._request(worker_pb2.SessionRequest(
                        release=worker_pb2.ReleaseLease(lease_id=lease_id, run_id=run_id)),
                        lease_id), RELEASE_TIMEOUT)
                    log.info("run %s released for another worker", run_id)
        except Exception:
            # No outcome could be recorded: give the run back rather than hold it.
            log.exception("run %s: could not report its outcome; releasing it", run_id)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._request(worker_pb2.SessionRequest(
                    release=worker_pb2.ReleaseLease(lease_id=lease_id, run_id=run_id)),
                    lease_id), RELEASE_TIMEOUT)
        finally:
            self._executions.pop(lease_id, None)

    async def _complete(self, outcome: worker_pb2.Complete, lease_id: str) -> None:
        """Report the outcome until the coordinator records it: a refused output
        becomes a non-retryable failure and a transient error is tried again,
        so no run is left RUNNING by a worker that has finished with it."""
        try:
            await self._request_patiently(worker_pb2.SessionRequest(complete=outcome), lease_id)
        except WriteRefusedError as exc:
            if outcome.WhichOneof("outcome") == "failed":
                raise
            log.warning("run %s: outcome refused (%s); failing the run", outcome.run_id, exc)
            error = error_to_pb(error_from_exception(exc))
            failed = worker_pb2.Complete(lease_id=outcome.lease_id, run_id=outcome.run_id,
                                         failed=worker_pb2.Failed(error=error))
            await self._request_patiently(worker_pb2.SessionRequest(complete=failed), lease_id)


async def _catch_error(
    ctx: Context, task: Task[Any, Any], error: RunError
) -> tuple[RunError, float | None]:
    """Let the task's catch_error hook decide about a failed attempt: the
    error to record, and how long until the next attempt (None: the policy's
    backoff). A time the hook names is turned into a delay on this worker's
    clock now, as `ctx.sleep_until` does."""
    hook = task.catch_error
    assert hook is not None
    try:
        decision = await hook(ctx, error)
    except (asyncio.CancelledError, LeaseLostError):
        raise
    except Exception:
        log.exception("run %s: the catch_error hook failed; keeping the policy's choice",
                      ctx.run_id)
        return error, None
    if decision is None:
        return error, None
    now = time.time()
    if decision.action == "fail":
        return dataclasses.replace(error, non_retryable=True), None
    if decision.action == "replace" and decision.error is not None:
        return decision.error, None
    if decision.action == "retry_in":
        return error, max(0.0, decision.at or 0.0)
    if decision.action == "retry":
        return error, 0.0 if not decision.at else max(0.0, decision.at - now)
    return error, None


async def _watch_loop(lease_ttl: float) -> None:
    """Warn when the event loop stood still for a third of the lease TTL:
    heartbeats leave from this loop, so a longer stall costs the leases. The
    usual cause is a sync step holding the GIL in C code; `executor="process"`
    runs such a step where it cannot stall the worker."""
    loop = asyncio.get_running_loop()
    limit = lease_ttl / 3
    tick = min(0.1, limit / 4)
    while True:
        before = loop.time()
        await asyncio.sleep(tick)
        stalled = loop.time() - before - tick
        if stalled > limit:
            log.warning(
                "the event loop was blocked for %.1fs (lease TTL %.1fs): no heartbeat could "
                "be sent meanwhile. A sync step holding the GIL in C code (a regex, a C "
                "extension) does this; run it with ctx.step(..., executor=\"process\")",
                stalled, lease_ttl)


async def _on_failure(ctx: Context, task: Task[Any, Any], error: RunError) -> None:
    """The task's on-failure hook, once per run: a durable step, so a replay of
    this last attempt does not call it again."""
    hook = task.on_failure
    assert hook is not None
    try:
        await ctx.step("ratchet:on_failure", hook, ctx, error)  # type: ignore[arg-type]
    except (asyncio.CancelledError, LeaseLostError):
        raise
    except Exception:
        log.exception("run %s: the on_failure hook failed", ctx.run_id)


async def _until_done_or_suspended(
    ctx: Context, coro: Awaitable[Any]
) -> tuple[list[str], Any]:
    """Run the task until it returns, or until every branch waits durably:
    then stop it and return the keys it waits on (the run will suspend)."""
    main = asyncio.ensure_future(coro)
    suspended = asyncio.ensure_future(ctx.suspended.wait())
    try:
        await asyncio.wait({main, suspended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        suspended.cancel()
        if not main.done() and not ctx.suspended.is_set():
            main.cancel()  # the execution itself was cancelled
    if main.done():
        return [], main.result()
    waiting_on = ctx.waiting_on
    main.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await main
    return waiting_on, None


class _LeaseJournal:
    def __init__(self, worker: Worker, lease_id: str) -> None:
        self._worker = worker
        self._lease_id = lease_id

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None:
        await self._worker._request_patiently(
            worker_pb2.SessionRequest(checkpoint=checkpoint), self._lease_id)

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]:
        ack = await self._worker._request_patiently(
            worker_pb2.SessionRequest(children=request), self._lease_id)
        return list(ack.run_ids)

"""The worker's session with the coordinator: the transport under the executions.

A `Session` keeps one `WorkerService.Session` stream open at a time. It says
hello (tasks, slots, the leases it still holds) and adopts what the welcome
says the coordinator kept; it numbers requests, matches acknowledgements to
them and sends the unacknowledged ones again after a reconnect; it reconnects
with backoff, sends heartbeats while connected and warns when the event loop
stalls; it starts an execution for each lease pushed (the worker's `start`
builds it) and cancels it when told; and it drains: slots 0, wait, release.

What happens under one lease is `_execution.py`; this module never looks
inside a run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import typing
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from ratchet import __version__
from ratchet._codec import duration, retry_to_pb
from ratchet._errors import LeaseLostError, RatchetError, WorkerError, WriteRefusedError
from ratchet.v1 import worker_pb2, worker_pb2_grpc

if typing.TYPE_CHECKING:
    from ratchet._execution import Execution
    from ratchet._task import Task

log = logging.getLogger("ratchet.worker")

PROTOCOL_VERSION = 1
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
TOO_LARGE_HINT = ("; keep large data outside the run (a file or object store) and return or "
                  "pass a reference to it")


class TransientWriteError(RatchetError):
    """The coordinator could not record a write now (e.g. its database is down)."""


@dataclasses.dataclass(eq=False)
class _Pending:
    message: worker_pb2.SessionRequest
    future: asyncio.Future[worker_pb2.Ack]
    lease_id: str


class Session:
    """The connection to the coordinator, across reconnects, and the leases it holds.

    `executions` maps each lease this worker holds to its execution; an
    execution is in it from its grant until it has reported (or given up).
    """

    def __init__(
        self,
        *,
        coordinator: str,
        api_key: str | None,
        worker_id: str,
        slots: int,
        tasks: Mapping[str, Task[Any, Any]],
        max_reconnect_delay: float,
        start: Callable[[worker_pb2.LeaseGrant], Execution],
    ) -> None:
        self.coordinator = coordinator
        self._api_key = api_key
        self._worker_id = worker_id
        self._slots = slots
        self._tasks = tasks
        self._max_reconnect_delay = max_reconnect_delay
        self._start_execution = start
        self.executions: dict[str, Execution] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._outbound: asyncio.Queue[worker_pb2.SessionRequest | None] | None = None
        self.stopping = False
        self.connected = asyncio.Event()

    def stop(self) -> None:
        """Take no new runs: hello offers no slots, a lease pushed now is
        released at once, and `serve()` ends once nothing executes."""
        self.stopping = True

    def close(self) -> None:
        """End the current stream's requests (the stream then ends)."""
        if self._outbound is not None:
            self._outbound.put_nowait(None)

    async def drain(self, timeout: float) -> None:
        """Stop taking runs, let running ones finish, give the rest back.

        Loops until nothing executes: a lease pushed while draining is
        released at once, and the connection stays up (reconnecting if need
        be) until every outcome or release is acknowledged.
        """
        log.info("draining: %d run(s) still executing", len(self.executions))
        self.send(worker_pb2.SessionRequest(slots=worker_pb2.SlotsUpdate(slots=0)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.executions:
            tasks = {e.task for e in self.executions.values() if e.task is not None}
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.wait(tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                continue
            for execution in list(self.executions.values()):
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

    async def serve(self) -> None:
        """Stay connected, reconnecting with backoff, until stopped and idle.

        Raises WorkerError when the coordinator refuses this worker.
        """
        failures = 0
        # While draining, stay connected until every execution has reported.
        while not self.stopping or self.executions:
            established = False
            try:
                async with grpc.aio.insecure_channel(self.coordinator,
                                                     options=CHANNEL_OPTIONS) as channel:
                    established = await self._stream(channel)
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
            if self.stopping and not self.executions:
                return
            failures = 0 if established else failures + 1
            delay = min(self._max_reconnect_delay, 0.1 * 2 ** failures) * random.uniform(0.8, 1.2)
            await asyncio.sleep(delay)

    async def _stream(self, channel: grpc.aio.Channel) -> bool:
        """One stream: hello, welcome, then serve until it ends."""
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        outbound: asyncio.Queue[worker_pb2.SessionRequest | None] = asyncio.Queue()
        hello = worker_pb2.SessionRequest(hello=worker_pb2.Hello(
            worker_id=self._worker_id, sdk_name="ratchet-python", sdk_version=__version__,
            protocol_version=PROTOCOL_VERSION, slots=0 if self.stopping else self._slots,
            tasks=[_definition(t) for t in self._tasks.values()],
            active_lease_ids=list(self.executions)))

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

    def _adopt(self, adopted: set[str]) -> None:
        """After a reconnect: drop every execution whose lease was not adopted."""
        for lease_id, execution in list(self.executions.items()):
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
                active_lease_ids=list(self.executions))))

    def _handle(self, response: worker_pb2.SessionResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "ack":
            pending = self._pending.pop(response.request_id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(response.ack)
        elif kind == "lease":
            self._start(response.lease)
        elif kind == "cancel":
            execution = self.executions.get(response.cancel.lease_id)
            if execution is not None:
                execution.cancel(response.cancel.reason)

    def _start(self, grant: worker_pb2.LeaseGrant) -> None:
        execution = self._start_execution(grant)
        self.executions[grant.lease_id] = execution
        if self.stopping:
            execution.release_on_cancel = True
        execution.task = asyncio.create_task(self._execute(execution),
                                             name=f"ratchet-run-{grant.run_id}")

    async def _execute(self, execution: Execution) -> None:
        try:
            await execution.run()
        finally:
            self.executions.pop(execution.lease_id, None)

    # --- requests ---------------------------------------------------------------------

    def send(self, message: worker_pb2.SessionRequest) -> None:
        """Send without waiting for an acknowledgement (dropped if not connected)."""
        if self._outbound is not None:
            self._outbound.put_nowait(message)

    async def request(
        self, message: worker_pb2.SessionRequest, lease_id: str
    ) -> worker_pb2.Ack:
        """Send a request and wait for its acknowledgement, across reconnects."""
        if message.ByteSize() > MAX_MESSAGE_BYTES:
            raise WriteRefusedError(
                f"a {message.WhichOneof('kind')} of {message.ByteSize()} bytes is over the "
                f"{MAX_MESSAGE_BYTES}-byte message limit{TOO_LARGE_HINT}")
        message.request_id = next(self._ids)
        future: asyncio.Future[worker_pb2.Ack] = asyncio.get_running_loop().create_future()
        self._pending[message.request_id] = _Pending(message, future, lease_id)
        self.send(message)
        try:
            ack = await future
        finally:
            self._pending.pop(message.request_id, None)
        if ack.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]:
            raise LeaseLostError(ack.message)
        if ack.code in REFUSED_CODES:
            # Sending it again cannot help (too large, not JSON, ...).
            hint = TOO_LARGE_HINT if ack.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] \
                else ""
            raise WriteRefusedError(f"the coordinator refused a write: {ack.message}{hint}")
        if ack.code != 0:
            raise TransientWriteError(f"the coordinator could not record a write: "
                                      f"{ack.message} (code {ack.code})")
        return ack

    async def request_patiently(
        self, message: worker_pb2.SessionRequest, lease_id: str
    ) -> worker_pb2.Ack:
        """`request`, trying again with backoff while the coordinator's store is down."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return await self.request(message, lease_id)
            except TransientWriteError as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.warning("%s; trying again", exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt))
        raise AssertionError("unreachable")


def _definition(task: Task[Any, Any]) -> worker_pb2.TaskDefinition:
    return worker_pb2.TaskDefinition(
        id=task.id, version=task.version, queue=task.queue, retry=retry_to_pb(task.retry),
        payload_schema=task.payload_schema(), output_schema=task.output_schema(),
        max_duration=None if task.max_duration is None else duration(task.max_duration),
        # Python workers run a finishing lease (LeaseGrant.final_error) in
        # finishing mode: compensations and on_failure only (protocol §4).
        handles_final_error=True)


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

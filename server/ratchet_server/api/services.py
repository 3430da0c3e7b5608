"""The gRPC servicers. They translate and delegate: every rule is in the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from ratchet.v1 import (
    run_pb2,
    run_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from ratchet_server import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, __version__, clock, model, web
from ratchet_server.api import auth, convert, status
from ratchet_server.api.status import code_for
from ratchet_server.engine import errors, policy
from ratchet_server.engine.engine import CancelPush, EndPush, Engine, LeasePush
from ratchet_server.engine.engine import Session as WorkerSession
from ratchet_server.store import StoreUnavailable

log = logging.getLogger("ratchet.api")

R = TypeVar("R")



def _unary(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Turn engine errors into the matching gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            convert.check_strings(request)
            return await fn(self, request, context)
        except status.MAPPED as exc:
            if isinstance(exc, StoreUnavailable):
                log.warning("%s: %s", fn.__name__, exc)
            await context.abort(status.code_for(exc), str(exc))
            raise  # unreachable: abort raises

    return wrapper


class RunService(run_pb2_grpc.RunServiceServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine, public_url: str = "") -> None:
        self._engine = engine
        # Where the coordinator's HTTP port is reached from outside (token URLs).
        self._public_url = public_url

    @_unary
    async def Trigger(self, request: Any, context: Any) -> run_pb2.TriggerResponse:
        spec = convert.trigger_spec(request.task_id, request.payload, request.options)
        [(run, created)] = await self._engine.trigger(auth.principal().env, [spec])
        return run_pb2.TriggerResponse(run=convert.run_to_pb(run), created=created)

    @_unary
    async def BatchTrigger(self, request: Any, context: Any) -> run_pb2.BatchTriggerResponse:
        specs = [convert.trigger_spec(i.task_id, i.payload, i.options) for i in request.items]
        results = await self._engine.trigger(auth.principal().env, specs)
        return run_pb2.BatchTriggerResponse(results=[
            run_pb2.TriggerResponse(run=convert.run_to_pb(run), created=created)
            for run, created in results])

    @_unary
    async def GetRun(self, request: Any, context: Any) -> run_pb2.GetRunResponse:
        run, steps = await self._engine.get_run(auth.principal().env, request.run_id)
        return run_pb2.GetRunResponse(run=convert.run_to_pb(run),
                                      steps=[convert.step_to_pb(s) for s in steps])

    @_unary
    async def ListRuns(self, request: Any, context: Any) -> run_pb2.ListRunsResponse:
        try:
            statuses = tuple(convert.RUN_STATUS_FROM_PB[s] for s in request.statuses)
        except KeyError:
            raise errors.InvalidArgument("unknown run status in filter") from None
        flt = model.RunFilter(env=auth.principal().env, statuses=statuses,
                              task_id=request.task_id or None, tag=request.tag or None,
                              parent_run_id=request.parent_run_id or None,
                              error_type=request.error_type or None,
                              created_after=convert.from_ts(request.created_after,
                                                            request.HasField("created_after"),
                                                            "created_after"),
                              created_before=convert.from_ts(request.created_before,
                                                             request.HasField("created_before"),
                                                             "created_before"),
                              include_discarded=request.include_discarded,
                              summary=convert.summary_view(request.view))
        runs, token = await self._engine.list_runs(flt, request.page_size, request.page_token)
        return run_pb2.ListRunsResponse(runs=[convert.run_to_pb(r) for r in runs],
                                        next_page_token=token)

    @_unary
    async def ListStuckRuns(self, request: Any,
                            context: Any) -> run_pb2.ListStuckRunsResponse:
        found = await self._engine.stuck_runs(auth.principal().env, request.limit)
        return run_pb2.ListStuckRunsResponse(runs=[
            run_pb2.StuckRun(run=convert.run_to_pb(convert.summary(s.run)), reason=s.why)
            for s in found])

    @_unary
    async def CancelRun(self, request: Any, context: Any) -> run_pb2.CancelRunResponse:
        run = await self._engine.cancel(auth.principal().env, request.run_id, request.reason)
        return run_pb2.CancelRunResponse(run=convert.run_to_pb(run))

    @_unary
    async def GetRunHistory(self, request: Any, context: Any) -> run_pb2.GetRunHistoryResponse:
        who = auth.principal()
        events, token = await self._engine.history(
            who.env, request.run_id, request.page_size, request.page_token)
        show_lease = who.role is model.Role.ADMIN
        return run_pb2.GetRunHistoryResponse(
            events=[convert.event_to_pb(e, show_lease=show_lease) for e in events],
            next_page_token=token)

    @_unary
    async def ReplayRun(self, request: Any, context: Any) -> run_pb2.ReplayRunResponse:
        run = await self._engine.replay(auth.principal().env, request.run_id,
                                        from_scratch=request.from_scratch,
                                        rerun_compensated=request.rerun_compensated)
        return run_pb2.ReplayRunResponse(run=convert.run_to_pb(run))

    @_unary
    async def RetryRun(self, request: Any, context: Any) -> run_pb2.RetryRunResponse:
        run = await self._engine.retry_with_payload(auth.principal().env, request.run_id,
                                                    request.payload)
        return run_pb2.RetryRunResponse(run=convert.run_to_pb(run))

    @_unary
    async def DiscardRun(self, request: Any, context: Any) -> run_pb2.DiscardRunResponse:
        run = await self._engine.discard(auth.principal().env, request.run_id)
        return run_pb2.DiscardRunResponse(run=convert.run_to_pb(run))

    @_unary
    async def CompleteToken(self, request: Any, context: Any) -> run_pb2.CompleteTokenResponse:
        completed, run_id, message = await self._engine.complete_token(
            auth.principal().env, request.token_id, request.data)
        return run_pb2.CompleteTokenResponse(completed=completed, run_id=run_id,
                                             message=message)

    @_unary
    async def CreateToken(self, request: Any, context: Any) -> run_pb2.CreateTokenResponse:
        token, created = await self._engine.create_token(
            auth.principal().env,
            timeout=convert.from_dur(request.timeout, request.HasField("timeout")),
            idempotency_key=request.idempotency_key, tags=tuple(request.tags))
        return run_pb2.CreateTokenResponse(token=self._token(token, with_url=True),
                                           created=created)

    @_unary
    async def GetToken(self, request: Any, context: Any) -> run_pb2.GetTokenResponse:
        token = await self._engine.get_token(auth.principal().env, request.token_id)
        return run_pb2.GetTokenResponse(token=self._token(token, with_url=True))

    @_unary
    async def ListTokens(self, request: Any, context: Any) -> run_pb2.ListTokensResponse:
        try:
            statuses = tuple(convert.TOKEN_STATUS_FROM_PB[s] for s in request.statuses)
        except KeyError:
            raise errors.InvalidArgument("unknown token status in filter") from None
        flt = model.TokenFilter(env=auth.principal().env, run_id=request.run_id or None,
                                statuses=statuses, tags=tuple(request.tags))
        tokens, page = await self._engine.list_tokens(flt, request.page_size,
                                                      request.page_token)
        return run_pb2.ListTokensResponse(tokens=[self._token(t) for t in tokens],
                                          next_page_token=page)

    @_unary
    async def ListTasks(self, request: Any, context: Any) -> run_pb2.ListTasksResponse:
        tasks = await self._engine.list_tasks(auth.principal().env, request.task_id)
        return run_pb2.ListTasksResponse(tasks=[convert.task_info_to_pb(t) for t in tasks])

    @_unary
    async def ListWorkers(self, request: Any, context: Any) -> run_pb2.ListWorkersResponse:
        workers = self._engine.list_workers(auth.principal().env, request.task_id)
        return run_pb2.ListWorkersResponse(workers=[convert.worker_to_pb(w) for w in workers])

    def _token(self, token: model.Token, *, with_url: bool = False) -> run_pb2.Token:
        url = web.token_url(self._public_url, token.id, token.secret) if with_url else ""
        return convert.token_to_pb(token, policy.token_status(token, clock.now()), url)


class SystemService(system_pb2_grpc.SystemServiceServicer):  # type: ignore[misc]
    async def GetVersion(self, request: Any, context: Any) -> system_pb2.GetVersionResponse:
        return system_pb2.GetVersionResponse(
            server_version=__version__, protocol_version=PROTOCOL_VERSION,
            min_protocol_version=MIN_PROTOCOL_VERSION,
            features=["session-stream", "batch-trigger", "lease-adoption", "durable-waits",
                      "wait-tokens", "child-runs"])


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Session(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.SessionResponse]:
        who = auth.principal()
        session: WorkerSession | None = None
        try:
            try:
                first = await anext(requests, None)
            except DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _undecodable(exc))
                return
            if first is None:
                return
            try:
                session, welcome = await self._open(who, first)
            except errors.EngineError as exc:
                await context.abort(code_for(exc), str(exc))
                return
            yield welcome
            out: asyncio.Queue[_Out] = asyncio.Queue()
            async with _SessionTasks() as tasks:
                tasks.start(self._read(requests, session, out, tasks))
                tasks.start(self._forward(session, out))
                while (message := await out.get()) is not None:
                    if isinstance(message, _StreamEnd):
                        log.info("session %s: ending the stream %s: %s", session.id,
                                 message.code.name, message.message)
                        await context.abort(message.code, message.message)
                        return
                    yield message
        finally:
            if session is not None:
                self._engine.close_session(session)

    async def _open(
        self, who: auth.Principal, first: Any
    ) -> tuple[WorkerSession, worker_pb2.SessionResponse]:
        if first.WhichOneof("kind") != "hello":
            raise errors.InvalidArgument("the first message of a session must be hello")
        hello = first.hello
        env = who.env
        tasks = [_task_from_pb(env, t) for t in hello.tasks]
        session, adopted = await self._engine.open_session(
            env, hello.worker_id, tasks, hello.slots, list(hello.active_lease_ids),
            protocol_version=hello.protocol_version, key_id=who.key_id)
        cfg = self._engine.config
        welcome = worker_pb2.SessionResponse(welcome=worker_pb2.Welcome(
            session_id=session.id, protocol_version=PROTOCOL_VERSION,
            heartbeat_interval=convert.dur(cfg.heartbeat_interval),
            lease_ttl=convert.dur(cfg.lease_ttl), adopted_lease_ids=adopted,
            server_version=__version__))
        return session, welcome

    async def _set_slots(self, session: WorkerSession, request: Any) -> None:
        try:
            self._engine.set_slots(session, request.slots.slots)
        except errors.EngineError as exc:
            log.warning("session %s: %s", session.id, exc)

    async def _forward(self, session: WorkerSession, out: asyncio.Queue[_Out]) -> None:
        ttl = self._engine.config.lease_ttl
        while True:
            push = await session.outbox.get()
            if isinstance(push, LeasePush):
                out.put_nowait(worker_pb2.SessionResponse(
                    lease=convert.lease_to_pb(push.leased, ttl)))
            elif isinstance(push, CancelPush):
                out.put_nowait(worker_pb2.SessionResponse(cancel=worker_pb2.CancelRun(
                    run_id=push.run_id, lease_id=push.lease_id, reason=push.reason)))
            elif isinstance(push, EndPush):
                # A revoked key cannot come back; a stopping coordinator's
                # workers reconnect (elsewhere) and adopt their leases.
                out.put_nowait(_StreamEnd(
                    grpc.StatusCode.UNAUTHENTICATED if push.key_revoked
                    else grpc.StatusCode.UNAVAILABLE, push.reason))
                return

    async def _read(
        self,
        requests: AsyncIterator[Any],
        session: WorkerSession,
        out: asyncio.Queue[_Out],
        tasks: _SessionTasks,
    ) -> None:
        try:
            async for request in requests:
                session.seen()
                kind = request.WhichOneof("kind")
                if kind == "hello":
                    out.put_nowait(_StreamEnd(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "hello was already sent on this session: a session has exactly one "
                        "hello, its first message (open a new session to announce new tasks)"))
                    return
                if kind is None and not request.request_id:
                    out.put_nowait(_StreamEnd(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "empty SessionRequest (no kind and no request_id) on an open session"))
                    return
                if kind == "heartbeat":
                    tasks.start(self._engine.heartbeat(
                        session, list(request.heartbeat.active_lease_ids)))
                elif kind == "slots":
                    tasks.start(self._set_slots(session, request))
                elif kind in ("checkpoint", "complete", "release", "children"):
                    # Each in its own task: many in flight share one group commit.
                    tasks.start(self._answer(session, request, kind, out))
                else:
                    out.put_nowait(_ack(request.request_id, grpc.StatusCode.INVALID_ARGUMENT,
                                        f"unexpected message {kind!r} in a session"))
        except DecodeError as exc:
            out.put_nowait(_StreamEnd(grpc.StatusCode.INVALID_ARGUMENT, _undecodable(exc)))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            out.put_nowait(None)

    async def _answer(
        self,
        session: WorkerSession,
        request: Any,
        kind: str,
        out: asyncio.Queue[_Out],
    ) -> None:
        try:
            run_ids: list[str] = []
            if kind == "checkpoint":
                await self._checkpoint(session, request.checkpoint)
            elif kind == "children":
                c = request.children
                specs = [convert.trigger_spec(i.task_id, i.payload, i.options) for i in c.items]
                run_ids = await self._engine.trigger_children(
                    session, run_id=c.run_id, lease_id=c.lease_id, step_key=c.step_key,
                    specs=specs, wait=c.wait)
            elif kind == "complete":
                await self._complete(session, request.complete)
            else:
                await self._engine.release(session, run_id=request.release.run_id,
                                           lease_id=request.release.lease_id)
        except status.MAPPED as exc:
            out.put_nowait(_ack(request.request_id, code_for(exc), str(exc)))
        except Exception as exc:
            log.exception("session %s: %s failed", session.id, kind)
            out.put_nowait(_ack(request.request_id, grpc.StatusCode.INTERNAL,
                                f"{type(exc).__name__}: {exc}"))
        else:
            out.put_nowait(_ack(request.request_id, grpc.StatusCode.OK, "", run_ids))

    async def _checkpoint(self, session: WorkerSession, cp: Any) -> None:
        event = convert.STEP_EVENT_FROM_PB.get(cp.event)
        kind = convert.STEP_KIND_FROM_PB.get(cp.kind or 1)
        if event is None or kind is None:
            raise errors.InvalidArgument("checkpoint needs a known event and step kind")
        if cp.existing_token:
            if kind is not model.StepKind.TOKEN or event is not model.StepEvent.STARTED:
                raise errors.InvalidArgument("existing_token is for a STARTED token step")
            await self._engine.wait_on_token(
                session, run_id=cp.run_id, lease_id=cp.lease_id, key=cp.step_key,
                attempt=cp.attempt, retry_base=cp.retry_base, token_id=cp.token_id,
                started_at=convert.from_ts(cp.started_at, cp.HasField("started_at")),
                state=cp.state if cp.HasField("state") else None)
            return
        await self._engine.checkpoint(
            session, run_id=cp.run_id, lease_id=cp.lease_id, key=cp.step_key, kind=kind,
            event=event, attempt=cp.attempt, retry_base=cp.retry_base,
            output=cp.output if event is model.StepEvent.COMPLETED else None,
            error=convert.error_from_pb(cp.error) if cp.HasField("error") else None,
            started_at=convert.from_ts(cp.started_at, cp.HasField("started_at")),
            finished_at=convert.from_ts(cp.finished_at, cp.HasField("finished_at")),
            state=cp.state if cp.HasField("state") else None,
            wake_at=convert.from_ts(cp.wake_at, cp.HasField("wake_at")),
            retry_at=convert.from_ts(cp.retry_at, cp.HasField("retry_at")),
            wake_after=convert.from_dur(cp.wake_after, cp.HasField("wake_after")),
            retry_after=convert.from_dur(cp.retry_after, cp.HasField("retry_after")),
            token_id=cp.token_id or None)

    async def _complete(self, session: WorkerSession, c: Any) -> None:
        state = c.state if c.HasField("state") else None
        outcome = c.WhichOneof("outcome")
        if outcome == "succeeded":
            await self._engine.complete_success(
                session, run_id=c.run_id, lease_id=c.lease_id, output=c.succeeded.output,
                state=state)
        elif outcome == "failed":
            await self._engine.complete_failure(
                session, run_id=c.run_id, lease_id=c.lease_id,
                error=convert.error_from_pb(c.failed.error), state=state,
                retry_at=convert.from_ts(c.failed.retry_at, c.failed.HasField("retry_at")),
                retry_after=convert.from_dur(c.failed.retry_after,
                                             c.failed.HasField("retry_after")))
        elif outcome == "suspended":
            await self._engine.complete_suspended(
                session, run_id=c.run_id, lease_id=c.lease_id,
                step_keys=list(c.suspended.step_keys), state=state)
        else:
            raise errors.InvalidArgument("complete needs an outcome")


def _task_from_pb(env: str, pb: Any) -> model.TaskDef:
    """A hello is refused whole for one bad task; the message names it."""
    try:
        return convert.task_from_pb(env, pb)
    except errors.InvalidArgument as exc:
        if repr(pb.id) in str(exc):
            raise
        raise errors.InvalidArgument(f"task {pb.id!r}: {exc}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class _StreamEnd:
    """End the session's stream with this status (after what was queued before)."""

    code: grpc.StatusCode
    message: str


# What the session's writer sends: a message, the end with a status, or the
# end of the worker's side (None).
_Out = worker_pb2.SessionResponse | _StreamEnd | None


def _undecodable(exc: DecodeError) -> str:
    return (f"a SessionRequest could not be decoded ({exc}); the stream is ended because "
            "what follows cannot be trusted either: check the worker's generated stubs "
            "against protos/ratchet/v1")


def _ack(
    request_id: int, code: grpc.StatusCode, message: str, run_ids: Sequence[str] = ()
) -> worker_pb2.SessionResponse:
    return worker_pb2.SessionResponse(request_id=request_id, ack=worker_pb2.Ack(
        code=code.value[0], message=message, run_ids=list(run_ids)))


class _SessionTasks:
    """The tasks of one session, all cancelled when it ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __aenter__(self) -> _SessionTasks:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

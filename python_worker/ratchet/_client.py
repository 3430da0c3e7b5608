"""`ratchet.Client`: trigger runs and inspect them (async)."""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from ratchet._codec import (
    duration,
    event_from_pb,
    run_from_pb,
    task_info_from_pb,
    timestamp,
    to_json,
    token_from_pb,
    trigger_options,
    worker_from_pb,
)
from ratchet._errors import ClientError, RunFailedError, from_rpc_error
from ratchet._retry import Retry
from ratchet._session import CHANNEL_OPTIONS
from ratchet._task import Task
from ratchet._types import BatchItem, Run, RunEvent, RunStatus, TaskInfo, Token, WorkerInfo
from ratchet._worker import DEFAULT_COORDINATOR
from ratchet.v1 import common_pb2, run_pb2, run_pb2_grpc, system_pb2, system_pb2_grpc


class Client:
    """A connection to the coordinator's RunService.

    `coordinator` defaults to `$RATCHET_COORDINATOR` (else 127.0.0.1:7420) and
    `api_key` to `$RATCHET_API_KEY`. Use it as `async with ratchet.Client() as c:`
    or call `close()`. Coordinator errors raise `ratchet.ClientError` subclasses.
    """

    def __init__(self, coordinator: str | None = None, *, api_key: str | None = None,
                 timeout: float = 30.0) -> None:
        self.coordinator = coordinator or os.environ.get("RATCHET_COORDINATOR") \
            or DEFAULT_COORDINATOR
        key = api_key if api_key is not None else os.environ.get("RATCHET_API_KEY")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else None
        self._timeout = timeout
        self._channel = grpc.aio.insecure_channel(self.coordinator, options=CHANNEL_OPTIONS)
        self._runs = run_pb2_grpc.RunServiceStub(self._channel)
        self._system = system_pb2_grpc.SystemServiceStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def trigger(
        self,
        task: Task[Any, Any] | str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        idempotency_key_ttl: float | None = None,
        delay: float | None = None,
        ttl: float | None = None,
        priority: int = 0,
        queue: str | None = None,
        concurrency_key: str | None = None,
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        retry: Retry | None = None,
        max_duration: float | None = None,
    ) -> Run:
        """Start a run of `task` (a Task or its id). Returns it as created (QUEUED).

        With `idempotency_key`, a repeated trigger returns the first run
        (`run.created` is False) and starts nothing: that run keeps its own
        payload and options, whatever this call passed. Raises NotFoundError
        for a task no worker has registered, InvalidArgumentError for a payload that does not fit.
        `queue` and `concurrency_key` are not supported yet: a queue other than
        the task id, or any concurrency key, raises NotSupportedError (nothing
        is sent).
        """
        options = trigger_options(_task_id(task), idempotency_key, idempotency_key_ttl, delay,
                                  ttl, priority, queue, concurrency_key, tags, metadata, retry,
                                  max_duration)
        response = await self._call(self._runs.Trigger, run_pb2.TriggerRequest(
            task_id=_task_id(task), payload=to_json(payload), options=options))
        return run_from_pb(response.run, created=response.created)

    async def batch_trigger(
        self, task: Task[Any, Any] | str, payloads: Iterable[Any | BatchItem], *,
        tags: Sequence[str] = (), priority: int = 0,
    ) -> list[Run]:
        """Start one run per payload in one transaction (all or none; at most 1,000).

        An item may be a `ratchet.BatchItem(payload, idempotency_key=...)`:
        a key already in use returns the existing run (`created` False), as
        `trigger` does, so a batch sent twice creates each keyed run once.
        """
        items = []
        for p in payloads:
            item = p if isinstance(p, BatchItem) else BatchItem(p)
            options = trigger_options(_task_id(task), item.idempotency_key,
                                      item.idempotency_key_ttl, None, None, priority, None,
                                      None, tags, None, None, None)
            items.append(run_pb2.BatchTriggerItem(task_id=_task_id(task),
                                                  payload=to_json(item.payload), options=options))
        response = await self._call(self._runs.BatchTrigger,
                                    run_pb2.BatchTriggerRequest(items=items))
        return [run_from_pb(r.run, created=r.created) for r in response.results]

    async def get(self, run_id: str) -> Run:
        """The run with its steps. Raises NotFoundError."""
        response = await self._call(self._runs.GetRun, run_pb2.GetRunRequest(run_id=run_id))
        return run_from_pb(response.run, response.steps)

    async def list(
        self,
        *,
        status: RunStatus | str | Sequence[RunStatus | str] | None = None,
        task: Task[Any, Any] | str | None = None,
        tag: str | None = None,
        parent: str | None = None,
        error_type: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        include_discarded: bool = False,
        limit: int = 50,
        page_token: str = "",
        full: bool = False,
    ) -> tuple[list[Run], str]:
        """One page of runs, newest first, and the token of the next page ("" at the end).

        Runs are summaries: `payload` and `output` are None (use `get()`), unless
        `full` is true; a full page may hold fewer than `limit` runs, so that
        the reply stays under the message size limit.
        """
        statuses: Sequence[RunStatus | str] = (
            [] if status is None else [status] if isinstance(status, str) else status)
        codes: list[Any] = [_status_pb(s) for s in statuses]
        request = run_pb2.ListRunsRequest(
            statuses=codes,
            task_id="" if task is None else _task_id(task), tag=tag or "", page_size=limit,
            page_token=page_token, parent_run_id=parent or "", error_type=error_type or "",
            include_discarded=include_discarded,
            view=run_pb2.RUN_VIEW_FULL if full else run_pb2.RUN_VIEW_SUMMARY)
        if created_after is not None:
            request.created_after.CopyFrom(timestamp(created_after))
        if created_before is not None:
            request.created_before.CopyFrom(timestamp(created_before))
        response = await self._call(self._runs.ListRuns, request)
        return [run_from_pb(r) for r in response.runs], response.next_page_token

    async def stuck(self, limit: int = 100) -> builtins.list[tuple[Run, str]]:
        """Unfinished runs that nothing would move again, each with the reason
        (summaries; admin keys only). Each coordinator's reconciler repairs
        them within its interval; this only shows them."""
        response = await self._call(self._runs.ListStuckRuns,
                                    run_pb2.ListStuckRunsRequest(limit=limit))
        return [(run_from_pb(s.run), s.reason) for s in response.runs]

    async def cancel(self, run_id: str, reason: str = "") -> Run:
        """Cancel a run that is not final; its worker is told to stop."""
        response = await self._call(self._runs.CancelRun,
                                    run_pb2.CancelRunRequest(run_id=run_id, reason=reason))
        return run_from_pb(response.run)

    async def history(self, run_id: str) -> builtins.list[RunEvent]:
        """Every entry of the run's history, oldest first."""
        events: builtins.list[RunEvent] = []
        token = ""
        while True:
            response = await self._call(self._runs.GetRunHistory, run_pb2.GetRunHistoryRequest(
                run_id=run_id, page_size=1000, page_token=token))
            events += [event_from_pb(e) for e in response.events]
            token = response.next_page_token
            if not token:
                return events

    async def replay(self, run_id: str, *, from_scratch: bool = False,
                     rerun_compensated: bool = False) -> Run:
        """Give a run that ended without completing a new attempt from its last
        checkpoint (completed steps are kept; FAILED steps get a fresh budget of
        attempts), or with `from_scratch` start a new linked run with the same
        payload.

        A run whose compensations have run (`ctx.step(..., compensate=...)`)
        is refused with a `ClientError` (FAILED_PRECONDITION): replaying it
        could redo forward steps whose effects were undone. Start it over with
        `from_scratch`, or pass `rerun_compensated=True` to replay it anyway."""
        response = await self._call(self._runs.ReplayRun, run_pb2.ReplayRunRequest(
            run_id=run_id, from_scratch=from_scratch, rerun_compensated=rerun_compensated))
        return run_from_pb(response.run)

    async def discard(self, run_id: str) -> Run:
        """Hide a final run from listings (its history stays until retention)."""
        response = await self._call(self._runs.DiscardRun,
                                    run_pb2.DiscardRunRequest(run_id=run_id))
        return run_from_pb(response.run)

    async def retry(self, run_id: str, payload: Any) -> Run:
        """A new run of the same task with a corrected payload, linked to `run_id`."""
        response = await self._call(self._runs.RetryRun, run_pb2.RetryRunRequest(
            run_id=run_id, payload=to_json(payload)))
        return run_from_pb(response.run)

    async def complete_token(self, token_id: str, data: Any = None) -> bool:
        """Deliver `data` to the run waiting on a wait token and wake it.

        Returns False (and changes nothing) when the token was already
        completed or timed out. Raises NotFoundError for an unknown token.
        """
        completed, _ = await self._complete_token(token_id, data)
        return completed

    async def _complete_token(self, token_id: str, data: Any = None) -> tuple[bool, str]:
        """`complete_token`, with the coordinator's reason when nothing changed
        (the token completed or timed out before, or its run is final)."""
        response = await self._call(self._runs.CompleteToken, run_pb2.CompleteTokenRequest(
            token_id=token_id, data=to_json(data)))
        return bool(response.completed), response.message

    async def create_token(
        self, *, timeout: float | dt.timedelta | None = None, idempotency_key: str = "",
        tags: Sequence[str] = (),
    ) -> Token:
        """Create a wait token outside any run, to pass to a run as data.

        The run waits on it with `ctx.wait_for_token(token.id)`; complete it
        with `complete_token(token.id, data)` or by POSTing JSON to
        `token.url` (before or after the run starts waiting: data delivered
        first is handed to the run as soon as it waits). `timeout` counts
        from now; None = never. With `idempotency_key`, a second call
        returns the first token (same id and url). Raises
        InvalidArgumentError for a negative timeout or bad tags.
        """
        seconds = timeout.total_seconds() if isinstance(timeout, dt.timedelta) else timeout
        request = run_pb2.CreateTokenRequest(idempotency_key=idempotency_key, tags=list(tags))
        if seconds is not None:
            if seconds < 0:
                raise ValueError("a token timeout cannot be negative")
            request.timeout.CopyFrom(duration(seconds))
        response = await self._call(self._runs.CreateToken, request)
        return token_from_pb(response.token)

    async def get_token(self, token_id: str) -> Token:
        """A token created with `create_token`, with its completion URL.
        Raises NotFoundError if absent."""
        response = await self._call(self._runs.GetToken,
                                    run_pb2.GetTokenRequest(token_id=token_id))
        return token_from_pb(response.token)

    async def list_tokens(
        self, *, run_id: str | None = None,
        status: str | Iterable[str] | None = None, tags: Sequence[str] = (),
        limit: int = 50, page_token: str = "",
    ) -> tuple[builtins.list[Token], str]:
        """One page of tokens created with `create_token`, newest first, and the
        token of the next page ("" at the end). Filters: the run waiting on
        it, status ("WAITING", "COMPLETED", "TIMED_OUT"), tags (all of them).
        With `run_id`, every token that run waits or waited on, those it
        created itself (`ctx.create_token`, no tags) included; NotFoundError
        for an unknown run. Listed tokens carry no URL (`get_token` has it)."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        try:
            codes = [getattr(run_pb2, f"TOKEN_STATUS_{s.upper()}") for s in statuses]
        except AttributeError:
            raise ValueError(f"unknown token status in {statuses!r}; "
                             "use WAITING, COMPLETED or TIMED_OUT") from None
        response = await self._call(self._runs.ListTokens, run_pb2.ListTokensRequest(
            run_id=run_id or "", statuses=codes, tags=list(tags), page_size=limit,
            page_token=page_token))
        return [token_from_pb(t) for t in response.tokens], response.next_page_token

    async def tasks(self, task: Task[Any, Any] | str | None = None) -> builtins.list[TaskInfo]:
        """The tasks registered in the key's environment (only `task`, if
        given), in id order, with their schema and retry policy, and the
        sessions of the coordinator answering that serve each now."""
        response = await self._call(self._runs.ListTasks, run_pb2.ListTasksRequest(
            task_id="" if task is None else _task_id(task)))
        return [task_info_from_pb(t) for t in response.tasks]

    async def workers(self, task: Task[Any, Any] | str | None = None,
                      ) -> builtins.list[WorkerInfo]:
        """The worker sessions of the key's environment connected to the
        coordinator answering (only those serving `task`, if given), oldest
        first. Sessions are not stored: with several coordinators, ask each."""
        response = await self._call(self._runs.ListWorkers, run_pb2.ListWorkersRequest(
            task_id="" if task is None else _task_id(task)))
        return [worker_from_pb(w) for w in response.workers]

    async def wait(self, run_id: str, *, timeout: float | None = None) -> Run:
        """Wait until the run is final and return it (polling with backoff).

        Raises TimeoutError when `timeout` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            run = await self.get(run_id)
            if run.status.is_final:
                return run
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"run {run_id} is still {run.status} after {timeout}s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """The run's output once COMPLETED; raises RunFailedError for other final statuses."""
        run = await self.wait(run_id, timeout=timeout)
        if run.status is not RunStatus.COMPLETED:
            raise RunFailedError(run)
        return run.output

    async def version(self) -> dict[str, Any]:
        """What the coordinator is and speaks."""
        r = await self._call(self._system.GetVersion,
                             system_pb2.GetVersionRequest(client_protocol_version=1))
        return {"server_version": r.server_version, "protocol_version": r.protocol_version,
                "min_protocol_version": r.min_protocol_version, "features": list(r.features)}


def _task_id(task: Task[Any, Any] | str) -> str:
    return task if isinstance(task, str) else task.id


def _status_pb(status: RunStatus | str) -> int:
    try:
        name = RunStatus(str(status).upper()).value
    except ValueError:
        raise ClientError("INVALID_ARGUMENT", f"unknown run status {status!r}") from None
    return int(common_pb2.RunStatus.Value(f"RUN_STATUS_{name}"))

"""The engine's rules on an in-memory SQLite store: triggers, leases, retries, sessions."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import errors
from ratchet_server.engine.engine import (
    MAX_BATCH,
    CancelPush,
    Engine,
    EngineConfig,
    LeasePush,
    Session,
    TriggerSpec,
)
from ratchet_server.store import Store

pytestmark = pytest.mark.timeout(30)

ENV = "dev"
WAIT = 2.0  # seconds: the longest any single expectation may take

SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                     "required": ["n"]})


def task_def(task_id: str = "t", *, retry: Retry | None = None,
             payload_schema: str | None = None) -> model.TaskDef:
    return model.TaskDef(env=ENV, id=task_id, version="1", queue=task_id,
                         retry=retry or Retry(max_attempts=3, min_delay=30, max_delay=30),
                         payload_schema=payload_schema, output_schema=None, max_duration=None)


def spec(task_id: str = "t", payload: bytes = b'{"n": 1}', **kwargs: object) -> TriggerSpec:
    return TriggerSpec(task_id=task_id, payload=payload, **kwargs)  # type: ignore[arg-type]


async def stop(engine: Engine) -> None:
    await asyncio.wait_for(engine.stop(), 5.0)


async def trigger_one(engine: Engine, *args: object, **kwargs: object) -> model.Run:
    [(run, created)] = await engine.trigger(ENV, [spec(*args, **kwargs)])  # type: ignore[arg-type]
    assert created
    return run


async def open_session(engine: Engine, *tasks: model.TaskDef, slots: int = 4,
                       adopt: tuple[str, ...] = ()) -> Session:
    session, _ = await engine.open_session(ENV, "worker-1", list(tasks) or [task_def()], slots,
                                           list(adopt))
    return session


async def next_push(session: Session) -> model.LeasedRun:
    push = await asyncio.wait_for(session.outbox.get(), WAIT)
    assert isinstance(push, LeasePush), push
    return push.leased


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    async def poll() -> None:
        while not await check():  # noqa: ASYNC110 - the store offers no event to wait on
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def get(engine: Engine, run_id: str) -> model.Run:
    run, _ = await engine.get_run(ENV, run_id)
    return run


async def status_is(engine: Engine, run_id: str, status: model.RunStatus) -> None:
    async def check() -> bool:
        return (await get(engine, run_id)).status is status

    await eventually(check)


def failure(message: str = "boom", *, non_retryable: bool = False) -> model.ErrorInfo:
    return model.ErrorInfo(type="ValueError", message=message, non_retryable=non_retryable)


async def list_ids(engine: Engine) -> list[str]:
    runs, _ = await engine.list_runs(model.RunFilter(env=ENV), 1000, "")
    return [r.id for r in runs]


# --- lifecycle ------------------------------------------------------------------------


async def test_stop_right_after_a_wake_up_returns(store: Store) -> None:
    engine = Engine(store, EngineConfig())
    await engine.start()
    await engine.register_tasks([task_def()])
    await asyncio.sleep(0.05)  # the dispatcher is idle, waiting for a wake-up
    await trigger_one(engine)  # sets the wake-up event
    await asyncio.wait_for(engine.stop(), 2.0)


async def test_stop_when_idle_returns(store: Store) -> None:
    engine = Engine(store, EngineConfig())
    await engine.start()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await engine.stop()
    assert time.monotonic() - started < 1.0


# --- trigger --------------------------------------------------------------------------


async def test_trigger_of_an_unregistered_task_raises_not_found(engine: Engine) -> None:
    with pytest.raises(errors.NotFound, match="not registered"):
        await engine.trigger(ENV, [spec("nope")])
    await engine.register_tasks([task_def()])
    with pytest.raises(errors.NotFound):
        await engine.trigger("other-env", [spec()])


@pytest.mark.parametrize("payload", [b"{not json", b"", b"\xff\xfe", b"{} {}"])
async def test_non_json_payload_raises_invalid_argument(engine: Engine, payload: bytes) -> None:
    await engine.register_tasks([task_def()])
    with pytest.raises(errors.InvalidArgument, match="payload is not valid JSON"):
        await engine.trigger(ENV, [spec(payload=payload)])
    assert await list_ids(engine) == []


@pytest.mark.parametrize("payload", [b"NaN", b'{"x": Infinity}', b"[-Infinity]"])
async def test_non_standard_json_constants_raise_invalid_argument(
    engine: Engine, payload: bytes,
) -> None:
    await engine.register_tasks([task_def()])
    with pytest.raises(errors.InvalidArgument, match="payload is not valid JSON"):
        await engine.trigger(ENV, [spec(payload=payload)])


async def test_oversized_payload_raises_resource_exhausted(engine: Engine) -> None:
    await engine.register_tasks([task_def()])
    big = b'"' + b"x" * (1024 * 1024) + b'"'
    with pytest.raises(errors.ResourceExhausted, match="payload"):
        await engine.trigger(ENV, [spec(payload=big)])


async def test_schema_mismatch_raises_invalid_argument_and_creates_nothing(
    engine: Engine,
) -> None:
    await engine.register_tasks([task_def(payload_schema=SCHEMA)])
    with pytest.raises(errors.InvalidArgument, match="does not match the schema"):
        await engine.trigger(ENV, [spec(payload=b'{"n": "x"}')])
    # All or none: one bad payload in a batch creates none of the runs.
    with pytest.raises(errors.InvalidArgument, match=r"\(root\)"):
        await engine.trigger(ENV, [spec(payload=b'{"n": 1}'), spec(payload=b"{}")])
    assert await list_ids(engine) == []
    run = await trigger_one(engine, payload=b'{"n": 2}')
    assert await list_ids(engine) == [run.id]


async def test_register_rejects_an_invalid_schema(engine: Engine) -> None:
    with pytest.raises(errors.InvalidArgument, match="invalid JSON Schema"):
        await engine.register_tasks([task_def(payload_schema='{"type": 12}')])
    with pytest.raises(errors.InvalidArgument):
        await engine.register_tasks([task_def(payload_schema="{nope")])


async def test_batch_limits(engine: Engine) -> None:
    await engine.register_tasks([task_def()])
    with pytest.raises(errors.ResourceExhausted):
        await engine.trigger(ENV, [spec()] * (MAX_BATCH + 1))
    with pytest.raises(errors.InvalidArgument):
        await engine.trigger(ENV, [])
    assert await list_ids(engine) == []
    results = await engine.trigger(ENV, [spec()] * 3)
    assert len({r.id for r, _ in results}) == 3 and all(c for _, c in results)


async def test_trigger_options(engine: Engine) -> None:
    await engine.register_tasks([task_def()])
    before = time.time()
    run = await trigger_one(engine, delay=60.0, priority=9, tags=("a",), metadata={"k": "v"},
                            retry=Retry(max_attempts=9), queue="t")
    assert run.status is model.RunStatus.QUEUED and run.attempt == 0
    assert run.run_at >= before + 60 and run.priority == 9 and run.queue == "t"
    assert run.tags == ("a",) and run.metadata == {"k": "v"} and run.retry.max_attempts == 9
    with pytest.raises(errors.InvalidArgument, match="priority"):
        await engine.trigger(ENV, [spec(priority=1001)])


async def test_trigger_with_an_idempotency_key(engine: Engine) -> None:
    await engine.register_tasks([task_def()])
    first = await trigger_one(engine, idempotency_key="k")
    [(again, created)] = await engine.trigger(ENV, [spec(idempotency_key="k")])
    assert not created and again.id == first.id


# --- sessions and the dispatcher ------------------------------------------------------


async def test_open_session_and_dispatcher_push_a_lease(engine: Engine) -> None:
    session = await open_session(engine)
    run = await trigger_one(engine)
    leased = await next_push(session)
    assert leased.run.id == run.id and leased.run.attempt == 1 and leased.steps == ()
    assert leased.run.status is model.RunStatus.RUNNING
    assert leased.run.lease_owner == session.id and leased.run.lease_id in session.active
    assert session.free == 3


async def test_dispatcher_respects_free_slots(engine: Engine) -> None:
    session = await open_session(engine, slots=2)
    await engine.trigger(ENV, [spec()] * 3)
    first, second = await next_push(session), await next_push(session)
    assert session.free == 0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(session.outbox.get(), 0.2)
    await engine.complete_success(session, run_id=first.run.id, lease_id=str(first.run.lease_id),
                                  output=b"1", state=None)
    third = await next_push(session)
    assert len({first.run.id, second.run.id, third.run.id}) == 3


async def test_checkpoint_then_complete_success(engine: Engine) -> None:
    session = await open_session(engine)
    run = await trigger_one(engine)
    leased = (await next_push(session)).run
    lease_id = str(leased.lease_id)
    now = time.time()
    await engine.checkpoint(session, run_id=run.id, lease_id=lease_id, key="download",
                            kind=model.StepKind.RUN, event=model.StepEvent.COMPLETED, attempt=1,
                            retry_base=0, output=b'{"size": 3}', error=None, started_at=now,
                            finished_at=now, state=b'{"phase": 1}')
    await engine.complete_success(session, run_id=run.id, lease_id=lease_id,
                                  output=b'{"ok": true}', state=b'{"phase": 2}')
    done, steps = await engine.get_run(ENV, run.id)
    assert done.status is model.RunStatus.COMPLETED and done.output == '{"ok": true}'
    assert done.state == '{"phase": 2}' and done.attempt == 1 and done.finished_at
    [step] = steps
    assert step.key == "download" and step.status is model.StepStatus.COMPLETED
    assert step.output == '{"size": 3}'
    assert lease_id not in session.active
    types = [e["type"] for e in await engine.store.get_events(run.id)]
    assert types == ["triggered", "leased", "step_completed", "finished"]
    # A resent completion (after a reconnect) is acknowledged again.
    await engine.complete_success(session, run_id=run.id, lease_id=lease_id, output=b"1",
                                  state=None)


async def test_checkpoint_validation(engine: Engine) -> None:
    session = await open_session(engine)
    run = await trigger_one(engine)
    lease_id = str((await next_push(session)).run.lease_id)

    async def checkpoint(**kwargs: object) -> None:
        args: dict[str, object] = dict(
            run_id=run.id, lease_id=lease_id, key="s", kind=model.StepKind.RUN,
            event=model.StepEvent.STARTED, attempt=1, retry_base=0, output=None, error=None,
            started_at=time.time(), finished_at=None, state=None)
        args.update(kwargs)
        await engine.checkpoint(session, **args)  # type: ignore[arg-type]

    with pytest.raises(errors.InvalidArgument):
        await checkpoint(key="")
    with pytest.raises(errors.InvalidArgument):
        await checkpoint(attempt=0)
    with pytest.raises(errors.InvalidArgument, match="needs an error"):
        await checkpoint(event=model.StepEvent.RETRYING)
    with pytest.raises(errors.InvalidArgument, match="output is not valid JSON"):
        await checkpoint(event=model.StepEvent.COMPLETED, output=b"{")
    with pytest.raises(errors.InvalidArgument, match="state is not valid JSON"):
        await checkpoint(state=b"{")
    await checkpoint(event=model.StepEvent.RETRYING, error=failure())
    [step] = (await engine.get_run(ENV, run.id))[1]
    assert step.status is model.StepStatus.RUNNING and step.error == failure()


async def test_complete_failure_retries_after_the_backoff_then_fails(engine: Engine) -> None:
    retry = Retry(max_attempts=2, min_delay=0.3, max_delay=0.3)
    session = await open_session(engine, task_def(retry=retry))
    run = await trigger_one(engine)
    first = (await next_push(session)).run
    before = time.time()
    await engine.complete_failure(session, run_id=run.id, lease_id=str(first.lease_id),
                                  error=failure("one"), state=None)
    queued = await get(engine, run.id)
    assert queued.status is model.RunStatus.QUEUED and queued.attempt == 1
    assert queued.run_at >= before + 0.29
    assert queued.error is not None and queued.error.message == "one"
    assert queued.error.attempt == 1

    second = (await next_push(session)).run
    assert time.time() >= before + 0.29
    assert second.attempt == 2 and second.lease_id != first.lease_id
    await engine.complete_failure(session, run_id=run.id, lease_id=str(second.lease_id),
                                  error=failure("two"), state=None)
    failed = await get(engine, run.id)
    assert failed.status is model.RunStatus.FAILED and failed.attempt == 2
    assert failed.error is not None and failed.error.message == "two"
    types = [e["type"] for e in await engine.store.get_events(run.id)]
    assert types == ["triggered", "leased", "retry_scheduled", "leased", "finished"]


async def test_complete_failure_uses_the_task_retry_delay(engine: Engine) -> None:
    session = await open_session(engine)  # 30 s between attempts
    run = await trigger_one(engine)
    leased = (await next_push(session)).run
    before = time.time()
    await engine.complete_failure(session, run_id=run.id, lease_id=str(leased.lease_id),
                                  error=failure(), state=b'{"s": 1}')
    queued = await get(engine, run.id)
    assert queued.status is model.RunStatus.QUEUED and queued.run_at >= before + 29.9
    assert queued.state == '{"s": 1}'
    # Resent after a reconnect: already applied, so no error.
    await engine.complete_failure(session, run_id=run.id, lease_id=str(leased.lease_id),
                                  error=failure(), state=None)


async def test_non_retryable_failure_fails_at_once(engine: Engine) -> None:
    session = await open_session(engine, task_def(retry=Retry(max_attempts=5)))
    run = await trigger_one(engine)
    leased = (await next_push(session)).run
    await engine.complete_failure(session, run_id=run.id, lease_id=str(leased.lease_id),
                                  error=failure(non_retryable=True), state=None)
    failed = await get(engine, run.id)
    assert failed.status is model.RunStatus.FAILED and failed.attempt == 1
    assert failed.error is not None and failed.error.non_retryable


async def test_stale_lease_raises(engine: Engine) -> None:
    session = await open_session(engine)
    run = await trigger_one(engine)
    lease_id = str((await next_push(session)).run.lease_id)
    now = time.time()
    with pytest.raises(errors.StaleLease):
        await engine.checkpoint(session, run_id=run.id, lease_id="bogus", key="s",
                                kind=model.StepKind.RUN, event=model.StepEvent.STARTED,
                                attempt=1, retry_base=0, output=None, error=None,
                                started_at=now, finished_at=None, state=None)
    with pytest.raises(errors.StaleLease):
        await engine.complete_success(session, run_id=run.id, lease_id="bogus", output=b"1",
                                      state=None)
    with pytest.raises(errors.StaleLease):
        await engine.complete_failure(session, run_id=run.id, lease_id="bogus",
                                      error=failure(), state=None)
    with pytest.raises(errors.StaleLease):
        await engine.release(session, run_id=run.id, lease_id="bogus")
    assert (await get(engine, run.id)).status is model.RunStatus.RUNNING
    # A completion under a real lease, then a contradicting one: the second is stale.
    await engine.complete_success(session, run_id=run.id, lease_id=lease_id, output=b"1",
                                  state=None)
    with pytest.raises(errors.StaleLease):
        await engine.complete_failure(session, run_id=run.id, lease_id=lease_id,
                                      error=failure(), state=None)
    assert errors.StaleLease.__mro__[1] is errors.FailedPrecondition


async def test_close_session_releases_leases_after_the_grace(engine: Engine) -> None:
    session = await open_session(engine)
    run = await trigger_one(engine)
    leased = (await next_push(session)).run
    engine.close_session(session)
    engine.close_session(session)  # twice is harmless
    await status_is(engine, run.id, model.RunStatus.QUEUED)
    queued = await get(engine, run.id)
    # A lost lease is counted apart: the attempt is given back.
    assert queued.attempt == 0 and queued.lease_owner is None and queued.lease_losses == 1
    assert queued.error is not None and queued.error.type == "LeaseLost"
    events = await engine.store.get_events(run.id)
    assert events[-1]["type"] == "lease_lost"
    assert events[-1]["lease_id"] == leased.lease_id
    assert json.loads(events[-1]["data"])["lease_losses"] == 1

    # The next lease makes the same attempt again.
    other = await open_session(engine)
    assert (await next_push(other)).run.attempt == 1


async def test_a_lost_lease_does_not_fail_a_run_with_no_attempts_left(engine: Engine) -> None:
    session = await open_session(engine, task_def(retry=Retry(max_attempts=1)))
    run = await trigger_one(engine)
    await next_push(session)
    engine.close_session(session)
    await status_is(engine, run.id, model.RunStatus.QUEUED)
    queued = await get(engine, run.id)
    assert queued.attempt == 0 and queued.lease_losses == 1


async def test_a_reconnect_within_the_grace_adopts_the_lease(
    store: Store,
) -> None:
    engine = Engine(store, EngineConfig(session_grace=0.3, reap_interval=0.05))
    await engine.start()
    try:
        session = await open_session(engine, slots=1)
        run = await trigger_one(engine)
        lease_id = str((await next_push(session)).run.lease_id)
        engine.close_session(session)
        again, adopted = await engine.open_session(ENV, "worker-1", [task_def()], 1,
                                                   [lease_id, "bogus"])
        assert adopted == [lease_id] and lease_id in again.active
        await asyncio.sleep(0.5)  # past the grace of the closed session
        kept = await get(engine, run.id)
        assert kept.status is model.RunStatus.RUNNING and kept.lease_owner == again.id
        await engine.complete_success(again, run_id=run.id, lease_id=lease_id, output=b"2",
                                      state=None)
        assert (await get(engine, run.id)).status is model.RunStatus.COMPLETED
    finally:
        await stop(engine)


async def test_an_expired_lease_is_reaped_and_leased_again(store: Store) -> None:
    # The heartbeat interval stays long: a session silent for two intervals
    # is leased nothing, and this one never sends a heartbeat.
    engine = Engine(store, EngineConfig(lease_ttl=0.2, heartbeat_interval=5.0,
                                        reap_interval=0.02))
    await engine.start()
    try:
        session = await open_session(engine, slots=1)
        run = await trigger_one(engine)
        first = (await next_push(session)).run
        second = (await next_push(session)).run  # no heartbeat: the reaper took it back
        assert second.id == run.id and second.attempt == 1 and second.lease_losses == 1
        assert second.lease_id != first.lease_id
        types = [e["type"] for e in await engine.store.get_events(run.id)]
        assert "lease_lost" in types
    finally:
        await stop(engine)


async def test_heartbeat_keeps_a_lease_alive(store: Store) -> None:
    engine = Engine(store, EngineConfig(lease_ttl=0.3, heartbeat_interval=0.1,
                                        reap_interval=0.02))
    await engine.start()
    try:
        session = await open_session(engine, slots=1)
        run = await trigger_one(engine)
        leased = (await next_push(session)).run
        for _ in range(8):
            await engine.heartbeat(session, [str(leased.lease_id)])
            await asyncio.sleep(0.05)
        kept = await get(engine, run.id)
        assert kept.status is model.RunStatus.RUNNING and kept.lease_id == leased.lease_id
    finally:
        await stop(engine)


async def test_heartbeat_without_the_lease_lets_it_expire(store: Store) -> None:
    """A worker that lost track of a run cannot hold it by heartbeating."""
    engine = Engine(store, EngineConfig(lease_ttl=0.3, heartbeat_interval=0.1,
                                        reap_interval=0.02))
    await engine.start()
    try:
        session = await open_session(engine, slots=1)
        run = await trigger_one(engine)
        first = (await next_push(session)).run
        for _ in range(8):
            await engine.heartbeat(session, [])
            await asyncio.sleep(0.05)
        again = (await next_push(session)).run
        assert again.id == run.id and again.lease_id != first.lease_id and again.attempt == 1
    finally:
        await stop(engine)


async def test_undelivered_leases_go_back_without_costing_an_attempt(store: Store) -> None:
    engine = Engine(store, EngineConfig(session_grace=30.0))
    await engine.start()
    try:
        session = await open_session(engine, slots=1)
        run = await trigger_one(engine)
        await asyncio.wait_for(_until(lambda: not session.outbox.empty()), 5.0)
        engine.close_session(session)  # the push was never taken from the outbox

        async def requeued() -> bool:
            r = await get(engine, run.id)
            return r.status is model.RunStatus.QUEUED and r.attempt == 0

        await asyncio.wait_for(_until_async(requeued), 5.0)
    finally:
        await stop(engine)


async def _until(check: Any) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)


async def _until_async(check: Any) -> None:
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.01)


async def test_release_refunds_the_attempt(engine: Engine) -> None:
    session = await open_session(engine, slots=1)
    run = await trigger_one(engine)
    first = (await next_push(session)).run
    assert first.attempt == 1
    engine.set_slots(session, 0)
    await engine.release(session, run_id=run.id, lease_id=str(first.lease_id))
    released = await get(engine, run.id)
    assert released.status is model.RunStatus.QUEUED and released.attempt == 0
    assert released.error is None
    assert (await engine.store.get_events(run.id))[-1]["type"] == "lease_released"
    # Released twice (a resend) is fine.
    await engine.release(session, run_id=run.id, lease_id=str(first.lease_id))
    engine.set_slots(session, 1)
    again = (await next_push(session)).run
    assert again.attempt == 1


# --- cancel ----------------------------------------------------------------------------


async def test_cancel_a_queued_run(engine: Engine) -> None:
    await engine.register_tasks([task_def()])
    run = await trigger_one(engine)
    canceled = await engine.cancel(ENV, run.id, "no longer needed")
    assert canceled.status is model.RunStatus.CANCELED
    assert (await get(engine, run.id)).status is model.RunStatus.CANCELED


async def test_cancel_a_final_run_raises_failed_precondition(engine: Engine) -> None:
    await engine.register_tasks([task_def()])
    run = await trigger_one(engine)
    await engine.cancel(ENV, run.id)
    with pytest.raises(errors.FailedPrecondition, match="already CANCELED"):
        await engine.cancel(ENV, run.id)
    with pytest.raises(errors.NotFound):
        await engine.cancel(ENV, "run_missing")


async def test_cancel_a_running_run_tells_its_session(engine: Engine) -> None:
    session = await open_session(engine)
    run = await trigger_one(engine)
    lease_id = str((await next_push(session)).run.lease_id)
    await engine.cancel(ENV, run.id, "stop")
    push = await asyncio.wait_for(session.outbox.get(), WAIT)
    assert push == CancelPush(run_id=run.id, lease_id=lease_id, reason="stop")
    assert lease_id not in session.active
    with pytest.raises(errors.StaleLease):
        await engine.complete_success(session, run_id=run.id, lease_id=lease_id, output=b"1",
                                      state=None)
    assert (await get(engine, run.id)).status is model.RunStatus.CANCELED


# --- reads -----------------------------------------------------------------------------


async def test_get_run_of_a_missing_run_raises_not_found(engine: Engine) -> None:
    with pytest.raises(errors.NotFound):
        await engine.get_run(ENV, "run_missing")


async def test_list_runs_pages(engine: Engine) -> None:
    await engine.register_tasks([task_def()])
    await engine.trigger(ENV, [spec()] * 5)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        runs, token = await engine.list_runs(model.RunFilter(env=ENV), 2, token)
        seen += [r.id for r in runs]
        pages += 1
        if not token:
            break
    assert pages == 3 and len(set(seen)) == 5
    with pytest.raises(errors.InvalidArgument, match="page_token"):
        await engine.list_runs(model.RunFilter(env=ENV), 2, "garbage")

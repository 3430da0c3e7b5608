"""Review fixes to the first-hour engine work (issue 12), on SQLite and
Postgres: a cancel's reason is bounded; a run's own token reads as it can be
used (a canceled run's token is no longer WAITING, one past its timeout is
TIMED_OUT) and a status filter sees what the listing shows."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import errors, validate
from ratchet_server.engine.engine import Engine, Session, TriggerSpec
from ratchet_server.engine.ids import new_id
from ratchet_server.store import Store
from tests.engines import running_engine

pytestmark = pytest.mark.timeout(30)

ENV = "dev"


@pytest.fixture
async def engine(store: Store) -> AsyncIterator[Engine]:
    async with running_engine(store, stop_within=5.0, lease_ttl=30.0, timer_interval=60.0,
                              reconcile_interval=0) as e:
        yield e


async def leased(engine: Engine) -> tuple[Session, model.Run]:
    task = model.TaskDef(env=ENV, id="t", version="1", queue="t", retry=Retry(max_attempts=3),
                         payload_schema=None, output_schema=None, max_duration=None)
    s, _ = await engine.open_session(ENV, "w-" + secrets.token_hex(3), [task], 0, [])
    await engine.trigger(ENV, [TriggerSpec(task_id="t", payload=b"{}")])
    [item] = await engine.store.lease_ready(env=ENV, task_ids=("t",), limit=1, owner=s.id,
                                            nonce=new_id("n"), ttl=60.0)
    return s, item.run


async def own_token(engine: Engine, s: Session, run: model.Run, token_id: str,
                    key: str, wake_at: float | None = None) -> None:
    assert run.lease_id is not None
    await engine.checkpoint(s, run_id=run.id, lease_id=run.lease_id, key=key,
                            kind=model.StepKind.TOKEN, event=model.StepEvent.STARTED, attempt=1,
                            retry_base=0, output=None, error=None, started_at=time.time(),
                            finished_at=None, state=None, wake_at=wake_at, token_id=token_id)


async def listed(engine: Engine, run: model.Run,
                 *statuses: model.TokenStatus) -> dict[str, model.TokenStatus]:
    tokens, _ = await engine.list_tokens(
        model.TokenFilter(env=ENV, run_id=run.id, statuses=statuses), 50, "")
    return {t.id: t.status for t in tokens}


async def test_a_cancel_reason_over_the_limit_is_refused_and_changes_nothing(
        engine: Engine) -> None:
    _, run = await leased(engine)
    with pytest.raises(errors.InvalidArgument,
                       match=f"reason is {validate.MAX_REASON + 1} characters; "
                             f"at most {validate.MAX_REASON}"):
        await engine.cancel(ENV, run.id, "x" * (validate.MAX_REASON + 1))
    after = await engine.store.get_run(ENV, run.id)
    assert after is not None and after.status is model.RunStatus.RUNNING
    canceled = await engine.cancel(ENV, run.id, "y" * validate.MAX_REASON)
    assert canceled.status is model.RunStatus.CANCELED


async def test_a_canceled_runs_own_token_is_not_listed_as_waiting(engine: Engine) -> None:
    s, run = await leased(engine)
    await own_token(engine, s, run, "tok_own", "approve")
    assert await listed(engine, run, model.TokenStatus.WAITING) == {
        "tok_own": model.TokenStatus.WAITING}
    await engine.cancel(ENV, run.id, "withdrawn")
    assert await listed(engine, run, model.TokenStatus.WAITING) == {}
    assert await listed(engine, run) == {"tok_own": model.TokenStatus.TIMED_OUT}
    assert await listed(engine, run, model.TokenStatus.TIMED_OUT) == {
        "tok_own": model.TokenStatus.TIMED_OUT}
    completed, _, why = await engine.complete_token(ENV, "tok_own", b"1")
    assert not completed and why


async def test_a_runs_own_token_past_its_timeout_is_filtered_as_timed_out(
        engine: Engine) -> None:
    s, run = await leased(engine)
    # The timer that would time the step out has not fired (timer_interval 60 s).
    await own_token(engine, s, run, "tok_late", "late", wake_at=time.time() - 1)
    await own_token(engine, s, run, "tok_open", "open", wake_at=time.time() + 3600)
    assert await listed(engine, run, model.TokenStatus.WAITING) == {
        "tok_open": model.TokenStatus.WAITING}
    assert await listed(engine, run, model.TokenStatus.TIMED_OUT) == {
        "tok_late": model.TokenStatus.TIMED_OUT}


async def fail_and_lease_again(engine: Engine, s: Session, run: model.Run) -> model.Run:
    assert run.lease_id is not None
    await engine.complete_failure(s, run_id=run.id, lease_id=run.lease_id,
                                  error=model.ErrorInfo(type="E", message="boom"), state=None,
                                  retry_after=0)
    [item] = await engine.store.lease_ready(env=ENV, task_ids=("t",), limit=1, owner=s.id,
                                            nonce=new_id("n"), ttl=60.0)
    return item.run


async def canceled_event_attempt(engine: Engine, run: model.Run) -> int:
    events = await engine.store.get_events(run.id)
    [event] = [e for e in events if e["type"] == model.EventType.CANCELED.value]
    return int(event["attempt"])


async def test_a_woken_then_canceled_run_reads_its_last_attempt(engine: Engine) -> None:
    s, run = await leased(engine)
    run = await fail_and_lease_again(engine, s, run)
    assert run.attempt == 2 and run.lease_id is not None
    await own_token(engine, s, run, "tok_w", "approve")
    await engine.complete_suspended(s, run_id=run.id, lease_id=run.lease_id,
                                    step_keys=["approve"], state=None)
    completed, _, _ = await engine.complete_token(ENV, "tok_w", b"1")
    woken = await engine.store.get_run(ENV, run.id)
    assert completed and woken is not None and woken.status is model.RunStatus.QUEUED
    canceled = await engine.cancel(ENV, run.id, "")
    assert canceled.attempt == 2
    assert await canceled_event_attempt(engine, run) == 2


async def test_a_released_then_canceled_run_reads_its_last_attempt(engine: Engine) -> None:
    s, run = await leased(engine)
    assert run.lease_id is not None
    await engine.release(s, run_id=run.id, lease_id=run.lease_id, reason="draining")
    canceled = await engine.cancel(ENV, run.id, "")
    assert canceled.attempt == 1
    # The next attempt after a replay is counted from there.
    await engine.replay(ENV, run.id, from_scratch=False)
    [item] = await engine.store.lease_ready(env=ENV, task_ids=("t",), limit=1, owner=s.id,
                                            nonce=new_id("n"), ttl=60.0)
    assert item.run.attempt == 2

"""Tokens created outside runs (engine/tokens.py) on an in-memory SQLite store:
create (idempotent), get, list, a run's wait on one (before and after its
completion), completion by id and by URL secret, time-outs."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine import errors, policy
from ratchet_server.engine.engine import Engine, Session, TriggerSpec
from ratchet_server.engine.ids import new_id
from ratchet_server.store import Store
from tests.engines import running_engine

pytestmark = pytest.mark.timeout(30)

ENV = "dev"


@pytest.fixture
async def engine(store: Store) -> AsyncIterator[Engine]:
    async with running_engine(store, stop_within=5.0, lease_ttl=30.0, timer_interval=0.02,
                              reconcile_interval=0) as e:
        yield e


async def session(engine: Engine) -> Session:
    task = model.TaskDef(env=ENV, id="t", version="1", queue="t", retry=Retry(max_attempts=3),
                         payload_schema=None, output_schema=None, max_duration=None)
    s, _ = await engine.open_session(ENV, "w-" + secrets.token_hex(3), [task], 0, [])
    return s


async def leased(engine: Engine, s: Session) -> model.Run:
    await engine.trigger(ENV, [TriggerSpec(task_id="t", payload=b"{}")])
    [item] = await engine.store.lease_ready(env=ENV, task_ids=("t",), limit=1, owner=s.id,
                                            nonce=new_id("n"), ttl=60.0)
    return item.run


async def wait_on(engine: Engine, s: Session, run: model.Run, token_id: str,
                  key: str = "w") -> None:
    assert run.lease_id is not None
    await engine.wait_on_token(s, run_id=run.id, lease_id=run.lease_id, key=key, attempt=1,
                               retry_base=0, token_id=token_id, started_at=time.time(),
                               state=None)


async def suspend(engine: Engine, s: Session, run: model.Run, key: str = "w") -> None:
    assert run.lease_id is not None
    await engine.complete_suspended(s, run_id=run.id, lease_id=run.lease_id, step_keys=[key],
                                    state=None)


async def step(engine: Engine, run: model.Run, key: str = "w") -> model.Step:
    [found] = [st for st in await engine.store.get_steps(run.id) if st.key == key]
    return found


async def status(engine: Engine, run: model.Run) -> model.RunStatus:
    got = await engine.store.get_run(ENV, run.id)
    assert got is not None
    return got.status


async def create(engine: Engine, *, timeout: float | None = None, key: str = "",
                 tags: tuple[str, ...] = ()) -> tuple[model.Token, bool]:
    return await engine.create_token(ENV, timeout=timeout, idempotency_key=key, tags=tags)


async def test_the_same_idempotency_key_returns_the_same_token(engine: Engine) -> None:
    first, created = await create(engine, key="order-7", tags=("a",))
    again, created_again = await create(engine, key="order-7", timeout=5)
    other, _ = await create(engine, key="order-8")
    assert created and not created_again
    assert (again.id, again.secret, again.tags) == (first.id, first.secret, ("a",))
    assert other.id != first.id and other.secret != first.secret
    assert first.status is model.TokenStatus.WAITING and first.expires_at is None


async def test_bad_create_arguments_are_refused(engine: Engine) -> None:
    with pytest.raises(errors.InvalidArgument, match="timeout"):
        await create(engine, timeout=-1)
    with pytest.raises(errors.InvalidArgument, match="tags"):
        await create(engine, tags=("",))
    with pytest.raises(errors.InvalidArgument, match="idempotency_key"):
        await create(engine, key="k\x00")
    tokens, _ = await engine.list_tokens(model.TokenFilter(env=ENV), 10, "")
    assert tokens == []


async def test_get_and_list_with_filters_and_pages(engine: Engine) -> None:
    s = await session(engine)
    a, _ = await create(engine, tags=("red", "big"))
    b, _ = await create(engine, tags=("red",))
    c, _ = await create(engine, timeout=0)
    run = await leased(engine, s)
    await wait_on(engine, s, run, b.id)
    assert (await engine.get_token(ENV, a.id)).id == a.id
    with pytest.raises(errors.NotFound):
        await engine.get_token(ENV, "tok_nope")
    with pytest.raises(errors.NotFound):
        await engine.get_token("other-env", a.id)

    async def ids(**kw: object) -> list[str]:
        found, _ = await engine.list_tokens(model.TokenFilter(env=ENV, **kw),  # type: ignore[arg-type]
                                            50, "")
        return [t.id for t in found]

    assert await ids() == [c.id, b.id, a.id]
    assert await ids(run_id=run.id) == [b.id]
    assert await ids(tags=("red",)) == [b.id, a.id]
    assert await ids(tags=("red", "big")) == [a.id]
    assert await ids(statuses=(model.TokenStatus.TIMED_OUT,)) == [c.id]
    assert await ids(statuses=(model.TokenStatus.WAITING,)) == [b.id, a.id]
    await engine.complete_token(ENV, a.id, b'{"x": 1}')
    assert await ids(statuses=(model.TokenStatus.COMPLETED,)) == [a.id]
    page, more = await engine.list_tokens(model.TokenFilter(env=ENV), 2, "")
    rest, end = await engine.list_tokens(model.TokenFilter(env=ENV), 2, more)
    assert [t.id for t in page + rest] == [c.id, b.id, a.id] and end == ""


async def test_a_token_completed_before_the_wait_resumes_the_run_at_once(
        engine: Engine) -> None:
    s = await session(engine)
    token, _ = await create(engine)
    completed, run_id, _ = await engine.complete_token(ENV, token.id, b'{"approved": true}')
    assert completed and run_id == ""
    run = await leased(engine, s)
    await wait_on(engine, s, run, token.id)
    got = await step(engine, run)
    assert got.status is model.StepStatus.COMPLETED and got.output == '{"approved": true}'
    await suspend(engine, s, run)
    assert await status(engine, run) is model.RunStatus.QUEUED
    linked = await engine.get_token(ENV, token.id)
    assert (linked.run_id, linked.step_key) == (run.id, "w")


async def test_a_token_completed_during_the_wait_wakes_the_run(engine: Engine) -> None:
    s = await session(engine)
    token, _ = await create(engine)
    run = await leased(engine, s)
    await wait_on(engine, s, run, token.id)
    await suspend(engine, s, run)
    assert await status(engine, run) is model.RunStatus.WAITING
    assert (await step(engine, run)).token_id == token.id
    completed, run_id, _ = await engine.complete_token(ENV, token.id, b'"yes"')
    assert completed and run_id == run.id
    assert await status(engine, run) is model.RunStatus.QUEUED
    assert (await step(engine, run)).output == '"yes"'
    again = await engine.complete_token(ENV, token.id, b'"no"')
    assert again == (False, run.id, "the token was already completed; nothing changed")
    assert (await step(engine, run)).output == '"yes"'


async def test_a_token_wakes_one_run(engine: Engine) -> None:
    s = await session(engine)
    token, _ = await create(engine)
    first, second = await leased(engine, s), await leased(engine, s)
    await wait_on(engine, s, first, token.id)
    await wait_on(engine, s, first, token.id)  # a resent checkpoint is fine
    with pytest.raises(errors.InvalidArgument, match="already waited on by run"):
        await wait_on(engine, s, second, token.id)
    with pytest.raises(errors.InvalidArgument, match="not found"):
        await wait_on(engine, s, second, "tok_unknown")
    assert [st.key for st in await engine.store.get_steps(second.id)] == []


async def test_a_wait_under_a_stale_lease_changes_nothing(engine: Engine) -> None:
    s = await session(engine)
    token, _ = await create(engine)
    run = await leased(engine, s)
    with pytest.raises(errors.StaleLease):
        await engine.wait_on_token(s, run_id=run.id, lease_id="lease_old", key="w", attempt=1,
                                   retry_base=0, token_id=token.id, started_at=None,
                                   state=None)
    assert (await engine.get_token(ENV, token.id)).run_id is None


async def test_a_timed_out_token_step_is_timed_out_not_failed(engine: Engine) -> None:
    s = await session(engine)
    token, _ = await create(engine, timeout=0.2)
    run = await leased(engine, s)
    await wait_on(engine, s, run, token.id)
    await suspend(engine, s, run)
    deadline = time.monotonic() + 5
    while await status(engine, run) is not model.RunStatus.QUEUED:
        assert time.monotonic() < deadline, "the timer never woke the run"
        await asyncio.sleep(0.02)
    timed_out = await step(engine, run)
    assert timed_out.status is model.StepStatus.TIMED_OUT
    assert timed_out.error == policy.TOKEN_TIMEOUT
    assert policy.token_status(await engine.get_token(ENV, token.id), time.time()) is (
        model.TokenStatus.TIMED_OUT)
    completed, _, why = await engine.complete_token(ENV, token.id, b"1")
    assert not completed and why == "the token timed out; nothing changed"


async def test_a_token_past_its_timeout_before_the_wait_is_timed_out_at_once(
        engine: Engine) -> None:
    s = await session(engine)
    token, _ = await create(engine, timeout=0)
    run = await leased(engine, s)
    await wait_on(engine, s, run, token.id)
    assert (await step(engine, run)).status is model.StepStatus.TIMED_OUT


async def test_completion_by_url_needs_the_secret(engine: Engine) -> None:
    token, _ = await create(engine)
    with pytest.raises(errors.NotFound):
        await engine.complete_token_url(token.id, "wrong", b"1")
    with pytest.raises(errors.NotFound):
        await engine.complete_token_url("tok_nope", token.secret, b"1")
    with pytest.raises(errors.NotFound):
        await engine.complete_token_url("tok\x00", token.secret, b"1")
    with pytest.raises(errors.InvalidArgument):
        await engine.complete_token_url(token.id, token.secret, b"{not json")
    assert (await engine.get_token(ENV, token.id)).status is model.TokenStatus.WAITING
    done, why = await engine.complete_token_url(token.id, token.secret, b'{"n": 1}')
    assert done.completed and why == ""
    again, why = await engine.complete_token_url(token.id, token.secret, b'{"n": 2}')
    assert not again.completed and "already completed" in why
    assert (await engine.get_token(ENV, token.id)).data == '{"n": 1}'


async def test_in_run_tokens_still_complete_by_id(engine: Engine) -> None:
    s = await session(engine)
    run = await leased(engine, s)
    assert run.lease_id is not None
    await engine.checkpoint(s, run_id=run.id, lease_id=run.lease_id, key="w",
                            kind=model.StepKind.TOKEN, event=model.StepEvent.STARTED, attempt=1,
                            retry_base=0, output=None, error=None, started_at=time.time(),
                            finished_at=None, state=None, token_id="tok_inrun")
    completed, run_id, _ = await engine.complete_token(ENV, "tok_inrun", b"7")
    assert completed and run_id == run.id
    with pytest.raises(errors.NotFound):
        await engine.complete_token(ENV, "tok_neither", b"7")

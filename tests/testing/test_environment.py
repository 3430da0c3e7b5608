"""ratchet.testing: users' tasks in-process, with a clock the test moves."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import threading
import time
from typing import Any

import pydantic
import pytest

import ratchet
import ratchet.testing
from ratchet import _steps
from ratchet_server import clock

pytestmark = pytest.mark.timeout(30)

calls: dict[str, int] = {}


def count(name: str) -> int:
    calls[name] = calls.get(name, 0) + 1
    return calls[name]


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    calls.clear()


@ratchet.task(id="testing-nap")
async def nap(ctx: ratchet.Context, payload: Any) -> str:
    await ctx.step("before", count, "before")
    await ctx.sleep("nap", 86400)
    await ctx.step("after", count, "after")
    return "rested"


@ratchet.task(id="testing-approval")
async def approval(ctx: ratchet.Context, payload: Any) -> Any:
    token = await ctx.create_token("approve")
    return await ctx.wait_for_token(token)


def flaky() -> str:
    count("flaky")
    return "ok"


@ratchet.task(id="testing-flaky")
async def flaky_task(ctx: ratchet.Context, payload: Any) -> str:
    return await ctx.step("call", flaky, retry=ratchet.Retry(max_attempts=3, min_delay=30))


# New in each test that uses them (an Event belongs to one event loop).
release: asyncio.Event
entered: asyncio.Event


async def blocked() -> str:
    count("blocked")
    entered.set()
    await release.wait()
    return "released"


@ratchet.task(id="testing-crash")
async def crashing(ctx: ratchet.Context, payload: Any) -> list[Any]:
    first = await ctx.step("first", count, "first")
    second = await ctx.step("second", blocked)
    return [first, second]


class Order(pydantic.BaseModel):
    id: int
    items: list[str]


class Receipt(pydantic.BaseModel):
    order_id: int
    count: int


@ratchet.task(id="testing-typed")
async def typed(ctx: ratchet.Context, order: Order) -> Receipt:
    n = await ctx.step("count", len, order.items)
    return Receipt(order_id=order.id, count=n)


TASKS = [nap, approval, flaky_task, crashing, typed]


async def test_a_day_long_sleep_passes_in_under_a_second() -> None:
    async with ratchet.testing.Environment(TASKS) as env:
        began = time.monotonic()
        run = await env.trigger(nap)
        await env.advance(dt.timedelta(days=1))
        assert await env.result(run) == "rested"
        assert time.monotonic() - began < 1.0
        steps = await env.steps(run)
        assert [k for k in steps] == ["before", "nap", "after"]
        assert steps["nap"].status == "COMPLETED"
    assert calls == {"before": 1, "after": 1}
    assert clock.now() == pytest.approx(time.time(), abs=1.0)  # the clock is back


async def test_a_sleep_does_not_end_before_its_time() -> None:
    async with ratchet.testing.Environment(TASKS) as env:
        run = await env.trigger(nap)
        await env.advance(86400 - 60)
        await env.settle()
        assert (await env.run(run)).status is ratchet.RunStatus.WAITING
        await env.advance(60)
        assert await env.result(run) == "rested"


@ratchet.task(id="testing-long-naps")
async def long_naps(ctx: ratchet.Context, payload: Any) -> str:
    await ctx.sleep("hour", 3600)
    await ctx.sleep("day", 86400)
    return "done"


async def test_skip_time_moves_the_clock_to_each_due_time_and_no_further() -> None:
    async with ratchet.testing.Environment([long_naps]) as env:
        run = await env.trigger(long_naps)
        assert await env.result(run, skip_time=True, timeout=5) == "done"
        assert clock.now() - time.time() == pytest.approx(3600 + 86400, abs=5)


async def test_skip_time_does_not_end_a_token_wait_without_a_timeout() -> None:
    async with ratchet.testing.Environment(TASKS) as env:
        run = await env.trigger(approval)
        with pytest.raises(TimeoutError, match="WAITING"):
            await env.result(run, skip_time=True, timeout=0.3)


@ratchet.task(id="testing-short-nap")
async def short_nap(ctx: ratchet.Context, payload: Any) -> str:
    await ctx.sleep("blink", 3)  # under a production worker's sleep threshold
    return "awake"


async def test_a_short_sleep_follows_the_clock_too() -> None:
    async with ratchet.testing.Environment([short_nap]) as env:
        run = await env.trigger(short_nap)
        began = time.monotonic()
        await env.advance(3)
        assert await env.result(run) == "awake"
        assert time.monotonic() - began < 1.0


async def test_a_token_completed_through_the_environment() -> None:
    async with ratchet.testing.Environment(TASKS) as env:
        run = await env.trigger(approval)
        assert await env.complete_token(run, {"approved": True}, step="approve")
        assert await env.result(run) == {"approved": True}


async def test_a_token_completed_by_its_id() -> None:
    async with ratchet.testing.Environment(TASKS) as env:
        run = await env.trigger(approval)
        waiting = await env.wait_until(run, "WAITING")
        token_id = next(s.token_id for s in waiting.steps if s.key == "approve")
        assert await env.complete_token(token_id, "yes")
        assert await env.result(run) == "yes"


async def test_a_step_made_to_fail_on_its_first_attempt_succeeds_on_the_second() -> None:
    async with ratchet.testing.Environment(TASKS) as env:
        env.fail_step("call", on_attempt=1)
        run = await env.trigger(flaky_task)
        await env.advance(30)  # the backoff, on the coordinator's clock
        assert await env.result(run) == "ok"
        assert calls == {"flaky": 1}  # attempt 1 failed before the function ran
        step = (await env.steps(run))["call"]
        assert step.attempts == 2
        retried = [e for e in await env.history(run) if e.step_key == "call"]
        assert [e.type for e in retried][:1] == ["step_retrying"]
        assert "InjectedFault" in str(retried[0].data)
    assert _steps.fault_hook is None  # nothing left behind for production code


async def test_a_fault_given_as_an_error_fails_the_run_when_no_retry_is_left() -> None:
    async with ratchet.testing.Environment(TASKS) as env:
        for attempt in (1, 2, 3):
            env.fail_step("call", on_attempt=attempt, error=ConnectionError("down"))
        run = await env.trigger(flaky_task)
        with pytest.raises(ratchet.RunFailedError):  # after the step's and the run's retries
            await env.result(run, skip_time=True)
        failed = await env.run(run)
        assert failed.error is not None and "down" in failed.error.message
    assert calls == {}


async def test_after_a_crash_completed_steps_are_not_run_again() -> None:
    global release, entered
    release, entered = asyncio.Event(), asyncio.Event()
    async with ratchet.testing.Environment(TASKS) as env:
        run = await env.trigger(crashing)
        await entered.wait()  # inside the second step
        entered.clear()
        assert (await env.steps(run))["first"].status == "COMPLETED"
        await env.crash_worker()
        await env.restart_worker()
        await entered.wait()  # the second step runs again ...
        release.set()
        assert await env.result(run) == [1, "released"]
        assert calls == {"first": 1, "blocked": 2}  # ... the first does not
        assert (await env.run(run)).lease_losses == 1


async def test_a_typed_payload_and_output() -> None:
    async with ratchet.testing.Environment(TASKS) as env:
        run = await env.trigger(typed, Order(id=7, items=["a", "b"]))
        assert await env.result(run) == Receipt(order_id=7, count=2)


async def test_tasks_from_a_module_and_no_threads_left_behind() -> None:
    import tests.testing.test_environment as here

    before = {t.ident for t in threading.enumerate()}
    async with ratchet.testing.Environment([here]) as env:
        assert set(env.tasks) == {t.id for t in TASKS} | {long_naps.id, short_nap.id}
        assert await env.result(await env.trigger(typed, {"id": 1, "items": []})) == \
            Receipt(order_id=1, count=0)
    await asyncio.sleep(0.1)
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert left == []


async def test_settle_names_what_does_not_settle() -> None:
    global release, entered
    release, entered = asyncio.Event(), asyncio.Event()
    async with ratchet.testing.Environment(TASKS) as env:
        await env.trigger(crashing)
        with pytest.raises(TimeoutError, match="executing"):
            await env.settle(timeout=0.3)
        release.set()


async def test_one_environment_at_a_time() -> None:
    async with ratchet.testing.Environment(TASKS):
        with pytest.raises(RuntimeError, match="already open"):
            async with ratchet.testing.Environment(TASKS):
                pass


async def test_without_the_server_extra_the_error_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ratchet_server.app", None)
    with pytest.raises(ImportError, match=r"pip install 'ratchet\[server\]'"):
        async with ratchet.testing.Environment(TASKS):
            pass

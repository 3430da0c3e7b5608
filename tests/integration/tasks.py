"""Tasks the integration tests run in real worker processes.

Side effects are lines appended to files in the directory the payload names,
so tests can count how often each step really ran, and in which process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pydantic

import ratchet


def mark(directory: str, name: str) -> int:
    """Append this process's pid to directory/name; return how many lines it has now."""
    path = Path(directory) / name
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


class Work(pydantic.BaseModel):
    dir: str
    hold: float = 30.0


@ratchet.task(id="five-steps", retry=ratchet.Retry(max_attempts=5, min_delay=0.05))
async def five_steps(ctx: ratchet.Context, payload: Work) -> dict[str, Any]:
    """Step 3 blocks (in a thread) on its first execution, so a test can kill its worker."""
    done = []
    for i in range(1, 6):
        def step(i: int = i) -> int:
            n = mark(payload.dir, f"step{i}")
            if i == 3 and n == 1:
                time.sleep(payload.hold)
            return i
        done.append(await ctx.step(f"step{i}", step))
    return {"steps": done, "pid": os.getpid()}


@ratchet.task(id="silent", retry=ratchet.Retry(max_attempts=5, min_delay=0.05))
async def silent(ctx: ratchet.Context, payload: Work) -> dict[str, Any]:
    """Step two holds on its first execution, so a test can SIGSTOP its worker there."""
    await ctx.step("one", mark, payload.dir, "one")

    def two() -> int:
        n = mark(payload.dir, "two")
        if n == 1:
            time.sleep(payload.hold)
        return n

    await ctx.step("two", two)
    pid = await ctx.step("three", os.getpid)
    return {"pid": pid}


class Flaky(pydantic.BaseModel):
    dir: str
    failures: int = 2


@ratchet.task(id="flaky-step")
async def flaky_step(ctx: ratchet.Context, payload: Flaky) -> str:
    def call() -> str:
        n = mark(payload.dir, "flaky")
        if n <= payload.failures:
            raise ConnectionError(f"transient failure {n}")
        return f"ok after {n}"

    return await ctx.step("call", call, retry=ratchet.Retry(max_attempts=5, min_delay=0.05,
                                                            max_delay=0.2))


@ratchet.task(id="non-retryable", retry=ratchet.Retry(max_attempts=5, min_delay=0.05))
async def non_retryable(ctx: ratchet.Context, payload: dict[str, Any]) -> None:
    def refuse() -> None:
        mark(payload["dir"], "refuse")
        raise ratchet.NonRetryableError("the input can never work")

    await ctx.step("refuse", refuse, retry=ratchet.Retry(max_attempts=5, min_delay=0.05))


@ratchet.task(id="always-fails", retry=ratchet.Retry(max_attempts=3, min_delay=0.05,
                                                    max_delay=0.1))
async def always_fails(ctx: ratchet.Context, payload: dict[str, Any]) -> None:
    """A completed step, then a failure on every attempt: the task policy gives up."""
    await ctx.step("prepare", mark, payload["dir"], "prepare")
    n = mark(payload["dir"], "attempts")
    raise ValueError(f"bug on attempt {n}")


@ratchet.task(id="fails-once", retry=ratchet.Retry(max_attempts=3, min_delay=0.05))
async def fails_once(ctx: ratchet.Context, payload: dict[str, Any]) -> str:
    """Task-level retry: the first attempt fails after two completed steps."""
    await ctx.step("first", mark, payload["dir"], "first")
    await ctx.step("second", mark, payload["dir"], "second")
    ctx.state["seen"] = ctx.state.get("seen", 0) + 1
    if mark(payload["dir"], "attempts") == 1:
        raise RuntimeError("transient crash after two steps")
    return f"done on attempt {ctx.attempt}"


class Order(pydantic.BaseModel):
    order_id: str
    quantity: int = pydantic.Field(gt=0)


@ratchet.task(id="typed-order")
async def typed_order(ctx: ratchet.Context, payload: Order) -> dict[str, Any]:
    return {"order": payload.order_id, "quantity": payload.quantity}


class Slow(pydantic.BaseModel):
    dir: str
    steps: int = 4
    seconds: float = 0.3


@ratchet.task(id="slow-steps", retry=ratchet.Retry(max_attempts=10, min_delay=0.05))
async def slow_steps(ctx: ratchet.Context, payload: Slow) -> int:
    total = 0
    for i in range(payload.steps):
        def work(i: int = i) -> int:
            time.sleep(payload.seconds)
            mark(payload.dir, f"{ctx.run_id}-{i}")
            return i
        total += await ctx.step(f"s{i}", work)
    return total


@ratchet.task(id="huge-output", retry=ratchet.Retry(max_attempts=3, min_delay=0.05))
async def huge_output(ctx: ratchet.Context, payload: dict[str, Any]) -> str:
    """Returns more than the coordinator accepts (1 MiB)."""
    mark(payload["dir"], "attempts")
    return "x" * (1024 * 1024 + 10)


class Sleeper(pydantic.BaseModel):
    dir: str
    seconds: float = 30.0


@ratchet.task(id="sleeper")
async def sleeper(ctx: ratchet.Context, payload: Sleeper) -> dict[str, Any]:
    """A step, a long durable sleep, a step; values recorded once."""
    await ctx.step("before", mark, payload.dir, "before")
    started = await ctx.now()
    await ctx.sleep("nap", payload.seconds)
    await ctx.step("after", mark, payload.dir, "after")
    ended = await ctx.now()
    return {"slept": (ended - started).total_seconds(), "pid": os.getpid()}


@ratchet.task(id="three-sleeps")
async def three_sleeps(ctx: ratchet.Context, payload: dict[str, Any]) -> list[float]:
    """gather() of three suspending sleeps: the run ends after the longest."""
    import asyncio

    scale = payload.get("scale", 1.0)
    await asyncio.gather(*(ctx.sleep(f"s{n}", n * 10 * scale) for n in (1, 2, 3)))
    mark(payload["dir"], "done")
    return [n * 10 * scale for n in (1, 2, 3)]


class Approval(pydantic.BaseModel):
    dir: str
    timeout: float | None = None


@ratchet.task(id="approval")
async def approval(ctx: ratchet.Context, payload: Approval) -> dict[str, Any]:
    """Waits for a person: the token id is written to a file for the test."""
    token = await ctx.create_token("approve", timeout=payload.timeout)
    await ctx.step("announce", lambda: (Path(payload.dir) / "token").write_text(token))
    try:
        decision = await ctx.wait_for_token(token)
    except ratchet.TokenTimeoutError:
        mark(payload.dir, "timed-out")
        return {"approved": False, "timed_out": True}
    mark(payload.dir, "decided")
    return {"approved": True, "decision": decision}


@ratchet.task(id="busy")
async def busy(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """Short work, to show a sleeping run holds no slot."""
    return await ctx.step("work", mark, payload["dir"], "busy")


@ratchet.task(id="square")
async def square(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """A child: records itself, then returns n²; fails for negative n."""
    n = payload["n"]
    if payload.get("dir"):
        mark(payload["dir"], f"child-{n}")
    if n < 0:
        raise ratchet.NonRetryableError(f"negative: {n}")
    if payload.get("hold"):
        import asyncio

        await asyncio.sleep(payload["hold"])
    return n * n


@ratchet.task(id="fan-out", retry=ratchet.Retry(max_attempts=5, min_delay=0.05))
async def fan_out(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Fans out to `count` children and sums their results."""
    await ctx.step("before", mark, payload["dir"], "parent-before")
    results = await ctx.batch_trigger_and_wait(
        "square", [{"n": i, "dir": payload["dir"], "hold": payload.get("hold", 0)}
                   for i in range(payload["count"])])
    mark(payload["dir"], "parent-after")
    return {"count": len(results), "sum": sum(results), "first": results[:3]}


@ratchet.task(id="family")
async def family(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """One child awaited, one fired and forgotten, a failing one caught, all in gather()."""
    import asyncio

    fired = await ctx.trigger("square", {"n": 7})
    awaited, stepped, _ = await asyncio.gather(
        ctx.trigger_and_wait("square", {"n": 3}),
        ctx.step("local", lambda: 42),
        ctx.sleep("pause", 0.1),
    )
    try:
        await ctx.trigger_and_wait("square", {"n": -1}, name="bad-child")
        failed = None
    except ratchet.ChildRunFailedError as exc:
        failed = {"status": exc.status, "error": exc.error.message if exc.error else None}
    return {"fired": fired, "awaited": awaited, "stepped": stepped, "failed": failed}


@ratchet.task(id="cancellable")
async def cancellable(ctx: ratchet.Context, payload: dict[str, Any]) -> None:
    """Sync step code that polls ctx.cancelled and stops when told."""
    def work() -> None:
        mark(payload["dir"], "working")
        deadline = time.monotonic() + 30
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        mark(payload["dir"], "noticed" if ctx.cancelled else "gave-up")

    await ctx.step("work", work)


@ratchet.task(id="buggy", retry=ratchet.Retry(max_attempts=2, min_delay=0.05))
async def buggy(ctx: ratchet.Context, payload: dict[str, Any]) -> str:
    """Step three has a bug until the worker runs with RATCHET_TEST_FIXED=1. It
    has one attempt: FAILED, it stays failed on the second run attempt (its
    error is raised again, `three` is not called) until a replay."""
    await ctx.step("one", mark, payload["dir"], "one")
    await ctx.step("two", mark, payload["dir"], "two")

    def three() -> str:
        mark(payload["dir"], "three")
        if os.environ.get("RATCHET_TEST_FIXED") != "1":
            raise KeyError("the bug")
        return "fixed"

    return await ctx.step("three", three, retry=ratchet.NO_RETRY)


@ratchet.task(id="fails-twice", retry=ratchet.Retry(max_attempts=3, min_delay=0.05))
async def fails_twice(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    await ctx.step("prepare", mark, payload["dir"], "prepare")
    n = mark(payload["dir"], "attempts")
    if n <= 2:
        raise RuntimeError(f"transient failure {n}")
    return n


class Greeting(pydantic.BaseModel):
    name: str


@ratchet.task(id="greet")
async def greet(ctx: ratchet.Context, payload: Greeting) -> str:
    if not payload.name.strip():
        raise ratchet.NonRetryableError("empty name")
    return await ctx.step("hello", lambda: f"hello {payload.name}")


class Fetch(pydantic.BaseModel):
    url: str
    dir: str = ""
    attempts: int = 5


@ratchet.task(id="fetcher", retry=ratchet.Retry(max_attempts=1))
async def fetcher(ctx: ratchet.Context, payload: Fetch) -> dict[str, Any]:
    response = await ratchet.retry.fetch(
        payload.url, retry=ratchet.Retry(max_attempts=payload.attempts, min_delay=0.1,
                                         max_delay=10.0))
    return {"status": response.status_code, "body": response.json()}


async def _record_failure(ctx: ratchet.Context, error: ratchet.RunError) -> None:
    mark(ctx.state["dir"], "on_failure")


@ratchet.task(id="hooked", retry=ratchet.Retry(max_attempts=3, min_delay=0.05),
              on_failure=_record_failure)
async def hooked(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """Fails `fail` times; on_failure must run once if the run ends FAILED."""
    ctx.state["dir"] = payload["dir"]
    n = mark(payload["dir"], "attempts")
    if n <= payload["fail"]:
        raise RuntimeError(f"failure {n}")
    return n


async def _decide(ctx: ratchet.Context, error: ratchet.RunError) -> ratchet.Decision | None:
    mode = ctx.state.get("mode")
    if mode == "fail":
        return ratchet.Decision.fail()
    if mode == "later":
        return ratchet.Decision.retry_at(1.5)
    if mode == "replace":
        return ratchet.Decision.replace(ratchet.RunError(type="Upstream", message="replaced",
                                                         non_retryable=True))
    return None


@ratchet.task(id="catcher", retry=ratchet.Retry(max_attempts=3, min_delay=0.05),
              catch_error=_decide)
async def catcher(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    ctx.state["mode"] = payload["mode"]
    n = mark(payload["dir"], "attempts")
    if n < 2:
        raise RuntimeError(f"failure {n}")
    return n


class Flop(Exception):
    retry_after = 6.0  # longer than the worker's 5 s sleep threshold


@ratchet.task(id="retry-beside-work")
async def retry_beside_work(ctx: ratchet.Context, payload: dict[str, Any]) -> list[Any]:
    """One branch waits 6 s for a step retry while the other works for 8 s: the
    retry falls due before the run can suspend, and must not strand it."""
    import asyncio

    def flaky() -> str:
        if mark(payload["dir"], "flaky") == 1:
            raise Flop("try again later")
        return "ok"

    return list(await asyncio.gather(
        ctx.step("flaky", flaky, retry=ratchet.Retry(max_attempts=3, min_delay=0.1,
                                                      max_delay=30.0)),
        ctx.step("work", time.sleep, 8),
    ))

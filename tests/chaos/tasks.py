"""Tasks of the chaos suite, each with an outcome known from its payload.

Every step execution appends one line to `<dir>/runs/<run id>` (its side
effect): `key outcome pid attempt started finished`. The suite counts these
lines to find steps that ran again, and `expected()` says how every run must
end, so nothing about a run's fate is left to judgement after the faults.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import ratchet

# Kills no longer cost attempts (a lost lease gives its attempt back and counts
# towards max_lease_losses); runs expected to complete still get many attempts.
PATIENT = ratchet.Retry(max_attempts=200, min_delay=0.05, max_delay=0.5)
STEP_RETRY = ratchet.Retry(max_attempts=8, min_delay=0.05, max_delay=0.2)


def record(directory: str, run_id: str, key: str, outcome: str, attempt: int,
           started: float) -> None:
    """The side effect of one step execution: a line in the run's file (one write),
    naming the lease it ran under (a lost lease gives its attempt back, so the
    attempt alone no longer tells two leases apart)."""
    try:
        lease = ratchet.current_context()._lease_id
    except Exception:
        lease = "-"
    line = (f"{key} {outcome} {os.getpid()} {attempt} {started:.6f} {time.time():.6f} "
            f"{lease}\n")
    fd = os.open(Path(directory) / "runs" / run_id, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def executions(directory: str, run_id: str, key: str) -> int:
    """How many executions of `key` this run has recorded so far (any outcome)."""
    path = Path(directory) / "runs" / run_id
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.split(" ", 1)[0] == key)


async def work(ctx: ratchet.Context, directory: str, key: str, *, seconds: float = 0.05,
               fail_first: int = 0, fatal: bool = False,
               retry: ratchet.Retry | None = STEP_RETRY) -> int:
    """A step that sleeps `seconds` in a thread, fails its first `fail_first`
    executions (or every one, non-retryably, when `fatal`), and records each."""

    def body() -> int:
        started = time.time()
        n = executions(directory, ctx.run_id, key) + 1
        if fatal:
            time.sleep(seconds)
            record(directory, ctx.run_id, key, "fatal", ctx.attempt, started)
            raise ratchet.NonRetryableError(f"{key} can never work")
        if n <= fail_first:
            time.sleep(seconds)
            record(directory, ctx.run_id, key, "err", ctx.attempt, started)
            raise ConnectionError(f"{key}: transient failure {n}")
        # The side effect first, then more work before the checkpoint: a kill in
        # between is the one case in which a step may run again (guarantees §2).
        record(directory, ctx.run_id, key, "ok", ctx.attempt, started)
        time.sleep(seconds)
        return n

    return await ctx.step(key, body, retry=retry)


@ratchet.task(id="chaos-steps", retry=PATIENT)
async def chaos_steps(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Steps in sequence; step i fails its first `fails[i]` executions; a
    short in-process sleep between some. `fatal` names a step that fails the run."""
    d = payload["dir"]
    for i, fails in enumerate(payload["fails"]):
        await work(ctx, d, f"s{i}", seconds=payload.get("seconds", 0.05), fail_first=fails,
                   fatal=payload.get("fatal") == i)
        if i == 1:
            await ctx.sleep("short", 0.1)  # below the sleep threshold: in process
    return {"steps": len(payload["fails"])}


@ratchet.task(id="chaos-exhaust", retry=ratchet.Retry(max_attempts=2, min_delay=0.05))
async def chaos_exhaust(ctx: ratchet.Context, payload: dict[str, Any]) -> None:
    """A completed step, then a step that always fails: the run ends FAILED."""
    d = payload["dir"]
    await work(ctx, d, "prepare")
    await work(ctx, d, "doomed", fail_first=10**6,
               retry=ratchet.Retry(max_attempts=2, min_delay=0.05, max_delay=0.05))


@ratchet.task(id="chaos-sleeper", retry=PATIENT)
async def chaos_sleeper(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """A step, a durable sleep longer than the worker's threshold (it suspends), a step."""
    d = payload["dir"]
    await work(ctx, d, "before")
    started = await ctx.now()
    await ctx.sleep("nap", payload["seconds"])
    ended = await ctx.now()
    await work(ctx, d, "after")
    return {"slept": (ended - started).total_seconds()}


@ratchet.task(id="chaos-token", retry=PATIENT)
async def chaos_token(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Waits on a token the suite completes from outside (its id is published in
    `<dir>/tokens/<run id>`), or lets it time out when `complete` is false."""
    d = payload["dir"]
    token = await ctx.create_token("approval", timeout=payload.get("timeout"))

    def publish() -> None:
        started = time.time()
        (Path(d) / "tokens" / ctx.run_id).write_text(token)
        record(d, ctx.run_id, "publish", "ok", ctx.attempt, started)

    await ctx.step("publish", publish)
    try:
        data = await ctx.wait_for_token(token)
    except ratchet.TokenTimeoutError:
        await work(ctx, d, "after")
        return {"timed_out": True}
    await work(ctx, d, "after")
    return {"data": data}


@ratchet.task(id="chaos-child", retry=PATIENT)
async def chaos_child(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """A child: one step, an optional durable sleep; non-retryable failure when `fail`."""
    d = payload["dir"]
    await work(ctx, d, "work", seconds=0.02, fatal=bool(payload.get("fail")))
    if payload.get("sleep"):
        await ctx.sleep("nap", payload["sleep"])
    n = int(payload["n"])
    return n * n


@ratchet.task(id="chaos-parent", retry=PATIENT)
async def chaos_parent(ctx: ratchet.Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Fans out a batch of children, then one more child, and sums what came back."""
    d = payload["dir"]
    await work(ctx, d, "before")
    kids = [{"dir": d, "n": i, "fail": i in payload.get("fail", []),
             "sleep": payload.get("sleep", 0)} for i in range(payload["children"])]
    batch: Any
    try:
        batch = sum(await ctx.batch_trigger_and_wait("chaos-child", kids, name="batch",
                                                     tags=["step:batch"]))
    except ratchet.ChildRunFailedError:
        batch = "failed"
    single = await ctx.trigger_and_wait("chaos-child", {"dir": d, "n": 10}, name="single",
                                        tags=["step:single"])
    await work(ctx, d, "after")
    return {"batch": batch, "single": single}


@ratchet.task(id="chaos-gather", retry=PATIENT)
async def chaos_gather(ctx: ratchet.Context, payload: dict[str, Any]) -> list[Any]:
    """A token, a long sleep and a child awaited together: three waits of one suspension."""
    d = payload["dir"]
    token = await ctx.create_token("approval")

    def publish() -> None:
        started = time.time()
        (Path(d) / "tokens" / ctx.run_id).write_text(token)
        record(d, ctx.run_id, "publish", "ok", ctx.attempt, started)

    await ctx.step("publish", publish)
    results = await asyncio.gather(
        ctx.wait_for_token(token),
        ctx.sleep("nap", payload["seconds"]),
        ctx.trigger_and_wait("chaos-child", {"dir": d, "n": 3}, name="kid", tags=["step:kid"]),
    )
    await work(ctx, d, "after")
    return [results[0], results[2]]


TASKS: list[ratchet.Task[Any, Any]] = [
    chaos_steps, chaos_exhaust, chaos_sleeper, chaos_token, chaos_child, chaos_parent,
    chaos_gather]


def expected(task: str, payload: dict[str, Any]) -> tuple[str, Any]:
    """The final status and output a run of `task` must reach (output None: not checked)."""
    if task == "chaos-steps":
        if payload.get("fatal") is not None:
            return "FAILED", None
        return "COMPLETED", {"steps": len(payload["fails"])}
    if task == "chaos-exhaust":
        return "FAILED", None
    if task == "chaos-sleeper":
        return "COMPLETED", None  # the output's `slept` is checked against the payload
    if task == "chaos-token":
        if payload["complete"]:
            return "COMPLETED", {"data": payload["secret"]}
        return "COMPLETED", {"timed_out": True}
    if task == "chaos-child":
        return ("FAILED", None) if payload.get("fail") else ("COMPLETED", payload["n"] ** 2)
    if task == "chaos-parent":
        fails = payload.get("fail", [])
        batch = "failed" if fails else sum(i * i for i in range(payload["children"]))
        return "COMPLETED", {"batch": batch, "single": 100}
    if task == "chaos-gather":
        return "COMPLETED", [payload["secret"], 9]
    raise ValueError(task)

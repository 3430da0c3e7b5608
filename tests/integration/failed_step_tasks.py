"""Tasks for tests/integration/test_failed_steps.py: what a later run attempt
does with a FAILED step, and the saga trap it closes.

Each call of a step function appends a line to a file in the payload's
directory, so the tests count real calls across worker processes. The "bank"
is a JSON file of balances in that directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ratchet


def mark(directory: str, name: str) -> int:
    """Append this process's pid to directory/name; return how many lines it has now."""
    path = Path(directory) / name
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


FAST_RUNS = ratchet.Retry(max_attempts=3, min_delay=0.05, max_delay=0.05)
FAST_STEPS = ratchet.Retry(max_attempts=3, min_delay=0.05, max_delay=0.05)


def flaky(directory: str, failures: int) -> int:
    """Fails on its first `failures` calls (counted in the file), then returns the count."""
    n = mark(directory, "flaky")
    if n <= failures:
        raise ConnectionError(f"flaky call {n} failed")
    return n


async def _flaky_run(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    # One attempt per step: whether it runs again is the run policy's business.
    return await ctx.step("flaky", flaky, payload["dir"], payload["failures"],
                          retry=ratchet.NO_RETRY)


@ratchet.task(id="stays-failed", retry=FAST_RUNS)
async def stays_failed(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """The default: a FAILED step raises its error again on run attempts 2 and 3."""
    return await _flaky_run(ctx, payload)


@ratchet.task(id="reruns-failed",
              retry=ratchet.Retry(max_attempts=3, min_delay=0.05, max_delay=0.05,
                                  rerun_failed_steps=True))
async def reruns_failed(ctx: ratchet.Context, payload: dict[str, Any]) -> int:
    """rerun_failed_steps=True: a FAILED step gets a fresh budget on each run attempt."""
    return await _flaky_run(ctx, payload)


# --- the money-transfer saga, ported literally (Temporal's sample) ------------------------


def _bank(directory: str) -> Path:
    return Path(directory) / "bank.json"


def open_accounts(directory: str, balances: dict[str, int]) -> None:
    _bank(directory).write_text(json.dumps(balances))


def balances(directory: str) -> dict[str, int]:
    return dict(json.loads(_bank(directory).read_text()))


def _move(directory: str, account: str, amount: int) -> None:
    accounts = balances(directory)
    accounts[account] += amount
    _bank(directory).write_text(json.dumps(accounts))


def withdraw(directory: str, account: str, amount: int) -> None:
    mark(directory, "withdraw")
    _move(directory, account, -amount)


def deposit(directory: str, account: str, amount: int, failures: int) -> None:
    """The target bank is down for its first `failures` calls."""
    n = mark(directory, "deposit")
    if n <= failures:
        raise ConnectionError(f"deposit call {n}: the target bank is unavailable")
    _move(directory, account, amount)


def refund(directory: str, account: str, amount: int) -> None:
    mark(directory, "refund")
    _move(directory, account, amount)


@ratchet.task(id="transfer", retry=FAST_RUNS)
async def transfer(ctx: ratchet.Context, payload: dict[str, Any]) -> str:
    """Withdraw; deposit; if the deposit fails, refund and re-raise (no compensate=)."""
    d, amount = payload["dir"], payload["amount"]
    await ctx.step("withdraw", withdraw, d, "from", amount)
    try:
        await ctx.step("deposit", deposit, d, "to", amount, payload["deposit_failures"],
                       retry=FAST_STEPS)
    except ratchet.StepFailedError:
        await ctx.step("refund", refund, d, "from", amount)
        raise
    return "transferred"


def _refund_withdrawal(directory: str) -> Any:
    def undo(_output: Any) -> None:
        refund(directory, "from", 100)

    return undo


@ratchet.task(id="compensated-transfer", retry=FAST_RUNS)
async def compensated_transfer(ctx: ratchet.Context, payload: dict[str, Any]) -> str:
    """The same with compensate=: the withdrawal's undo is the refund."""
    d = payload["dir"]
    await ctx.step("withdraw", withdraw, d, "from", 100, compensate=_refund_withdrawal(d))
    await ctx.step("deposit", deposit, d, "to", 100, payload["deposit_failures"],
                   retry=ratchet.NO_RETRY)
    return "transferred"

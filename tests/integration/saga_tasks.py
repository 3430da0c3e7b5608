"""The money-transfer example (examples/money_transfer.py), served with its
worker killed (SIGKILL) at chosen points of the bank's operations, for
tests/integration/test_saga.py.

Each run dies once at the point its transfer's amount names
(`POINTS[amount % len(POINTS)]`): just before or just after an operation's
effect is committed to the bank, so also between an effect and its step's
checkpoint. A marker file in $SAGA_KILLS (one per run and point) makes it
once: the worker that takes the run over goes past that point.

Also tasks for finishing mode: a crash while compensating, and a run that
kills its worker every time (a finishing lease after the lease-loss bound).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import ratchet

ROOT = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location(
    "money_transfer", ROOT / "examples" / "money_transfer.py")
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
sys.modules["money_transfer"] = example
_spec.loader.exec_module(example)

POINTS = ("none", "before withdraw", "after withdraw", "before deposit", "after deposit",
          "before refund", "after refund")

_apply = example.apply


def point_of(amount: int) -> str:
    return POINTS[abs(amount) % len(POINTS)]


def _die_once(key: str, point: str) -> None:
    run_id = key.split(":", 1)[0]
    marker = Path(os.environ["SAGA_KILLS"]) / f"{run_id} {point}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def apply_or_die(key: str, kind: str, account: str, amount: int) -> example.Operation:
    point = point_of(amount)
    if point == f"before {kind}":
        _die_once(key, point)
    done = _apply(key, kind, account, amount)
    if point == f"after {kind}":
        _die_once(key, point)
    return done


example.apply = apply_or_die
money_transfer = example.money_transfer


# --- finishing mode ---------------------------------------------------------------------


def mark(directory: str, name: str) -> int:
    """Append this process's pid to directory/name; return how many lines it has now."""
    path = Path(directory) / name
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


async def _marked_failure(ctx: ratchet.Context, error: ratchet.RunError) -> None:
    mark(ctx.state["dir"], f"on_failure {error.type}")


@ratchet.task(id="crash-while-compensating", on_failure=_marked_failure)
async def crash_while_compensating(ctx: ratchet.Context, payload: dict[str, str]) -> None:
    """Fails after one compensable step unless the file `ok` exists; the undo
    kills its worker the first time. The test creates `ok` before the next
    worker starts: replayed, the code would go forward now, but the run is
    finishing: the step "forward" must not start."""
    d = payload["dir"]
    ctx.state["dir"] = d

    def undo(count: int) -> None:
        if mark(d, "undo") == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    await ctx.step("reserve", mark, d, "reserve", compensate=undo)
    if not (Path(d) / "ok").exists():
        raise ValueError("the reservation cannot be paid for")
    await ctx.step("forward", mark, d, "forward")


@ratchet.task(id="poison-saga", on_failure=_marked_failure,
              retry=ratchet.Retry(max_lease_losses=2))
async def poison_saga(ctx: ratchet.Context, payload: dict[str, str]) -> None:
    """Its second step kills its worker every time: after the lease-loss bound
    a finishing lease must run the first step's undo and the hook, once."""
    d = payload["dir"]
    ctx.state["dir"] = d

    def poison() -> None:
        mark(d, "poison")
        os.kill(os.getpid(), signal.SIGKILL)

    await ctx.step("reserve", mark, d, "reserve",
                   compensate=lambda count: mark(d, "undo"))
    await ctx.step("poison", poison)

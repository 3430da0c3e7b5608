"""`ctx.step(..., executor="process")`: the step runs in a child process."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ratchet import Context, NonRetryableError, Retry, StepFailedError
from ratchet._process import ProcessPool, reference
from ratchet.v1 import worker_pb2

pytestmark = pytest.mark.timeout(60)


def pid_plus(n: int) -> dict[str, int]:
    return {"pid": os.getpid(), "n": n + 1}


def refuses(message: str) -> None:
    raise NonRetryableError(message)


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")
        self.lock = threading.Lock()


def raises_unpicklable() -> None:
    raise Unpicklable(1, 2)


def dies() -> None:
    os._exit(3)


class Journal:
    def __init__(self) -> None:
        self.checkpoints: list[worker_pb2.Checkpoint] = []

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None:
        self.checkpoints.append(checkpoint)

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]:
        raise AssertionError("not used")


@pytest.fixture(scope="module")
def pool() -> Any:
    p = ProcessPool(max_workers=1)
    yield p
    p.shutdown()


@pytest.fixture
async def ctx(pool: ProcessPool) -> AsyncIterator[Context]:
    yield Context(run_id="run_1", task_id="t", attempt=1, lease_id="lease-1", steps={},
                  state={}, journal=Journal(), processes=pool)


def test_only_what_a_fresh_interpreter_can_find_is_sent() -> None:
    async def coro() -> None: ...

    def local() -> None: ...

    for fn in (lambda: None, local, coro):
        with pytest.raises(TypeError):
            reference(fn)
    ref = reference(pid_plus)
    assert ref.module == __name__ and ref.qualname == "pid_plus"  # type: ignore[union-attr]
    assert reference(functools.partial(pid_plus, 1)) is not None  # pickled as it is
    with pytest.raises(TypeError, match="cannot be sent"):
        reference(functools.partial(local))


async def test_a_process_step_runs_in_another_process(ctx: Context) -> None:
    result = await ctx.step("p", pid_plus, 41, executor="process")
    assert result["n"] == 42 and result["pid"] != os.getpid()
    [cp] = ctx._steps.journal.checkpoints  # type: ignore[attr-defined]
    assert cp.event == worker_pb2.STEP_EVENT_COMPLETED


async def test_errors_come_back_with_their_type_and_retry_intent(ctx: Context) -> None:
    with pytest.raises(StepFailedError) as info:
        await ctx.step("p", refuses, "no", executor="process",
                       retry=Retry(max_attempts=3, min_delay=0, max_delay=0))
    assert info.value.error.type == "ratchet.NonRetryableError"
    assert info.value.error.non_retryable and info.value.attempts == 1
    assert "refuses" in info.value.error.stack  # the child's traceback


async def test_an_exception_that_cannot_cross_back_is_described(ctx: Context) -> None:
    with pytest.raises(StepFailedError) as info:
        await ctx.step("p", raises_unpicklable, executor="process")
    assert "Unpicklable: 1/2" in info.value.error.message
    # The pool still works.
    assert (await ctx.step("q", pid_plus, 1, executor="process"))["n"] == 2


async def test_bad_uses_fail_before_anything_is_recorded(ctx: Context) -> None:
    with pytest.raises(ValueError, match="executor"):
        await ctx.step("p", pid_plus, 1, executor="fiber")
    with pytest.raises(TypeError, match="module-level"):
        await ctx.step("q", lambda: 1, executor="process")
    bare = Context(run_id="r", task_id="t", attempt=1, lease_id="l", steps={}, state={},
                   journal=Journal())
    with pytest.raises(RuntimeError, match="Worker"):
        await bare.step("p", pid_plus, 1, executor="process")
    assert ctx._steps.journal.checkpoints == []  # type: ignore[attr-defined]


async def test_a_child_that_dies_fails_its_step_and_the_pool_starts_again(
    ctx: Context
) -> None:
    with pytest.raises(StepFailedError) as info:
        await ctx.step("p", dies, executor="process")
    assert info.value.error.type.endswith("BrokenProcessPool")
    assert (await ctx.step("q", pid_plus, 1, executor="process"))["n"] == 2

"""`ctx.step`: replay, step keys, retries and their checkpoints, with a fake journal."""

from __future__ import annotations

import threading
import time
from typing import Any

import pydantic
import pytest

from ratchet import NO_RETRY, Context, NonRetryableError, Retry, StepFailedError
from ratchet.v1 import common_pb2, worker_pb2

pytestmark = pytest.mark.timeout(10)

RUN_ID = "run_1"
FAST = Retry(max_attempts=3, min_delay=0.0, max_delay=0.0)


class Journal:
    """Records checkpoints as the coordinator would receive them."""

    def __init__(self) -> None:
        self.checkpoints: list[worker_pb2.Checkpoint] = []

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None:
        self.checkpoints.append(checkpoint)

    def events(self) -> list[tuple[str, int, int]]:
        """(event name, attempt, retry_base) of each checkpoint."""
        return [(worker_pb2.StepEvent.Name(c.event).removeprefix("STEP_EVENT_"), c.attempt,
                 c.retry_base) for c in self.checkpoints]


def make_ctx(journal: Journal, steps: dict[str, common_pb2.Step] | None = None,
             state: dict[str, Any] | None = None, *,
             rerun_failed_steps: bool = False) -> Context:
    return Context(run_id=RUN_ID, task_id="t", attempt=1, lease_id="lease-1",
                   steps=steps or {}, state=state if state is not None else {},
                   journal=journal, rerun_failed_steps=rerun_failed_steps)


def record(key: str, status: int, *, attempts: int = 1, retry_base: int = 0,
           output: bytes = b"", error: common_pb2.ErrorInfo | None = None) -> common_pb2.Step:
    return common_pb2.Step(key=key, kind=common_pb2.STEP_KIND_RUN, status=status,  # type: ignore[arg-type]
                           attempts=attempts, retry_base=retry_base, output=output,
                           error=error)


class Flaky:
    """Fails `failures` times with `exc`, then returns `value`."""

    def __init__(self, failures: int, value: Any = "ok",
                 exc: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.value = value
        self.exc = exc
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"failure {self.calls}")
        return self.value


class Doc(pydantic.BaseModel):
    title: str
    pages: int


async def make_doc(title: str) -> Doc:
    return Doc(title=title, pages=3)


def make_doc_sync(title: str) -> Doc:
    return Doc(title=title, pages=4)


async def make_docs() -> list[Doc]:
    return [Doc(title="a", pages=1)]


# --- replay and keys ---------------------------------------------------------------------


async def test_a_completed_step_is_not_called_again() -> None:
    journal = Journal()
    ctx = make_ctx(journal, {"fetch": record("fetch", common_pb2.STEP_STATUS_COMPLETED,
                                             output=b'{"v": 42}')})
    calls = 0

    async def fetch() -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"v": 0}

    assert await ctx.step("fetch", fetch) == {"v": 42}
    assert calls == 0 and journal.checkpoints == []
    # The second use of the name is a new step, so it runs.
    assert await ctx.step("fetch", fetch) == {"v": 0}
    assert calls == 1 and journal.events() == [("COMPLETED", 1, 0)]
    assert journal.checkpoints[0].step_key == "fetch#2"


async def test_a_completed_step_with_empty_output_replays_as_none() -> None:
    ctx = make_ctx(Journal(), {"s": record("s", common_pb2.STEP_STATUS_COMPLETED)})

    async def never() -> Any:
        raise AssertionError("called")

    assert await ctx.step("s", never) is None


async def test_step_keys_number_repeated_names() -> None:
    journal = Journal()
    ctx = make_ctx(journal)

    async def one() -> int:
        return 1

    for _ in range(3):
        await ctx.step("a", one)
    await ctx.step("b", one)
    assert [c.step_key for c in journal.checkpoints] == ["a", "a#2", "a#3", "b"]
    assert all(c.run_id == RUN_ID and c.lease_id == "lease-1" for c in journal.checkpoints)
    assert all(c.kind == common_pb2.STEP_KIND_RUN for c in journal.checkpoints)


@pytest.mark.parametrize("name", ["a#b", "#", "a#2", ""])
async def test_bad_step_names_raise_value_error(name: str) -> None:
    ctx = make_ctx(Journal())

    async def one() -> int:
        return 1

    with pytest.raises(ValueError, match="must not contain '#'"):
        await ctx.step(name, one)


async def test_a_bad_name_does_not_shift_later_keys() -> None:
    journal = Journal()
    ctx = make_ctx(journal)

    async def one() -> int:
        return 1

    with pytest.raises(ValueError):
        await ctx.step("a#b", one)
    await ctx.step("a", one)
    assert journal.checkpoints[0].step_key == "a"


# --- success and failure ------------------------------------------------------------------


async def test_a_successful_step_records_one_completed_checkpoint() -> None:
    journal = Journal()
    ctx = make_ctx(journal)

    async def add(a: int, b: int = 0) -> int:
        return a + b

    assert await ctx.step("add", add, 2, b=3) == 5
    [cp] = journal.checkpoints
    assert cp.event == worker_pb2.STEP_EVENT_COMPLETED and cp.output == b"5"
    assert cp.attempt == 1 and cp.retry_base == 0 and not cp.HasField("error")
    assert cp.HasField("started_at") and cp.HasField("finished_at")
    assert cp.finished_at.ToNanoseconds() >= cp.started_at.ToNanoseconds()
    assert not cp.HasField("retry_at")


async def test_without_retry_a_step_retries_per_the_default_policy() -> None:
    # Retry(): 3 attempts, the first wait 1 s (short: it stays in process).
    journal = Journal()
    ctx = make_ctx(journal)
    flaky = Flaky(1)
    started = time.monotonic()
    assert await ctx.step("s", flaky) == "ok"
    assert time.monotonic() - started >= 0.95
    assert flaky.calls == 2 and journal.events() == [("RETRYING", 1, 0), ("COMPLETED", 2, 0)]


async def test_no_retry_fails_the_step_at_once() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    flaky = Flaky(1)
    with pytest.raises(StepFailedError) as info:
        await ctx.step("s", flaky, retry=NO_RETRY)
    assert flaky.calls == 1 and journal.events() == [("FAILED", 1, 0)]
    assert info.value.step_key == "s" and info.value.attempts == 1
    assert info.value.error.type == "ConnectionError"
    assert isinstance(info.value.__cause__, ConnectionError)


async def test_a_retry_policy_retries_with_checkpoints_then_completes() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    flaky = Flaky(2, value={"ok": True})
    assert await ctx.step("s", flaky, retry=FAST) == {"ok": True}
    assert flaky.calls == 3
    assert journal.events() == [("RETRYING", 1, 0), ("RETRYING", 2, 0), ("COMPLETED", 3, 0)]
    first, second, done = journal.checkpoints
    assert first.error.type == "ConnectionError" and first.error.message == "failure 1"
    assert first.error.attempt == 1 and first.error.step_key == "s"
    assert second.error.message == "failure 2" and second.error.attempt == 2
    assert not first.HasField("retry_at") and not done.HasField("error")
    assert done.output == b'{"ok":true}'


async def test_short_retry_waits_stay_in_process_without_retry_at() -> None:
    """A wait up to the sleep threshold sends no retry_at: the coordinator keeps
    no timer for it (long waits suspend the run; see test_fetch.py)."""
    journal = Journal()
    ctx = make_ctx(journal)
    policy = Retry(max_attempts=3, min_delay=0.01, factor=2.0, max_delay=1.0)
    started = time.monotonic()
    await ctx.step("s", Flaky(2), retry=policy)
    assert time.monotonic() - started >= 0.03  # waited 0.01 s, then 0.02 s
    first, second, _ = journal.checkpoints
    assert not first.HasField("retry_at") and not second.HasField("retry_at")


async def test_exhausting_the_retries_raises_step_failed_with_a_failed_checkpoint() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    flaky = Flaky(10)
    with pytest.raises(StepFailedError) as info:
        await ctx.step("s", flaky, retry=FAST)
    assert flaky.calls == 3 and info.value.attempts == 3
    assert journal.events() == [("RETRYING", 1, 0), ("RETRYING", 2, 0), ("FAILED", 3, 0)]
    assert journal.checkpoints[-1].error.message == "failure 3"
    assert not journal.checkpoints[-1].HasField("retry_at")


async def test_non_retryable_error_fails_at_once() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    flaky = Flaky(10, exc=NonRetryableError)
    with pytest.raises(StepFailedError) as info:
        await ctx.step("s", flaky, retry=FAST)
    assert flaky.calls == 1 and journal.events() == [("FAILED", 1, 0)]
    assert info.value.error.non_retryable and journal.checkpoints[0].error.non_retryable
    assert info.value.error.type == "ratchet.NonRetryableError"


async def test_an_error_with_non_retryable_attribute_fails_at_once() -> None:
    class Permanent(Exception):
        non_retryable = True

    journal = Journal()
    flaky = Flaky(10, exc=Permanent)
    with pytest.raises(StepFailedError):
        await make_ctx(journal).step("s", flaky, retry=FAST)
    assert flaky.calls == 1


async def test_cancellation_is_not_retried_or_recorded() -> None:
    import asyncio

    journal = Journal()
    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await make_ctx(journal).step("s", cancelled, retry=FAST)
    assert calls == 1 and journal.checkpoints == []


# --- resuming a step after a crash ------------------------------------------------------------


async def test_a_running_step_keeps_counting_its_attempts() -> None:
    # The worker died mid-backoff after two failed attempts: only one is left.
    journal = Journal()
    ctx = make_ctx(journal, {"s": record("s", common_pb2.STEP_STATUS_RUNNING, attempts=2,
                                         retry_base=0)})
    flaky = Flaky(10)
    with pytest.raises(StepFailedError) as info:
        await ctx.step("s", flaky, retry=FAST)
    assert flaky.calls == 1 and info.value.attempts == 3
    assert journal.events() == [("FAILED", 3, 0)]


async def test_a_running_step_keeps_its_retry_base() -> None:
    journal = Journal()
    ctx = make_ctx(journal, {"s": record("s", common_pb2.STEP_STATUS_RUNNING, attempts=4,
                                         retry_base=3)})
    flaky = Flaky(10)
    with pytest.raises(StepFailedError):
        await ctx.step("s", flaky, retry=FAST)
    assert flaky.calls == 2
    assert journal.events() == [("RETRYING", 5, 3), ("FAILED", 6, 3)]


async def test_a_failed_step_raises_its_recorded_error_again() -> None:
    # It failed in an earlier run attempt: by default it stays failed, and its
    # function is not called again.
    journal = Journal()
    error = common_pb2.ErrorInfo(type="ValueError", message="no such account", step_key="s",
                                 attempt=3)
    ctx = make_ctx(journal, {"s": record("s", common_pb2.STEP_STATUS_FAILED, attempts=3,
                                         error=error)})
    flaky = Flaky(0, value=7)
    with pytest.raises(StepFailedError) as info:
        await ctx.step("s", flaky, retry=FAST)
    assert flaky.calls == 0 and journal.checkpoints == []
    assert info.value.step_key == "s" and info.value.attempts == 3
    assert info.value.error.type == "ValueError"
    assert info.value.error.message == "no such account"
    # The same without a retry policy, and without a recorded error.
    ctx = make_ctx(journal, {"s": record("s", common_pb2.STEP_STATUS_FAILED, attempts=1)})
    with pytest.raises(StepFailedError) as info:
        await ctx.step("s", flaky)
    assert flaky.calls == 0 and journal.checkpoints == []
    assert info.value.error.step_key == "s"


async def test_a_failed_step_gets_a_fresh_budget_with_rerun_failed_steps() -> None:
    # It failed in an earlier run attempt; this run attempt may try it again in full.
    journal = Journal()
    ctx = make_ctx(journal, {"s": record("s", common_pb2.STEP_STATUS_FAILED, attempts=2,
                                         retry_base=0)}, rerun_failed_steps=True)
    flaky = Flaky(10)
    with pytest.raises(StepFailedError) as info:
        await ctx.step("s", flaky, retry=FAST)
    assert flaky.calls == 3 and info.value.attempts == 5
    assert journal.events() == [("RETRYING", 3, 2), ("RETRYING", 4, 2), ("FAILED", 5, 2)]


async def test_a_failed_step_can_succeed_on_a_later_run_attempt() -> None:
    journal = Journal()
    ctx = make_ctx(journal, {"s": record("s", common_pb2.STEP_STATUS_FAILED, attempts=1)},
                   rerun_failed_steps=True)
    assert await ctx.step("s", Flaky(0, value=7)) == 7
    assert journal.events() == [("COMPLETED", 2, 1)]


# --- state -------------------------------------------------------------------------------------


async def test_state_is_sent_only_when_it_changed() -> None:
    journal = Journal()
    ctx = make_ctx(journal, state={"n": 0})

    async def one() -> int:
        return 1

    await ctx.step("a", one)
    ctx.state["n"] = 1
    await ctx.step("b", one)
    await ctx.step("c", one)
    ctx.state["n"] = 2
    ctx.state["extra"] = [1]
    await ctx.step("d", one)
    sent = [c.state if c.HasField("state") else None for c in journal.checkpoints]
    assert sent == [None, b'{"n":1}', None, b'{"n":2,"extra":[1]}']


async def test_state_changed_inside_a_step_goes_with_its_checkpoint() -> None:
    journal = Journal()
    ctx = make_ctx(journal)

    async def bump() -> None:
        ctx.state["seen"] = True

    await ctx.step("s", bump)
    assert journal.checkpoints[0].state == b'{"seen":true}'


async def test_state_the_code_never_reached_is_not_serialised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that never uses ctx.state pays nothing for it per checkpoint."""
    from ratchet import _steps

    journal = Journal()
    ctx = make_ctx(journal, state={"big": list(range(1000))})
    calls = []
    real = _steps.to_json

    def counting(value: Any) -> bytes:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(_steps, "to_json", counting)

    async def one() -> int:
        return 1

    for name in "abc":
        await ctx.step(name, one)
    assert [c for c in calls if c is not None and c != 1] == []
    assert not any(c.HasField("state") for c in journal.checkpoints)


async def test_a_change_through_a_kept_reference_is_sent() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    kept = ctx.state

    async def one() -> int:
        return 1

    await ctx.step("a", one)
    kept["n"] = 1  # not through ctx.state: still seen
    await ctx.step("b", one)
    sent = [c.state if c.HasField("state") else None for c in journal.checkpoints]
    assert sent == [None, b'{"n":1}']


# --- values ----------------------------------------------------------------------------------


async def test_pydantic_return_annotations_round_trip() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    doc = await ctx.step("doc", make_doc, "x")
    assert isinstance(doc, Doc) and doc == Doc(title="x", pages=3)
    assert journal.checkpoints[0].output == b'{"title":"x","pages":3}'
    synced = await ctx.step("sync", make_doc_sync, "y")
    assert isinstance(synced, Doc) and synced.pages == 4
    docs = await ctx.step("docs", make_docs)
    assert docs == [Doc(title="a", pages=1)] and isinstance(docs[0], Doc)

    # The replay of a completed step is validated the same way.
    replay = make_ctx(Journal(), {"doc": record("doc", common_pb2.STEP_STATUS_COMPLETED,
                                                output=b'{"title":"r","pages":9}')})
    again = await replay.step("doc", make_doc, "ignored")
    assert isinstance(again, Doc) and again == Doc(title="r", pages=9)


async def test_values_without_annotations_are_the_json_round_trip() -> None:
    ctx = make_ctx(Journal())

    async def tuple_value():  # type: ignore[no-untyped-def]
        return (1, "a")

    assert await ctx.step("t", tuple_value) == [1, "a"]
    assert await ctx.step("l", lambda: {"k": (1, 2)}) == {"k": [1, 2]}


async def test_a_value_that_is_not_json_fails_the_step() -> None:
    journal = Journal()
    ctx = make_ctx(journal)

    async def opaque() -> Any:
        return object()

    with pytest.raises(StepFailedError) as info:
        await ctx.step("s", opaque, retry=NO_RETRY)
    assert info.value.error.type == "TypeError"
    assert journal.events() == [("FAILED", 1, 0)]


async def test_sync_functions_run_in_a_thread() -> None:
    ctx = make_ctx(Journal())
    here = threading.get_ident()

    def where() -> int:
        return threading.get_ident()

    async def where_async() -> int:
        return threading.get_ident()

    assert await ctx.step("sync", where) != here
    assert await ctx.step("async", where_async) == here


async def test_idempotency_key_is_run_and_step_inside_a_step() -> None:
    ctx = make_ctx(Journal())
    assert ctx.idempotency_key == RUN_ID

    async def key_async() -> str:
        return ctx.idempotency_key

    def key_sync() -> str:
        return ctx.idempotency_key

    assert await ctx.step("charge", key_async) == f"{RUN_ID}:charge"
    assert await ctx.step("charge", key_sync) == f"{RUN_ID}:charge#2"
    assert ctx.idempotency_key == RUN_ID


async def test_the_step_key_is_reset_after_a_failed_attempt() -> None:
    ctx = make_ctx(Journal())
    with pytest.raises(StepFailedError):
        await ctx.step("s", Flaky(1), retry=NO_RETRY)
    assert ctx.idempotency_key == RUN_ID

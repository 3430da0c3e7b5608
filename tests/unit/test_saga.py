"""Compensation and finishing mode (_saga.py), through a whole `Execution`
with a fake session: what is checkpointed, which functions run, and the
outcome reported."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

import ratchet
from ratchet import Context, Retry
from ratchet._execution import Execution
from ratchet.v1 import common_pb2, worker_pb2

pytestmark = pytest.mark.timeout(20)

FAST = Retry(max_attempts=2, min_delay=0.0, max_delay=0.0)


class Session:
    """What an Execution sends, acknowledged at once as the coordinator would."""

    def __init__(self) -> None:
        self.sent: list[worker_pb2.SessionRequest] = []

    async def request_patiently(self, message: worker_pb2.SessionRequest,
                                lease_id: str) -> worker_pb2.Ack:
        self.sent.append(message)
        return worker_pb2.Ack()

    def checkpoints(self) -> list[tuple[str, str]]:
        """(step key, event name) of each checkpoint, in order."""
        return [(m.checkpoint.step_key,
                 worker_pb2.StepEvent.Name(m.checkpoint.event).removeprefix("STEP_EVENT_"))
                for m in self.sent if m.WhichOneof("kind") == "checkpoint"]

    def outcome(self) -> worker_pb2.Complete:
        [complete] = [m.complete for m in self.sent if m.WhichOneof("kind") == "complete"]
        return complete


def grant(steps: list[common_pb2.Step] = (), *, attempt: int = 1,  # type: ignore[assignment]
          final_error: common_pb2.ErrorInfo | None = None) -> worker_pb2.LeaseGrant:
    g = worker_pb2.LeaseGrant(
        lease_id="lease-1", run_id="run_1", task_id="saga", attempt=attempt,
        snapshot=worker_pb2.Snapshot(payload=b"null", steps=list(steps)),
        retry=common_pb2.RetryPolicy(max_attempts=3))
    if final_error is not None:
        g.final_error.CopyFrom(final_error)
    return g


async def execute(task: ratchet.Task[Any, Any], g: worker_pb2.LeaseGrant, *,
                  sleep_threshold: float = 5.0) -> Session:
    session = Session()
    execution = Execution(g, task, session, threads=None, processes=None,  # type: ignore[arg-type]
                          sleep_threshold=sleep_threshold)
    await asyncio.wait_for(execution.run(), 10)
    return session


def completed(key: str, output: Any) -> common_pb2.Step:
    return common_pb2.Step(key=key, kind=common_pb2.STEP_KIND_RUN,
                           status=common_pb2.STEP_STATUS_COMPLETED, attempts=1,
                           output=json.dumps(output).encode())


def failed(key: str, error: common_pb2.ErrorInfo) -> common_pb2.Step:
    return common_pb2.Step(key=key, kind=common_pb2.STEP_KIND_RUN,
                           status=common_pb2.STEP_STATUS_FAILED, attempts=2, error=error)


class Bank:
    """Calls made by the saga below, in order."""

    def __init__(self, *, deposit_fails: bool = True, refund_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.deposit_fails = deposit_fails
        self.refund_fails = refund_fails
        self.hook_errors: list[ratchet.RunError] = []

    def task(self) -> ratchet.Task[Any, Any]:
        async def on_failure(ctx: Context, error: ratchet.RunError) -> None:
            self.hook_errors.append(error)

        @ratchet.task(id="saga", on_failure=on_failure)
        async def saga(ctx: Context, payload: Any) -> str:
            a = await ctx.step("withdraw", self.withdraw, 10, compensate=self.refund,
                               retry=FAST)
            b = await ctx.step("reserve", self.reserve, compensate=self.release_sync,
                               retry=FAST)
            try:
                await ctx.step("deposit", self.deposit, retry=FAST)
            except Exception:
                # A plain `except Exception` must not swallow finishing mode.
                self.calls.append("handler")
                await ctx.step("after-handler", self.after)
                raise
            return f"{a}/{b}"

        return saga

    async def withdraw(self, amount: int) -> dict[str, int]:
        self.calls.append("withdraw")
        return {"amount": amount}

    async def reserve(self) -> str:
        self.calls.append("reserve")
        return "seat-7"

    async def deposit(self) -> None:
        self.calls.append("deposit")
        if self.deposit_fails:
            raise ConnectionError("bank down")

    async def after(self) -> None:
        self.calls.append("after")

    async def refund(self, withdrawn: dict[str, int]) -> dict[str, int]:
        self.calls.append(f"refund {withdrawn['amount']}")
        if self.refund_fails:
            raise ConnectionError("refund refused")
        return withdrawn

    def release_sync(self, seat: str) -> None:
        self.calls.append(f"release {seat}")


ORIGINAL = common_pb2.ErrorInfo(type="ConnectionError", message="bank down",
                                step_key="deposit", attempt=2)


def failure_record(error: common_pb2.ErrorInfo) -> common_pb2.Step:
    return failed("ratchet:failure", error)


# --- compensation in the attempt that fails -----------------------------------------------


async def test_a_failure_after_compensable_steps_runs_undos_in_reverse_and_is_final() -> None:
    bank = Bank()
    session = await execute(bank.task(), grant())
    assert bank.calls == ["withdraw", "reserve", "deposit", "deposit", "handler", "after",
                          "release seat-7", "refund 10"]
    assert session.checkpoints() == [
        ("withdraw", "COMPLETED"), ("reserve", "COMPLETED"), ("deposit", "RETRYING"),
        ("deposit", "FAILED"), ("after-handler", "COMPLETED"), ("ratchet:failure", "FAILED"),
        ("ratchet:undo:reserve", "COMPLETED"), ("ratchet:undo:withdraw", "COMPLETED"),
        ("ratchet:on_failure", "COMPLETED")]
    outcome = session.outcome()
    # The run's policy allowed 3 attempts and the error is retryable: final anyway.
    assert outcome.WhichOneof("outcome") == "failed"
    error = outcome.failed.error
    assert error.non_retryable and error.type == "ConnectionError"
    assert error.step_key == "deposit" and error.message == "bank down"
    [hook_error] = bank.hook_errors
    assert hook_error.type == "ConnectionError" and hook_error.non_retryable
    recorded = next(m.checkpoint for m in session.sent
                    if m.checkpoint.step_key == "ratchet:failure")
    assert recorded.error.message == "bank down" and recorded.error.non_retryable


async def test_an_undo_that_fails_for_good_is_recorded_and_the_others_still_run() -> None:
    bank = Bank(refund_fails=True)

    @ratchet.task(id="saga")
    async def saga(ctx: Context, payload: Any) -> None:
        await ctx.step("withdraw", bank.withdraw, 5, compensate=bank.refund,
                       compensate_retry=FAST)
        await ctx.step("reserve", bank.reserve, compensate=bank.release_sync)
        raise ValueError("no deposit today")

    session = await execute(saga, grant())
    assert bank.calls == ["withdraw", "reserve", "release seat-7", "refund 5", "refund 5"]
    assert session.checkpoints() == [
        ("withdraw", "COMPLETED"), ("reserve", "COMPLETED"), ("ratchet:failure", "FAILED"),
        ("ratchet:undo:reserve", "COMPLETED"), ("ratchet:undo:withdraw", "RETRYING"),
        ("ratchet:undo:withdraw", "FAILED")]
    error = session.outcome().failed.error
    assert error.type == "ValueError" and error.non_retryable


async def test_without_undos_a_failure_is_left_to_the_run_policy() -> None:
    @ratchet.task(id="saga")
    async def saga(ctx: Context, payload: Any) -> None:
        async def one() -> int:
            return 1

        await ctx.step("one", one)
        raise ValueError("try again")

    session = await execute(saga, grant())
    assert session.checkpoints() == [("one", "COMPLETED")]
    error = session.outcome().failed.error
    assert error.type == "ValueError" and not error.non_retryable


async def test_undos_of_steps_replayed_from_an_earlier_attempt_are_registered() -> None:
    """An earlier attempt completed withdraw (its output is recorded): the
    replay registers the undo with the recorded output."""
    bank = Bank()
    session = await execute(bank.task(), grant(
        [completed("withdraw", {"amount": 99}), completed("reserve", "seat-1")], attempt=2))
    assert bank.calls[:1] == ["deposit"] and bank.calls[-2:] == ["release seat-1", "refund 99"]
    assert session.outcome().failed.error.non_retryable


async def test_step_names_starting_with_ratchet_are_reserved() -> None:
    @ratchet.task(id="saga")
    async def saga(ctx: Context, payload: Any) -> None:
        async def one() -> int:
            return 1

        await ctx.step("ratchet:undo:x", one)

    session = await execute(saga, grant())
    error = session.outcome().failed.error
    assert error.type == "ValueError" and "reserved" in error.message
    assert session.checkpoints() == []


async def test_a_step_in_flight_in_another_branch_completes_and_is_compensated() -> None:
    calls: list[str] = []

    async def slow() -> str:
        calls.append("slow started")
        await asyncio.sleep(0.3)  # still running when the run starts finishing
        calls.append("slow done")
        return "slow"

    async def boom() -> None:
        raise ValueError("boom")

    async def undo(output: str) -> None:
        calls.append(f"undo {output}")

    async def never() -> None:
        calls.append("later step")

    @ratchet.task(id="saga")
    async def saga(ctx: Context, payload: Any) -> None:
        async def branch() -> None:
            await ctx.step("slow", slow, compensate=undo)
            await ctx.step("later", never)

        await asyncio.gather(branch(), ctx.step("boom", boom, retry=ratchet.Retry(
            max_attempts=1)))

    session = await execute(saga, grant())
    assert calls == ["slow started", "slow done", "undo slow"]
    assert ("later", "COMPLETED") not in session.checkpoints()
    assert session.outcome().failed.error.type == "ValueError"


# --- finishing mode -----------------------------------------------------------------------


async def test_after_a_crash_while_compensating_no_forward_step_runs() -> None:
    """The worker died after the reserve's undo: the next lease replays, runs
    no forward step (not even the handler's), runs the remaining undo, the
    hook with the recorded error, and reports that error."""
    bank = Bank(deposit_fails=False)
    recorded = common_pb2.ErrorInfo(type="ConnectionError", message="bank down",
                                    non_retryable=True, step_key="deposit", attempt=1)
    session = await execute(bank.task(), grant([
        completed("withdraw", {"amount": 10}), completed("reserve", "seat-7"),
        failed("deposit", ORIGINAL), failure_record(recorded),
        completed("ratchet:undo:reserve", None)]))
    assert bank.calls == ["refund 10"]
    assert session.checkpoints() == [("ratchet:undo:withdraw", "COMPLETED"),
                                     ("ratchet:on_failure", "COMPLETED")]
    error = session.outcome().failed.error
    assert error.type == "ConnectionError" and error.message == "bank down"
    assert error.non_retryable
    assert [e.message for e in bank.hook_errors] == ["bank down"]


async def test_finishing_mode_stops_a_step_that_was_running() -> None:
    """Even a step still RUNNING (retrying when its worker died) does not
    start again once the run is finishing."""
    bank = Bank(deposit_fails=False)
    running = common_pb2.Step(key="deposit", kind=common_pb2.STEP_KIND_RUN,
                              status=common_pb2.STEP_STATUS_RUNNING, attempts=1)
    session = await execute(bank.task(), grant([
        completed("withdraw", {"amount": 3}), completed("reserve", "s"), running,
        failure_record(common_pb2.ErrorInfo(type="X", message="m")),
        completed("ratchet:undo:reserve", None),
        completed("ratchet:undo:withdraw", None)]))
    assert bank.calls == []
    assert session.checkpoints() == [("ratchet:on_failure", "COMPLETED")]
    assert session.outcome().failed.error.type == "X"


async def test_a_finishing_lease_runs_undos_and_the_hook_with_the_final_error() -> None:
    bank = Bank(deposit_fails=False)
    final = common_pb2.ErrorInfo(type="ratchet.LeaseLossLimit", non_retryable=True,
                                 message="the run's lease was lost 11 times (limit 10)")
    session = await execute(bank.task(), grant(
        [completed("withdraw", {"amount": 7})], final_error=final))
    # reserve never completed: it does not start, nor does anything after it.
    assert bank.calls == ["refund 7"]
    assert session.checkpoints() == [("ratchet:undo:withdraw", "COMPLETED"),
                                     ("ratchet:on_failure", "COMPLETED")]
    error = session.outcome().failed.error
    assert error.type == "ratchet.LeaseLossLimit" and error.non_retryable
    assert [e.type for e in bank.hook_errors] == ["ratchet.LeaseLossLimit"]


async def test_a_finishing_lease_whose_hook_already_ran_only_reports() -> None:
    bank = Bank()
    final = common_pb2.ErrorInfo(type="E", message="m", non_retryable=True)
    session = await execute(bank.task(), grant(
        [completed("ratchet:on_failure", None)], final_error=final))
    assert bank.calls == [] and bank.hook_errors == []
    assert session.checkpoints() == []
    assert session.outcome().failed.error.type == "E"


@pytest.mark.parametrize("call", ["sleep", "now", "random", "uuid", "create_token",
                                  "trigger", "trigger_and_wait"])
async def test_finishing_mode_stops_every_durable_call_that_has_not_completed(
    call: str
) -> None:
    reached: list[str] = []

    @ratchet.task(id="saga")
    async def saga(ctx: Context, payload: Any) -> None:
        try:
            if call == "sleep":
                await ctx.sleep("nap", 60)
            elif call == "create_token":
                await ctx.create_token("approval")
            elif call == "trigger":
                await ctx.trigger("child")
            elif call == "trigger_and_wait":
                await ctx.trigger_and_wait("child")
            else:
                await getattr(ctx, call)()
        except Exception:
            reached.append("handler")
        reached.append("after")

    final = common_pb2.ErrorInfo(type="E", message="m", non_retryable=True)
    session = await execute(saga, grant(final_error=final))
    assert reached == []
    assert session.checkpoints() == []
    assert session.outcome().failed.error.type == "E"


async def test_finishing_replay_that_returns_still_fails() -> None:
    """A replay that gets through every call (all completed) cannot succeed."""
    async def one() -> int:
        return 1

    @ratchet.task(id="saga")
    async def saga(ctx: Context, payload: Any) -> int:
        return await ctx.step("one", one)

    final = common_pb2.ErrorInfo(type="E", message="m", non_retryable=True)
    session = await execute(saga, grant([completed("one", 1)], final_error=final))
    assert session.outcome().WhichOneof("outcome") == "failed"


def sometimes_failing_refund(calls: list[str], failures: int) -> Any:
    async def refund(withdrawn: dict[str, int]) -> None:
        calls.append("refund")
        if len(calls) <= failures:
            raise ConnectionError("refund refused")
    return refund


def waiting_undo(due_in: float) -> common_pb2.Step:
    """An undo step that failed once and waits for its retry."""
    step = common_pb2.Step(key="ratchet:undo:withdraw", kind=common_pb2.STEP_KIND_RUN,
                           status=common_pb2.STEP_STATUS_RUNNING, attempts=1)
    step.wake_at.FromNanoseconds(int((time.time() + due_in) * 1e9))
    return step


def undo_saga(calls: list[str], failures: int, retry: Retry) -> ratchet.Task[Any, Any]:
    async def withdraw() -> dict[str, int]:
        calls.append("withdraw")
        return {"amount": 1}

    @ratchet.task(id="saga")
    async def saga(ctx: Context, payload: Any) -> None:
        await ctx.step("withdraw", withdraw, compensate=sometimes_failing_refund(
            calls, failures), compensate_retry=retry)
        raise ValueError("deposit refused")

    return saga


async def test_a_long_undo_retry_wait_suspends_the_run_and_it_finishes_later() -> None:
    calls: list[str] = []
    slow = Retry(max_attempts=3, min_delay=30.0, max_delay=30.0)
    session = await execute(undo_saga(calls, 2, slow), grant())
    assert calls == ["withdraw", "refund"]
    outcome = session.outcome()
    assert outcome.WhichOneof("outcome") == "suspended"
    assert list(outcome.suspended.step_keys) == ["ratchet:undo:withdraw"]
    retrying = [m.checkpoint for m in session.sent
                if m.checkpoint.step_key == "ratchet:undo:withdraw"]
    assert retrying[-1].HasField("retry_after")

    # Woken when the retry is due: the next lease finishes the run.
    session = await execute(undo_saga(calls, 1, slow), grant([
        completed("withdraw", {"amount": 1}), failure_record(common_pb2.ErrorInfo(
            type="ValueError", message="deposit refused", non_retryable=True)),
        waiting_undo(-1.0)]))
    assert calls == ["withdraw", "refund", "refund"]
    assert session.checkpoints() == [("ratchet:undo:withdraw", "COMPLETED")]
    error = session.outcome().failed.error
    assert error.type == "ValueError" and error.non_retryable


async def test_a_finishing_lease_waits_for_an_undo_retry_in_process() -> None:
    """A finishing lease ends the run whatever it reports: it never suspends."""
    calls: list[str] = []
    final = common_pb2.ErrorInfo(type="E", message="m", non_retryable=True)
    session = await execute(
        undo_saga(calls, 0, FAST),
        grant([completed("withdraw", {"amount": 1}), waiting_undo(0.5)], final_error=final),
        sleep_threshold=0.1)
    assert calls == ["refund"]
    assert session.checkpoints() == [("ratchet:undo:withdraw", "COMPLETED")]
    assert session.outcome().failed.error.type == "E"


async def test_a_forced_replay_of_a_compensated_run_goes_forward_again() -> None:
    """`replay --rerun-compensated` gives FAILED steps of kind RUN a fresh
    start, ratchet:failure included: the run is no longer finishing."""
    bank = Bank(deposit_fails=False)
    reset = common_pb2.Step(key="ratchet:failure", kind=common_pb2.STEP_KIND_RUN,
                            status=common_pb2.STEP_STATUS_RUNNING, attempts=1, retry_base=1)
    deposit = common_pb2.Step(key="deposit", kind=common_pb2.STEP_KIND_RUN,
                              status=common_pb2.STEP_STATUS_RUNNING, attempts=2, retry_base=2)
    session = await execute(bank.task(), grant(
        [completed("withdraw", {"amount": 10}), completed("reserve", "seat-7"), deposit,
         reset, completed("ratchet:undo:reserve", None),
         completed("ratchet:undo:withdraw", None)], attempt=2))
    assert bank.calls == ["deposit"]
    assert session.outcome().WhichOneof("outcome") == "succeeded"


async def test_hooks_and_undos_may_make_durable_calls_of_their_own() -> None:
    """An undo or on_failure may call ctx.step (ratchet.retry.fetch does):
    that is not a forward step, so finishing mode lets it run."""
    calls: list[str] = []

    async def noted(what: str) -> str:
        calls.append(what)
        return what

    async def undo(output: str) -> None:
        await ratchet.current_context().step("refund-call", noted, f"undo {output}")

    async def on_failure(ctx: Context, error: ratchet.RunError) -> None:
        await ctx.step("notify", noted, f"notify {error.type}")

    async def catch_error(ctx: Context, error: ratchet.RunError) -> None:
        await ctx.step("in-catch-error", noted, "catch_error step")

    @ratchet.task(id="saga", on_failure=on_failure, catch_error=catch_error)
    async def saga(ctx: Context, payload: Any) -> None:
        await ctx.step("reserve", noted, "reserve", compensate=undo)
        raise ValueError("nope")

    session = await execute(saga, grant())
    assert calls == ["reserve", "undo reserve", "notify ValueError"]
    assert [k for k, _ in session.checkpoints()] == [
        "reserve", "ratchet:failure", "refund-call", "ratchet:undo:reserve", "notify",
        "ratchet:on_failure"]
    assert session.outcome().failed.error.type == "ValueError"


async def test_a_compensation_that_is_not_callable_is_refused_before_the_step_runs() -> None:
    calls: list[str] = []

    async def reserve() -> str:
        calls.append("reserve")
        return "x"

    @ratchet.task(id="saga")
    async def saga(ctx: Context, payload: Any) -> None:
        await ctx.step("reserve", reserve, compensate="refund")  # type: ignore[arg-type]

    session = await execute(saga, grant())
    assert calls == [] and session.checkpoints() == []
    error = session.outcome().failed.error
    assert error.type == "TypeError" and "compensate= must be callable" in error.message

"""Issue 12, the SDK's errors: options that are not supported yet are refused
(item 5), a refused step write names its step, size and limit with a public
error type (item 9), and a step whose value JSON cannot carry fails at once
(item 17). With a fake journal, as in test_context.py."""

from __future__ import annotations

from typing import Any

import pytest

import ratchet
from ratchet import Context, NotSupportedError, Retry, StepFailedError
from ratchet._codec import (
    error_from_exception,
    retry_from_pb,
    retry_to_pb,
    task_info_from_pb,
    trigger_options,
)
from ratchet._session import TOO_LARGE_HINT
from ratchet.v1 import run_pb2, worker_pb2
from ratchet_server.engine import errors, validate
from ratchet_server.engine.core import TriggerSpec

pytestmark = pytest.mark.timeout(10)

RETRIES = Retry(max_attempts=3, min_delay=0.0, max_delay=0.0)


class Journal:
    """Records checkpoints; refuses the first one carrying `refuse` with WriteRefusedError."""

    def __init__(self, refuse: str = "") -> None:
        self.checkpoints: list[worker_pb2.Checkpoint] = []
        self.refuse = refuse

    async def checkpoint(self, checkpoint: worker_pb2.Checkpoint) -> None:
        if self.refuse and checkpoint.event == worker_pb2.STEP_EVENT_COMPLETED:
            raise ratchet.WriteRefusedError(f"the coordinator refused a write: {self.refuse}")
        self.checkpoints.append(checkpoint)

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]:
        raise AssertionError("nothing may be sent")


def make_ctx(journal: Journal) -> Context:
    return Context(run_id="run_1", task_id="t", attempt=1, lease_id="lease-1", steps={},
                   state={}, journal=journal)


class Unencodable:
    pass


# --- item 17: a value JSON cannot carry -----------------------------------------------


@pytest.mark.parametrize(("value", "named"), [
    (Unencodable(), "a value of type tests.unit.test_first_hour_sdk.Unencodable"),
    ({"items": [Unencodable()]},
     "a dict holding a value of type tests.unit.test_first_hour_sdk.Unencodable"),
    (float("nan"), "a float that is NaN or infinite"),
])
async def test_a_step_value_json_cannot_carry_fails_at_once(value: Any, named: str) -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    calls = 0

    async def produce() -> Any:
        nonlocal calls
        calls += 1
        return value

    with pytest.raises(StepFailedError) as caught:
        await ctx.step("produce", produce, retry=RETRIES)
    assert calls == 1  # not retried: encoding it again cannot succeed
    [failed] = journal.checkpoints
    assert failed.event == worker_pb2.STEP_EVENT_FAILED and failed.attempt == 1
    error = caught.value.error
    assert error.non_retryable and error.step_key == "produce"
    assert error.type == "TypeError"
    assert error.message.startswith(f"step 'produce' returned {named}, which cannot be stored")
    assert "return JSON-compatible data" in error.message and "pydantic model" in error.message


async def test_a_task_output_json_cannot_carry_is_non_retryable() -> None:
    @ratchet.task(id="unencodable-output")
    async def unencodable_output(ctx: Context, payload: Any) -> Any:
        return Unencodable()

    with pytest.raises(TypeError, match=r"task 'unencodable-output' returned a value "
                                        r"of type .*Unencodable") as caught:
        unencodable_output.dump_output(Unencodable())
    assert error_from_exception(caught.value).non_retryable


# --- item 9: a refused write names its step, with a public error type --------------------


async def test_a_refused_step_write_names_the_step_size_and_limit() -> None:
    journal = Journal(refuse=f"output is 2097154 bytes; the limit is 1048576{TOO_LARGE_HINT}")
    ctx = make_ctx(journal)

    async def big() -> str:
        return "x" * 10

    with pytest.raises(ratchet.WriteRefusedError) as caught:
        await ctx.step("big", big)
    assert caught.value.step_key == "big"
    message = str(caught.value)
    assert message.startswith("step 'big': the coordinator refused a write: output is "
                              "2097154 bytes; the limit is 1048576")
    assert "reference" in message  # the fix
    described = error_from_exception(caught.value, step_key="big")
    assert described.type == "ratchet.WriteRefusedError" and described.non_retryable


def test_write_refused_is_public() -> None:
    assert ratchet.WriteRefusedError.__module__ == "ratchet._errors"
    assert issubclass(ratchet.WriteRefusedError, ratchet.NonRetryableError)


# --- item 5: queue= and concurrency_key= are refused, not ignored -----------------------


def test_a_task_on_another_queue_is_refused() -> None:
    async def fn(ctx: Context, payload: Any) -> None:
        return None

    with pytest.raises(NotSupportedError, match=r"task 'q-task': queue= is not supported yet"):
        ratchet.task(id="q-task", queue="emails")(fn)
    # The default queue (the task id) is what a task has anyway.
    assert ratchet.task(id="q-task", queue="q-task")(fn).queue == "q-task"
    assert ratchet.task(id="q-task")(fn).queue == "q-task"


@pytest.mark.parametrize(("option", "says"), [
    ({"queue": "emails"}, "queue= is not supported yet"),
    ({"concurrency_key": "customer-1"}, "concurrency_key= is not supported yet"),
])
async def test_client_trigger_refuses_before_sending(option: dict[str, str], says: str) -> None:
    # Nothing listens on port 1: refusing must not need the coordinator.
    async with ratchet.Client("127.0.0.1:1") as client:
        with pytest.raises(NotSupportedError, match=says) as caught:
            await client.trigger("t", {}, **option)  # type: ignore[arg-type]
    assert "leave" in str(caught.value)  # what to do instead


@pytest.mark.parametrize(("option", "says"), [
    ({"queue": "emails"}, "queue= is not supported yet"),
    ({"concurrency_key": "customer-1"}, "concurrency_key= is not supported yet"),
])
async def test_child_triggers_refuse_them(option: dict[str, str], says: str) -> None:
    ctx = make_ctx(Journal())
    with pytest.raises(NotSupportedError, match=says):
        await ctx.trigger("child", {}, **option)
    with pytest.raises(NotSupportedError, match=says):
        await ctx.batch_trigger_and_wait("child", [{}], **option)


def test_the_task_id_is_accepted_as_its_queue() -> None:
    """As @ratchet.task and the coordinator accept it: each task is its own queue."""
    assert trigger_options("t", None, None, None, None, 0, "t", None, (), None, None,
                           None).queue == "t"
    with pytest.raises(NotSupportedError, match="queue= is not supported yet"):
        trigger_options("t", None, None, None, None, 0, "other", None, (), None, None, None)


class Sends(Journal):
    """Records the child triggers sent, each one child run."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[worker_pb2.TriggerChildren] = []

    async def trigger_children(self, request: worker_pb2.TriggerChildren) -> list[str]:
        self.sent.append(request)
        return ["run_child"]


async def test_client_and_child_triggers_accept_the_task_id_as_queue() -> None:
    journal = Sends()
    ctx = make_ctx(journal)
    with pytest.raises(NotSupportedError, match="queue="):
        await ctx.trigger("child", {}, queue="other")
    await ctx.trigger("child", {}, queue="child")
    [sent] = journal.sent
    assert sent.items[0].task_id == "child" and sent.items[0].options.queue == "child"
    # Nothing listens on port 1: the call gets past the check to the network.
    async with ratchet.Client("127.0.0.1:1") as client:
        with pytest.raises(ratchet.UnavailableError):
            await client.trigger("t", {}, queue="t")


@pytest.mark.parametrize("retry", [
    Retry(), Retry(max_attempts=None, factor=1.0, min_delay=0.0, max_delay=0.0),
    Retry(max_attempts=1, factor=3.5, min_delay=0.25, max_delay=9.0, jitter=False,
          max_lease_losses=1, rerun_failed_steps=True),
])
def test_a_task_retry_policy_reads_as_sent(retry: Retry) -> None:
    assert retry_from_pb(retry_to_pb(retry)) == retry
    info = task_info_from_pb(run_pb2.TaskInfo(id="t", retry=retry_to_pb(retry)))
    assert info.retry == retry


def test_a_zero_retry_field_is_not_replaced_by_a_default() -> None:
    """The coordinator sends resolved policies: a zero is its bug, not a
    value to guess (the client used to show 3 attempts, x2, 10 lease losses)."""
    sent = retry_to_pb(Retry())
    sent.max_lease_losses = 0
    with pytest.raises(ValueError, match="max_lease_losses"):
        task_info_from_pb(run_pb2.TaskInfo(id="t", retry=sent))


def test_empty_options_are_unset() -> None:
    opts = trigger_options("t", None, None, None, None, 0, "", "", (), None, None, None)
    assert opts.queue == "" and opts.concurrency_key == ""


@pytest.mark.parametrize(("fields", "says"), [
    ({"concurrency_key": "c"}, "concurrency_key is not supported yet"),
    ({"queue": "emails"}, "queue is not supported yet"),
])
def test_the_coordinator_refuses_them(fields: dict[str, str], says: str) -> None:
    spec = TriggerSpec(task_id="t", payload=b"{}", **fields)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match=says):
        validate.trigger_spec(spec)


def test_the_coordinator_accepts_the_default_queue() -> None:
    validate.trigger_spec(TriggerSpec(task_id="t", payload=b"{}", queue="t"))
    validate.trigger_spec(TriggerSpec(task_id="t", payload=b"{}", queue=None,
                                      concurrency_key=None))

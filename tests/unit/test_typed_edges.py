"""Issue 10, "Typed edges": unlimited attempts, child outputs typed by the child
task, per-item idempotency keys, `ratchet.current_context()`, error classes."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pydantic
import pytest

import ratchet
from ratchet import Retry, _context
from ratchet._codec import retry_to_pb
from ratchet._process import ProcessPool, reference
from ratchet.v1 import common_pb2, run_pb2
from ratchet_server import model
from ratchet_server.api.convert import retry_from_pb
from ratchet_server.api.convert import retry_to_pb as server_retry_to_pb
from ratchet_server.engine import policy
from ratchet_server.engine.engine import Engine, EngineConfig, TriggerSpec
from ratchet_server.store import Store
from ratchet_server.store._rows import retry_from_json, retry_to_json
from tests.unit.test_context import Flaky, Journal, make_ctx

pytestmark = pytest.mark.timeout(20)

UNLIMITED = Retry(max_attempts=None, min_delay=0.0, max_delay=0.0)

# --- Retry(max_attempts=None) ----------------------------------------------------------


def test_unlimited_attempts_always_allow_another() -> None:
    assert all(UNLIMITED.allows_another(n) for n in (0, 1, 7, 10**9))
    assert UNLIMITED.delay_after(10**6) == 0.0
    with pytest.raises(ValueError, match="max_attempts"):
        Retry(max_attempts=0)


async def test_a_step_with_unlimited_attempts_fails_seven_times_then_completes() -> None:
    journal = Journal()
    flaky = Flaky(7)
    assert await make_ctx(journal).step("s", flaky, retry=UNLIMITED) == "ok"
    assert flaky.calls == 8
    assert [e for e, _, _ in journal.events()] == ["RETRYING"] * 7 + ["COMPLETED"]


def test_unlimited_attempts_cross_the_wire_as_their_own_field() -> None:
    pb = retry_to_pb(UNLIMITED)
    assert pb.unlimited_attempts and pb.max_attempts == 0
    assert retry_from_pb(pb, Retry()) == UNLIMITED
    assert server_retry_to_pb(UNLIMITED) == pb
    # Without the flag, 0 still means "the default", as before the field existed.
    limited = retry_to_pb(Retry(max_attempts=4))
    assert not limited.unlimited_attempts and retry_from_pb(limited, Retry()).max_attempts == 4
    limited.max_attempts = 0
    assert retry_from_pb(limited, Retry(max_attempts=3)).max_attempts == 3


def test_unlimited_attempts_in_the_stores_json() -> None:
    assert retry_from_json(retry_to_json(UNLIMITED)) == UNLIMITED
    assert '"max_attempts":null' in retry_to_json(UNLIMITED)
    assert retry_from_json(retry_to_json(Retry(max_attempts=5))).max_attempts == 5


def test_the_coordinator_requeues_an_unlimited_run_however_often_it_failed() -> None:
    ref = model.LeaseRef(run_id="r", lease_id="l", attempt=10_000, retry=UNLIMITED,
                         lease_owner=None)
    error = model.ErrorInfo(type="ValueError", message="boom")
    again = policy.failure_transition(ref, error, state=None, immediate=False, now=1.0)
    assert again.status is model.RunStatus.QUEUED
    # A non-retryable error still ends it.
    final = policy.failure_transition(
        ref, model.ErrorInfo(type="X", message="no", non_retryable=True), state=None,
        immediate=False, now=1.0)
    assert final.status is model.RunStatus.FAILED


async def test_a_stored_run_keeps_unlimited_attempts_and_a_replay_keeps_them(
    store: Store,
) -> None:
    engine = Engine(store, EngineConfig(lease_ttl=30.0, heartbeat_interval=5.0))
    await engine.register_tasks([model.TaskDef(
        env="dev", id="t", version="1", queue="t", retry=UNLIMITED, payload_schema=None,
        output_schema=None, max_duration=None)])
    [(run, _)] = await engine.trigger("dev", [TriggerSpec(task_id="t", payload=b"{}")])
    assert run.retry.max_attempts is None
    stored = await store.get_run("dev", run.id)
    assert stored is not None and stored.retry == UNLIMITED
    await engine.cancel("dev", run.id)
    replayed = await engine.replay("dev", run.id, from_scratch=False)
    assert replayed.retry.max_attempts is None
    assert time.time() >= replayed.run_at


# --- ratchet.current_context() ---------------------------------------------------------


def context_in_thread() -> tuple[str, bool]:
    ctx = ratchet.current_context()
    return ctx.run_id, threading.current_thread() is not threading.main_thread()


async def context_in_async_step() -> str:
    return ratchet.current_context().idempotency_key


def context_in_process() -> str:
    try:
        ratchet.current_context()
    except RuntimeError as exc:
        return str(exc)
    return "a context in a process step"


async def test_current_context_in_async_and_sync_steps() -> None:
    ctx = make_ctx(Journal())
    token = _context._current_context.set(ctx)  # as the worker's execution does
    try:
        assert ratchet.current_context() is ctx
        assert await ctx.step("a", context_in_async_step) == "run_1:a"
        assert await ctx.step("s", context_in_thread) == ("run_1", True)
    finally:
        _context._current_context.reset(token)


def test_current_context_outside_a_run_raises() -> None:
    with pytest.raises(RuntimeError, match="outside a Ratchet run"):
        ratchet.current_context()


async def test_current_context_in_a_process_step_raises_a_clear_error() -> None:
    pool = ProcessPool(1)
    try:
        message = await pool.run(reference(context_in_process), (), {})
    finally:
        pool.shutdown()
    assert "executor='process'" in message and "arguments" in message


# --- RunError.error_class() / is_instance() ---------------------------------------------


class PaymentError(Exception):
    pass


class CardDeclined(PaymentError):
    pass


def error_of(exc: BaseException) -> ratchet.RunError:
    from ratchet._codec import error_from_exception

    return error_from_exception(exc)


def test_error_types_resolve_to_their_classes() -> None:
    declined = error_of(CardDeclined("no"))
    assert declined.type == f"{__name__}.CardDeclined"  # the string stays as it was
    assert declined.error_class() is CardDeclined
    assert declined.is_instance(PaymentError) and declined.is_instance((KeyError, CardDeclined))
    assert not declined.is_instance(ValueError)
    assert error_of(KeyError("k")).error_class() is KeyError  # builtins by bare name
    assert error_of(KeyError("k")).is_instance(LookupError)
    refused = error_of(ratchet.NonRetryableError("x"))
    assert refused.type == "ratchet.NonRetryableError"
    assert refused.error_class() is ratchet.NonRetryableError
    assert refused.is_instance(ratchet.RatchetError)


def test_error_types_that_cannot_be_imported_give_none() -> None:
    class Local(Exception):
        pass

    for name in ("LeaseLost", "ratchet.MaxDurationExceeded", "no_such_module.Error",
                 error_of(Local()).type, "os.path", "builtins.len", "", "."):
        error = ratchet.RunError(type=name, message="")
        assert error.error_class() is None, name
        assert not error.is_instance(Exception)


# --- child outputs typed by the child's Task ---------------------------------------------


class Summary(pydantic.BaseModel):
    words: int
    title: str


@ratchet.task(id="summarise")
async def summarise(ctx: ratchet.Context, payload: dict[str, Any]) -> Summary:
    return Summary(words=1, title="t")


@ratchet.task(id="untyped-child")
async def untyped_child(ctx: ratchet.Context, payload: dict[str, Any]) -> Any:
    return None


def children_done(key: str, *outputs: Any) -> dict[str, common_pb2.Step]:
    results = [{"run_id": f"run_c{i}", "status": "COMPLETED", "output": o, "error": None}
               for i, o in enumerate(outputs)]
    return {key: common_pb2.Step(key=key, kind=common_pb2.STEP_KIND_CHILD,
                                 status=common_pb2.STEP_STATUS_COMPLETED,
                                 output=json.dumps(results).encode())}


async def test_a_child_output_is_parsed_into_its_tasks_output_type() -> None:
    out = {"words": 3, "title": "a"}
    ctx = make_ctx(Journal(), children_done("summarise", out))
    assert await ctx.trigger_and_wait(summarise, {}) == Summary(words=3, title="a")
    # By id the type is unknown: plain JSON.
    ctx = make_ctx(Journal(), children_done("summarise", out))
    assert await ctx.trigger_and_wait("summarise", {}) == out
    # Unannotated (Any) outputs stay JSON too.
    ctx = make_ctx(Journal(), children_done("untyped-child", out))
    assert await ctx.trigger_and_wait(untyped_child, {}) == out


async def test_a_batch_of_child_outputs_is_typed_in_order() -> None:
    ctx = make_ctx(Journal(), children_done("fan", {"words": 1, "title": "x"},
                                            {"words": 2, "title": "y"}))
    got = await ctx.batch_trigger_and_wait(summarise, [{}, {}], name="fan")
    assert got == [Summary(words=1, title="x"), Summary(words=2, title="y")]


async def test_an_output_that_does_not_fit_raises_child_output_error() -> None:
    ctx = make_ctx(Journal(), children_done("fan", {"words": 1, "title": "x"},
                                            {"words": "many"}))
    with pytest.raises(ratchet.ChildOutputError) as caught:
        await ctx.batch_trigger_and_wait(summarise, [{}, {}], name="fan")
    error = caught.value
    assert error.run_id == "run_c1" and error.task_id == "summarise"
    assert error.output_type is Summary and error.output == {"words": "many"}
    assert "run_c1" in str(error) and "Summary" in str(error)
    assert isinstance(error, ratchet.NonRetryableError)


# --- per-item idempotency keys --------------------------------------------------------------


class FakeRunService:
    def __init__(self) -> None:
        self.requests: list[run_pb2.BatchTriggerRequest] = []

    async def BatchTrigger(self, request: run_pb2.BatchTriggerRequest,
                           **_: Any) -> run_pb2.BatchTriggerResponse:
        self.requests.append(request)
        return run_pb2.BatchTriggerResponse(results=[
            run_pb2.TriggerResponse(run=run_pb2.Run(id=f"run_{i}", task_id=item.task_id,
                                                   status=common_pb2.RUN_STATUS_QUEUED),
                                    created=True)
            for i, item in enumerate(request.items)])


async def test_batch_trigger_sends_each_items_own_key() -> None:
    client = ratchet.Client("127.0.0.1:1")
    fake = FakeRunService()
    client._runs = fake
    try:
        runs = await client.batch_trigger(
            "summarise", [ratchet.BatchItem({"n": 1}, idempotency_key="order-1",
                                            idempotency_key_ttl=60.0),
                          {"n": 2}, ratchet.BatchItem({"n": 3})], tags=["t"], priority=5)
    finally:
        await client.close()
    assert [r.id for r in runs] == ["run_0", "run_1", "run_2"]
    [request] = fake.requests
    items = list(request.items)
    assert [json.loads(i.payload) for i in items] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [i.options.idempotency_key for i in items] == ["order-1", "", ""]
    assert items[0].options.idempotency_key_ttl.seconds == 60
    assert not items[1].options.HasField("idempotency_key_ttl")
    assert all(list(i.options.tags) == ["t"] and i.options.priority == 5 for i in items)


async def test_child_runs_refuse_idempotency_keys_before_sending_anything() -> None:
    journal = Journal()
    ctx = make_ctx(journal)
    with pytest.raises(ValueError, match="exactly once per"):
        await ctx.batch_trigger_and_wait(summarise, [ratchet.BatchItem({}, idempotency_key="k")])
    with pytest.raises(ValueError, match=r"Client\.batch_trigger"):
        await ctx.trigger(summarise, {}, idempotency_key="k")
    assert journal.checkpoints == []
    # A BatchItem without a key is just its payload; the refused calls took no step key.
    ctx = make_ctx(Journal(), children_done("summarise", {"words": 1, "title": "x"}))
    assert await ctx.batch_trigger_and_wait(summarise, [ratchet.BatchItem({})]) == [
        Summary(words=1, title="x")]

"""`ctx.wait_for_token` (issue 10): tokens created outside the run, model
validation, a timeout as a value, TIMED_OUT records; with a fake journal."""

from __future__ import annotations

import asyncio

import pydantic
import pytest

from ratchet import Context, TokenDataError, TokenResult, TokenTimeoutError
from ratchet.v1 import common_pb2, worker_pb2
from tests.unit.test_context import Journal, make_ctx

pytestmark = pytest.mark.timeout(10)

TOKEN = "tok_0123456789abcdef"
KEY = f"token:{TOKEN}"


class Approval(pydantic.BaseModel):
    approved: bool
    by: str


def token_record(status: int, output: bytes = b"", key: str = KEY) -> common_pb2.Step:
    return common_pb2.Step(key=key, kind=common_pb2.STEP_KIND_TOKEN, status=status,  # type: ignore[arg-type]
                           attempts=1, token_id=TOKEN, output=output)


def ctx_with(record: common_pb2.Step | None) -> tuple[Context, Journal]:
    journal = Journal()
    return make_ctx(journal, {record.key: record} if record is not None else {}), journal


async def test_a_token_from_outside_starts_a_linked_wait_and_suspends() -> None:
    ctx, journal = ctx_with(None)
    waiter = asyncio.create_task(ctx.wait_for_token(TOKEN))
    await asyncio.wait_for(ctx._steps.suspended.wait(), 2)
    waiter.cancel()
    [cp] = journal.checkpoints
    assert (cp.step_key, cp.kind, cp.event, cp.token_id, cp.existing_token) == (
        KEY, common_pb2.STEP_KIND_TOKEN, worker_pb2.STEP_EVENT_STARTED, TOKEN, True)
    assert not cp.HasField("wake_after")
    assert ctx._steps.waiting_on == [KEY]


async def test_in_run_tokens_are_not_sent_as_existing() -> None:
    ctx, journal = ctx_with(None)
    token = await ctx.create_token("approve", timeout=60)
    waiter = asyncio.create_task(ctx.wait_for_token(token))
    await asyncio.wait_for(ctx._steps.suspended.wait(), 2)
    waiter.cancel()
    [cp] = journal.checkpoints
    assert cp.step_key == "approve" and not cp.existing_token


async def test_completed_data_is_validated_against_the_model() -> None:
    ctx, journal = ctx_with(token_record(common_pb2.STEP_STATUS_COMPLETED,
                                         b'{"approved": true, "by": "ana"}'))
    got = await ctx.wait_for_token(TOKEN, model=Approval)
    assert got == Approval(approved=True, by="ana")
    assert journal.checkpoints == []
    result = await ctx.wait_for_token(TOKEN, model=Approval, timeout_as_value=True)
    assert result == TokenResult(ok=True, data=Approval(approved=True, by="ana"),
                                 timed_out=False, token_id=TOKEN)


async def test_data_that_does_not_fit_raises_a_non_retryable_error_naming_the_step() -> None:
    ctx, _ = ctx_with(token_record(common_pb2.STEP_STATUS_COMPLETED, b'{"approved": "?"}'))
    with pytest.raises(TokenDataError) as caught:
        await ctx.wait_for_token(TOKEN, model=Approval)
    assert caught.value.non_retryable and caught.value.step_key == KEY
    assert f"token step {KEY!r}" in str(caught.value) and "Approval" in str(caught.value)
    assert caught.value.data == {"approved": "?"}


@pytest.mark.parametrize("status", [common_pb2.STEP_STATUS_TIMED_OUT,
                                    common_pb2.STEP_STATUS_FAILED])  # older coordinators
async def test_a_timeout_raises_or_is_returned_as_a_value(status: int) -> None:
    ctx, _ = ctx_with(token_record(status))
    with pytest.raises(TokenTimeoutError):
        await ctx.wait_for_token(TOKEN)
    result = await ctx.wait_for_token(TOKEN, model=Approval, timeout_as_value=True)
    assert result == TokenResult(ok=False, data=None, timed_out=True, token_id=TOKEN)


async def test_an_empty_token_id_is_refused() -> None:
    ctx, journal = ctx_with(None)
    with pytest.raises(ValueError):
        await ctx.wait_for_token("")
    assert journal.checkpoints == []

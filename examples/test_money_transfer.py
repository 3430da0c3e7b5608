"""Testing a task with ratchet.testing: the money-transfer saga, in process.

    .venv/bin/python -m pytest examples/test_money_transfer.py

Each test opens an Environment (a coordinator on SQLite in memory and a
worker serving the task, in the test's event loop) and a fresh bank file.
Retry backoffs are durable waits on the coordinator's clock:
`env.advance()` moves it, so no test waits for them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from money_transfer import Receipt, Transfer, balances, money_transfer, open_bank, operations

import ratchet
import ratchet.testing

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        ratchet.testing.Environment]:
    monkeypatch.setenv("MONEY_TRANSFER_BANK", str(tmp_path / "bank.db"))
    open_bank()
    async with ratchet.testing.Environment([money_transfer]) as env:
        yield env


async def test_a_transfer_moves_the_money(env: ratchet.testing.Environment) -> None:
    run = await env.trigger(money_transfer, Transfer(source="alice", target="bob", amount=30))
    receipt = await env.result(run)
    assert isinstance(receipt, Receipt)
    assert balances()["alice"] == 70 and balances()["bob"] == 80


async def test_a_deposit_that_fails_once_is_retried(env: ratchet.testing.Environment) -> None:
    env.fail_step("deposit", on_attempt=1, error=ConnectionError("bank timed out"))
    run = await env.trigger(money_transfer, Transfer(source="alice", target="bob", amount=30))
    await env.advance(1)  # the deposit's backoff
    await env.result(run)
    assert (await env.steps(run))["deposit"].attempts == 2
    assert balances()["bob"] == 80


async def test_a_frozen_account_refunds_the_withdrawal(
        env: ratchet.testing.Environment) -> None:
    run = await env.trigger(money_transfer, Transfer(source="alice", target="carol", amount=30))
    with pytest.raises(ratchet.RunFailedError, match="AccountFrozen"):
        await env.result(run)
    assert balances()["alice"] == 100
    assert [op.kind for op in operations()] == ["withdraw", "refund"]


async def test_a_crash_after_the_withdrawal_does_not_withdraw_twice(
        env: ratchet.testing.Environment) -> None:
    env.fail_step("deposit", on_attempt=1)  # the run waits in the deposit's backoff
    run = await env.trigger(money_transfer, Transfer(source="alice", target="bob", amount=30))
    await env.settle()
    await env.crash_worker()
    await env.restart_worker()
    await env.advance(1)
    await env.result(run)
    assert balances() == {"alice": 70, "bob": 80, "carol": 0, "dave": 0}
    assert [op.kind for op in operations()] == ["withdraw", "deposit"]

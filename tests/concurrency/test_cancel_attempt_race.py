"""A cancel racing a wake, on Postgres: under READ COMMITTED a cancel blocked
behind the wake re-reads the run as QUEUED, and must still restore the
attempt the suspension gave back (the run reads its last attempt)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine.engine import Engine, Session, TriggerSpec
from ratchet_server.engine.ids import new_id
from ratchet_server.store import Store
from tests.engines import running_engine
from tests.harness import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]

ENV = "dev"
ROUNDS = 50


@pytest.fixture
async def engine(pg_store: Store) -> AsyncIterator[Engine]:
    async with running_engine(pg_store, check_stuck=True, timer_interval=60.0,
                              reconcile_interval=0, lease_ttl=60.0) as eng:
        yield eng


async def waiting_runs(engine: Engine, n: int) -> list[tuple[model.Run, str]]:
    """`n` runs WAITING on a token each, after their first attempt."""
    task = model.TaskDef(env=ENV, id="t", version="1", queue="t", retry=Retry(max_attempts=3),
                         payload_schema=None, output_schema=None, max_duration=None)
    s: Session
    s, _ = await engine.open_session(ENV, "w-" + secrets.token_hex(3), [task], 0, [])
    await engine.trigger(ENV, [TriggerSpec(task_id="t", payload=b"{}") for _ in range(n)])
    items = await engine.store.lease_ready(env=ENV, task_ids=("t",), limit=n, owner=s.id,
                                           nonce=new_id("n"), ttl=60.0)
    out = []
    for item in items:
        run, token_id = item.run, "tok_" + secrets.token_hex(8)
        assert run.lease_id is not None and run.attempt == 1
        await engine.checkpoint(s, run_id=run.id, lease_id=run.lease_id, key="w",
                                kind=model.StepKind.TOKEN, event=model.StepEvent.STARTED,
                                attempt=1, retry_base=0, output=None, error=None,
                                started_at=time.time(), finished_at=None, state=None,
                                token_id=token_id)
        await engine.complete_suspended(s, run_id=run.id, lease_id=run.lease_id,
                                        step_keys=["w"], state=None)
        out.append((run, token_id))
    return out


async def test_a_cancel_blocked_behind_a_wake_restores_the_attempt(
        engine: Engine, pg_url: str) -> None:
    [(run, _)] = await waiting_runs(engine, 1)
    with psycopg.connect(pg_url) as waker, psycopg.connect(pg_url, autocommit=True) as watch:
        # The wake's statement, held open: the cancel waits for its row lock.
        waker.execute("UPDATE runs SET status = 'QUEUED', waiting_on = NULL "
                      "WHERE id = %s AND status = 'WAITING'", (run.id,))
        cancel = asyncio.create_task(engine.cancel(ENV, run.id, ""))

        def blocked() -> bool:
            row = watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'UPDATE runs SET status = ''CANCELED''%%'").fetchone()
            return bool(row and row[0])

        await eventually(blocked, timeout=10, what="the cancel waiting for the row lock")
        waker.commit()
        canceled = await asyncio.wait_for(cancel, 10)
    assert canceled.status is model.RunStatus.CANCELED and canceled.attempt == 1


async def test_cancel_and_wake_at_once_read_the_last_attempt(engine: Engine) -> None:
    pairs = await waiting_runs(engine, ROUNDS)
    ops = []
    for i, (run, token_id) in enumerate(pairs):  # either first, in turn
        pair = [engine.cancel(ENV, run.id, ""), engine.complete_token(ENV, token_id, b"1")]
        ops.extend(pair if i % 2 else pair[::-1])
    await asyncio.gather(*ops)
    for run, _ in pairs:
        got = await engine.store.get_run(ENV, run.id)
        assert got is not None and got.status is model.RunStatus.CANCELED
        assert got.attempt == 1, (run.id, got.attempt)

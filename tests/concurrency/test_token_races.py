"""Tokens created outside runs: completion racing a run's wait, on Postgres.

The completion (CompleteToken or the URL) and the run's side (start waiting
on the token, then suspend) are issued together for many runs, each after a
random delay, so every interleaving of their transactions happens: a
completion before the wait, between the wait and the suspension, after
both. Every run must end up QUEUED with its token step COMPLETED with the
data, and the invariant check (the `engine` fixture) must find no stranded
run. See store/_tokens.py for the lock order that makes this hold.
"""

from __future__ import annotations

import asyncio
import random
import time

import psycopg
import pytest

from ratchet_server import model
from ratchet_server.engine.engine import Engine
from tests.concurrency.test_races import ENV, ROUNDS, engine, leased_runs, session, stranded

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

__all__ = ["engine"]  # the fixture, re-used

# Delays are drawn up to this: short enough that the two sides often overlap.
SPREAD = 0.005


async def test_completion_racing_the_wait_never_strands_a_run(engine: Engine) -> None:
    s = await session(engine)
    runs = await leased_runs(engine, s, ROUNDS)
    tokens = {}
    for run in runs:
        token, _ = await engine.create_token(ENV, timeout=None, idempotency_key="",
                                             tags=("race",))
        tokens[run.id] = token

    async def complete(run: model.Run) -> None:
        await asyncio.sleep(random.uniform(0, SPREAD))
        token = tokens[run.id]
        if random.random() < 0.5:
            completed, _, why = await engine.complete_token(ENV, token.id, b'{"ok": true}')
        else:
            done, why = await engine.complete_token_url(token.id, token.secret,
                                                        b'{"ok": true}')
            completed = done.completed
        assert completed, why

    async def wait_then_suspend(run: model.Run) -> None:
        assert run.lease_id is not None
        await asyncio.sleep(random.uniform(0, SPREAD))
        await engine.wait_on_token(s, run_id=run.id, lease_id=run.lease_id, key="w",
                                   attempt=1, retry_base=0, token_id=tokens[run.id].id,
                                   started_at=time.time(), state=None)
        await asyncio.sleep(random.uniform(0, 0.01))
        await engine.complete_suspended(s, run_id=run.id, lease_id=run.lease_id,
                                        step_keys=["w"], state=None)

    await asyncio.gather(*(f for run in runs for f in (complete(run), wait_then_suspend(run))))
    assert await stranded(engine.store, [r.id for r in runs]) == []
    for run in runs:
        got = await engine.store.get_run(ENV, run.id)
        assert got is not None and got.status is model.RunStatus.QUEUED, run.id
        [step] = await engine.store.get_steps(run.id)
        assert step.status is model.StepStatus.COMPLETED and step.output == '{"ok": true}'
        token = await engine.get_token(ENV, tokens[run.id].id)
        assert token.status is model.TokenStatus.COMPLETED and token.run_id == run.id


async def test_a_wait_meeting_an_uncommitted_completion_waits_for_it(engine: Engine,
                                                                     pg_url: str) -> None:
    """The interleaving the random race rarely hits, made to happen: a
    completion has updated the token but not committed when the run starts
    waiting. The wait must block on the token's row lock and then see the
    data (without the lock it would read the token as still pending, record
    the step RUNNING and strand the run)."""
    s = await session(engine)
    [run] = await leased_runs(engine, s, 1)
    assert run.lease_id is not None
    token, _ = await engine.create_token(ENV, timeout=None, idempotency_key="", tags=())
    with psycopg.connect(pg_url) as other:
        # What an unlinked completion does, held open.
        other.execute("UPDATE tokens SET status = 'COMPLETED', data = '1', completed_at = 0 "
                      "WHERE id = %(id)s AND run_id IS NULL", {"id": token.id})
        wait = asyncio.create_task(engine.wait_on_token(
            s, run_id=run.id, lease_id=run.lease_id, key="w", attempt=1, retry_base=0,
            token_id=token.id, started_at=time.time(), state=None))
        await asyncio.sleep(0.5)
        other.commit()
    await asyncio.wait_for(wait, 10)
    [step] = await engine.store.get_steps(run.id)
    assert step.status is model.StepStatus.COMPLETED and step.output == "1"
    await engine.complete_suspended(s, run_id=run.id, lease_id=run.lease_id, step_keys=["w"],
                                    state=None)
    got = await engine.store.get_run(ENV, run.id)
    assert got is not None and got.status is model.RunStatus.QUEUED

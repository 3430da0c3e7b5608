"""A checkpoint racing a lease loss, on Postgres: the checkpoint is one
statement in autocommit (`apply_step_writes`), the loss a transition in a
transaction (the reaper's requeue). Whichever commits first, the checkpoint
is all or nothing: its step, its history and the run's state are written
exactly when it reports its lease current, and never after the requeue."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from ratchet_server import model
from ratchet_server.store import Store
from tests.store.test_conformance import (
    create,
    event_types,
    lease,
    must_get,
    new_run,
    step_write,
    transition,
)

pytestmark = pytest.mark.timeout(120)

RUNS = 150
ROUNDS = 3


async def test_a_checkpoint_racing_a_lease_loss_is_all_or_nothing(pg_store: Store) -> None:
    rng = random.Random(11)
    step_won = lost_after = 0
    for _ in range(ROUNDS):
        await create(pg_store, *[new_run() for _ in range(RUNS)])
        runs = [item.run for item in await lease(pg_store, limit=RUNS)]
        assert len(runs) == RUNS

        async def checkpoint(run: model.Run) -> bool:
            done = model.Event(run_id=run.id, type=model.EventType.STEP_COMPLETED,
                               at=time.time(), attempt=1, lease_id=run.lease_id, step_key="s")
            [ok] = await pg_store.apply([step_write(run, "s", state='{"n": 1}', events=(done,))])
            return ok

        async def lose(run: model.Run) -> bool:
            [ok] = await pg_store.apply([transition(
                run, model.RunStatus.QUEUED, run_at=time.time(), refund_attempt=True,
                count_lease_loss=True)])
            return ok

        calls = [(run, kind) for run in runs for kind in ("checkpoint", "lose")]
        rng.shuffle(calls)
        results = await asyncio.gather(*(
            checkpoint(run) if kind == "checkpoint" else lose(run) for run, kind in calls))
        outcome = {(run.id, kind): ok for (run, kind), ok in zip(calls, results, strict=True)}
        for run in runs:
            assert outcome[(run.id, "lose")], run.id  # the loss always holds the lease
            wrote = outcome[(run.id, "checkpoint")]
            steps = await pg_store.get_steps(run.id)
            after = await must_get(pg_store, run.id)
            assert after.status is model.RunStatus.QUEUED and after.lease_losses == 1
            assert (len(steps) == 1) is wrote, run.id
            assert ("step_completed" in await event_types(pg_store, run.id)) is wrote, run.id
            assert (after.state == '{"n": 1}') is wrote, run.id
            step_won += wrote
            lost_after += not wrote
    # Both orders happened: the race was run, not one side alone.
    assert step_won and lost_after, (step_won, lost_after)

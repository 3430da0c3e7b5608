"""The last children of a wait finishing as their parent suspends, on Postgres.

Two coordinators share one schema; each holds the leases of half the
children. For many parents at once, every child finishes through its
coordinator's group commit (so the last children of a wait often end in
different batches, on different coordinators, at the same moment) while the
parent suspends on the wait, each after a random delay. The safety-net sweep
is off: the count in `child_waits` alone (store/_waits.children_final_txn)
must end every wait, with each child's result in trigger order, and wake
every parent. See docs/architecture.md "Lock order".
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import psycopg
import pytest

from ratchet_server import model
from ratchet_server.engine import timers
from ratchet_server.engine.engine import Engine, EngineConfig, Session, TriggerSpec
from ratchet_server.engine.ids import new_id
from ratchet_server.store import open_store
from tests.concurrency.test_races import ENV, leased_runs, session
from tests.harness import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

PARENTS = 120
SPREAD = 0.03


def config() -> EngineConfig:
    # No sweep, no reconciler: nothing but the children's count ends a wait.
    return EngineConfig(timer_interval=0.01, reconcile_interval=0, lease_ttl=60.0,
                        child_sweep_interval=0)


@pytest.fixture
async def engines(pg_url: str) -> AsyncIterator[tuple[Engine, Engine]]:
    stores = [await open_store(pg_url) for _ in range(2)]
    await stores[0].migrate()
    pair = (Engine(stores[0], config()), Engine(stores[1], config()))
    for eng in pair:
        await eng.start()
    try:
        yield pair
    finally:
        for eng in pair:
            await asyncio.wait_for(eng.stop(), 10.0)
        stuck = await timers.find_stuck(stores[0])
        for s in stores:
            await s.close()
        assert not stuck, [(s.run.id, s.why) for s in stuck]


async def lease_children(eng: Engine, s: Session, n: int) -> list[model.Run]:
    got: list[model.Run] = []
    while len(got) < n:
        batch = await eng.store.lease_ready(env=ENV, task_ids=("child",), limit=n - len(got),
                                            owner=s.id, nonce=new_id("n"), ttl=60.0)
        got.extend(item.run for item in batch)
    return got


async def test_the_count_alone_ends_every_wait(engines: tuple[Engine, Engine],
                                               pg_url: str) -> None:
    a, b = engines
    sa = await session(a, ENV, "parent", "child")
    sb = await session(b, ENV, "parent", "child")
    parents = await leased_runs(a, sa, PARENTS, "parent")
    kids: dict[str, list[str]] = {}
    for parent in parents:
        assert parent.lease_id is not None
        kids[parent.id] = await a.trigger_children(
            sa, run_id=parent.id, lease_id=parent.lease_id, step_key="w",
            specs=[TriggerSpec(task_id="child", payload=b"{}")
                   for _ in range(random.randint(1, 5))], wait=True)
    total = sum(len(ids) for ids in kids.values())
    held = {r.id: (a, sa, r) for r in await lease_children(a, sa, total // 2)}
    held.update({r.id: (b, sb, r) for r in await lease_children(b, sb, total - total // 2)})

    async def finish(child_id: str) -> None:
        eng, s, run = held[child_id]
        assert run.lease_id is not None
        await asyncio.sleep(random.uniform(0, SPREAD))
        await eng.complete_success(s, run_id=child_id, lease_id=run.lease_id,
                                   output=json.dumps(child_id).encode(), state=None)

    async def suspend(parent: model.Run) -> None:
        assert parent.lease_id is not None
        await asyncio.sleep(random.uniform(0, SPREAD))
        await a.complete_suspended(sa, run_id=parent.id, lease_id=parent.lease_id,
                                   step_keys=["w"], state=None)

    await asyncio.gather(*(suspend(p) for p in parents),
                         *(finish(c) for ids in kids.values() for c in ids))

    async def all_woken() -> bool:
        for p in parents:
            got = await a.store.get_run(ENV, p.id)
            if got is None or got.status is not model.RunStatus.QUEUED:
                return False
        return True

    await eventually(all_woken, timeout=10, what="every parent to wake")
    for p in parents:
        [step] = await a.store.get_steps(p.id)
        assert step.status is model.StepStatus.COMPLETED, p.id
        results = json.loads(str(step.output))
        assert [r["run_id"] for r in results] == kids[p.id]
        assert [r["output"] for r in results] == kids[p.id]
        assert {r["status"] for r in results} == {"COMPLETED"}
    assert a.child_waits_missed == b.child_waits_missed == 0
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM child_waits").fetchone() == (0,)

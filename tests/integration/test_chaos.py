"""Workers killed at random: every run finishes, and its history agrees with it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

import ratchet
from tests.harness import Cluster

pytestmark = pytest.mark.timeout(180)

FINISHING = {"finished", "canceled", "expired", "timed_out"}


def check_history(run: ratchet.Run, events: list[ratchet.RunEvent]) -> None:
    """The history of a run is consistent with its final state."""
    assert [e.id for e in events] == sorted(e.id for e in events), run.id
    assert events[0].type == "triggered", run.id
    finishing = [e for e in events if e.type in FINISHING]
    assert len(finishing) == 1 and events[-1] is finishing[0], (run.id, [e.type for e in events])
    assert finishing[0].data.get("status", run.status.value) == run.status.value
    leases = [e for e in events if e.type == "leased"]
    assert leases, run.id
    # Attempt numbers never go down, and the last lease is the run's attempt.
    attempts = [e.attempt for e in leases]
    assert attempts == sorted(attempts) and attempts[-1] == run.attempt, (run.id, attempts)
    # Every lease ends (lost, retried, released or finished) before the next one.
    ends = {"lease_lost", "retry_scheduled", "lease_released", "suspended", *FINISHING}
    current = None
    for e in events:
        if e.type == "leased":
            assert current is None, (run.id, "two leases at once", [x.type for x in events])
            current = e.lease_id
        elif e.type in ends and e.lease_id and e.lease_id == current:
            current = None
    # Every completed step has a step_completed event.
    completed = {e.step_key for e in events if e.type == "step_completed"}
    assert {s.key for s in run.steps if s.status == "COMPLETED"} <= completed, run.id


async def test_random_worker_kills(cluster: Cluster, tmp_path: Path) -> None:
    rng = random.Random(7)
    workers = [cluster.start_worker(slots=4) for _ in range(3)]
    for w in workers:
        await cluster.wait_worker_connected(w)
    client = cluster.client()
    runs = [await client.trigger("slow-steps", {"dir": str(tmp_path), "steps": 4,
                                                "seconds": 0.2}) for _ in range(12)]
    for i in range(4):
        (tmp_path / f"f{i}").mkdir()
    runs += [await client.trigger("fails-once", {"dir": str(tmp_path / f"f{i}")})
             for i in range(4)]
    for _ in range(4):
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        victim = rng.choice([w for w in workers if w.proc.poll() is None])
        victim.kill()
        fresh = cluster.start_worker(slots=4)
        workers.append(fresh)
        await cluster.wait_worker_connected(fresh)
    for run in runs:
        final = await client.wait(run.id, timeout=90)
        assert final.status.is_final, final
        check_history(await client.get(run.id), await client.history(run.id))

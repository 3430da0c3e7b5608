"""Heartbeats never stall: a step that holds the GIL in C runs in a process.

The harness's lease TTL is 2 s. A step that holds the GIL for about 5 s in
one C call (a backtracking regex) freezes its worker's event loop when it
runs in a thread: no heartbeat leaves, the lease is lost. With
`executor="process"` it runs in a child process and the lease holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import ROOT, Cluster, eventually, lines

# serial: the test calibrates how long a regex holds the GIL on this machine.
pytestmark = [pytest.mark.timeout(120), pytest.mark.serial]

GIL_TASKS = str(ROOT / "tests" / "integration" / "gil_tasks.py")
HOLD = 5.0  # seconds of one GIL hold: 2.5 times the harness's 2 s lease TTL


async def test_a_step_holding_the_gil_keeps_its_lease_in_a_process(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.start_worker(GIL_TASKS, slots=2)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("gil-in-process", {"dir": str(tmp_path), "seconds": HOLD})
    done = await client.wait(run.id, timeout=90)
    assert done.status == "COMPLETED", (done, cluster.logs())
    assert done.attempt == 1
    assert done.output["held_ms"] > 2500  # longer than the 2 s lease TTL
    # It ran once, in a child process of the worker (the task module was
    # loaded from its file path there too).
    assert lines(tmp_path / "hold") == [str(done.output["pid"])]
    assert done.output["pid"] != done.output["worker_pid"] == worker.pid
    types = [e.type for e in await client.history(run.id)]
    assert "lease_lost" not in types, types
    assert types.count("leased") == 1, types


async def test_the_same_step_in_a_thread_loses_its_lease(
    pg_url: str, tmp_path: Path
) -> None:
    """The limit `executor="process"` lifts: in a thread, the held GIL stops
    the heartbeats, the coordinator takes the lease back (the run's attempt
    is given back: the step runs again, and this time returns at once), and
    the worker says why in its log. (Postgres only: what it shows is in the
    worker.)"""
    cluster = Cluster(pg_url, tmp_path)
    try:
        await cluster.start_coordinator()
        worker = cluster.start_worker(GIL_TASKS, slots=2)
        await cluster.wait_worker_connected(worker)
        client = cluster.client()
        run = await client.trigger("gil-in-thread", {"dir": str(tmp_path), "seconds": HOLD})
        done = await client.wait(run.id, timeout=90)
        assert done.status == "COMPLETED", done
        assert done.attempt == 1 and done.lease_losses >= 1, done
        types = [e.type for e in await client.history(run.id)]
        assert "lease_lost" in types, types
        assert lines(tmp_path / "hold") == [str(worker.pid)]  # in the worker itself
        # Once the match ends, the loop-lag detector names the cause and the
        # remedy, and the step's late checkpoint is refused.
        await eventually(lambda: "event loop was blocked" in worker.output()
                         and "lost" in worker.output(), timeout=60, what="the warning")
        assert 'executor="process"' in worker.output()
    finally:
        await cluster.close()
        print(cluster.logs())

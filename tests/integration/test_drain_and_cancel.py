"""SIGTERM drains a worker; cancel reaches a running run's worker."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.harness import Cluster, count_lines, eventually, lines

pytestmark = pytest.mark.timeout(90)


async def test_sigterm_finishes_short_runs_and_releases_long_ones(
    cluster: Cluster, tmp_path: Path
) -> None:
    a = cluster.start_worker(slots=2)  # the harness gives workers a 2s drain timeout
    await cluster.wait_worker_connected(a)
    client = cluster.client()
    quick_dir, stuck_dir = tmp_path / "quick", tmp_path / "stuck"
    quick_dir.mkdir()
    stuck_dir.mkdir()
    stuck = await client.trigger("five-steps", {"dir": str(stuck_dir), "hold": 60})
    quick = await client.trigger("slow-steps", {"dir": str(quick_dir), "steps": 3,
                                                "seconds": 0.3})
    await eventually(lambda: count_lines(stuck_dir / "step3") == 1, what="step 3 to start")
    await eventually(lambda: any(quick_dir.iterdir()), what="the quick run to start")

    sent = time.monotonic()
    a.signal(signal.SIGTERM)
    code = await asyncio.to_thread(a.proc.wait, 30)
    assert code == 0, a.output()
    assert time.monotonic() - sent < 10  # drain timeout + release, not the 60s step
    assert "released" in a.output()

    # The quick run finished during the drain; the stuck one was given back.
    assert (await client.get(quick.id)).status == "COMPLETED"
    released = await client.get(stuck.id)
    assert released.status == "QUEUED" and released.attempt == 0  # not counted as an attempt

    b = cluster.start_worker(slots=2)
    await cluster.wait_worker_connected(b)
    output = await client.result(stuck.id, timeout=30)
    assert output["pid"] == b.pid
    assert lines(stuck_dir / "step1") == [str(a.pid)]
    assert (await client.get(stuck.id)).attempt == 1


async def test_cancel_queued_and_running_runs(cluster: Cluster, tmp_path: Path) -> None:
    client = cluster.client()
    w = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(w)
    running = await client.trigger("five-steps", {"dir": str(tmp_path), "hold": 60})
    await eventually(lambda: count_lines(tmp_path / "step3") == 1, what="step 3 to start")
    queued = await client.trigger("typed-order", {"order_id": "Q", "quantity": 1},
                                  delay=3600)
    assert (await client.cancel(queued.id, "not needed")).status == "CANCELED"
    assert (await client.cancel(running.id)).status == "CANCELED"
    await eventually(lambda: "canceled by the coordinator" in w.output(),
                     what="the worker to be told")
    final = await client.get(running.id)
    assert final.status == "CANCELED" and final.finished_at is not None
    with pytest.raises(Exception, match="FAILED_PRECONDITION"):
        await client.cancel(running.id)
    # The worker is free again: its slot was given back.
    nxt = await client.trigger("typed-order", {"order_id": "N", "quantity": 2})
    assert await client.result(nxt.id, timeout=30) == {"order": "N", "quantity": 2}


async def test_sync_step_code_sees_ctx_cancelled(cluster: Cluster, tmp_path: Path) -> None:
    w = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(w)
    client = cluster.client()
    run = await client.trigger("cancellable", {"dir": str(tmp_path)})
    await eventually(lambda: count_lines(tmp_path / "working") == 1, what="the step to start")
    await client.cancel(run.id)
    await eventually(lambda: count_lines(tmp_path / "noticed") == 1, timeout=10,
                     what="the step to notice ctx.cancelled")
    assert (await client.get(run.id)).status == "CANCELED"

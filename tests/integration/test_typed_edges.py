"""Issue 10, "Typed edges", across the wire: unlimited run attempts, typed child
outputs, per-item idempotency keys, `ratchet.current_context()` in a worker."""

from __future__ import annotations

import pytest

from tests.harness import ROOT, Cluster

pytestmark = pytest.mark.timeout(60)

EDGE_TASKS = str(ROOT / "tests" / "integration" / "edge_tasks.py")


@pytest.fixture
async def worker(cluster: Cluster) -> None:
    w = cluster.start_worker(EDGE_TASKS, slots=4)
    await cluster.wait_worker_connected(w)


async def test_unlimited_attempts_fail_seven_times_then_complete(
    cluster: Cluster, worker: None
) -> None:
    client = cluster.client()
    run = await client.trigger("edge-unlimited", {"failures": 7})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED", final
    assert final.output == 8 and final.attempt == 8
    got = await client.get(run.id)
    assert got.error is None


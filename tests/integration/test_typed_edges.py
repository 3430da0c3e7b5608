"""Issue 10, "Typed edges", across the wire: unlimited run attempts, typed child
outputs, per-item idempotency keys, `ratchet.current_context()` in a worker."""

from __future__ import annotations

import pytest

import ratchet
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


async def test_child_outputs_are_typed_by_the_child_task(cluster: Cluster, worker: None) -> None:
    client = cluster.client()
    run = await client.trigger("edge-typed-parent", {})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED", final
    out = final.output
    assert out["by_task"] == ["Summary", 3]
    assert out["by_id"] == ["dict", {"words": 2, "title": "four "}]
    assert out["batch"] == [["Summary", 1], ["Summary", 2]]
    bad_run, task_id, type_name = out["bad"]
    assert bad_run.startswith("run") and task_id == "edge-summarise" and type_name == "Summary"
    # ratchet.current_context() in a sync step, in a worker thread.
    assert out["context"] == [True, f"{run.id}:probe", True]
    # Uncaught, the mismatch fails the parent at once: a retry would read the same output.
    run = await client.trigger("edge-typed-parent", {"uncaught": True})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "FAILED" and final.attempt == 1, final
    assert final.error is not None and final.error.type == "ratchet.ChildOutputError"
    assert final.error.non_retryable and "Summary" in final.error.message
    assert final.error.is_instance(ratchet.ChildOutputError)


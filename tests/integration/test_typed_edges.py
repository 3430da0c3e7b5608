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


async def test_batch_items_with_their_own_idempotency_keys(cluster: Cluster, worker: None) -> None:
    client = cluster.client()
    items = [ratchet.BatchItem({"text": "a"}, idempotency_key="doc-a"), {"text": "b"},
             ratchet.BatchItem({"text": "a again"}, idempotency_key="doc-a")]
    first = await client.batch_trigger("edge-summarise", items)
    assert [r.created for r in first] == [True, True, False]
    assert first[2].id == first[0].id and first[0].idempotency_key == "doc-a"
    # The same batch again: the keyed run is not created twice, the unkeyed one is.
    second = await client.batch_trigger("edge-summarise", items)
    assert [r.created for r in second] == [False, True, False]
    assert second[0].id == first[0].id and second[1].id != first[1].id
    done = await client.wait(first[0].id, timeout=30)
    assert done.status == "COMPLETED" and done.output == {"words": 1, "title": "a"}
    for run in (first[1], second[1]):
        assert (await client.wait(run.id, timeout=30)).status == "COMPLETED"

"""Child runs: trigger, trigger-and-wait, fan-out, exactly once, cancel cascades."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Cluster, count_lines, eventually, lines

pytestmark = pytest.mark.timeout(150)


async def all_children(cluster: Cluster, parent: str) -> list[str]:
    client = cluster.client()
    ids: list[str] = []
    token = ""
    while True:
        page, token = await client.list(parent=parent, limit=1000, page_token=token)
        ids += [r.id for r in page]
        if not token:
            return ids


async def test_trigger_wait_fire_and_forget_and_failures_in_gather(cluster: Cluster) -> None:
    worker = cluster.start_worker(slots=4)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("family", {})
    final = await client.wait(run.id, timeout=60)
    assert final.status == "COMPLETED", final
    out = final.output
    assert out["awaited"] == 9 and out["stepped"] == 42
    assert out["failed"] == {"status": "FAILED", "error": "negative: -1"}
    fired = await client.wait(out["fired"], timeout=30)
    assert fired.output == 49 and fired.parent_run_id == run.id
    children = await all_children(cluster, run.id)
    assert len(children) == 3 and out["fired"] in children
    kinds = {s.key: s.kind for s in (await client.get(run.id)).steps}
    assert kinds["square"] == "child" and kinds["bad-child"] == "child"


async def test_fan_out_of_200_returns_results_in_order(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=50)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("fan-out", {"dir": str(tmp_path), "count": 200})
    final = await client.wait(run.id, timeout=120)
    assert final.status == "COMPLETED", final
    assert final.output == {"count": 200, "sum": sum(i * i for i in range(200)),
                            "first": [0, 1, 4]}
    assert len(await all_children(cluster, run.id)) == 200
    assert count_lines(tmp_path / "parent-before") == 1
    assert count_lines(tmp_path / "parent-after") == 1


async def test_killing_the_parents_worker_creates_no_child_twice(
    cluster: Cluster, tmp_path: Path
) -> None:
    a = cluster.start_worker(slots=20)
    b = cluster.start_worker(slots=20)
    await cluster.wait_worker_connected(a)
    await cluster.wait_worker_connected(b)
    client = cluster.client()
    run = await client.trigger("fan-out", {"dir": str(tmp_path), "count": 200, "hold": 0.3})
    await eventually(lambda: count_lines(tmp_path / "parent-before") == 1,
                     what="the parent to start")
    parent_pid = int(lines(tmp_path / "parent-before")[0])
    holder = a if parent_pid == a.pid else b
    await eventually(lambda: len(list(tmp_path.glob("child-*"))) >= 5,
                     what="the fan-out to be under way")
    holder.kill()
    final = await client.wait(run.id, timeout=120)
    assert final.status == "COMPLETED", final
    assert final.output["count"] == 200
    children = await all_children(cluster, run.id)
    assert len(children) == 200 and len(set(children)) == 200
    assert count_lines(tmp_path / "parent-before") == 1


async def test_cancelling_a_parent_cancels_its_unfinished_children(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.start_worker(slots=4)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("fan-out", {"dir": str(tmp_path), "count": 20, "hold": 30})

    async def children_started() -> bool:
        return len(await all_children(cluster, run.id)) == 20

    await eventually(children_started, what="the children to exist")
    assert (await client.cancel(run.id)).status == "CANCELED"
    for child in await all_children(cluster, run.id):
        assert (await client.get(child)).status == "CANCELED"

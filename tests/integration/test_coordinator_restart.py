"""The coordinator is stateless: kill it mid-run, start it again, nothing is lost."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness import Cluster, count_lines, eventually

pytestmark = pytest.mark.timeout(120)


async def test_sigkill_coordinator_mid_run(cluster: Cluster, tmp_path: Path) -> None:
    workers = [cluster.start_worker(slots=4) for _ in range(2)]
    for w in workers:
        await cluster.wait_worker_connected(w)
    client = cluster.client()
    runs = [await client.trigger("slow-steps", {"dir": str(tmp_path), "steps": 4,
                                                "seconds": 0.3}) for _ in range(6)]
    await eventually(lambda: sum(1 for _ in tmp_path.iterdir()) >= 6,
                     what="the runs to make progress")
    assert cluster.coordinator is not None
    cluster.coordinator.kill()
    await cluster.start_coordinator()  # same port, same store

    for run in runs:
        final = await client.wait(run.id, timeout=60)
        assert final.status == "COMPLETED", (final, cluster.logs())
        assert final.output == 0 + 1 + 2 + 3
    for w in workers:
        assert w.proc.poll() is None, "workers reconnect by themselves"
        assert w.output().count("connected to") >= 2
    # The restarted coordinator adopted the leases the workers still held.
    assert cluster.coordinator is not None
    adopted = [int(n) for n in re.findall(r"adopted (\d+)", cluster.coordinator.output())]
    assert sum(adopted) >= 1, cluster.coordinator.output()
    # Every step of every run left its side effect. Only the step executing
    # when the coordinator died may have run twice; a completed one never again.
    for run in runs:
        counts = [count_lines(tmp_path / f"{run.id}-{i}") for i in range(4)]
        assert all(c >= 1 for c in counts) and sum(counts) <= 5, (run.id, counts)

"""The reconciler: a run stranded WAITING is found, repaired, logged and finishes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ratchet_server.engine import policy
from ratchet_server.store import open_store
from tests.harness import Cluster, eventually

pytestmark = pytest.mark.timeout(120)


async def test_a_stranded_run_is_repaired_within_the_interval(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    await cluster.start_coordinator("--reconcile-interval", "1s")
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("approval", {"dir": str(tmp_path)})
    token = await eventually(lambda: (tmp_path / "token").exists()
                             and (tmp_path / "token").read_text(), what="the token")

    async def waiting() -> bool:
        return (await client.get(run.id)).status == "WAITING"

    await eventually(waiting, what="the run to wait for its token")
    # Strand it as the old lost wake-up did: the token's step completes, but
    # the wake rule (here one that never wakes) leaves the run WAITING.
    store = await open_store(cluster.database_url)
    try:
        found = await store.find_token("test", token)
        assert found is not None
        outcome = policy.token_outcome(found[0], '{"by": "nobody"}', time.time())
        assert await store.resolve_waits([outcome], lambda *_: False) == [True]
    finally:
        await store.close()
    assert (await client.get(run.id)).status == "WAITING"
    stranded_at = time.monotonic()

    final = await client.wait(run.id, timeout=30)
    took = time.monotonic() - stranded_at
    assert final.status == "COMPLETED"
    assert final.output == {"approved": True, "decision": {"by": "nobody"}}
    # One interval to be seen (after the 1 s settle), a second at most to run.
    assert took < 6, took
    assert cluster.coordinator is not None
    assert f"reconciler: repaired run {run.id}" in cluster.coordinator.output()
    history = [e.type for e in await client.history(run.id)]
    assert "repaired" in history

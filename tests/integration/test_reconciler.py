"""The reconciler: a run stranded WAITING is found, repaired, logged and finishes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ratchet_server.engine import policy
from ratchet_server.store import open_store
from tests.harness import Cluster, eventually, run_cli_async

pytestmark = pytest.mark.timeout(120)


async def strand_a_run(cluster: Cluster, tmp_path: Path, reconcile_interval: str) -> str:
    """A run left WAITING although its token was completed; its id."""
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    await cluster.start_coordinator("--reconcile-interval", reconcile_interval)
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
    return run.id


async def test_a_stranded_run_is_repaired_within_the_interval(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    run_id = await strand_a_run(cluster, tmp_path, "1s")
    stranded_at = time.monotonic()
    client = cluster.client()

    final = await client.wait(run_id, timeout=30)
    took = time.monotonic() - stranded_at
    assert final.status == "COMPLETED"
    assert final.output == {"approved": True, "decision": {"by": "nobody"}}
    # One interval to be seen (after the 1 s settle), a second at most to run.
    assert took < 6, took
    assert cluster.coordinator is not None
    assert f"reconciler: repaired run {run_id}" in cluster.coordinator.output()
    history = [e.type for e in await client.history(run_id)]
    assert "repaired" in history


async def test_runs_list_stuck_shows_what_the_reconciler_would_repair(
        cluster: Cluster, tmp_path: Path) -> None:
    run_id = await strand_a_run(cluster, tmp_path, "0")  # no reconciler
    await asyncio.sleep(1.2)  # the listing leaves out runs changed in the last second
    shown = await run_cli_async("runs", "list", "--stuck", env=cluster.cli_env("admin"))
    assert shown.returncode == 0, shown.stderr
    [line] = [ln for ln in shown.stdout.splitlines() if run_id in ln]
    assert "WAITING although its wait ended: approve" in line
    [(run, why)] = await cluster.client("admin").stuck()
    assert run.id == run_id and run.payload is None and "approve" in why
    refused = await run_cli_async("runs", "list", "--stuck", env=cluster.cli_env("client"))
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    # Leave nothing stuck behind for the invariant check after the test.
    assert await cluster.client().cancel(run_id)

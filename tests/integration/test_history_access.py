"""Who sees what in a run's history."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Cluster

pytestmark = pytest.mark.timeout(60)


async def test_lease_ids_are_shown_to_admin_keys_only(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    admin = cluster.client("admin")
    run = await admin.trigger("busy", {"dir": str(tmp_path)})
    await admin.wait(run.id, timeout=30)
    as_admin = await admin.history(run.id)
    assert any(e.lease_id for e in as_admin if e.type == "leased")
    as_client = await cluster.client("client").history(run.id)
    assert [e.type for e in as_client] == [e.type for e in as_admin]
    assert not any(e.lease_id for e in as_client)

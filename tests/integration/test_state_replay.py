"""`ctx.state` replays cleanly: a worker killed in the middle of a run does not
make append-style state updates happen twice (issue 10, "State that replays
cleanly")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ratchet_server.store import open_store
from tests.harness import ROOT, Cluster, count_lines, eventually, lines

pytestmark = pytest.mark.timeout(60)

STATE_TASKS = str(ROOT / "tests" / "integration" / "state_tasks.py")


async def test_appends_before_each_of_five_steps_survive_a_sigkill_in_step_four(
    cluster: Cluster, database_url: str, tmp_path: Path
) -> None:
    a = cluster.start_worker(STATE_TASKS, slots=1)
    await cluster.wait_worker_connected(a)
    client = cluster.client()
    work = tmp_path / "work"
    work.mkdir()

    run = await client.trigger("state-appends", {"dir": str(work), "hold": 60})
    await eventually(lambda: count_lines(work / "step4") == 1, what="step 4 to start")
    assert lines(work / "step4") == [str(a.pid)]
    a.kill()
    b = cluster.start_worker(STATE_TASKS, slots=1)

    output = await client.result(run.id, timeout=30)
    assert output["pid"] == b.pid
    # Exactly one entry per step: the first three as the killed worker made
    # them (restored from the steps' checkpoints), the last two by the second.
    assert output["events"] == [f"1:{a.pid}", f"2:{a.pid}", f"3:{a.pid}",
                                f"4:{b.pid}", f"5:{b.pid}"]
    assert count_lines(work / "step4") == 2

    store = await open_store(database_url)
    try:
        stored = await store.get_run(None, run.id)
        steps = await store.get_steps(run.id)
    finally:
        await store.close()
    assert stored is not None and stored.state is not None
    assert json.loads(stored.state) == {"events": output["events"]}
    # Each step keeps the state it was completed with.
    assert [len(json.loads(s.state or "{}").get("events", [])) for s in steps] == [1, 2, 3, 4, 5]

"""`ratchet tasks` and `ratchet workers` (issue 12), and the hint of
`ratchet trigger --wait` when no worker serves the task (item 13): through a
real coordinator, worker and CLI processes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness import Cluster, eventually, run_cli_async

pytestmark = pytest.mark.timeout(120)


async def _json(cluster: Cluster, *args: str, role: str = "client") -> Any:
    result = await run_cli_async(*args, "--json", env=cluster.cli_env(role))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_tasks_and_workers_show_the_serving_session_until_it_stops(
        cluster: Cluster) -> None:
    worker = cluster.start_worker(slots=4)
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")
    held = await client.trigger("square", {"n": 3, "hold": 60})
    await eventually(lambda: _running(client, held.id), what="the run to start")

    [session] = await _json(cluster, "workers")
    assert session["slots_used"] == 1 and session["slots_free"] == 3
    assert session["slots"] == 4 and "five-steps" in session["task_ids"]
    assert session["last_seen_at"] is not None and session["worker_id"]
    sid = session["session_id"]

    [task] = await _json(cluster, "tasks", "five-steps")
    assert task["retry"]["max_attempts"] == 5 and task["retry"]["min_delay"] == 0.05
    assert "dir" in task["payload_schema"]["properties"]
    assert task["served_by"] == [sid]

    table = await run_cli_async("tasks", env=cluster.cli_env("client"))
    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if line.startswith("five-steps ")]
    assert "5 attempts" in row and '"dir"' in row and sid in row
    table = await run_cli_async("workers", env=cluster.cli_env("client"))
    assert table.returncode == 0, table.stderr
    assert "SLOTS USED" in table.stdout and "LAST HEARTBEAT" in table.stdout
    [row] = [line for line in table.stdout.splitlines() if line.startswith(sid)]
    assert row.split()[2:4] == ["1", "3"]  # session, worker, used, free, ...
    # Another environment sees neither the session nor the tasks.
    assert await _json(cluster, "workers", role="admin") != []
    other = cluster.cli_env("client", env="other")
    assert json.loads((await run_cli_async("workers", "--json", env=other)).stdout) == []
    assert json.loads((await run_cli_async("tasks", "--json", env=other)).stdout) == []

    worker.kill()
    await eventually(lambda: _no_workers(cluster), what="the session to close")
    [task] = await _json(cluster, "tasks", "five-steps")
    assert task["served_by"] == []
    table = await run_cli_async("tasks", "five-steps", env=cluster.cli_env("client"))
    assert "nobody" in table.stdout and sid not in table.stdout
    table = await run_cli_async("workers", env=cluster.cli_env("client"))
    assert table.returncode == 0 and "no workers connected" in table.stdout
    await client.cancel(held.id)


async def test_trigger_wait_says_no_worker_serves_the_task(cluster: Cluster) -> None:
    """Item 13: the timeout names the cause (no worker serves the task) and the fix."""
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)  # registers the tasks
    worker.kill()
    await eventually(lambda: _no_workers(cluster), what="the session to close")

    result = await run_cli_async("trigger", "greet", "--payload", '{"name": "x"}', "--wait",
                                 "--timeout", "1s", env=cluster.cli_env("client"))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "still QUEUED after 1.0s" in line
    assert "no worker connected to the coordinator" in line and "'greet'" in line
    assert "ratchet worker MODULE" in line
    client = cluster.client("client")
    [queued], _ = await client.list(task="greet")
    await client.cancel(queued.id)


async def test_trigger_wait_gives_no_hint_while_a_worker_serves_the_task(
        cluster: Cluster) -> None:
    """Busy, not missing: the one worker's only slot is taken, so the run
    times out QUEUED, and the message must not claim nobody serves it."""
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")
    held = await client.trigger("square", {"n": 3, "hold": 60})
    await eventually(lambda: _running(client, held.id), what="the run to start")

    result = await run_cli_async("trigger", "square", "--payload", '{"n": 2}', "--wait",
                                 "--timeout", "1s", env=cluster.cli_env("client"))
    assert result.returncode == 1 and "still QUEUED" in result.stderr
    assert "no worker" not in result.stderr
    for run in (await client.list(task="square"))[0]:
        await client.cancel(run.id)


async def _running(client: Any, run_id: str) -> bool:
    return bool((await client.get(run_id)).status == "RUNNING")


async def _no_workers(cluster: Cluster) -> bool:
    return await _json(cluster, "workers") == []

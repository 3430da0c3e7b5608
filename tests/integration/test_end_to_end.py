"""A client triggers, a worker process runs the 3-step example, the run completes."""

from __future__ import annotations

import json

import pytest

from tests.harness import EXAMPLE, Cluster, run_cli_async

pytestmark = pytest.mark.timeout(90)

EXPECTED = {"analysis": {"top_words": ["completed", "durable", "execution"], "sentences": 3},
            "word_count": 26}


async def test_trigger_by_client_and_cli(cluster: Cluster) -> None:
    worker = cluster.start_worker(EXAMPLE)
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")

    run = await client.trigger("process-document", {"url": "local://lorem"})
    assert run.status == "QUEUED" and run.created
    assert await client.result(run.id, timeout=30) == EXPECTED

    done = await run_cli_async("trigger", "process-document", "--payload",
                               '{"url": "local://lorem"}', "--wait", "--json",
                               env=cluster.cli_env("client"))
    assert done.returncode == 0, done.stderr
    cli_run = json.loads(done.stdout)
    assert cli_run["status"] == "COMPLETED"
    assert cli_run["output"] == EXPECTED

    for run_id in (run.id, cli_run["id"]):
        shown = await run_cli_async("runs", "show", run_id, "--json",
                                    env=cluster.cli_env("client"))
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["id"] == run_id and data["task"] == "process-document"
        assert data["status"] == "COMPLETED" and data["attempt"] == 1
        assert data["payload"] == {"url": "local://lorem"} and data["error"] is None
        assert [s["key"] for s in data["steps"]] == ["download", "extract", "analyse"]
        for step in data["steps"]:
            assert step["status"] == "COMPLETED" and step["kind"] == "run"
            assert step["started_at"] and step["finished_at"]
            assert step["finished_at"] >= step["started_at"]
        # The flaky download step took two attempts under its own retry policy.
        assert data["steps"][0]["attempts"] == 2
        assert data["steps"][0]["error"]["type"] == "ConnectionError"

    tree = await run_cli_async("runs", "show", run.id, env=cluster.cli_env("client"))
    assert tree.returncode == 0
    assert "download" in tree.stdout and "COMPLETED" in tree.stdout and "2 attempts" in tree.stdout

    listed = await run_cli_async("runs", "list", "--status", "COMPLETED", "--json",
                                 env=cluster.cli_env("client"))
    assert {r["id"] for r in json.loads(listed.stdout)} == {run.id, cli_run["id"]}

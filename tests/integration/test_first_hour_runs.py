"""`ratchet runs show` on waiting, canceled and timed-out runs, through real
processes on SQLite and Postgres (issue 12, items 3, 10, 11 and the pending
waits), and `runs replay` with nothing to replay (a usage error)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import ratchet
from tests.harness import ROOT, Cluster, eventually, run_cli, run_cli_async

NAPS = str(ROOT / "tests" / "integration" / "first_hour_tasks.py")

pytestmark = pytest.mark.timeout(90)


async def _status(client: ratchet.Client, run_id: str) -> str:
    return (await client.get(run_id)).status.value


async def _show(cluster: Cluster, run_id: str) -> tuple[str, dict[str, object]]:
    text, as_json = await asyncio.gather(
        run_cli_async("runs", "show", run_id, env=cluster.cli_env()),
        run_cli_async("runs", "show", run_id, "--json", env=cluster.cli_env()))
    assert text.returncode == 0, text.stderr
    assert as_json.returncode == 0, as_json.stderr
    return text.stdout, json.loads(as_json.stdout)


async def test_a_run_waiting_on_a_token_then_canceled(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=2)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("approval", {"dir": str(tmp_path), "timeout": 3600})

    async def waiting() -> bool:
        return await _status(client, run.id) == "WAITING"

    await eventually(waiting, what="the run to wait on its token")
    token = (tmp_path / "token").read_text()

    text, data = await _show(cluster, run.id)
    assert "WAITING  attempt 1" in text.splitlines()[0], text
    assert f"waiting on token {token}" in text
    assert f"complete it: ratchet tokens complete {token} --data '<JSON>'" in text
    [wait] = data["waits"]  # type: ignore[misc]
    assert wait["kind"] == "token" and wait["token_id"] == token and wait["times_out_at"]
    [step] = [s for s in data["steps"] if s["kind"] == "token"]  # type: ignore[attr-defined]
    assert step["token_id"] == token and step["wake_at"] == wait["times_out_at"]

    listed = await run_cli_async("runs", "list", "--status", "WAITING", env=cluster.cli_env())
    [line] = [ln for ln in listed.stdout.splitlines() if ln.startswith(run.id)]
    assert "WAITING    attempt 1" in line, line

    canceled = await run_cli_async("runs", "cancel", run.id, "--reason", "customer withdrew",
                                   env=cluster.cli_env())
    assert canceled.returncode == 0, canceled.stderr
    text, data = await _show(cluster, run.id)
    # The engine records the attempt that was waiting as the last one.
    assert data["status"] == "CANCELED" and data["attempt"] == 1, data
    assert "CANCELED  attempt 1" in text.splitlines()[0], text
    assert "canceled: customer withdrew" in text and data["cancel_reason"] == "customer withdrew"
    assert "RUNNING" not in text and "INTERRUPTED" in text and data["waits"] == []

    # Completing the canceled run's token changes nothing, and says why.
    completed, why = await client._complete_token(token, {"ok": True})
    assert not completed and "CANCELED" in why and "nothing changed" in why, why
    cli = await run_cli_async("tokens", "complete", token, "--data", '{"ok": true}',
                              env=cluster.cli_env())
    # A no-op is a failure (`tokens complete T && next` must stop): the reason on stderr.
    assert cli.returncode == 1 and cli.stdout == "", cli
    [line] = cli.stderr.splitlines()
    assert "CANCELED" in line and "already completed or timed out" not in line, line


async def test_a_run_waiting_on_sleeping_children_then_canceled(cluster: Cluster) -> None:
    worker = cluster.start_worker(NAPS, slots=4)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    parent = await client.trigger("nap-parent", {"count": 2})

    async def all_waiting() -> list[ratchet.Run] | None:
        kids, _ = await client.list(parent=parent.id)
        runs = [await client.get(parent.id), *kids]
        return kids if len(kids) == 2 and all(r.status == "WAITING" for r in runs) else None

    kids = {k.id for k in await eventually(all_waiting, what="parent and children to wait")}
    text, data = await _show(cluster, parent.id)
    assert "  child runs of step kids (2 of 2 unfinished)" in text, text
    assert "child runs:" in text and all(f"{kid}  napper  WAITING" in text for kid in kids)
    assert {c["id"] for c in data["children"]} == kids  # type: ignore[attr-defined]
    [wait] = data["waits"]  # type: ignore[misc]
    assert wait["kind"] == "child" and set(wait["children"]) == kids

    kid = sorted(kids)[0]
    text, data = await _show(cluster, kid)
    assert "  sleep nap until " in text and "(in 59m" in text, text
    [wait] = data["waits"]  # type: ignore[misc]
    assert wait["kind"] == "sleep" and wait["step_key"] == "nap" and wait["wake_at"]

    # Canceling the parent cancels its waiting children; each reads its last attempt.
    await client.cancel(parent.id)
    for run_id in (parent.id, *kids):
        run = await client.get(run_id)
        assert (run.status, run.attempt) == ("CANCELED", 1), run


async def test_a_waiting_run_that_times_out(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("approval", {"dir": str(tmp_path), "timeout": 3600},
                               max_duration=1.0)
    final = await client.wait(run.id, timeout=30)
    assert final.status == "TIMED_OUT" and final.attempt == 1, final
    text, _ = await _show(cluster, run.id)
    assert "TIMED_OUT  attempt 1" in text.splitlines()[0] and "RUNNING" not in text, text


def test_replay_with_nothing_to_replay_is_a_usage_error() -> None:
    done = run_cli("runs", "replay", "--coordinator", "127.0.0.1:9")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and "--status, --task or --tag" in done.stderr

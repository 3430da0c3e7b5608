"""Failed runs people can act on: history, replay after a fix, retry with a new payload."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.harness import Cluster, count_lines, run_cli_async

pytestmark = pytest.mark.timeout(120)


async def test_fix_and_replay_from_the_last_checkpoint(cluster: Cluster, tmp_path: Path) -> None:
    broken = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(broken)
    client = cluster.client()
    run = await client.trigger("buggy", {"dir": str(tmp_path)})
    failed = await client.wait(run.id, timeout=30)
    assert failed.status == "FAILED" and failed.attempt == 2
    assert failed.error is not None and failed.error.step_key == "three"
    # Run attempt 2 raised step three's recorded error again without calling it.
    assert count_lines(tmp_path / "three") == 1
    shown = await run_cli_async("runs", "show", run.id, env=cluster.cli_env())
    assert "error in step three: KeyError" in shown.stdout
    [three] = [line for line in shown.stdout.splitlines() if line.startswith("└─")]
    assert "✗" in three and "1 attempt" in three and "KeyError" in three

    broken.terminate()
    fixed = cluster.start_worker(slots=1, extra_env={"RATCHET_TEST_FIXED": "1"})
    await cluster.wait_worker_connected(fixed)
    replay = await run_cli_async("runs", "replay", run.id, env=cluster.cli_env())
    assert replay.returncode == 0, replay.stderr
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED" and final.output == "fixed"
    assert final.error is None and final.attempt == 3
    assert count_lines(tmp_path / "one") == 1 and count_lines(tmp_path / "two") == 1
    # The replay gave the FAILED step a fresh budget: the buggy attempt, then the fix.
    assert count_lines(tmp_path / "three") == 2
    [replayed] = [e for e in await client.history(run.id) if e.type == "replayed"]
    assert replayed.data["rerun_steps"] == ["three"]
    history = [e.type for e in await client.history(run.id)]
    assert "replayed" in history and history[-1] == "finished"
    again = await run_cli_async("runs", "replay", run.id, env=cluster.cli_env())
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr


async def test_retry_with_a_corrected_payload_links_both_runs(cluster: Cluster) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    bad = await client.trigger("greet", {"name": " "})
    assert (await client.wait(bad.id, timeout=30)).status == "FAILED"
    cli = await run_cli_async("runs", "retry", bad.id, "--payload", '{"name": "Ada"}',
                              env=cluster.cli_env())
    assert cli.returncode == 0, cli.stderr
    new_id = cli.stdout.strip()
    new = await client.wait(new_id, timeout=30)
    assert new.status == "COMPLETED" and new.output == "hello Ada" and new.replay_of == bad.id
    old_links = [e.data for e in await client.history(bad.id) if e.type == "replayed"]
    new_links = [e.data for e in await client.history(new_id) if e.type == "replayed"]
    assert old_links and old_links[0]["new_run_id"] == new_id
    assert new_links and new_links[0]["replay_of"] == bad.id
    scratch = await client.replay(bad.id, from_scratch=True)
    assert scratch.id != bad.id and scratch.replay_of == bad.id


async def test_history_of_a_run_that_retried_twice(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("fails-twice", {"dir": str(tmp_path)})
    assert (await client.wait(run.id, timeout=30)).status == "COMPLETED"
    events = await client.history(run.id)
    types = [e.type for e in events]
    assert types == ["triggered",
                     "leased", "step_completed", "retry_scheduled",
                     "leased", "retry_scheduled",
                     "leased", "finished"], types
    leased = [e for e in events if e.type == "leased"]
    assert [e.attempt for e in leased] == [1, 2, 3]
    assert len({e.lease_id for e in leased}) == 3 and all(e.lease_id for e in leased)
    retries = [e for e in events if e.type == "retry_scheduled"]
    assert [e.attempt for e in retries] == [1, 2]
    assert [e.lease_id for e in retries] == [e.lease_id for e in leased[:2]]
    assert retries[0].data["message"] == "transient failure 1"
    assert [e.id for e in events] == sorted(e.id for e in events)
    timeline = await run_cli_async("runs", "history", run.id, env=cluster.cli_env())
    assert timeline.returncode == 0
    assert timeline.stdout.count("retry_scheduled") == 2 and "attempt 3" in timeline.stdout


async def test_bulk_replay_of_failed_runs(cluster: Cluster, tmp_path: Path) -> None:
    broken = cluster.start_worker(slots=2)
    await cluster.wait_worker_connected(broken)
    client = cluster.client()
    for i in range(3):
        (tmp_path / str(i)).mkdir()
    runs = [await client.trigger("buggy", {"dir": str(tmp_path / str(i))}) for i in range(3)]
    for run in runs:
        await client.wait(run.id, timeout=30)
    broken.terminate()
    fixed = cluster.start_worker(slots=2, extra_env={"RATCHET_TEST_FIXED": "1"})
    await cluster.wait_worker_connected(fixed)
    bulk = await run_cli_async("runs", "replay", "--status", "FAILED", "--task", "buggy",
                               env=cluster.cli_env())
    assert bulk.returncode == 0, bulk.stderr
    assert "3/3" in bulk.stderr and "replayed 3 of 3" in bulk.stdout
    for run in runs:
        assert (await client.wait(run.id, timeout=30)).status == "COMPLETED"


async def test_catch_error_decides(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=3)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    dirs = {m: tmp_path / m for m in ("fail", "later", "replace")}
    for d in dirs.values():
        d.mkdir()
    runs = {m: await client.trigger("catcher", {"mode": m, "dir": str(d)})
            for m, d in dirs.items()}
    failed = await client.wait(runs["fail"].id, timeout=30)
    assert failed.status == "FAILED" and failed.attempt == 1
    replaced = await client.wait(runs["replace"].id, timeout=30)
    assert replaced.status == "FAILED" and replaced.error is not None
    assert (replaced.error.type, replaced.error.message) == ("Upstream", "replaced")
    later = await client.wait(runs["later"].id, timeout=30)
    assert later.status == "COMPLETED" and later.attempt == 2
    leased = [e.at for e in await client.history(later.id) if e.type == "leased"]
    assert leased[0] is not None and leased[1] is not None
    assert (leased[1] - leased[0]).total_seconds() >= 1.5  # not the policy's 0.05 s


async def test_list_failed_runs_by_error_type_and_time_and_discard(cluster: Cluster) -> None:
    worker = cluster.start_worker(slots=2)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    bad = await client.trigger("greet", {"name": " "})
    good = await client.trigger("greet", {"name": "Bo"})
    await client.wait(bad.id, timeout=30)
    await client.wait(good.id, timeout=30)
    by_type, _ = await client.list(status="FAILED", error_type="ratchet.NonRetryableError")
    assert [r.id for r in by_type] == [bad.id]
    assert (await client.list(error_type="KeyError"))[0] == []
    recent = await run_cli_async("runs", "list", "--since", "1h", "--json", env=cluster.cli_env())
    assert {r["id"] for r in json.loads(recent.stdout)} == {bad.id, good.id}
    future, _ = await client.list(created_after=time.time() + 60)
    assert future == []
    discarded = await run_cli_async("runs", "discard", bad.id, env=cluster.cli_env())
    assert discarded.returncode == 0, discarded.stderr
    assert [r.id for r in (await client.list(status="FAILED"))[0]] == []
    hidden, _ = await client.list(status="FAILED", include_discarded=True)
    assert [r.id for r in hidden] == [bad.id] and hidden[0].status == "FAILED"

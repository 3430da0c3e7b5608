"""Step retries, non-retryable errors, task-level retries from the snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Cluster, count_lines

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def worker(cluster: Cluster) -> None:
    w = cluster.start_worker(slots=4)
    await cluster.wait_worker_connected(w)


async def test_transient_step_failures_retry_then_complete(
    cluster: Cluster, worker: None, tmp_path: Path
) -> None:
    client = cluster.client()
    run = await client.trigger("flaky-step", {"dir": str(tmp_path), "failures": 2})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED", final
    assert final.output == "ok after 3"
    [step] = (await client.get(run.id)).steps
    assert step.key == "call" and step.status == "COMPLETED" and step.attempts == 3
    assert step.error is not None and step.error.type == "ConnectionError"
    assert final.attempt == 1  # retried inside the step, not as a new run attempt
    assert count_lines(tmp_path / "flaky") == 3


async def test_non_retryable_error_fails_after_one_attempt(
    cluster: Cluster, worker: None, tmp_path: Path
) -> None:
    client = cluster.client()
    run = await client.trigger("non-retryable", {"dir": str(tmp_path)})
    final = await client.get((await client.wait(run.id, timeout=30)).id)
    assert final.status == "FAILED"
    assert final.attempt == 1
    assert final.error is not None and final.error.type == "ratchet.NonRetryableError"
    assert final.error.non_retryable and final.error.step_key == "refuse"
    assert [(s.key, s.status, s.attempts) for s in final.steps] == [("refuse", "FAILED", 1)]
    assert count_lines(tmp_path / "refuse") == 1


async def test_task_attempts_exhausted_fails_with_last_error(
    cluster: Cluster, worker: None, tmp_path: Path
) -> None:
    client = cluster.client()
    run = await client.trigger("always-fails", {"dir": str(tmp_path)})
    final = await client.get((await client.wait(run.id, timeout=30)).id)
    assert final.status == "FAILED"
    assert final.attempt == 3
    assert final.error is not None
    assert final.error.type == "ValueError" and final.error.message == "bug on attempt 3"
    assert "Traceback" in final.error.stack
    # The completed step ran once; every retry replayed it from the snapshot.
    assert count_lines(tmp_path / "prepare") == 1
    assert count_lines(tmp_path / "attempts") == 3


async def test_task_retry_replays_from_snapshot(
    cluster: Cluster, worker: None, tmp_path: Path
) -> None:
    client = cluster.client()
    run = await client.trigger("fails-once", {"dir": str(tmp_path)})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED" and final.output == "done on attempt 2"
    assert final.error is None  # the first attempt's error does not stick to a success
    assert count_lines(tmp_path / "first") == 1
    assert count_lines(tmp_path / "second") == 1
    assert count_lines(tmp_path / "attempts") == 2


async def test_refused_output_fails_the_run_instead_of_leaving_it_running(
    cluster: Cluster, worker: None, tmp_path: Path
) -> None:
    client = cluster.client()
    run = await client.trigger("huge-output", {"dir": str(tmp_path)})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "FAILED"
    assert final.error is not None and final.error.non_retryable
    assert "refused" in final.error.message and "limit" in final.error.message
    assert count_lines(tmp_path / "attempts") == 1

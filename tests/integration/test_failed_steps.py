"""A FAILED step stays failed on later run attempts (issue 10, "a saga creates
money"), unless the run policy says rerun_failed_steps; replay re-runs it;
a compensated run is not replayed unless forced. Real coordinator and worker
processes; step calls are counted in files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import ratchet
from tests.harness import ROOT, Cluster, count_lines, run_cli_async
from tests.integration import failed_step_tasks as tasks

pytestmark = pytest.mark.timeout(90)

TASKS = str(ROOT / "tests" / "integration" / "failed_step_tasks.py")


async def started(cluster: Cluster) -> ratchet.Client:
    worker = cluster.start_worker(TASKS, slots=4)
    await cluster.wait_worker_connected(worker)
    return cluster.client()


def workdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


async def test_a_failed_step_is_not_run_again_on_later_run_attempts(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = await started(cluster)
    d = workdir(tmp_path, "default")
    run = await client.trigger("stays-failed", {"dir": str(d), "failures": 1})
    final = await client.wait(run.id, timeout=30)
    # Three run attempts; the step was called on the first only, and its
    # recorded error failed the other two.
    assert final.status == "FAILED" and final.attempt == 3
    assert count_lines(d / "flaky") == 1
    assert final.error is not None and final.error.type == "ConnectionError"
    assert final.error.step_key == "flaky" and "flaky call 1" in final.error.message
    shown = await client.get(run.id)
    [step] = [s for s in shown.steps if s.key == "flaky"]
    assert step.status == "FAILED" and step.attempts == 1


async def test_rerun_failed_steps_gives_the_step_a_fresh_budget(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = await started(cluster)
    declared = workdir(tmp_path, "declared")
    run = await client.trigger("reruns-failed", {"dir": str(declared), "failures": 1})
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED" and final.output == 2 and final.attempt == 2
    assert count_lines(declared / "flaky") == 2
    # The run's policy decides, so a trigger's own policy can ask for it too.
    triggered = workdir(tmp_path, "triggered")
    run = await client.trigger(
        "stays-failed", {"dir": str(triggered), "failures": 1},
        retry=ratchet.Retry(max_attempts=3, min_delay=0.05, rerun_failed_steps=True))
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED" and final.output == 2
    assert count_lines(triggered / "flaky") == 2


async def test_replay_runs_a_failed_step_again(cluster: Cluster, tmp_path: Path) -> None:
    client = await started(cluster)
    d = workdir(tmp_path, "replay")
    run = await client.trigger("stays-failed", {"dir": str(d), "failures": 1})
    assert (await client.wait(run.id, timeout=30)).status == "FAILED"
    assert count_lines(d / "flaky") == 1
    await client.replay(run.id)
    final = await client.wait(run.id, timeout=30)
    assert final.status == "COMPLETED" and final.output == 2 and final.attempt == 4
    assert count_lines(d / "flaky") == 2


async def transfer(client: ratchet.Client, d: Path, deposit_failures: int,
                   **options: Any) -> ratchet.Run:
    tasks.open_accounts(str(d), {"from": 100, "to": 0})
    run = await client.trigger("transfer", {"dir": str(d), "amount": 100,
                                            "deposit_failures": deposit_failures}, **options)
    return await client.wait(run.id, timeout=30)


@pytest.mark.parametrize("deposit_failures", [1000, 3], ids=["permanent", "transient"])
async def test_the_literal_saga_port_never_creates_money(
    cluster: Cluster, tmp_path: Path, deposit_failures: int
) -> None:
    """Temporal's "deposit failed -> refund -> re-raise", without compensate=:
    the deposit uses up its 3 attempts, the refund runs, the task raises. Run
    attempts 2 and 3 replay it: the deposit raises its recorded error again
    instead of running (the transient outage is over by then: it would
    succeed, on top of the refund), the refund returns its recorded result."""
    client = await started(cluster)
    d = workdir(tmp_path, "bank")
    final = await transfer(client, d, deposit_failures)
    assert final.status == "FAILED" and final.attempt == 3
    assert final.error is not None and final.error.step_key == "deposit"
    assert count_lines(d / "withdraw") == 1
    assert count_lines(d / "deposit") == 3
    assert count_lines(d / "refund") == 1
    assert tasks.balances(str(d)) == {"from": 100, "to": 0}


async def test_rerun_failed_steps_is_the_old_trap(cluster: Cluster, tmp_path: Path) -> None:
    """What the default prevents, kept as the explicit opt-in it now is: with
    rerun_failed_steps=True the deposit gets a fresh budget on run attempt 2,
    succeeds, and the run completes with the refund applied too."""
    client = await started(cluster)
    d = workdir(tmp_path, "bank")
    final = await transfer(client, d, 3, retry=ratchet.Retry(
        max_attempts=3, min_delay=0.05, rerun_failed_steps=True))
    assert final.status == "COMPLETED" and final.attempt == 2
    assert count_lines(d / "deposit") == 4 and count_lines(d / "refund") == 1
    assert tasks.balances(str(d)) == {"from": 100, "to": 100}  # 100 created


async def test_replay_refuses_a_compensated_run_unless_forced(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = await started(cluster)
    d = workdir(tmp_path, "bank")
    tasks.open_accounts(str(d), {"from": 100, "to": 0})
    run = await client.trigger("compensated-transfer",
                               {"dir": str(d), "deposit_failures": 1000})
    failed = await client.wait(run.id, timeout=30)
    assert failed.status == "FAILED" and count_lines(d / "refund") == 1
    assert any(s.key.startswith("ratchet:undo:") for s in (await client.get(run.id)).steps)

    one = await run_cli_async("runs", "replay", run.id, env=cluster.cli_env())
    assert one.returncode == 1
    assert "FAILED_PRECONDITION" in one.stderr and "compensated" in one.stderr
    assert "--from-scratch" in one.stderr and "--rerun-compensated" in one.stderr
    with pytest.raises(ratchet.ClientError) as info:
        await client.replay(run.id)
    assert info.value.code == "FAILED_PRECONDITION"
    assert (await client.get(run.id)).status == "FAILED"

    bulk = await run_cli_async("runs", "replay", "--status", "FAILED", "--task",
                               "compensated-transfer", env=cluster.cli_env())
    assert bulk.returncode == 0, bulk.stderr
    assert "replayed 0 of 1" in bulk.stdout and "skipped 1 compensated run" in bulk.stdout
    assert (await client.get(run.id)).status == "FAILED"

    forced = await run_cli_async("runs", "replay", run.id, "--rerun-compensated",
                                 env=cluster.cli_env())
    assert forced.returncode == 0, forced.stderr
    final = await client.wait(run.id, timeout=30)
    # The deposit still fails: the run ends FAILED again, its undo not redone.
    assert final.status == "FAILED" and final.attempt > failed.attempt
    assert count_lines(d / "withdraw") == 1 and count_lines(d / "refund") == 1
    assert tasks.balances(str(d)) == {"from": 100, "to": 0}

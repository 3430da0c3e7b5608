"""Worker crashes do not eat attempts; a run that kills its worker every time
stops after the lease-loss bound, and its on_failure hook runs once (issue 10,
part B, with real coordinator and worker processes on both stores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import (
    ROOT,
    Cluster,
    Process,
    count_lines,
    eventually,
    lines,
    run_cli_async,
)

pytestmark = pytest.mark.timeout(120)

TASKS = str(ROOT / "tests" / "integration" / "lease_loss_tasks.py")


async def test_three_sigkills_in_a_row_do_not_fail_a_run_allowed_two_attempts(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    work = tmp_path / "work"
    work.mkdir()
    worker = cluster.start_worker(TASKS, slots=1)
    await cluster.wait_worker_connected(worker)  # registers the task
    run = await client.trigger("crash-prone", {"dir": str(work), "kills": 3})
    for n in (1, 2, 3):
        if n > 1:
            worker = cluster.start_worker(TASKS, slots=1)
        await eventually(lambda n=n: count_lines(work / "hold") == n, timeout=30,
                         what=f"step 'hold' to start ({n})")
        assert lines(work / "hold")[-1] == str(worker.pid)
        worker.kill()  # SIGKILL, inside the step
    last = cluster.start_worker(TASKS, slots=1)
    output = await client.result(run.id, timeout=30)
    assert output == {"tries": 4, "pid": last.pid}
    final = await client.get(run.id)
    assert final.status == "COMPLETED"
    assert final.attempt == 1  # the three lost leases cost no attempt
    assert final.lease_losses == 3
    assert count_lines(work / "before") == 1  # completed steps did not run again
    # `ratchet runs show` says so.
    shown = await run_cli_async("runs", "show", run.id, env=cluster.cli_env())
    assert shown.returncode == 0, shown.stderr
    assert "COMPLETED  attempt 1  lost leases 3" in shown.stdout.splitlines()[0]
    as_json = await run_cli_async("runs", "show", run.id, "--json", env=cluster.cli_env())
    assert json.loads(as_json.stdout)["lease_losses"] == 3


async def test_a_run_that_kills_its_worker_every_time_stops_at_the_bound(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    work = tmp_path / "work"
    work.mkdir()
    workers: list[Process] = [cluster.start_worker(TASKS, slots=1)]
    await cluster.wait_worker_connected(workers[0])
    run = await client.trigger("kamikaze", {"dir": str(work)})

    async def finished() -> bool:
        # Each worker the run kills is replaced, as a supervisor would.
        if workers[-1].proc.poll() is not None:
            workers.append(cluster.start_worker(TASKS, slots=1))
        return (await client.get(run.id)).status not in ("QUEUED", "RUNNING", "WAITING")

    await eventually(finished, timeout=90, interval=0.1, what="the run to end")
    final = await client.get(run.id)
    assert final.status == "FAILED"
    assert final.error is not None and final.error.type == "ratchet.LeaseLossLimit"
    assert final.error.non_retryable
    assert "lost 3 times (limit 2)" in final.error.message
    assert final.lease_losses == 3 and final.attempt == 1
    # Killed three times; the finishing lease did not run the step again...
    assert count_lines(work / "boom") == 3
    assert count_lines(work / "before") == 1
    # ...and ran the on_failure hook, once, with the final error.
    hook = lines(work / "on_failure")
    assert len(hook) == 1, hook
    assert hook[0].startswith("ratchet.LeaseLossLimit: the run's lease was lost 3 times")
    assert "boom" not in {s.key for s in final.steps if s.status == "COMPLETED"}

"""Workers die; runs do not."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.harness import Cluster, count_lines, eventually, lines

pytestmark = pytest.mark.timeout(120)


async def test_sigkill_during_step_three_resumes_on_other_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    # A lease TTL far above 2 s: only noticing the lost session can be that fast.
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    await cluster.start_coordinator("--lease-ttl", "30s")
    a = cluster.start_worker(slots=2)
    b = cluster.start_worker(slots=2)
    await cluster.wait_worker_connected(a)
    await cluster.wait_worker_connected(b)
    client = cluster.client()
    work = tmp_path / "work"
    work.mkdir()

    run = await client.trigger("five-steps", {"dir": str(work), "hold": 60})
    await eventually(lambda: count_lines(work / "step3") == 1, what="step 3 to start")
    holder_pid = int(lines(work / "step3")[0])
    holder, other = (a, b) if holder_pid == a.pid else (b, a)
    assert holder_pid == holder.pid

    killed_at = time.monotonic()
    holder.kill()
    await eventually(lambda: count_lines(work / "step3") == 2, timeout=10,
                     interval=0.02, what="step 3 to start again")
    resumed_after = time.monotonic() - killed_at
    assert resumed_after < 2.0, f"resumed {resumed_after:.2f}s after the kill"

    output = await client.result(run.id, timeout=30)
    assert output["pid"] == other.pid and output["steps"] == [1, 2, 3, 4, 5]
    assert lines(work / "step1") == [str(holder_pid)]
    assert lines(work / "step2") == [str(holder_pid)]
    assert count_lines(work / "step3") == 2
    for i in (4, 5):
        assert lines(work / f"step{i}") == [str(other.pid)]
    final = await client.get(run.id)
    assert final.attempt == 1  # the lost lease cost no attempt...
    assert final.lease_losses == 1  # ...it is counted apart
    assert [s.attempts for s in final.steps] == [1, 1, 1, 1, 1]


async def test_silent_worker_loses_its_lease_and_is_fenced(
    cluster: Cluster, tmp_path: Path
) -> None:
    a = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(a)
    client = cluster.client()
    work = tmp_path / "work"
    work.mkdir()

    run = await client.trigger("silent", {"dir": str(work), "hold": 1.0})
    await eventually(lambda: count_lines(work / "two") == 1, what="step two to start")
    a.signal(signal.SIGSTOP)
    try:
        b = cluster.start_worker(slots=1)
        await cluster.wait_worker_connected(b)
        # After the lease TTL (2s) the run moves to b, which completes it.
        output = await client.result(run.id, timeout=30)
        assert output == {"pid": b.pid}
    finally:
        a.signal(signal.SIGCONT)
    # a wakes up, finishes its sleep, and its checkpoint is refused.
    refused = re.compile(r"run \S+: lease \S+ lost \(lease .* is no longer current\)")
    await eventually(lambda: refused.search(a.output()), timeout=15,
                     what="the silent worker's checkpoint to be refused")
    assert a.proc.poll() is None  # it drops the run, not the process
    final = await client.get(run.id)
    assert final.status == "COMPLETED" and final.output == {"pid": b.pid}
    assert lines(work / "one") == [str(a.pid)]
    assert lines(work / "two") == [str(a.pid), str(b.pid)]
    three = next(s for s in final.steps if s.key == "three")
    assert three.output == b.pid

"""Due times come from the coordinator's clock, whatever the worker's says.

A worker whose clock is 10 minutes slow once turned a long `ctx.sleep` (and a
step's backoff, and a catch_error delay) into a due time 10 minutes in the
past: the run woke at once. Workers now send durations and the coordinator
adds them to its own clock.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.harness import ROOT, Cluster, count_lines, eventually

pytestmark = pytest.mark.timeout(120)

CLOCK_TASKS = str(ROOT / "tests" / "integration" / "clock_tasks.py")
SKEW = -600.0  # the worker's clock is 10 minutes slow
WAIT = 6.0  # longer than the worker's 5 s sleep threshold: the run suspends


async def test_a_worker_with_a_slow_clock_waits_the_full_time(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.start_worker(CLOCK_TASKS, extra_env={
        "RATCHET_TEST_CLOCK_SKEW": str(SKEW)})
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    dirs = {name: tmp_path / name for name in ("sleep", "backoff", "catch")}
    for d in dirs.values():
        d.mkdir()
    started = time.time()
    sleep = await client.trigger("skewed-sleep", {"dir": str(dirs["sleep"]), "seconds": WAIT})
    backoff = await client.trigger("skewed-backoff",
                                   {"dir": str(dirs["backoff"]), "seconds": WAIT})
    catch = await client.trigger("skewed-catch", {"dir": str(dirs["catch"]), "seconds": WAIT})

    done = await client.wait(sleep.id, timeout=60)
    assert done.status == "COMPLETED", done
    assert time.time() - started >= WAIT - 0.5, "the sleep ended early"
    # The hook really skewed the worker's clock (else this test proves nothing).
    assert done.output["worker_clock"] - time.time() == pytest.approx(SKEW, abs=30)

    done = await client.wait(backoff.id, timeout=60)
    assert done.status == "COMPLETED" and done.output == 2, done
    assert time.time() - started >= WAIT - 0.5, "the backoff ended early"
    assert count_lines(dirs["backoff"] / "flaky") == 2
    history = await client.history(backoff.id)
    # Leased, suspended for the backoff, woken once when due: not a loop of
    # leases that each find the retry due by the coordinator but not by the worker.
    assert [e.type for e in history].count("leased") == 2, [e.type for e in history]
    suspended = next(e for e in history if e.type == "suspended")
    resumed = [e for e in history if e.type == "leased"][1]
    assert suspended.at is not None and resumed.at is not None
    assert (resumed.at - suspended.at).total_seconds() >= WAIT - 1.0

    done = await client.wait(catch.id, timeout=60)
    assert done.status == "COMPLETED" and done.output == 2, done
    history = await client.history(catch.id)
    scheduled = next(e for e in history if e.type == "retry_scheduled")
    assert scheduled.data["delay"] == pytest.approx(WAIT, abs=1.0), scheduled.data
    second = [e for e in history if e.type == "leased"][1]
    assert second.at is not None and scheduled.at is not None
    assert (second.at - scheduled.at).total_seconds() >= WAIT - 0.5


async def test_a_worker_with_a_fast_clock_resumes_a_pending_sleep_on_time(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The snapshot's wake_at is the coordinator's time: a worker 10 minutes
    ahead resuming a run whose sleep is still pending must not find it long
    past due (LeaseGrant.sent_at tells it the coordinator's time)."""
    worker = cluster.start_worker(CLOCK_TASKS, extra_env={"RATCHET_TEST_CLOCK_SKEW": "600"})
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    started = time.time()
    run = await client.trigger("skewed-gather", {"dir": str(tmp_path), "seconds": 8.0})
    token = await eventually(lambda: (tmp_path / "token").exists()
                             and (tmp_path / "token").read_text(), what="the token")

    async def waiting() -> bool:
        return (await client.get(run.id)).status == "WAITING"

    await eventually(waiting, what="the run to suspend")
    assert await client.complete_token(token, "go")
    done = await client.wait(run.id, timeout=60)
    assert done.status == "COMPLETED", done
    assert time.time() - started >= 7.5, "the pending sleep ended early on resume"
    assert count_lines(tmp_path / "woke") == 1
    types = [e.type for e in await client.history(run.id)]
    assert types.count("suspended") == 2, types  # on the token and the sleep, then the sleep

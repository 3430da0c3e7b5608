"""Durable waits: sleeps that hold no slot, tokens, gather, restarts, timers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ratchet_server.store import open_store
from tests.harness import Cluster, count_lines, eventually, run_cli_async

pytestmark = pytest.mark.timeout(150)


async def status_of(cluster: Cluster, run_id: str) -> str:
    return str((await cluster.client().get(run_id)).status)


async def test_a_sleeping_run_holds_no_slot(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    sleeper = await client.trigger("sleeper", {"dir": str(tmp_path), "seconds": 30})
    await eventually(lambda: status_of(cluster, sleeper.id), what="the sleeper to start")

    async def waiting() -> bool:
        return await status_of(cluster, sleeper.id) == "WAITING"

    await eventually(waiting, what="the sleeper to suspend")
    # The only slot is free: three other runs complete during the sleep.
    others = [await client.trigger("busy", {"dir": str(tmp_path)}) for _ in range(3)]
    for run in others:
        assert (await client.wait(run.id, timeout=20)).status == "COMPLETED"
    assert await status_of(cluster, sleeper.id) == "WAITING"
    assert count_lines(tmp_path / "busy") == 3

    final = await client.wait(sleeper.id, timeout=60)
    assert final.status == "COMPLETED", final
    assert final.output["slept"] >= 30
    assert final.attempt == 1  # waiting is not failing: the resume kept the attempt
    assert count_lines(tmp_path / "before") == 1  # the step before the sleep ran once
    assert count_lines(tmp_path / "after") == 1
    nap = next(s for s in (await client.get(sleeper.id)).steps if s.key == "nap")
    assert nap.kind == "sleep" and nap.status == "COMPLETED"


async def test_restarts_during_a_long_sleep_keep_the_wake_up(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("sleeper", {"dir": str(tmp_path), "seconds": 8})

    async def waiting() -> bool:
        return await status_of(cluster, run.id) == "WAITING"

    await eventually(waiting, what="the run to suspend")
    assert cluster.coordinator is not None
    cluster.coordinator.kill()
    worker.kill()
    await cluster.start_coordinator()
    fresh = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(fresh)
    final = await client.wait(run.id, timeout=60)
    assert final.status == "COMPLETED" and final.output["slept"] >= 8
    assert final.output["pid"] == fresh.pid
    assert count_lines(tmp_path / "before") == 1 and count_lines(tmp_path / "after") == 1


async def test_token_completed_by_cli_resumes_the_run(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("approval", {"dir": str(tmp_path)})
    token = await eventually(lambda: (tmp_path / "token").exists()
                             and (tmp_path / "token").read_text(), what="the token")

    async def waiting() -> bool:
        return await status_of(cluster, run.id) == "WAITING"

    await eventually(waiting, what="the run to wait for its token")
    env = cluster.cli_env("client")
    done = await run_cli_async("tokens", "complete", token, "--data", '{"by": "ana"}', env=env)
    assert done.returncode == 0 and "completed" in done.stdout, done.stderr
    final = await client.wait(run.id, timeout=30)
    assert final.output == {"approved": True, "decision": {"by": "ana"}}
    assert final.attempt == 1
    again = await run_cli_async("tokens", "complete", token, "--data", '{"by": "bo"}', env=env)
    assert again.returncode == 1 and "nothing changed" in again.stderr, again  # a no-op fails
    assert again.stdout == ""
    assert (await client.get(run.id)).output == final.output  # the second changed nothing
    assert count_lines(tmp_path / "decided") == 1
    unknown = await run_cli_async("tokens", "complete", "tok_nope", env=env)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


async def test_token_timeout_raises_in_the_task(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("approval", {"dir": str(tmp_path), "timeout": 2})
    final = await client.wait(run.id, timeout=30)
    assert final.output == {"approved": False, "timed_out": True}
    token = (tmp_path / "token").read_text()
    assert not await client.complete_token(token, {"late": True})


async def test_gather_of_three_sleeps_takes_the_longest(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    started = time.monotonic()
    run = await client.trigger("three-sleeps", {"dir": str(tmp_path)})
    final = await client.wait(run.id, timeout=90)
    took = time.monotonic() - started
    assert final.status == "COMPLETED" and final.output == [10, 20, 30]
    assert 30 <= took < 45, f"took {took:.1f}s"
    assert count_lines(tmp_path / "done") == 1
    kinds = {s.key: (s.kind, s.status) for s in (await client.get(run.id)).steps}
    assert kinds == {k: ("sleep", "COMPLETED") for k in ("s1", "s2", "s3")}


async def test_delay_ttl_and_max_duration(cluster: Cluster, tmp_path: Path) -> None:
    worker = cluster.start_worker(slots=2)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()

    delayed = await client.trigger("busy", {"dir": str(tmp_path)}, delay=2)
    final = await client.wait(delayed.id, timeout=30)
    assert final.status == "COMPLETED"
    assert final.started_at is not None and final.created_at is not None
    # run_at counts from the engine's clock reading; created_at is stamped by the
    # store a moment later (well under 50 ms).
    assert (final.started_at - final.created_at).total_seconds() >= 2 - 0.05

    long = await client.trigger("five-steps", {"dir": str(tmp_path), "hold": 60},
                                max_duration=2)
    timed_out = await client.wait(long.id, timeout=30)
    assert timed_out.status == "TIMED_OUT"
    await eventually(lambda: "exceeded its max duration" in worker.output(),
                     what="the worker to be told to stop")

    worker.terminate()
    expiring = await client.trigger("busy", {"dir": str(tmp_path)}, ttl=1)
    assert (await client.wait(expiring.id, timeout=30)).status == "EXPIRED"

    cli = await run_cli_async("trigger", "busy", "--payload", f'{{"dir": "{tmp_path}"}}',
                              "--ttl", "500ms", "--tag", "x", "--json",
                              env=cluster.cli_env("client"))
    assert cli.returncode == 0, cli.stderr
    cli_run = json.loads(cli.stdout)
    assert cli_run["tags"] == ["x"]
    assert (await client.wait(cli_run["id"], timeout=30)).status == "EXPIRED"


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_two_coordinators_fire_each_timer_once(cluster: Cluster, tmp_path: Path) -> None:
    second = Cluster(cluster.database_url, tmp_path / "second")
    (tmp_path / "second").mkdir()
    second.keys = cluster.keys
    try:
        await second.start_coordinator()
        workers = [cluster.start_worker(slots=4), second.start_worker(slots=4)]
        for c, w in zip((cluster, second), workers, strict=True):
            await c.wait_worker_connected(w)
        client = cluster.client()
        for i in range(8):
            (tmp_path / f"r{i}").mkdir()
        runs = [await client.trigger("sleeper", {"dir": str(tmp_path / f"r{i}"), "seconds": 6})
                for i in range(8)]
        for run in runs:
            assert (await client.wait(run.id, timeout=60)).status == "COMPLETED"
        store = await open_store(cluster.database_url)
        try:
            for i, run in enumerate(runs):
                events = await store.get_events(run.id)
                fired = [e for e in events if e["type"] == "wait_completed"]
                assert len(fired) == 1, events
                assert count_lines(tmp_path / f"r{i}" / "after") == 1
        finally:
            await store.close()
    finally:
        await second.close()


async def test_higher_priority_runs_start_first(cluster: Cluster, tmp_path: Path) -> None:
    first = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(first)
    first.terminate()  # the task is registered; nothing serves it now
    client = cluster.client()
    low = [await client.trigger("busy", {"dir": str(tmp_path)}, priority=0) for _ in range(3)]
    high = await client.trigger("busy", {"dir": str(tmp_path)}, priority=10)
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    done = [await client.wait(r.id, timeout=30) for r in (*low, high)]
    started = sorted(done, key=lambda r: r.started_at or r.created_at)
    assert started[0].id == high.id


async def test_a_retry_due_while_running_does_not_strand_the_run(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("retry-beside-work", {"dir": str(tmp_path)})
    final = await client.wait(run.id, timeout=40)
    assert final.status == "COMPLETED" and final.output == ["ok", None]
    assert count_lines(tmp_path / "flaky") == 2

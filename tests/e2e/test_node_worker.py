"""The protocol is language-neutral: a Node.js worker, built from docs/protocol.md
and the protos alone (examples/node_worker/), against a real coordinator, with
the Python `Client` (and a Python worker) on the other side.

Walk through the conformance checklist of docs/protocol.md §18. For each item:
the test that exercises it, or why none does. "(worker)" points at the code in
examples/node_worker/ratchet.js where a test cannot observe the rule from
outside.

 1. Bearer key of role worker/admin: every test (the worker key);
    a wrong role is refused in `test_bad_key_or_wrong_role_exits_1`.
 2. hello first, protocol_version 1, unique task ids, slots: every test
    (the coordinator ends the stream with INVALID_ARGUMENT or
    FAILED_PRECONDITION otherwise, which the worker treats as fatal, so
    "connected to" proves it).
 3. wait for welcome, speak its protocol_version: every test ("connected to"
    is logged on the Welcome; writes are queued until then). A coordinator
    that answers another version cannot be produced here (worker: fatal).
 4. fatal stream statuses stop the worker, others reconnect with capped,
    jittered backoff: `test_bad_key_or_wrong_role_exits_1` (UNAUTHENTICATED,
    PERMISSION_DENIED); `test_reconnects_and_adopts_its_lease` (UNAVAILABLE
    while the coordinator is down). INVALID_ARGUMENT, FAILED_PRECONDITION and
    UNIMPLEMENTED go through the same branch (worker) but are not provoked.
 5. heartbeats every welcome.heartbeat_interval, never delayed by task code:
    `test_cancel_stops_the_run` holds a step for longer than the lease TTL and
    the lease survives; `test_stale_lease_checkpoint_is_refused` shows the
    converse (a stopped worker sends none and loses its lease).
 6. non-zero, unique request_id; acks matched by id: every test (ids come
    from one counter in `Worker._request`, acks are looked up by id);
    `test_python_client_runs_node_task` runs five runs on four slots, so
    writes of several leases may be in flight together, but nothing forces
    acks out of order.
 7. request_id 0 on hello/heartbeat/slots, no second hello: every test (a
    second hello would be answered INVALID_ARGUMENT; the worker sends one per
    stream).
 8. lease_id and run_id in every write, lease_id opaque: every test (writes
    without them are refused with code 9).
 9. run from the top with the snapshot, stored outputs for COMPLETED steps:
    `test_sigkill_during_step_two_resumes_on_another_worker`,
    `test_stale_lease_checkpoint_is_refused` and
    `test_sigterm_drains_then_releases` (step one does not run again; the sum
    is built from step one's stored output). Empty state as {}: (worker)
    `Context`; these tasks do not use state.
10. step keys name, name#2, ...: the tasks use each name once, so only `name`
    is observed (`test_python_client_runs_node_task` checks the keys).
11. no progress past a step before its COMPLETED ack:
    `test_reconnects_and_adopts_its_lease` (step three waits while step two's
    checkpoint is queued across the outage, and runs once it is acknowledged).
12. at most one unacknowledged write per lease: (worker) writes of a lease are
    chained in `Execution.write`; not observable from outside.
13. RETRYING before a retry, attempts over the whole run, retry_base:
    `test_step_retries_inside_the_run_attempt` (attempts 3, last error kept,
    one run attempt). retry_base across leases is not exercised.
14. strict JSON, limits, no set-but-empty state: every test (outputs are
    JSON.stringify'd); the worker never sends `state`. Oversized outputs are
    refused locally (worker) and not tested.
15. every lease ends with complete, release, abandonment or stream close:
    completion (every test), release (`test_sigterm_drains_then_releases`),
    abandonment (`test_stale_lease_checkpoint_is_refused`), close
    (`test_sigkill_during_step_two_resumes_on_another_worker`).
16. complete refused with 3/8 → complete{failed} or release; 13 → resend:
    (worker) `Worker._complete`; the coordinator cannot be made to refuse an
    output this worker produces, so it is not tested.
17. ack 9 → abandon the attempt, keep the process:
    `test_stale_lease_checkpoint_is_refused`.
18. no complete{suspended}: the worker never sends it.
19. CancelRun stops the run, nothing more is sent, unknown leases ignored:
    `test_cancel_stops_the_run` (only the first step is recorded, the slot is
    used again). A cancel for an unknown lease is not provoked.
20. keep executing while disconnected, list leases in active_lease_ids,
    abandon those not adopted, resend unacknowledged requests:
    `test_reconnects_and_adopts_its_lease` (adopted, resent, attempt 1).
    A lease missing from adopted_lease_ids is not provoked (worker: same
    `_abandon` path as code 9).
21. no expiry notice assumed: `test_stale_lease_checkpoint_is_refused` (the
    worker learns only from the code-9 ack).
22. drain on shutdown: `test_sigterm_drains_then_releases`. A lease pushed
    while draining is released at once (worker), not provoked.
23. ErrorInfo filled (type, message, stack, step_key, attempt):
    `test_step_retries_inside_the_run_attempt`.
24. 16 MiB messages, keepalive: (worker) channel options; not tested.
25. blocking code off the stream's thread, per-step idempotency key: the Node
    tasks are asynchronous I/O on the event loop (CPU-bound step code would
    need worker_threads, which this example does not offer); the key is
    passed to every step function (worker), not tested.
26. unknown fields and oneof kinds ignored: (worker) `_onMessage` ignores
    unknown kinds; nothing to provoke with protocol version 1.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import StartNode
from tests.harness import Cluster, count_lines, eventually, lines

pytestmark = pytest.mark.timeout(120)

TASK = "node-three-steps"


def work_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


async def test_python_client_runs_node_task(
    cluster: Cluster, start_node: StartNode, tmp_path: Path
) -> None:
    worker = start_node(slots=4)
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")
    runs = [await client.trigger(TASK, {"dir": str(work_dir(tmp_path, f"r{n}")), "n": n})
            for n in range(5)]
    for n, run in enumerate(runs):
        assert await client.result(run.id, timeout=30) == {"sum": n + 3, "pid": worker.pid}
        final = await client.get(run.id)
        assert final.status == "COMPLETED" and final.attempt == 1
        assert [(s.key, s.status, s.attempts, s.output) for s in final.steps] == [
            ("one", "COMPLETED", 1, n + 1),
            ("two", "COMPLETED", 1, n + 2),
            ("three", "COMPLETED", 1, n + 3),
        ]
        for step in ("one", "two", "three"):
            assert lines(tmp_path / f"r{n}" / step) == [str(worker.pid)]


async def test_sigkill_during_step_two_resumes_on_another_worker(
    cluster: Cluster, start_node: StartNode, tmp_path: Path
) -> None:
    a, b = start_node(slots=1), start_node(slots=1)
    await cluster.wait_worker_connected(a)
    await cluster.wait_worker_connected(b)
    client = cluster.client()
    work = work_dir(tmp_path, "work")

    run = await client.trigger(TASK, {"dir": str(work), "hold": 60, "n": 10})
    await eventually(lambda: count_lines(work / "two") == 1, what="step two to start")
    holder, other = (a, b) if lines(work / "two")[0] == str(a.pid) else (b, a)
    holder.kill()

    assert await client.result(run.id, timeout=30) == {"sum": 13, "pid": other.pid}
    assert lines(work / "one") == [str(holder.pid)]  # not run again: read from the snapshot
    assert lines(work / "two") == [str(holder.pid), str(other.pid)]
    assert lines(work / "three") == [str(other.pid)]
    final = await client.get(run.id)
    # The killed worker's lease is a lost lease: it gives its attempt back.
    assert (final.attempt, final.lease_losses) == (1, 1)
    assert [(s.key, s.output) for s in final.steps] == [("one", 11), ("two", 12), ("three", 13)]


async def test_python_and_node_workers_share_a_coordinator(
    cluster: Cluster, start_node: StartNode, tmp_path: Path
) -> None:
    python = cluster.start_worker(slots=2)
    node = start_node(slots=2)
    await cluster.wait_worker_connected(python)
    await cluster.wait_worker_connected(node)
    client = cluster.client()
    orders = [await client.trigger("typed-order", {"order_id": f"A{i}", "quantity": i + 1})
              for i in range(3)]
    steps = [await client.trigger(TASK, {"dir": str(work_dir(tmp_path, f"n{i}")), "n": i})
             for i in range(3)]
    for i, run in enumerate(orders):
        assert await client.result(run.id, timeout=30) == {"order": f"A{i}", "quantity": i + 1}
    for i, run in enumerate(steps):
        assert await client.result(run.id, timeout=30) == {"sum": i + 3, "pid": node.pid}
    assert "typed-order" not in node.output()
    assert TASK not in python.output()


async def test_stale_lease_checkpoint_is_refused(
    cluster: Cluster, start_node: StartNode, tmp_path: Path
) -> None:
    a, b = start_node(slots=1), start_node(slots=1)
    await cluster.wait_worker_connected(a)
    await cluster.wait_worker_connected(b)
    client = cluster.client()
    work = work_dir(tmp_path, "work")

    run = await client.trigger(TASK, {"dir": str(work), "hold": 1.0})
    await eventually(lambda: count_lines(work / "two") == 1, interval=0.01,
                     what="step two to start")
    first, second = (a, b) if lines(work / "two")[0] == str(a.pid) else (b, a)
    first.signal(signal.SIGSTOP)
    try:
        # No heartbeats: after the lease TTL (2 s) the run moves to `second`.
        assert await client.result(run.id, timeout=30) == {"sum": 3, "pid": second.pid}
    finally:
        first.signal(signal.SIGCONT)
    # `first` wakes up, finishes step two and checkpoints it under its old lease.
    await eventually(lambda: "lease lost" in first.output(), timeout=15,
                     what="the stopped worker to learn that its lease is gone")
    assert first.proc.poll() is None  # it drops the run, not the process
    [lost] = [line for line in first.output().splitlines() if "lease lost" in line]
    assert "FAILED_PRECONDITION" in lost
    final = await client.get(run.id)
    assert final.status == "COMPLETED" and final.output == {"sum": 3, "pid": second.pid}
    assert (final.attempt, final.lease_losses) == (1, 1)  # the stopped worker's lease was lost
    assert lines(work / "one") == [str(first.pid)]
    assert lines(work / "two") == [str(first.pid), str(second.pid)]
    assert lines(work / "three") == [str(second.pid)]
    # The stored step output is the second worker's, not the late one's.
    assert [(s.key, s.output) for s in final.steps] == [("one", 1), ("two", 2), ("three", 3)]
    # And `first` still serves runs.
    assert second.terminate() == 0
    again = await client.trigger(TASK, {"dir": str(work_dir(tmp_path, "again")), "n": 1})
    assert await client.result(again.id, timeout=30) == {"sum": 4, "pid": first.pid}


async def test_cancel_stops_the_run(
    cluster: Cluster, start_node: StartNode, tmp_path: Path
) -> None:
    worker = start_node(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    work = work_dir(tmp_path, "work")
    run = await client.trigger(TASK, {"dir": str(work), "hold": 60})
    await eventually(lambda: count_lines(work / "two") == 1, what="step two to start")

    # Heartbeats keep the lease while the step holds for longer than the TTL.
    await asyncio.sleep(2.5)
    held = await client.get(run.id)
    assert held.status == "RUNNING" and held.attempt == 1
    assert "lease lost" not in worker.output()

    assert (await client.cancel(run.id, "changed my mind")).status == "CANCELED"
    await eventually(lambda: "canceled" in worker.output(), what="the worker to be told")
    assert "changed my mind" in worker.output()
    # The slot is free again, and the canceled run sent nothing more.
    nxt = await client.trigger(TASK, {"dir": str(work_dir(tmp_path, "next")), "n": 5})
    assert await client.result(nxt.id, timeout=30) == {"sum": 8, "pid": worker.pid}
    final = await client.get(run.id)
    assert final.status == "CANCELED"
    assert [s.key for s in final.steps] == ["one"]
    assert not (work / "three").exists()


async def test_step_retries_inside_the_run_attempt(
    cluster: Cluster, start_node: StartNode, tmp_path: Path
) -> None:
    worker = start_node()
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("node-flaky-step", {"dir": str(tmp_path), "failures": 2})
    assert await client.result(run.id, timeout=30) == "ok after 3"
    final = await client.get(run.id)
    assert final.attempt == 1  # retried inside the step, not as a new run attempt
    [step] = final.steps
    assert (step.key, step.status, step.attempts) == ("call", "COMPLETED", 3)
    assert step.error is not None
    assert (step.error.type, step.error.message) == ("ConnectionError", "transient failure 2")
    assert (step.error.step_key, step.error.attempt) == ("call", 2)
    assert "worker.js" in step.error.stack
    assert count_lines(tmp_path / "flaky") == 3


async def test_sigterm_drains_then_releases(
    cluster: Cluster, start_node: StartNode, tmp_path: Path
) -> None:
    worker = start_node(slots=2)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    quick_dir, stuck_dir = work_dir(tmp_path, "quick"), work_dir(tmp_path, "stuck")
    quick = await client.trigger(TASK, {"dir": str(quick_dir), "hold": 1.5})
    stuck = await client.trigger(TASK, {"dir": str(stuck_dir), "hold": 60})
    await eventually(lambda: count_lines(quick_dir / "two") == 1
                     and count_lines(stuck_dir / "two") == 1, what="both runs to hold")

    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.proc.wait, 30)
    assert code == 0, worker.output()
    assert time.monotonic() - sent < 9  # the 5 s drain and a release, not the 60 s step
    assert "released" in worker.output()
    # The quick run finished during the drain; the stuck one was given back,
    # not counted as an attempt.
    assert (await client.get(quick.id)).status == "COMPLETED"
    released = await client.get(stuck.id)
    assert released.status == "QUEUED" and released.attempt == 0

    successor = start_node(slots=1)
    await cluster.wait_worker_connected(successor)
    assert await client.result(stuck.id, timeout=30) == {"sum": 3, "pid": successor.pid}
    assert lines(stuck_dir / "one") == [str(worker.pid)]
    assert (await client.get(stuck.id)).attempt == 1


async def test_reconnects_and_adopts_its_lease(
    cluster: Cluster, start_node: StartNode, tmp_path: Path
) -> None:
    # A longer lease TTL than the harness's 2 s, so that the lease outlives
    # the coordinator's restart and the worker's reconnect backoff.
    assert cluster.coordinator is not None
    cluster.coordinator.kill()
    await cluster.start_coordinator("--lease-ttl", "15s")
    worker = start_node(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    work = work_dir(tmp_path, "work")
    run = await client.trigger(TASK, {"dir": str(work), "hold": 0.5})
    await eventually(lambda: count_lines(work / "two") == 1, interval=0.01,
                     what="step two to start")

    cluster.coordinator.kill()
    # Step two finishes while the coordinator is down: its checkpoint waits.
    await asyncio.sleep(1.0)
    assert not (work / "three").exists()
    await cluster.start_coordinator("--lease-ttl", "15s")

    assert await client.result(run.id, timeout=30) == {"sum": 3, "pid": worker.pid}
    output = worker.output()
    assert output.count("connected to") >= 2
    assert "adopted 1 of 1 leases" in output
    assert "resending 1 unacknowledged requests" in output
    assert "lease lost" not in output
    final = await client.get(run.id)
    assert final.attempt == 1  # adopted, so no attempt was lost
    for step in ("one", "two", "three"):
        assert lines(work / step) == [str(worker.pid)]


@pytest.mark.parametrize(("role", "status"), [(None, "UNAUTHENTICATED"),
                                              ("client", "PERMISSION_DENIED")])
async def test_bad_key_or_wrong_role_exits_1(
    cluster: Cluster, start_node: StartNode, role: str | None, status: str
) -> None:
    worker = start_node(key="rk_not-a-key" if role is None else cluster.key(role))
    code = await asyncio.to_thread(worker.proc.wait, 20)
    output = worker.output().strip()
    assert code == 1, output
    assert status in output and len(output.splitlines()) == 1, output

"""What the coordinator does at the edges of the session protocol (docs/protocol.md
§3, §13, §14): undecodable and oversized messages, a second hello, a hello with
one bad task, and a coordinator that is stopped while workers are connected.

The raw tests speak to the coordinator with a generic stream call and identity
serializers, so they can send bytes no generated stub would.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from ratchet.v1 import common_pb2, worker_pb2
from ratchet_server.store import open_store
from tests.harness import Cluster, count_lines, eventually

pytestmark = pytest.mark.timeout(90)

SESSION = "/ratchet.v1.WorkerService/Session"
GARBAGE = b"\xff\xff\xff\xff"


def _hello(*tasks: worker_pb2.TaskDefinition) -> bytes:
    return worker_pb2.SessionRequest(hello=worker_pb2.Hello(
        worker_id="edge-test", sdk_name="raw", protocol_version=1, slots=1,
        tasks=list(tasks))).SerializeToString()


async def _session(cluster: Cluster, messages: Sequence[bytes]
                   ) -> tuple[list[worker_pb2.SessionResponse], grpc.StatusCode, str]:
    """Send `messages` (raw bytes) on a session, keep the stream open until the
    coordinator ends it; what came back, and the final status."""
    async def requests():  # type: ignore[no-untyped-def]
        for m in messages:
            yield m
        await asyncio.sleep(30)  # the coordinator must end the stream, not us

    got: list[worker_pb2.SessionResponse] = []
    async with grpc.aio.insecure_channel(cluster.address, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        call = channel.stream_stream(SESSION, request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(
            requests(), metadata=(("authorization", f"Bearer {cluster.key('worker')}"),),
            timeout=20)
        try:
            async for raw in call:
                got.append(worker_pb2.SessionResponse.FromString(raw))
        except grpc.aio.AioRpcError as exc:
            return got, exc.code(), exc.details() or ""
        return got, await call.code(), await call.details()


def _coordinator_log(cluster: Cluster) -> str:
    assert cluster.coordinator is not None
    return cluster.coordinator.output()


async def test_an_undecodable_first_message_is_invalid_argument(cluster: Cluster) -> None:
    got, code, details = await _session(cluster, [GARBAGE])
    assert got == []
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "could not be decoded" in details
    assert "Traceback" not in _coordinator_log(cluster)
    assert " ERROR " not in _coordinator_log(cluster)


async def test_an_undecodable_message_after_the_welcome_is_invalid_argument(
    cluster: Cluster,
) -> None:
    got, code, details = await _session(cluster, [_hello(), GARBAGE])
    assert [m.WhichOneof("kind") for m in got] == ["welcome"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "could not be decoded" in details
    assert "Traceback" not in _coordinator_log(cluster)


async def test_a_second_hello_ends_the_stream(cluster: Cluster) -> None:
    got, code, details = await _session(cluster, [_hello(), _hello()])
    # No Ack that no request asked for: the welcome, then the end.
    assert [m.WhichOneof("kind") for m in got] == ["welcome"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "hello was already sent" in details


async def test_a_message_over_the_size_limit_ends_the_session_resource_exhausted(
    cluster: Cluster,
) -> None:
    too_big = worker_pb2.SessionRequest(request_id=1, checkpoint=worker_pb2.Checkpoint(
        run_id="run_x", lease_id="lease_x", step_key="s", attempt=1,
        output=b'"' + b"x" * (16 * 1024 * 1024) + b'"')).SerializeToString()
    got, code, details = await _session(cluster, [_hello(), too_big])
    assert [m.WhichOneof("kind") for m in got] == ["welcome"]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)


async def test_a_hello_with_one_bad_task_is_refused_whole(cluster: Cluster) -> None:
    good = worker_pb2.TaskDefinition(id="edge-good")
    bad = worker_pb2.TaskDefinition(id="edge-bad", retry=common_pb2.RetryPolicy(factor=0.5))
    got, code, details = await _session(cluster, [_hello(good, bad)])
    assert got == []
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "'edge-bad'" in details, details
    bad_schema = worker_pb2.TaskDefinition(id="edge-schema", payload_schema=b'{"type": 5}')
    got, code, details = await _session(cluster, [_hello(good, bad_schema)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'edge-schema'" in details, details
    # Nothing of the hello was registered, the good task included.
    store = await open_store(cluster.database_url)
    try:
        assert await store.get_task("test", "edge-good") is None
        assert await store.get_task("test", "edge-bad") is None
    finally:
        await store.close()


async def test_a_stopped_coordinator_leaves_leases_to_the_workers(
    cluster: Cluster, tmp_path: Path
) -> None:
    """SIGTERM: open streams end UNAVAILABLE; leases are not released, so the
    worker adopts its run after the restart and no attempt is lost."""
    # A lease TTL long enough for a restart on a busy machine: the point is
    # adoption, not how fast a coordinator starts.
    assert cluster.coordinator is not None
    cluster.coordinator.terminate()
    await cluster.start_coordinator("--lease-ttl", "20s")
    worker = cluster.start_worker(slots=1)
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    run = await client.trigger("slow-steps", {"dir": str(tmp_path), "steps": 8,
                                              "seconds": 0.5})
    await eventually(lambda: count_lines(tmp_path / f"{run.id}-0") == 1,
                     what="the first step")
    assert cluster.coordinator is not None
    cluster.coordinator.signal(signal.SIGTERM)
    assert await asyncio.to_thread(cluster.coordinator.proc.wait, 15) == 0
    cluster.coordinator.terminate()  # closes its log
    log = _coordinator_log(cluster)
    assert "ending 1 session(s) UNAVAILABLE" in log, log
    assert "are released in" not in log, log
    assert "stay with the worker" in log, log
    await eventually(lambda: "coordinator is shutting down" in worker.output(),
                     what="the worker to be told why")

    store = await open_store(cluster.database_url)
    try:
        stopped = await store.get_run("test", run.id)
        assert stopped is not None and stopped.status.value == "RUNNING", stopped
    finally:
        await store.close()

    await cluster.start_coordinator("--lease-ttl", "20s")
    done = await client.wait(run.id, timeout=60)
    assert done.status == "COMPLETED" and done.attempt == 1, done
    history = [e.type for e in await client.history(run.id)]
    assert "lease_adopted" in history and "lease_lost" not in history, history

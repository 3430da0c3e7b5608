"""Health checking, reflection, version, and what a malformed session gets."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ratchet.v1 import worker_pb2, worker_pb2_grpc
from tests.harness import Cluster

pytestmark = pytest.mark.timeout(60)


async def test_health_reflection_and_version(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ratchet.v1.WorkerService", "ratchet.v1.RunService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> reflection_pb2.ServerReflectionResponse:
            async for reply in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                return reply
            raise AssertionError("no reflection reply")

        names = {s.name for s in (await ask()).list_services_response.service}
        assert {"ratchet.v1.WorkerService", "ratchet.v1.RunService",
                "ratchet.v1.SystemService"} <= names

    version = await cluster.client("client").version()
    assert version["protocol_version"] == 1 and version["min_protocol_version"] == 1

    def healthz() -> tuple[int, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster.http_port}/healthz",
                                    timeout=5) as response:
            return response.status, response.read()

    assert await asyncio.to_thread(healthz) == (200, b"ok\n")


async def test_session_must_start_with_hello(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        call = stub.Session(
            iter([worker_pb2.SessionRequest(heartbeat=worker_pb2.Heartbeat())]),
            metadata=(("authorization", f"Bearer {cluster.key('worker')}"),))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_worker_with_a_client_key_is_refused(cluster: Cluster) -> None:
    worker = cluster.start_worker(extra_env={"RATCHET_API_KEY": cluster.key("client")})
    code = await asyncio.to_thread(worker.proc.wait, 30)
    assert code == 1
    last = worker.output().strip().splitlines()[-1]
    assert last.startswith("ratchet: ") and "PERMISSION_DENIED" in last
    assert "Traceback" not in worker.output()

"""Bad input gets the right status code and changes nothing."""

from __future__ import annotations

import grpc
import pytest

import ratchet
from ratchet.v1 import run_pb2, run_pb2_grpc
from tests.harness import Cluster, run_cli_async

pytestmark = pytest.mark.timeout(90)


async def test_unregistered_task_is_not_found(cluster: Cluster) -> None:
    client = cluster.client("client")
    with pytest.raises(ratchet.NotFoundError, match="not registered"):
        await client.trigger("no-such-task", {})
    result = await run_cli_async("trigger", "no-such-task", env=cluster.cli_env("client"))
    assert result.returncode != 0
    assert "NOT_FOUND" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_registered_task_waits_for_a_worker(cluster: Cluster) -> None:
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)
    worker.terminate()
    client = cluster.client("client")
    run = await client.trigger("typed-order", {"order_id": "A1", "quantity": 2})
    assert (await client.get(run.id)).status == "QUEUED"
    again = cluster.start_worker()
    await cluster.wait_worker_connected(again)
    assert await client.result(run.id, timeout=30) == {"order": "A1", "quantity": 2}


async def test_schema_and_json_violations_are_invalid_argument(cluster: Cluster) -> None:
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")
    with pytest.raises(ratchet.InvalidArgumentError, match="quantity"):
        await client.trigger("typed-order", {"order_id": "A1", "quantity": 0})
    with pytest.raises(ratchet.InvalidArgumentError):
        await client.trigger("typed-order", {"quantity": 3})
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = run_pb2_grpc.RunServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Trigger(run_pb2.TriggerRequest(task_id="typed-order", payload=b"{not json"),
                               metadata=(("authorization", f"Bearer {cluster.key('client')}"),))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    runs, _ = await client.list()
    assert runs == []  # nothing was created


async def test_bad_key_is_unauthenticated(cluster: Cluster) -> None:
    bad = ratchet.Client(cluster.address, api_key="rk_not-a-key")
    try:
        with pytest.raises(ratchet.AuthenticationError) as info:
            await bad.list()
        assert info.value.code == "UNAUTHENTICATED"
    finally:
        await bad.close()
    missing = ratchet.Client(cluster.address, api_key="")
    try:
        with pytest.raises(ratchet.AuthenticationError):
            await missing.list()
    finally:
        await missing.close()


async def test_roles_are_enforced(cluster: Cluster) -> None:
    as_worker = cluster.client("worker")
    with pytest.raises(ratchet.AuthenticationError) as info:
        await as_worker.list()
    assert info.value.code == "PERMISSION_DENIED"


async def test_environments_do_not_see_each_other(cluster: Cluster) -> None:
    for env in ("alpha", "beta"):
        worker = cluster.start_worker(env=env)
        await cluster.wait_worker_connected(worker)
    alpha, beta = cluster.client("client", "alpha"), cluster.client("client", "beta")
    run = await alpha.trigger("typed-order", {"order_id": "A", "quantity": 1})
    await alpha.wait(run.id, timeout=30)
    with pytest.raises(ratchet.NotFoundError):
        await beta.get(run.id)
    with pytest.raises(ratchet.NotFoundError):
        await beta.cancel(run.id)
    assert (await beta.list())[0] == []
    assert [r.id for r in (await alpha.list())[0]] == [run.id]
    # A task registered only in env "test" is unknown to a fresh environment.
    gamma = cluster.client("client", "gamma")
    with pytest.raises(ratchet.NotFoundError):
        await gamma.trigger("typed-order", {"order_id": "A", "quantity": 1})


async def test_idempotency_key_returns_one_run(cluster: Cluster) -> None:
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")
    first = await client.trigger("typed-order", {"order_id": "X", "quantity": 1},
                                 idempotency_key="order-X")
    second = await client.trigger("typed-order", {"order_id": "X", "quantity": 1},
                                  idempotency_key="order-X")
    assert first.created and not second.created and first.id == second.id
    cli = await run_cli_async("trigger", "typed-order", "--payload",
                              '{"order_id": "X", "quantity": 1}', "--idempotency-key",
                              "order-X", env=cluster.cli_env("client"))
    assert cli.returncode == 0 and cli.stdout.strip() == first.id
    runs, _ = await client.list(task="typed-order")
    assert [r.id for r in runs] == [first.id]

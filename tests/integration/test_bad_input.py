"""Bad input gets the right status code and changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

import ratchet
from ratchet.v1 import common_pb2, run_pb2, run_pb2_grpc
from ratchet_server import model
from ratchet_server.store import open_store
from tests.harness import Cluster, eventually, run_cli_async

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


# --- bounds, NUL characters, JSON depth: INVALID_ARGUMENT, and nothing written ---


def _stub(channel: grpc.aio.Channel) -> run_pb2_grpc.RunServiceStub:
    return run_pb2_grpc.RunServiceStub(channel)


async def _code(call: object, request: object, key: str) -> grpc.StatusCode:
    try:
        await call(request, metadata=(("authorization", f"Bearer {key}"),))  # type: ignore[operator]
    except grpc.aio.AioRpcError as exc:
        assert "\n" not in (exc.details() or ""), exc.details()
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_far_away_delay_is_refused_and_poisons_nothing(cluster: Cluster) -> None:
    """Trigger with a delay of 10^12 s used to commit the run, then fail with
    UNKNOWN building the reply; GetRun and ListRuns then failed for ever."""
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)
    key = cluster.key("client")
    client = cluster.client("client")
    far = duration_pb2.Duration(seconds=10**12)
    payload = b'{"order_id": "A", "quantity": 1}'
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = _stub(channel)
        for opts in (run_pb2.TriggerOptions(delay=far), run_pb2.TriggerOptions(ttl=far),
                     run_pb2.TriggerOptions(max_duration=far),
                     run_pb2.TriggerOptions(idempotency_key="k", idempotency_key_ttl=far),
                     run_pb2.TriggerOptions(delay=duration_pb2.Duration(seconds=-5)),
                     run_pb2.TriggerOptions(priority=2**31 - 1),
                     run_pb2.TriggerOptions(retry=common_pb2.RetryPolicy(max_delay=far))):
            request = run_pb2.TriggerRequest(task_id="typed-order", payload=payload,
                                             options=opts)
            assert await _code(stub.Trigger, request, key) == \
                grpc.StatusCode.INVALID_ARGUMENT, opts
            batch = run_pb2.BatchTriggerRequest(items=[
                run_pb2.BatchTriggerItem(task_id="typed-order", payload=payload),
                run_pb2.BatchTriggerItem(task_id="typed-order", payload=payload, options=opts)])
            assert await _code(stub.BatchTrigger, batch, key) == \
                grpc.StatusCode.INVALID_ARGUMENT, opts
    assert (await client.list())[0] == []
    # The largest accepted delay still makes a run that reads back.
    run = await client.trigger("typed-order", {"order_id": "A", "quantity": 1},
                               delay=10 * 365 * 24 * 3600.0)
    assert (await client.get(run.id)).status == "QUEUED"
    assert [r.id for r in (await client.list())[0]] == [run.id]


async def test_nul_characters_deep_json_and_odd_times_are_invalid_argument(
    cluster: Cluster,
) -> None:
    worker = cluster.start_worker()
    await cluster.wait_worker_connected(worker)
    key = cluster.key("client")
    client = cluster.client("client")
    good = b'{"order_id": "A", "quantity": 1}'
    deep = b"[" * 100_000 + b"]" * 100_000
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = _stub(channel)
        triggers = [
            run_pb2.TriggerRequest(task_id="typed-order", payload=deep),
            run_pb2.TriggerRequest(task_id="typed-order",
                                   payload=b'{"order_id": "A\\u0000", "quantity": 1}'),
            run_pb2.TriggerRequest(task_id="typed-order\x00", payload=good),
            run_pb2.TriggerRequest(task_id="typed-order", payload=good,
                                   options=run_pb2.TriggerOptions(tags=["a\x00b"])),
            run_pb2.TriggerRequest(task_id="typed-order", payload=good,
                                   options=run_pb2.TriggerOptions(metadata={"k": "v\x00"})),
            run_pb2.TriggerRequest(task_id="typed-order", payload=good,
                                   options=run_pb2.TriggerOptions(idempotency_key="\x00")),
            run_pb2.TriggerRequest(task_id="typed-order", payload=good,
                                   options=run_pb2.TriggerOptions(queue="q\x00")),
            run_pb2.TriggerRequest(task_id="typed-order", payload=good,
                                   options=run_pb2.TriggerOptions(concurrency_key="c\x00")),
        ]
        for request in triggers:
            assert await _code(stub.Trigger, request, key) == invalid, request
        run = await client.trigger("typed-order", {"order_id": "A", "quantity": 1})
        await client.wait(run.id, timeout=30)
        assert await _code(stub.GetRun, run_pb2.GetRunRequest(run_id="run\x00"), key) == invalid
        assert await _code(stub.CancelRun, run_pb2.CancelRunRequest(run_id=run.id,
                                                                    reason="\x00"), key) == invalid
        assert await _code(stub.CompleteToken, run_pb2.CompleteTokenRequest(
            token_id="tok\x00"), key) == invalid
        assert await _code(stub.CompleteToken, run_pb2.CompleteTokenRequest(
            token_id="tok", data=deep), key) == invalid
        assert await _code(stub.RetryRun, run_pb2.RetryRunRequest(
            run_id=run.id, payload=b'"\\u0000"'), key) == invalid
        assert await _code(stub.GetRunHistory, run_pb2.GetRunHistoryRequest(
            run_id=run.id, page_token="9" * 30), key) == invalid
        for listing in (run_pb2.ListRunsRequest(error_type="E\x00"),
                        run_pb2.ListRunsRequest(tag="\x00"),
                        run_pb2.ListRunsRequest(page_token="1e400|run_x"),
                        run_pb2.ListRunsRequest(page_token="nan|run_x"),
                        run_pb2.ListRunsRequest(
                            created_after=timestamp_pb2.Timestamp(seconds=10**12)),
                        run_pb2.ListRunsRequest(
                            created_before=timestamp_pb2.Timestamp(seconds=1, nanos=-1))):
            assert await _code(stub.ListRuns, listing, key) == invalid, listing
    # Only the one good run exists, and its history has nothing from the refusals.
    assert [r.id for r in (await client.list())[0]] == [run.id]
    assert [r.id for r in (await client.list(include_discarded=True))[0]] == [run.id]


async def test_a_stored_out_of_range_time_still_reads_back(database_url: str,
                                                         tmp_path: Path) -> None:
    """A run stored with a time the protocol cannot carry (written before the
    bounds existed) is shown with the time clamped instead of failing reads."""
    store = await open_store(database_url)
    await store.migrate()
    try:
        [(stored, _)] = await store.create_runs([model.NewRun(
            id="run_far", env="test", task_id="typed-order", payload="{}", queue="typed-order",
            retry=ratchet.Retry(), run_at=1e13, ttl=1e13)])
    finally:
        await store.close()
    cluster = Cluster(database_url, tmp_path)
    try:
        await cluster.start_coordinator()
        client = cluster.client("client")
        run = await client.get(stored.id)
        assert run.status == "QUEUED"
        assert [r.id for r in (await client.list())[0]] == [stored.id]
    finally:
        await cluster.close()


async def test_lost_database_connections_are_unavailable(pg_url: str, tmp_path: Path) -> None:
    """Connections the database ends (an admin, a restart) answer UNAVAILABLE,
    which clients retry, not UNKNOWN; the coordinator recovers by itself.
    Only this test's coordinator's connections are ended (by application_name)."""
    app = f"ratchet-test-{tmp_path.name}"[:60]
    cluster = Cluster(f"{pg_url}&application_name={app}", tmp_path)
    server = pg_url.split("?")[0]
    try:
        await cluster.start_coordinator()
        client = cluster.client("client")
        await client.list()  # the key is cached; the next calls reach the store
        codes = []
        ended = 0
        for _ in range(20):
            await asyncio.sleep(0.1)  # the pool reopens connections meanwhile
            with psycopg.connect(server, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = %s", (app,)).fetchone()
            ended += row[0] if row else 0
            try:
                await client.list()
                codes.append("OK")
            except ratchet.ClientError as exc:
                codes.append(exc.code)
                assert "\n" not in str(exc)
        assert ended >= 20 and set(codes) <= {"OK", "UNAVAILABLE"}, (ended, codes)
        assert "UNAVAILABLE" in codes, codes

        async def recovered() -> bool:
            try:
                return (await client.list())[0] == []
            except ratchet.UnavailableError:
                return False  # another connection ended above, met only now

        await eventually(recovered, timeout=10, what="the coordinator to recover")
    finally:
        await cluster.close()
        print(cluster.logs())


NUL_TASKS = '''
import ratchet

@ratchet.task(id="nul-error", retry=ratchet.Retry(max_attempts=1))
async def nul_error(ctx: ratchet.Context, payload: dict) -> None:
    raise ValueError("a NUL \\x00 in the message")
'''


async def test_a_nul_in_a_worker_error_does_not_break_listing(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    """An exception message with a NUL was stored as JSON with a \\u0000
    escape, which Postgres cannot cast to jsonb: every ListRuns filtered by
    error type then failed for the whole environment."""
    module = tmp_path / "nul_tasks.py"
    module.write_text(NUL_TASKS)
    worker = cluster.start_worker(str(module))
    await cluster.wait_worker_connected(worker)
    client = cluster.client("client")
    run = await client.trigger("nul-error", {})
    with pytest.raises(ratchet.RunFailedError):
        await client.result(run.id, timeout=30)
    runs, _ = await client.list(error_type="ValueError")
    assert [r.id for r in runs] == [run.id]
    assert "\x00" not in (runs[0].error.message if runs[0].error else "")

"""Revoking an API key ends what it opened: `ratchet keys revoke`, `keys list`.

Real coordinator and worker processes. Coordinators run with `--key-cache 1s`,
so a revoked key must stop working (new calls and open sessions) within about
a second; the assertions allow KEY_CACHE + SLACK.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ratchet.v1 import system_pb2, system_pb2_grpc
from ratchet_server.store import open_store
from tests.harness import Cluster, Process, count_lines, eventually, lines, run_cli_async

pytestmark = pytest.mark.timeout(120)

KEY_CACHE = 1.0
SLACK = 4.0  # process start-up of the CLI is not counted; scheduling on 2 cores is


async def _create_key(cluster: Cluster, name: str) -> tuple[str, str]:
    """A worker key named `name` in environment `test`: (key, key id)."""
    result = await run_cli_async("keys", "create", "--database-url", cluster.database_url,
                                 "--env", "test", "--role", "worker", "--name", name)
    assert result.returncode == 0, result.stderr
    found = re.search(r"created (key_\w+)", result.stderr)
    assert found, result.stderr
    return result.stdout.strip(), found.group(1)


async def _list_keys(cluster: Cluster) -> dict[str, dict[str, str | None]]:
    result = await run_cli_async("keys", "list", "--database-url", cluster.database_url,
                                 "--json")
    assert result.returncode == 0, result.stderr
    return {k["name"]: k for k in json.loads(result.stdout)}


async def _version_code(address: str, key: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await system_pb2_grpc.SystemServiceStub(channel).GetVersion(
                system_pb2.GetVersionRequest(), timeout=5,
                metadata=(("authorization", f"Bearer {key}"),))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def _exited(worker: Process, timeout: float) -> int:
    return await asyncio.to_thread(worker.proc.wait, timeout)


@pytest.fixture
async def fast_cluster(database_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(database_url, tmp_path)
    try:
        await c.start_coordinator("--key-cache", f"{KEY_CACHE}s")
        yield c
    finally:
        await c.close()
        print(c.logs())


async def test_a_revoked_worker_key_loses_its_session_and_gives_its_run_back(
    fast_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = fast_cluster
    key, key_id = await _create_key(cluster, "doomed")
    worker = cluster.start_worker(slots=1, extra_env={"RATCHET_API_KEY": key})
    await cluster.wait_worker_connected(worker)
    client = cluster.client()
    held = await client.trigger("cancellable", {"dir": str(tmp_path)})
    await eventually(lambda: count_lines(tmp_path / "working") == 1, what="the run to start")
    assert (await client.get(held.id)).attempt == 1

    revoked = await run_cli_async("keys", "revoke", key_id, "--database-url",
                                  cluster.database_url)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {key_id}" in revoked.stdout
    t0 = time.monotonic()

    # The session ends UNAUTHENTICATED (the SDK stops: that cannot be retried).
    code = await _exited(worker, KEY_CACHE + SLACK)
    ended_after = time.monotonic() - t0
    assert code == 1
    assert "UNAUTHENTICATED" in worker.output()
    assert "revoked" in worker.output()
    print(f"session ended {ended_after:.2f}s after the revoke returned")

    # The run it held went back without costing an attempt.
    back = await client.get(held.id)
    assert back.status == "QUEUED" and back.attempt == 0, back
    history = await client.history(held.id)
    released = [e for e in history if e.type == "lease_released"]
    assert len(released) == 1 and "revoked" in released[0].data["reason"], history
    assert not [e for e in history if e.type == "lease_lost"], history

    # New calls with the key are refused; a run triggered now waits for a
    # worker with a valid key, and the revoked key cannot bring one back.
    assert await _version_code(cluster.address, key) == grpc.StatusCode.UNAUTHENTICATED
    later = await client.trigger("busy", {"dir": str(tmp_path)})
    again = cluster.start_worker(slots=1, extra_env={"RATCHET_API_KEY": key})
    assert await _exited(again, 30) == 1
    assert "UNAUTHENTICATED" in again.output()
    await asyncio.sleep(1.0)
    assert (await client.get(later.id)).status == "QUEUED"
    assert count_lines(tmp_path / "busy") == 0

    good_key, _ = await _create_key(cluster, "good")
    good = cluster.start_worker(slots=2, extra_env={"RATCHET_API_KEY": good_key})
    assert (await client.wait(later.id, timeout=30)).status == "COMPLETED"
    assert lines(tmp_path / "busy") == [str(good.pid)]
    await client.cancel(held.id)

    listed = await _list_keys(cluster)
    assert listed["doomed"]["id"] == key_id and listed["doomed"]["revoked_at"]
    assert listed["good"]["revoked_at"] is None
    assert all("rk_" not in json.dumps(k) for k in listed.values())
    table = await run_cli_async("keys", "list", "--database-url", cluster.database_url)
    assert table.returncode == 0 and key_id in table.stdout and "REVOKED" in table.stdout

    twice = await run_cli_async("keys", "revoke", key_id, "--database-url",
                                cluster.database_url)
    assert twice.returncode == 0, twice.stderr
    assert "already revoked" in twice.stdout and "nothing changed" in twice.stdout
    unknown = await run_cli_async("keys", "revoke", "key_nope", "--database-url",
                                  cluster.database_url)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().count("\n") == 0
    assert "no API key with id 'key_nope'" in unknown.stderr


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_every_replica_ends_the_sessions_of_a_revoked_key(
    fast_cluster: Cluster, tmp_path: Path
) -> None:
    first = fast_cluster
    second = Cluster(first.database_url, tmp_path / "second")
    (tmp_path / "second").mkdir()
    second.keys = first.keys
    try:
        await second.start_coordinator("--key-cache", f"{KEY_CACHE}s")
        key, key_id = await _create_key(first, "shared")
        workers = [c.start_worker(slots=1, extra_env={"RATCHET_API_KEY": key})
                   for c in (first, second)]
        for c, w in zip((first, second), workers, strict=True):
            await c.wait_worker_connected(w)
        client = first.client()
        dirs = [tmp_path / "a", tmp_path / "b"]
        for d in dirs:
            d.mkdir()
        runs = [await client.trigger("cancellable", {"dir": str(d)}) for d in dirs]
        for d in dirs:
            await eventually(lambda d=d: count_lines(d / "working") == 1,
                             what="both runs to start")

        revoked = await run_cli_async("keys", "revoke", key_id, "--database-url",
                                      first.database_url)
        assert revoked.returncode == 0, revoked.stderr
        t0 = time.monotonic()
        codes = await asyncio.gather(*(_exited(w, KEY_CACHE + SLACK) for w in workers))
        print(f"both sessions ended within {time.monotonic() - t0:.2f}s")
        assert codes == [1, 1]
        for c in (first, second):
            assert c.coordinator is not None
            assert f"API key {key_id} was revoked" in c.coordinator.output()
        for w in workers:
            assert "UNAUTHENTICATED" in w.output()
        for run in runs:
            back = await client.get(run.id)
            assert back.status == "QUEUED" and back.attempt == 0, back
        store = await open_store(first.database_url)
        try:
            for run in runs:
                types = [e["type"] for e in await store.get_events(run.id)]
                assert "lease_released" in types and "lease_lost" not in types, types
        finally:
            await store.close()
    finally:
        await second.close()
        print(second.logs())

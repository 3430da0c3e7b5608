"""Coordinators with `--no-notify` (how a distributed SQL database without
LISTEN/NOTIFY, such as CockroachDB, is run): real coordinator and worker
processes on Postgres, no NOTIFY sent, and every run still completes,
including runs made ready where no dispatcher is woken (another replica, a
timer, a child) — found by the dispatcher's bounded poll.

Each test gets a database of its own (NOTIFY channels are per database, so
a listener there hears only this test's coordinators).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine.ids import new_id
from ratchet_server.store import open_store
from ratchet_server.store.postgres import CHANNEL
from tests.harness import Cluster, stuck_runs

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture
async def own_db(pg_server: str) -> AsyncIterator[str]:
    """A URL of a fresh database; the invariant check runs on it afterwards."""
    name = "ratchet_dsql_" + secrets.token_hex(5)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(pg_server)._replace(path=f"/{name}"))
    try:
        yield url
        assert await stuck_runs(url) == []
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def notifications(url: str) -> Iterator[list[str]]:
    """Every NOTIFY on Ratchet's channel in the database, while inside."""
    heard: list[str] = []
    stop = threading.Event()
    ready = threading.Event()

    def listen() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            ready.set()
            while not stop.is_set():
                heard.extend(n.payload for n in conn.notifies(timeout=0.2))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield heard
    finally:
        stop.set()
        thread.join(5)


async def _insert_run(url: str, task_id: str, payload: str) -> str:
    """A run made ready by another writer: nothing wakes any dispatcher."""
    store = await open_store(url, notify=False)
    try:
        [(run, created)] = await store.create_runs([model.NewRun(
            id=new_id("run"), env="test", task_id=task_id, queue=task_id, payload=payload,
            retry=Retry())])
        assert created
        return run.id
    finally:
        await store.close()


async def test_a_store_without_notify_neither_listens_nor_notifies(own_db: str) -> None:
    store = await open_store(own_db, notify=False)
    try:
        await store.migrate()
        with notifications(own_db) as heard:
            await store.listen(lambda _: None)
            assert "ratchet-listen" not in {t.name for t in threading.enumerate()}
            await store.notify_ready("test")
            await store.create_runs([model.NewRun(
                id=new_id("run"), env="test", task_id="t", queue="t", payload="{}",
                retry=Retry())])
            await asyncio.sleep(0.5)
        assert heard == []
    finally:
        await store.close()


async def test_a_coordinator_without_notify_completes_runs(own_db: str, tmp_path: Path) -> None:
    cluster = Cluster(own_db, tmp_path)
    try:
        with notifications(own_db) as heard:
            await cluster.start_coordinator("--no-notify")
            worker = cluster.start_worker(slots=4)
            await cluster.wait_worker_connected(worker)
            client = cluster.client()

            run = await client.trigger("greet", {"name": "ada"})
            assert await client.result(run.id, timeout=30) == "hello ada"
            # Idle worker, a run nobody announces: only the poll can find it.
            await asyncio.sleep(1.5)
            inserted = await _insert_run(own_db, "greet", '{"name": "bob"}')
            assert await client.result(inserted, timeout=30) == "hello bob"
            # Children, and their parent woken when the last one finishes.
            fan = await client.trigger("fan-out", {"dir": str(tmp_path), "count": 3})
            assert (await client.result(fan.id, timeout=30))["sum"] == 0 + 1 + 4
            # A durable sleep: the timer requeues the run, the poll leases it.
            nap = await client.trigger("sleeper", {"dir": str(tmp_path), "seconds": 0.5})
            assert (await client.result(nap.id, timeout=30))["slept"] >= 0.5
        assert heard == []
    finally:
        await cluster.close()
        print(cluster.logs())


async def test_a_run_triggered_on_one_coordinator_runs_on_a_worker_of_another(
    own_db: str, tmp_path: Path
) -> None:
    first = Cluster(own_db, tmp_path / "first")
    second = Cluster(own_db, tmp_path / "second")
    for c in (first, second):
        c.tmp.mkdir()
    second.keys = first.keys
    try:
        with notifications(own_db) as heard:
            await first.start_coordinator("--no-notify")
            await second.start_coordinator("--no-notify")
            # The worker (and so every lease) is on the second coordinator;
            # the first only takes triggers.
            worker = second.start_worker(slots=4)
            await second.wait_worker_connected(worker)
            client = first.client()
            await asyncio.sleep(1.5)  # the worker is idle: its coordinator is only polling
            runs = [await client.trigger("greet", {"name": f"n{i}"}) for i in range(5)]
            for i, run in enumerate(runs):
                assert await client.result(run.id, timeout=30) == f"hello n{i}"
            fan = await client.trigger("fan-out", {"dir": str(tmp_path), "count": 3})
            assert (await client.result(fan.id, timeout=30))["sum"] == 0 + 1 + 4
        assert heard == []
    finally:
        await first.close()
        await second.close()
        print(first.logs())
        print(second.logs())

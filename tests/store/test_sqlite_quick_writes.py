"""SQLite's quick writes (issue 11): a checkpoint's step write runs on the
event loop when the store's thread is idle (no two thread hand-offs per
step), and otherwise waits its turn on that thread; the event loop never
waits for a lock, and WAL checkpoints run on the store's thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from ratchet_server import model
from ratchet_server.store import StoreUnavailable, _writes, open_store
from ratchet_server.store import sqlite as sqlite_store
from tests.store.test_conformance import create, lease_one, new_run, step_write

pytestmark = pytest.mark.timeout(60)

# How long the store's thread or another connection holds the lock in the
# tests where a write must wait without stalling the event loop.
HOLD = 0.5


@pytest.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[Any]:
    store = await open_store(f"sqlite:///{tmp_path / 'quick.db'}")
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


async def running(store: Any) -> model.Run:
    await create(store, new_run())
    return await lease_one(store)


async def longest_stall(work: Awaitable[Any]) -> tuple[Any, float]:
    """Run `work` while a ticker measures the longest the event loop stood still."""
    stalls = [0.0]

    async def tick() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.005)
            stalls[0] = max(stalls[0], time.monotonic() - before - 0.005)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    try:
        result = await work
        await asyncio.sleep(0.02)  # the ticker notes a stall when it runs next
        return result, stalls[0]
    finally:
        ticker.cancel()


async def test_a_step_write_runs_on_the_event_loop_when_the_store_thread_is_idle(
    file_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await running(file_store)
    threads: list[int] = []
    real = _writes.apply_writes_txn

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(_writes, "apply_writes_txn", spy)
    assert await file_store.apply([step_write(run, "a")]) == [True]
    assert threads == [threading.get_ident()]
    # A large value goes to the store's thread: it would hold the loop too long.
    big = step_write(run, "b", output='"' + "x" * (_writes.QUICK_CHARS + 1) + '"')
    assert await file_store.apply([big]) == [True]
    assert threads[1] != threading.get_ident()
    assert [s.key for s in await file_store.get_steps(run.id)] == ["a", "b"]


async def test_a_step_write_waits_its_turn_while_the_store_thread_is_busy(
    file_store: Any,
) -> None:
    run = await running(file_store)
    started = threading.Event()

    def slow(conn: Any) -> str:
        started.set()
        time.sleep(HOLD)
        return str(conn.execute("SELECT count(*) FROM steps").fetchone()[0])

    busy = asyncio.ensure_future(file_store._run(slow))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5.0)
    written, stall = await longest_stall(file_store.apply([step_write(run, "a")]))
    assert written == [True]
    assert await busy == "0"  # the slow transaction did not see the write: it came after
    assert stall < HOLD / 2  # blocking would stall the loop for about HOLD
    [step] = await file_store.get_steps(run.id)
    assert step.status is model.StepStatus.COMPLETED


async def test_a_step_write_never_holds_the_loop_for_another_process_write_lock(
    file_store: Any, tmp_path: Path
) -> None:
    """Another connection (a migration, `ratchet keys create`) holding
    SQLite's write lock: the write waits on the store's thread, not the loop."""
    run = await running(file_store)
    other = sqlite3.connect(tmp_path / "quick.db", isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(HOLD, lambda: other.execute("COMMIT"))
    release.start()
    try:
        written, stall = await longest_stall(file_store.apply([step_write(run, "a")]))
    finally:
        release.join()
        other.close()
    assert written == [True]
    assert stall < HOLD / 2  # blocking would stall the loop for about HOLD
    assert [s.key for s in await file_store.get_steps(run.id)] == ["a"]


async def test_the_wal_is_checkpointed_on_the_store_thread(
    file_store: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 20)
    checkpoints: list[int] = []
    real = sqlite_store.SqliteStore._checkpoint

    def spy(self: Any) -> None:
        checkpoints.append(threading.get_ident())
        real(self)

    monkeypatch.setattr(sqlite_store.SqliteStore, "_checkpoint", spy)
    run = await running(file_store)
    for i in range(50):
        assert await file_store.apply([step_write(run, f"s{i}")]) == [True]
    await file_store._run(lambda conn: None)  # let a queued checkpoint finish
    assert len(checkpoints) >= 2
    assert threading.get_ident() not in checkpoints
    # SQLite's own automatic checkpoint (which would run inside a commit on
    # the loop) is off.
    [[pages]] = sqlite3.connect(tmp_path / "quick.db").execute(
        "PRAGMA wal_autocheckpoint").fetchall()
    assert pages == 1000  # a fresh connection's default: the setting is per connection
    assert await file_store._run(
        lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0


async def test_a_closed_store_refuses_a_quick_write_and_stays_closed(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'closed.db'}")
    await store.migrate()
    run = await running(store)
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.apply([step_write(run, "late")])
    assert store._conn is None  # not reopened on the event loop


async def test_a_write_whose_commit_fails_leaves_no_transaction_open(
    file_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed COMMIT (e.g. SQLITE_BUSY on a filesystem without WAL) is
    rolled back, so the same write can go again on the store's thread."""
    run = await running(file_store)
    real = file_store._connection()
    failures = [sqlite3.OperationalError("database is locked")]

    class CommitFailsOnce:
        in_transaction = property(lambda self: real.in_transaction)

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT" and failures:
                raise failures.pop()
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    monkeypatch.setattr(file_store, "_connection", lambda: CommitFailsOnce())
    assert await file_store.apply([step_write(run, "a")]) == [True]
    assert not failures and not real.in_transaction
    assert [s.key for s in await file_store.get_steps(run.id)] == ["a"]

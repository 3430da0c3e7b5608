"""Group commit's batching (engine/writes.py), over a store that records the
batches it is given: pure scheduling logic, so a stand-in store is enough."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from ratchet_server.engine.writes import GroupCommit

pytestmark = pytest.mark.timeout(10)


class Recorder:
    """Applies every write (True), recording batches; `gate` holds commits."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def apply(self, writes: Sequence[Any]) -> list[bool]:
        self.batches.append(list(writes))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [True] * len(writes)


async def test_a_lone_write_is_committed_by_its_caller() -> None:
    """Nothing queued and a slot free: no hand-off to the writer loop (which
    is not even running here)."""
    store = Recorder()
    commit = GroupCommit(store, max_batch=100, concurrency=2)  # type: ignore[arg-type]
    assert await commit.write("w1") is True  # type: ignore[arg-type]
    assert await commit.write("w2") is True  # type: ignore[arg-type]
    assert store.batches == [["w1"], ["w2"]]


async def test_writes_arriving_while_the_slots_are_busy_go_in_one_batch() -> None:
    store = Recorder()
    commit = GroupCommit(store, max_batch=100, concurrency=1)  # type: ignore[arg-type]
    loop = asyncio.create_task(commit.run())
    try:
        store.gate.clear()
        first = asyncio.create_task(commit.write("first"))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert store.batches == [["first"]]  # in flight, holding the only slot
        rest = [asyncio.create_task(commit.write(f"w{i}"))  # type: ignore[arg-type]
                for i in range(5)]
        await asyncio.sleep(0.01)
        store.gate.set()
        assert await first is True
        assert await asyncio.gather(*rest) == [True] * 5
        assert store.batches == [["first"], ["w0", "w1", "w2", "w3", "w4"]]
    finally:
        loop.cancel()


async def test_a_write_queues_behind_one_the_loop_holds() -> None:
    """The loop took a write and waits for a slot: a newcomer must not jump
    ahead of it through a slot freed meanwhile."""
    store = Recorder()
    commit = GroupCommit(store, max_batch=1, concurrency=1)  # type: ignore[arg-type]
    loop = asyncio.create_task(commit.run())
    try:
        store.gate.clear()
        first = asyncio.create_task(commit.write("first"))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        second = asyncio.create_task(commit.write("second"))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)  # the loop holds "second", waiting for the slot
        store.gate.set()
        await first
        third = asyncio.create_task(commit.write("third"))  # type: ignore[arg-type]
        await asyncio.gather(second, third)
        assert store.batches == [["first"], ["second"], ["third"]]
    finally:
        loop.cancel()


async def test_a_failed_commit_raises_to_its_writer() -> None:
    store = Recorder()
    store.fail = RuntimeError("database gone")
    commit = GroupCommit(store, max_batch=100, concurrency=1)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="database gone"):
        await commit.write("w")  # type: ignore[arg-type]

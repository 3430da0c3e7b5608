"""Fixtures shared by the engine's unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ratchet_server.engine.engine import Engine, EngineConfig
from ratchet_server.store import Store, open_store


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    """A fresh, migrated SQLite store in memory."""
    s = await open_store("sqlite://:memory:")
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def engine(store: Store) -> AsyncIterator[Engine]:
    """A started engine on that store, reaping quickly; stopped after the test.
    A module that needs other timings defines its own `engine`."""
    e = Engine(store, EngineConfig(lease_ttl=30.0, heartbeat_interval=5.0, session_grace=0.05,
                                   reap_interval=0.05))
    await e.start()
    try:
        yield e
    finally:
        await asyncio.wait_for(e.stop(), 5.0)

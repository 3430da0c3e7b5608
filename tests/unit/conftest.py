"""Fixtures shared by the engine's unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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

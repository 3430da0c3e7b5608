"""Fixtures for the races: a migrated store on a Postgres schema of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ratchet_server.store import Store, open_store


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[Store]:
    store = await open_store(pg_url)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()

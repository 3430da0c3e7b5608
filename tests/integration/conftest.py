from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Cluster


@pytest.fixture
async def cluster(database_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """A coordinator process on a fresh database (SQLite file or Postgres schema)."""
    c = Cluster(database_url, tmp_path)
    try:
        await c.start_coordinator()
        yield c
    finally:
        await c.close()
        print(c.logs())  # shown by pytest only when the test failed

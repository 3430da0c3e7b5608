"""Shared fixtures: a real Postgres (or a throwaway cluster), stores, coordinators.

Postgres comes from `RATCHET_TEST_DATABASE_URL` (default: the local server on
127.0.0.1:5432, user postgres). If none answers, a throwaway cluster is
started with initdb/pg_ctl when those exist. Under `CI=true` a missing
Postgres fails the run instead of skipping.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from ratchet_server.store import Store, open_store
from tests.harness import Cluster, stuck_runs

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _throwaway_cluster(tmp: Path) -> tuple[str, Path] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl or os.geteuid() == 0:
        return None  # initdb refuses to run as root
    data = tmp / "pgdata"
    subprocess.run([initdb, "-D", str(data), "-U", "postgres", "-A", "trust"], check=True,
                   capture_output=True)
    port = 55432
    subprocess.run([pg_ctl, "-D", str(data), "-o", f"-p {port} -k {tmp}", "-l",
                    str(tmp / "pg.log"), "-w", "start"], check=True, capture_output=True)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", data


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a Postgres server for the test session."""
    url = os.environ.get("RATCHET_TEST_DATABASE_URL", DEFAULT_PG)
    if _answers(url):
        yield url
        return
    tmp = Path(tempfile.mkdtemp(prefix="ratchet-pg-"))
    started = _throwaway_cluster(tmp)
    if started is None:
        message = f"no PostgreSQL answers at {url} and no throwaway cluster could be started"
        if IN_CI:
            pytest.fail(message + " (CI=true: Postgres is required)")
        pytest.skip(message)
    cluster_url, data = started
    try:
        yield cluster_url
    finally:
        subprocess.run([shutil.which("pg_ctl") or "pg_ctl", "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A URL whose connections see only a fresh schema of their own."""
    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in pg_server else "?"
    yield f"{pg_server}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[Store]:
    """A migrated Postgres store on a fresh schema of its own."""
    store = await open_store(pg_url)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database of each kind, as a URL a coordinator process can open.

    After the test (and every coordinator it started has stopped), the
    invariant check must find no run that nothing would move again."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ratchet.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    yield url
    assert await stuck_runs(url) == []


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


@pytest.fixture(params=["sqlite-memory", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A migrated store of each kind (SQLite in memory for speed, Postgres for truth)."""
    url = "sqlite://:memory:" if request.param == "sqlite-memory" else str(
        request.getfixturevalue("pg_url"))
    s = await open_store(url)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()

"""Migrations produce the schema the store's queries use, on Postgres and SQLite."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import psycopg
import pytest

from ratchet_server.store import _dialect, open_store

pytestmark = pytest.mark.timeout(60)

# The columns the queries in store/queries.sql read and write.
EXPECTED_COLUMNS = {
    "runs": {
        "id", "env", "task_id", "status", "attempt", "payload", "output", "error", "queue",
        "priority", "retry", "run_at", "idempotency_key", "idempotency_expires_at",
        "concurrency_key", "tags", "metadata", "parent_run_id", "ttl", "max_duration", "state",
        "lease_id", "lease_owner", "lease_expires_at", "created_at", "started_at",
        "finished_at", "updated_at", "waiting_on", "expire_at", "deadline_at", "parent_step_key",
        "child_index", "replay_of", "discarded_at", "lease_losses", "final_error",
        "attempt_given_back",
    },
    "steps": {
        "run_id", "key", "kind", "status", "attempts", "retry_base", "output", "error",
        "created_at", "started_at", "finished_at", "wake_at", "token_id", "state",
    },
    "run_events": {"id", "run_id", "at", "type", "attempt", "lease_id", "step_key", "data"},
    "tasks": {
        "env", "id", "version", "queue", "retry", "payload_schema", "output_schema",
        "max_duration", "updated_at", "handles_final_error",
    },
    "api_keys": {"id", "env", "role", "name", "key_hash", "created_at", "revoked_at"},
    "tokens": {
        "id", "env", "secret", "status", "data", "tags", "idempotency_key", "created_at",
        "expires_at", "completed_at", "run_id", "step_key",
    },
    "ratchet_migrations": {"version", "name", "applied_at"},
    "child_waits": {"parent_run_id", "step_key", "pending"},
    "run_tags": {"run_id", "run_env", "tag", "run_created_at"},
}

MIGRATION_FILES = {
    kind: sorted(p.name for p in
                 (Path(_dialect.__file__).parent / "migrations" / kind).glob("*.sql"))
    for kind in ("postgres", "sqlite")
}


def columns_written_by_sql() -> dict[str, set[str]]:
    """Table -> columns named in the INSERT column lists of queries.sql."""
    found: dict[str, set[str]] = {}
    for value in _dialect.QUERIES.values():
        if not isinstance(value, str):
            continue
        for table, cols in re.findall(r"INSERT INTO (\w+) \(([^)]*)\)", value):
            found.setdefault(table, set()).update(c.strip() for c in cols.split(","))
    return found


def test_expected_columns_cover_every_insert_in_sql() -> None:
    written = columns_written_by_sql()
    assert set(written) == {"api_keys", "tasks", "runs", "steps", "run_events",
                            "ratchet_migrations", "tokens", "child_waits", "run_tags"}
    for table, cols in written.items():
        assert cols <= EXPECTED_COLUMNS[table], table


def test_each_dialect_has_the_same_migrations() -> None:
    assert MIGRATION_FILES["postgres"] == MIGRATION_FILES["sqlite"]
    assert MIGRATION_FILES["postgres"][0].startswith("0001_")


async def test_postgres_migrations_produce_the_current_schema(pg_url: str) -> None:
    store = await open_store(pg_url)
    try:
        assert await store.migrate() == MIGRATION_FILES["postgres"]
        assert await store.migrate() == []
    finally:
        await store.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()").fetchall()
        indexes = dict(conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename = 'runs'").fetchall())
        versions = conn.execute("SELECT version, name FROM ratchet_migrations ORDER BY version"
                                ).fetchall()
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    assert tables == EXPECTED_COLUMNS
    assert "runs_ready" not in indexes  # replaced by 0007_dispatch
    due = indexes["runs_due"]
    assert "(env, task_id, run_at, id)" in due and "WHERE (status = 'QUEUED'::text)" in due
    ready = indexes["runs_ready_priority"]
    assert "(env, task_id, priority DESC, run_at, id)" in ready
    assert "WHERE ((status = 'QUEUED'::text) AND (priority <> 0))" in ready
    assert "runs_idempotency" in indexes and "UNIQUE" in indexes["runs_idempotency"]
    assert [name for _, name in versions] == MIGRATION_FILES["postgres"]


async def test_sqlite_migrations_produce_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "ratchet.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        assert await store.migrate() == MIGRATION_FILES["sqlite"]
        assert await store.migrate() == []
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        tables = {name: {r[1] for r in conn.execute(f"PRAGMA table_info({name})")}
                  for name in names}
        indexes = dict(conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' "
            "AND sql IS NOT NULL").fetchall())
        partial = {r[1]: r[4] for r in conn.execute("PRAGMA index_list(runs)")}
        versions = [r[0] for r in conn.execute(
            "SELECT name FROM ratchet_migrations ORDER BY version")]
    finally:
        conn.close()
    assert tables == EXPECTED_COLUMNS
    assert "runs_ready" not in indexes  # replaced by 0007_dispatch
    assert partial["runs_due"] == 1 and "WHERE status = 'QUEUED'" in indexes["runs_due"]
    assert partial["runs_ready_priority"] == 1
    assert "priority <> 0" in indexes["runs_ready_priority"]
    assert versions == MIGRATION_FILES["sqlite"]


async def test_concurrent_postgres_migrations_apply_once(pg_url: str) -> None:
    stores = [await open_store(pg_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
    finally:
        for s in stores:
            await s.close()
    assert sorted(results, key=len) == [[], [], MIGRATION_FILES["postgres"]]

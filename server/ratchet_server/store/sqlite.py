"""The embedded store: one SQLite file (WAL mode) or memory, one thread."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ratchet_server.store import _dialect
from ratchet_server.store.base import SqlStore
from ratchet_server.store.contract import StoreDataError, StoreUnavailable, first_line

T = TypeVar("T")


class SqliteStore(SqlStore):
    """A store in one SQLite database, used by one coordinator process.

    All SQL runs on one dedicated thread with one connection, which is what
    SQLite serialises anyway; the event loop never waits on it.
    """

    dialect = _dialect.SQLITE

    def __init__(self, path: str | Path) -> None:
        super().__init__(threads=1)
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            if self._path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        return self._conn

    def _transaction(self, fn: Callable[[Any], T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def _run(self, fn: Callable[[Any], T]) -> T:
        try:
            return await super()._run(fn)
        except sqlite3.OperationalError as exc:
            # Another process (`ratchet keys create`, a migration) holds the
            # write lock for longer than busy_timeout: worth retrying.
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreUnavailable(f"SQLite is busy: {first_line(exc)}") from exc
            raise
        except (sqlite3.DataError, OverflowError) as exc:
            raise StoreDataError(f"the database refused a value: {first_line(exc)}") from exc

    def _execute_script(self, conn: Any, script: str) -> None:
        # executescript() would commit the open transaction; run statement by statement.
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        await super().close()

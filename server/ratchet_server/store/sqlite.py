"""The embedded store: one SQLite file (WAL mode) or memory, one connection."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ratchet_server.store import _dialect
from ratchet_server.store.base import SqlStore
from ratchet_server.store.contract import StoreDataError, StoreUnavailable, first_line

T = TypeVar("T")

# The store checkpoints the WAL itself, on its thread, after this many commits
# (SQLite's own automatic checkpoint would run inside whichever commit crosses
# its threshold: on the event loop, for a quick write).
CHECKPOINT_EVERY = 256
# How long the store's thread waits for another process's write lock.
BUSY_TIMEOUT_MS = 5000


class SqliteStore(SqlStore):
    """A store in one SQLite database, used by one coordinator process.

    One connection, used by one thread at a time, which is what SQLite
    serialises anyway. SQL runs on the store's own thread, except a quick
    write (`_run_quick`: a checkpoint's step, tens of microseconds) that
    finds that thread idle: it runs on the caller's, the event loop, without
    the two thread hand-offs that would cost more than the write (issue 11).
    A quick write never waits on the connection's lock, and never runs a WAL
    checkpoint: those stay on the store's thread.
    """

    dialect = _dialect.SQLITE

    def __init__(self, path: str | Path) -> None:
        super().__init__(threads=1)
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        # Held by whichever thread uses the connection.
        self._lock = threading.Lock()
        self._commits = 0
        self._closed = False  # under the lock: no transaction may reopen it

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            if self._path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._conn = conn
        return self._conn

    def _transaction(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            self._check_open()
            result = self._locked_transaction(fn)
            if self._commits >= CHECKPOINT_EVERY:
                self._checkpoint()
            return result

    def _locked_transaction(self, fn: Callable[[Any], T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed statement or COMMIT: nothing stays half done
                conn.execute("ROLLBACK")
            raise
        self._commits += 1
        return result

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed (the coordinator is stopping)")

    def _checkpoint(self) -> None:
        """Copy the WAL back into the database (PASSIVE: readers and the
        coordinator's other connections are never waited for). Holds the lock."""
        self._commits = 0
        if self._path != ":memory:":
            self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpoint_locked(self) -> None:
        with self._lock:
            if not self._closed:
                self._checkpoint()

    async def _run(self, fn: Callable[[Any], T]) -> T:
        try:
            return await super()._run(fn)
        except (sqlite3.Error, OverflowError) as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def _run_quick(self, fn: Callable[[Any], T]) -> T:
        if not self._lock.acquire(blocking=False):
            return await self._run(fn)  # the store's thread is busy: queue behind it
        try:
            self._check_open()
            conn = self._connection()
            # Never wait on the event loop for another process's write lock
            # (a migration, `ratchet keys create`): the store's thread waits.
            conn.execute("PRAGMA busy_timeout=0")
            try:
                result = self._locked_transaction(fn)
            finally:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if self._commits >= CHECKPOINT_EVERY:
                self._commits = 0
                # The write has committed whatever happens here: a store
                # shutting down just skips this checkpoint.
                with contextlib.suppress(RuntimeError):
                    self._executor.submit(self._checkpoint_locked)
            return result
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
        except (sqlite3.Error, OverflowError) as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            self._lock.release()
        # Busy: nothing was written (rolled back, or BEGIN refused); the
        # store's thread tries again, waiting up to busy_timeout.
        return await self._run(fn)

    def _execute_script(self, conn: Any, script: str) -> None:
        # executescript() would commit the open transaction; run statement by statement.
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)

    async def close(self) -> None:
        def shut() -> None:
            with self._lock:
                self._closed = True
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        await super().close()


def _translate(exc: Exception) -> Exception:
    """A driver error as the store's own (see contract.py), or as it is."""
    if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
        # Another process (`ratchet keys create`, a migration) holds the
        # write lock for longer than busy_timeout: worth retrying.
        return StoreUnavailable(f"SQLite is busy: {first_line(exc)}")
    if isinstance(exc, sqlite3.DataError | OverflowError):
        return StoreDataError(f"the database refused a value: {first_line(exc)}")
    return exc


def _busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)

"""The production store: PostgreSQL through psycopg 3 and a connection pool.

Any number of coordinators may share one database: ready runs are leased
with `FOR UPDATE SKIP LOCKED`, and a trigger or requeue on one replica wakes
the others through `LISTEN/NOTIFY`.

Notifications are only a latency hint: with `notify=False` (for databases
without LISTEN/NOTIFY, such as CockroachDB) nothing is sent or listened for,
and each replica finds the others' work by its dispatcher's bounded poll.
Correctness never rests on them, nor on advisory locks (the one below only
serialises migrations). A transaction that loses a deadlock or a
serialization check runs again, whole (docs/operations.md, "Past one Postgres").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from ratchet_server.store import _dialect
from ratchet_server.store.base import SqlStore
from ratchet_server.store.contract import (
    StoreDataError,
    StoreUnavailable,
    first_line,
    parse_ready_topic,
)

T = TypeVar("T")

log = logging.getLogger("ratchet.store")

CHANNEL = "ratchet_ready"
# Arbitrary constant: the advisory lock that serialises migrations.
MIGRATION_LOCK = 7_420_001
# A transaction that lost a deadlock or a serialization check runs again up
# to this many times in all, after a jittered pause that doubles from
# RETRY_PAUSE up to RETRY_PAUSE_MAX (SERIALIZABLE databases such as
# CockroachDB lose such checks routinely under contention).
TRANSACTION_ATTEMPTS = 8
RETRY_PAUSE = 0.002
RETRY_PAUSE_MAX = 0.1
# Opening the store: each connection attempt waits at most CONNECT_TIMEOUT
# seconds (unless the URL sets connect_timeout), and an unreachable server is
# tried again for CONNECT_PATIENCE seconds in all; a refusal no retry can
# mend (no such database or role, a wrong password) fails at once.
CONNECT_TIMEOUT = 3
CONNECT_PATIENCE = 3.0
# Worth running again: nothing was committed. Not 40003 (statement completion
# unknown): the commit may have happened.
RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure,
             _dialect.TransientConflict)


class PostgresStore(SqlStore):
    dialect = _dialect.POSTGRES

    def __init__(self, url: str, *, pool_size: int = 4, notify: bool = True) -> None:
        """`notify=False`: send no NOTIFY and LISTEN for none (see the module docstring)."""
        super().__init__(threads=pool_size)
        self._url = url
        self.notify = notify
        # Transactions run again after a deadlock or serialization failure
        # (read by tests and operators; written under _retries_lock).
        self.retries = 0
        self._retries_lock = threading.Lock()
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"row_factory": dict_row, "autocommit": False},
            open=False,
        )
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()

    async def connect(self) -> None:
        def check() -> None:
            # One plain connection first: a refusal that no retry can mend (no
            # such database or role, a wrong password, a malformed URL) fails
            # at once in one line, before the pool would retry it with a
            # warning each time.
            _probe(self._url)
            self._pool.open(wait=False)
            try:
                self._pool.wait(timeout=10.0)
            except Exception as exc:
                self._pool.close()
                raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from None

        await asyncio.to_thread(check)

    def _transaction(self, fn: Callable[[Any], T], *, autocommit: bool = False) -> T:
        # Transaction functions only touch the database (their NOTIFYs are
        # sent at commit, if ever), so one that lost a deadlock (concurrent
        # group commits locking rows in another order) or a serialization
        # check can simply run again from the start.
        for attempt in range(TRANSACTION_ATTEMPTS):
            try:
                with self._pool.connection() as conn:
                    if autocommit:
                        # Each statement committed on its own: no BEGIN and
                        # COMMIT round trips.
                        conn.autocommit = True
                        try:
                            return fn(conn)
                        finally:
                            conn.autocommit = False
                    with conn.transaction():
                        return fn(conn)
            except RETRYABLE as exc:
                if attempt == TRANSACTION_ATTEMPTS - 1:
                    log.warning("transaction failed %d times in a row (%s); giving up",
                                TRANSACTION_ATTEMPTS, type(exc).__name__)
                    raise
                with self._retries_lock:
                    self.retries += 1
                time.sleep(random.uniform(0, min(RETRY_PAUSE_MAX, RETRY_PAUSE * 2 ** attempt)))
        raise AssertionError("unreachable")

    async def _run(self, fn: Callable[[Any], T]) -> T:
        try:
            return await super()._run(fn)
        except psycopg.Error as exc:
            raise _translate(exc) from exc

    async def _run_autocommit(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(self._transaction, fn, autocommit=True))
        except psycopg.Error as exc:
            raise _translate(exc) from exc

    def _lock_for_migration(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%(k)s)", {"k": MIGRATION_LOCK})

    def _execute_script(self, conn: Any, script: str) -> None:
        conn.execute(script)

    def _notify_txn(self, conn: Any, envs: set[str]) -> None:
        if not self.notify:
            return
        for env in envs:
            conn.execute("SELECT pg_notify(%(ch)s, %(env)s)", {"ch": CHANNEL, "env": env})

    async def listen(self, callback: Callable[[str, str], None]) -> None:
        if not self.notify:
            return
        loop = asyncio.get_running_loop()

        def forward() -> None:
            while not self._closing.is_set():
                try:
                    with psycopg.connect(self._url, autocommit=True) as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        while not self._closing.is_set():
                            for note in conn.notifies(timeout=0.5):
                                loop.call_soon_threadsafe(
                                    callback, *parse_ready_topic(note.payload))
                except psycopg.Error:
                    if self._closing.wait(0.5):
                        return
                except RuntimeError:
                    return  # the event loop is gone

        self._listener = threading.Thread(target=forward, name="ratchet-listen", daemon=True)
        self._listener.start()

    async def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 2.0)
        await super().close()
        await asyncio.to_thread(self._pool.close)


def _probe(url: str) -> None:
    """Connect once and close, or raise StoreUnavailable in one line naming
    the cause and the fix. Only an unreachable server (refused, timed out,
    starting up, full) is tried again, until CONNECT_PATIENCE has passed."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise StoreUnavailable(f"invalid PostgreSQL URL: {first_line(exc)} (the form is "
                               "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE)") from None
    timeout: dict[str, Any] = ({} if "connect_timeout" in params
                               else {"connect_timeout": CONNECT_TIMEOUT})
    where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
    deadline = time.monotonic() + CONNECT_PATIENCE
    pause = 0.1
    while True:
        try:
            psycopg.connect(url, **timeout).close()
            return
        except psycopg.Error as exc:
            message = " ".join(first_line(exc).split())
            refusal = _refusal(message, params)
            if refusal is not None:
                raise StoreUnavailable(f"cannot connect to PostgreSQL at {where}: {refusal}") \
                    from None
            if time.monotonic() + pause > deadline:
                raise StoreUnavailable(
                    f"cannot reach PostgreSQL at {where} (tried for {CONNECT_PATIENCE:g}s): "
                    f"{_cause(message)}; check that the server runs and that the host and "
                    "port in the database URL are right") from None
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def _cause(message: str) -> str:
    """libpq's message without its 'connection failed: connection to server
    at ... failed:' preamble (the caller names the server)."""
    return message.rpartition(" failed: ")[2].removeprefix("FATAL: ").strip() or message


# Refusals worth waiting out: the server is starting, stopping or full.
_TEMPORARY = ("starting up", "shutting down", "not yet accepting connections",
              "too many clients", "remaining connection slots", "in recovery mode")


def _refusal(message: str, params: dict[str, Any]) -> str | None:
    """The cause and fix of a connection error no retry can mend, or None."""
    if "FATAL:" in message and not any(t in message for t in _TEMPORARY):
        cause = _cause(message)
        if "database" in cause and "does not exist" in cause:
            name = params.get("dbname") or "DATABASE"
            return (f"{cause}: create it (createdb {name}) or correct the database name in "
                    "the database URL")
        if "role" in cause and "does not exist" in cause:
            return f"{cause}: create the role or correct the user in the database URL"
        if "password" in cause:
            return f"{cause}: correct the user or password in the database URL"
        return f"{cause}: correct the database URL or the server's access rules (pg_hba.conf)"
    if message.startswith(("connection is bad:", "invalid ")):
        return (f"invalid database URL ({_cause(message).removeprefix('connection is bad: ')}); "
                "the form is postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
    if "failed to resolve host" in message:
        return f"{_cause(message)}: correct the host in the database URL"
    return None


def _translate(exc: psycopg.Error) -> Exception:
    """A driver error as the store's own: lost connections, shutdowns, pool
    timeouts and lost conflicts are worth retrying (StoreUnavailable);
    refused values (SQLSTATE class 22, and 54: e.g. an index entry too large)
    are the caller's (StoreDataError); anything else is a bug, left as is."""
    state = exc.sqlstate or ""
    if isinstance(exc, psycopg.DataError) or state.startswith("54"):
        return StoreDataError(f"the database refused a value: {first_line(exc)}")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return StoreUnavailable(f"PostgreSQL is unavailable: {first_line(exc)}")
    return exc

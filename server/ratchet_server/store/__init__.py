"""Storage: one contract (`Store`), two implementations (SQLite, Postgres).

Only this package runs SQL or imports a database driver.
"""

from __future__ import annotations

from ratchet_server.store.contract import Store, StoreDataError, StoreUnavailable


class StoreURLError(ValueError):
    """The database URL names no store Ratchet knows."""


async def open_store(url: str, *, notify: bool = True) -> Store:
    """Open (and connect) the store a URL names.

    `postgresql://...`, or `sqlite:///relative.db`, `sqlite:////absolute.db`,
    `sqlite://:memory:`. Raises `StoreURLError` for other schemes and
    `StoreUnavailable` when the database cannot be reached. `notify=False`:
    no LISTEN/NOTIFY between coordinators (a Postgres store only; other
    replicas' work is found by polling, docs/operations.md).
    """
    store = _store_for(url, notify)
    await store.connect()
    return store


def _store_for(url: str, notify: bool = True) -> Store:
    if url.startswith(("postgresql://", "postgres://")):
        from ratchet_server.store.postgres import PostgresStore

        return PostgresStore(url, notify=notify)
    if url.startswith("sqlite://"):
        from ratchet_server.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        if path in ("", "/:memory:", ":memory:"):
            return SqliteStore(":memory:")
        # sqlite:///relative/or/absolute: the third slash starts the path.
        # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db
        return SqliteStore(path[1:] if path.startswith("/") else path)
    raise StoreURLError(f"unsupported database URL {url!r}: use postgresql:// or sqlite:///PATH")


__all__ = ["Store", "StoreDataError", "StoreURLError", "StoreUnavailable", "open_store"]

"""Round trips on Postgres's hot paths (what the per-step and start
latencies in BENCHMARKS.md rest on): a checkpoint is one statement outside
any transaction block; leasing new runs is one statement (with its history)
in a transaction; a run leased before costs one read more, in the same
transaction, so the lease and its snapshot commit or retry together."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from ratchet_server import model
from ratchet_server.store import Store, _runs
from tests.store.test_conformance import ENV, create, lease, new_run, step_write, transition

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """The first word of each statement the store sends, and whether its
    connection was in autocommit."""
    calls: list[tuple[str, bool]] = []
    execute = psycopg.Connection.execute

    def spy(conn: psycopg.Connection[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((str(query).split()[0], conn.autocommit))
        return execute(conn, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", spy)
    return calls


async def test_a_checkpoint_is_one_statement_without_begin_or_commit(
    pg_store: Store, sent: list[tuple[str, bool]]
) -> None:
    await create(pg_store, new_run())
    [leased] = await lease(pg_store, limit=1)
    run = leased.run
    done = model.Event(run_id=run.id, type=model.EventType.STEP_COMPLETED, at=0.0,
                       attempt=1, lease_id=run.lease_id, step_key="s")
    sent.clear()
    assert await pg_store.apply([step_write(run, "s", state='{"x": 1}',
                                            events=(done,))]) == [True]
    assert sent == [("WITH", True)]
    [step] = await pg_store.get_steps(run.id)
    assert step.status is model.StepStatus.COMPLETED
    assert (await pg_store.get_run(ENV, run.id)).state == '{"x": 1}'  # type: ignore[union-attr]
    assert "step_completed" in [e["type"] for e in await pg_store.get_events(run.id)]


async def test_leasing_new_runs_is_one_statement_with_its_history(
    pg_store: Store, sent: list[tuple[str, bool]]
) -> None:
    await create(pg_store, new_run(), new_run())
    sent.clear()
    leased = await lease(pg_store, limit=5, owner="o1")
    assert sent == [("WITH", False)]
    assert len(leased) == 2 and all(item.steps == () for item in leased)
    for item in leased:
        [event] = [e for e in await pg_store.get_events(item.run.id) if e["type"] == "leased"]
        assert json.loads(event["data"]) == {"owner": "o1"}
        assert (event["attempt"], event["lease_id"]) == (1, item.run.lease_id)


async def test_a_run_with_steps_is_leased_with_its_snapshot(
    pg_store: Store, sent: list[tuple[str, bool]]
) -> None:
    await create(pg_store, new_run(), new_run())
    first, fresh = [item.run for item in await lease(pg_store, limit=1)] + [None]
    assert first is not None and fresh is None
    assert await pg_store.apply([step_write(first, "a", output="1")]) == [True]
    assert await pg_store.apply([transition(first, model.RunStatus.QUEUED)]) == [True]
    sent.clear()
    leased = {item.run.id: item for item in await lease(pg_store, limit=5)}
    assert sent == [("WITH", False), ("SELECT", False)]  # the lease, then its steps
    assert [s.key for s in leased[first.id].steps] == ["a"]
    assert [item.steps for run_id, item in leased.items() if run_id != first.id] == [()]
    assert (await pg_store.get_run(ENV, first.id)).attempt == 2  # type: ignore[union-attr]


async def test_a_run_leased_before_has_its_steps_read_even_without_any(
    pg_store: Store, sent: list[tuple[str, bool]]
) -> None:
    """The lease statement's snapshot may predate steps that another
    coordinator's lease committed before this one locked the run: a run
    leased before is always read again, by a later statement."""
    await create(pg_store, new_run())
    [first] = [item.run for item in await lease(pg_store, limit=1)]
    assert await pg_store.apply([transition(first, model.RunStatus.QUEUED)]) == [True]
    sent.clear()
    [again] = await lease(pg_store, limit=1)
    assert again.run.id == first.id and again.steps == ()
    assert sent == [("WITH", False), ("SELECT", False)]


async def test_a_lease_whose_snapshot_read_fails_is_retried_whole(
    pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost serialization check on the steps read (routine on SERIALIZABLE
    databases) must not leave the first attempt's runs leased but never
    handed out: the retry runs the lease again, from a rolled-back start."""
    await create(pg_store, *[new_run() for _ in range(4)])
    real = _runs.lease_ready_txn
    failed: list[bool] = []

    class Once:
        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def execute(self, sql: str, params: Any = None) -> Any:
            if sql.lstrip().startswith("SELECT * FROM steps") and not failed:
                failed.append(True)
                raise psycopg.errors.SerializationFailure("injected")
            return self._conn.execute(sql, params)

        def cursor(self) -> Any:
            return self._conn.cursor()

    def leased_before_everywhere(conn: Any, d: Any, **kwargs: Any) -> Any:
        # Make the lease read steps, as for runs leased before.
        original = d.sql

        class Dialect:
            def __getattr__(self, name: str) -> Any:
                return getattr(d, name)

            def sql(self, name: str, **fragments: str) -> str:
                text = original(name, **fragments)
                return text.replace("leased_before OR EXISTS", "TRUE OR EXISTS")

        return real(Once(conn), Dialect(), **kwargs)

    monkeypatch.setattr(_runs, "lease_ready_txn", leased_before_everywhere)
    leased = await lease(pg_store, limit=2)
    monkeypatch.undo()
    assert failed and len(leased) == 2
    running = [r for r in await pg_store.list_runs(model.RunFilter(env=ENV), 10, None)
               if r.status is model.RunStatus.RUNNING]
    assert sorted(r.id for r in running) == sorted(item.run.id for item in leased)

"""A Postgres transaction that loses a deadlock or a serialization check runs
again, whole, after a short jittered pause; how many times is counted.

Distributed SQL databases (CockroachDB: SERIALIZABLE by default) lose such
checks routinely, so the store must retry them and stay idempotent
(docs/operations.md, "Past one Postgres").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from ratchet import Retry
from ratchet_server import model
from ratchet_server.engine.ids import new_id
from ratchet_server.store import StoreUnavailable, open_store
from ratchet_server.store.postgres import TRANSACTION_ATTEMPTS, PostgresStore
from tests.store.test_conformance import serializable

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = await open_store(serializable(pg_url), notify=False)
    assert isinstance(store, PostgresStore)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


def _insert_key(conn: Any, key_id: str) -> None:
    conn.execute("INSERT INTO api_keys (id, env, role, name, key_hash, created_at) "
                 "VALUES (%(id)s, 'dev', 'admin', '', %(id)s, 0)", {"id": key_id})


@pytest.mark.parametrize("lost", [psycopg.errors.SerializationFailure,
                                  psycopg.errors.DeadlockDetected])
async def test_a_transaction_that_lost_a_conflict_runs_again_from_the_start(
    pg: PostgresStore, lost: type[Exception]
) -> None:
    calls = 0

    def txn(conn: Any) -> str:
        nonlocal calls
        calls += 1
        # The same row each time: a first attempt not rolled back whole would
        # make the second fail on the primary key.
        _insert_key(conn, "key_once")
        if calls == 1:
            raise lost("could not serialize access (injected)")
        return "done"

    assert await pg._run(txn) == "done"
    assert calls == 2 and pg.retries == 1
    assert [k.id for k in await pg.list_api_keys()] == ["key_once"]


async def test_a_transaction_that_keeps_losing_gives_up_after_the_last_attempt(
    pg: PostgresStore,
) -> None:
    calls = 0

    def txn(conn: Any) -> None:
        nonlocal calls
        calls += 1
        raise psycopg.errors.SerializationFailure("could not serialize access (injected)")

    with pytest.raises(StoreUnavailable):
        await pg._run(txn)
    assert calls == TRANSACTION_ATTEMPTS and pg.retries == TRANSACTION_ATTEMPTS - 1


async def test_a_commit_of_unknown_outcome_is_not_run_again(pg: PostgresStore) -> None:
    calls = 0

    def txn(conn: Any) -> None:
        nonlocal calls
        calls += 1
        raise psycopg.errors.StatementCompletionUnknown("result is ambiguous (injected)")

    with pytest.raises(StoreUnavailable) as raised:
        await pg._run(txn)
    assert isinstance(raised.value.__cause__, psycopg.errors.StatementCompletionUnknown)
    assert calls == 1 and pg.retries == 0


async def test_concurrent_triggers_with_one_key_conflict_and_create_one_run(
    pg: PostgresStore,
) -> None:
    """A natural serialization failure: under SERIALIZABLE, triggers racing
    with one idempotency key all read "no such run"; all but one lose at the
    insert or the commit, run again, and find the winner's run. Each round
    must create exactly one run with one `triggered` event."""
    rounds, racers = 20, 4
    for i in range(rounds):
        key = f"key-{i}"
        news = [model.NewRun(id=new_id("run"), env="dev", task_id="t", queue="t",
                             payload="{}", retry=Retry(), idempotency_key=key,
                             idempotency_expires_at=None) for _ in range(racers)]
        results = await asyncio.gather(*(pg.create_runs([n]) for n in news))
        created = [run for [(run, was_created)] in results if was_created]
        assert len(created) == 1, results
        assert {run.id for [(run, _)] in results} == {created[0].id}
        events = await pg.get_events(created[0].id)
        assert [e["type"] for e in events] == ["triggered"]
    print(f"{pg.retries} transaction(s) ran again over {rounds} rounds of {racers} racers")
    assert pg.retries > 0

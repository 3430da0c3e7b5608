"""The implementation both SQL stores share (the contract is in contract.py).

Each store method is one transaction. The SQL runs in threads (one for
SQLite, a pool for Postgres), so the coordinator's event loop never blocks on
the database; the two concrete stores only say how to open a connection and
a transaction.
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ratchet_server import clock, model
from ratchet_server.store import _dialect, _rows, _runs, _tokens, _waits, _writes
from ratchet_server.store.contract import ready_topic

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"

class SqlStore(abc.ABC):
    """Shared implementation over a DB-API connection (sqlite3 or psycopg)."""

    dialect: _dialect.Dialect

    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ratchet-db")
        # The engine's child-wait rules (use_child_wait_rules); without them a
        # child wait is left to the engine's sweep.
        self._child_rules: _waits.ChildRules | None = None
        self._child_woke: Callable[[], None] | None = None

    def use_child_wait_rules(self, outcome: model.ChildWaitRule, wake: model.WakeRule,
                             woke: Callable[[], None]) -> None:
        """The engine's rules for the transaction of a wait's last child to
        end the wait (store/_waits.children_final_txn), and what to call, after
        the commit, when that woke a parent."""
        self._child_rules = (outcome, wake)
        self._child_woke = woke

    def _children_final_txn(self, conn: Any, run_ids: Sequence[str]) -> list[tuple[str, str]]:
        """Runs made final in this transaction: count their waits down."""
        return _waits.children_final_txn(conn, self.dialect, run_ids) if run_ids else []

    async def _end_child_waits(self, reached: Sequence[tuple[str, str]]) -> None:
        """After the commit that counted them to 0: end those waits, one
        transaction each (parent row first: docs/architecture.md, lock order).
        Without the engine's rules they are left to its sweep."""
        rules = self._child_rules
        if rules is None:
            return
        woken = False
        for parent, key in reached:
            def txn(conn: Any, parent: str = parent, key: str = key) -> bool:
                if not _waits.end_child_wait_txn(conn, self.dialect, parent, key, rules,
                                                 clock.now()):
                    return False
                self._notify_txn(conn, {"*"})
                return True

            try:
                woken = await self._run(txn) or woken
            except Exception:  # the writes have committed: the sweep ends this wait
                _waits.log.exception("ending child wait %s/%s failed", parent, key)
        if woken and self._child_woke is not None:
            self._child_woke()

    @abc.abstractmethod
    def _transaction(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(conn)` in one transaction, in the calling (worker) thread."""

    async def _run(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transaction, fn)

    async def _run_quick(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(conn)` in one transaction, as `_run`; `fn` is a short write
        (`_writes.quick`), which a store may run on the calling thread when
        that never waits (SQLite, its thread idle)."""
        return await self._run(fn)

    async def _run_autocommit(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(conn)`, which sends exactly one statement, committed on its
        own where the database allows it (else in a transaction, as `_run`).
        A retry after a lost conflict runs that one statement again."""
        return await self._run(fn)

    async def connect(self) -> None:
        """Make sure the database answers; raise StoreUnavailable if not."""

    async def close(self) -> None:
        self._executor.shutdown(wait=True)

    # --- schema ---------------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply the numbered migrations not yet applied; return their names."""
        files = sorted((MIGRATIONS / self.dialect.name).glob("*.sql"))
        d = self.dialect

        def txn(conn: Any) -> list[str]:
            self._lock_for_migration(conn)
            conn.execute(d.sql("create_migrations_table"))
            done = {r["version"] for r in conn.execute(
                d.sql("select_migration_versions")).fetchall()}
            applied = []
            for path in files:
                version = int(path.name.split("_", 1)[0])
                if version in done:
                    continue
                self._execute_script(conn, path.read_text())
                conn.execute(
                    d.sql("insert_migration"),
                    {"v": version, "n": path.name, "t": clock.now()},
                )
                applied.append(path.name)
            return applied

        return await self._run(txn)

    def _lock_for_migration(self, conn: Any) -> None:
        """Serialise concurrent migrations (several replicas starting at once)."""

    @abc.abstractmethod
    def _execute_script(self, conn: Any, script: str) -> None: ...

    # --- keys and tasks ---------------------------------------------------------

    async def create_api_key(
        self, *, key_id: str, env: str, role: model.Role, name: str, key_hash: str
    ) -> None:
        params = {"id": key_id, "env": env, "role": role.value, "name": name,
                  "key_hash": key_hash, "now": clock.now()}
        await self._run(lambda c: c.execute(self.dialect.sql("insert_api_key"), params))

    async def find_api_key(self, key_hash: str) -> model.ApiKey | None:
        def txn(conn: Any) -> model.ApiKey | None:
            row = conn.execute(self.dialect.sql("select_api_key"),
                               {"key_hash": key_hash}).fetchone()
            if row is None:
                return None
            return model.ApiKey(id=row["id"], env=row["env"], role=model.Role(row["role"]),
                                name=row["name"])

        return await self._run(txn)

    async def list_api_keys(self) -> list[model.ApiKeyInfo]:
        def txn(conn: Any) -> list[model.ApiKeyInfo]:
            rows = conn.execute(self.dialect.sql("list_api_keys")).fetchall()
            return [model.ApiKeyInfo(id=r["id"], env=r["env"], role=model.Role(r["role"]),
                                     name=r["name"], created_at=r["created_at"],
                                     revoked_at=r["revoked_at"]) for r in rows]

        return await self._run(txn)

    async def revoke_api_key(self, key_id: str, now: float) -> bool:
        """Revoke a key not revoked yet; False if there is no such key to revoke."""
        def txn(conn: Any) -> bool:
            row = conn.execute(self.dialect.sql("revoke_api_key"),
                               {"id": key_id, "now": now}).fetchone()
            return row is not None

        return await self._run(txn)

    async def upsert_tasks(self, tasks: Sequence[model.TaskDef]) -> None:
        now = clock.now()
        sql = self.dialect.sql("upsert_task")

        def txn(conn: Any) -> None:
            for t in tasks:
                conn.execute(sql, {
                    "env": t.env, "id": t.id, "version": t.version, "queue": t.queue,
                    "retry": _rows.retry_to_json(t.retry), "payload_schema": t.payload_schema,
                    "output_schema": t.output_schema, "max_duration": t.max_duration,
                    "handles_final_error": int(t.handles_final_error), "now": now,
                })

        await self._run(txn)

    async def get_task(self, env: str, task_id: str) -> model.TaskDef | None:
        def txn(conn: Any) -> model.TaskDef | None:
            row = conn.execute(self.dialect.sql("select_task"),
                               {"env": env, "id": task_id}).fetchone()
            return None if row is None else _rows.task_from_row(row)

        return await self._run(txn)

    async def list_tasks(self, env: str,
                         task_id: str = "") -> list[tuple[model.TaskDef, float]]:
        """The environment's registered tasks in id order ("" = all), each with
        when it was last registered."""
        def txn(conn: Any) -> list[tuple[model.TaskDef, float]]:
            rows = conn.execute(self.dialect.sql("select_tasks"),
                                {"env": env, "id": task_id}).fetchall()
            return [(_rows.task_from_row(row), float(row["updated_at"])) for row in rows]

        return await self._run(txn)

    # --- runs -------------------------------------------------------------------

    async def create_runs(self, runs: Sequence[model.NewRun]) -> list[tuple[model.Run, bool]]:
        d = self.dialect

        def txn(conn: Any) -> list[tuple[model.Run, bool]]:
            result = _runs.create_runs_txn(conn, d, runs, clock.now())
            if any(created for _, created in result):
                self._notify_txn(conn, {ready_topic(r.env, r.task_id) for r in runs})
            return result

        return await self._run(txn)

    def _notify_txn(self, conn: Any, topics: set[str]) -> None:
        """Tell other coordinators, at commit, that runs became ready: of the
        tasks the topics name (contract.ready_topic), "*" for any."""

    async def get_run(self, env: str | None, run_id: str) -> model.Run | None:
        def txn(conn: Any) -> model.Run | None:
            if env is None:
                row = conn.execute(self.dialect.sql("select_run_any_env"),
                                   {"id": run_id}).fetchone()
            else:
                row = conn.execute(self.dialect.sql("select_run"),
                                   {"env": env, "id": run_id}).fetchone()
            return None if row is None else _rows.run_from_row(row)

        return await self._run(txn)

    async def get_steps(self, run_id: str) -> list[model.Step]:
        def txn(conn: Any) -> list[model.Step]:
            rows = conn.execute(self.dialect.sql("select_steps"),
                                {"run_id": run_id}).fetchall()
            return [_rows.step_from_row(r) for r in rows]

        return await self._run(txn)

    async def get_events(self, run_id: str) -> list[dict[str, Any]]:
        def txn(conn: Any) -> list[dict[str, Any]]:
            rows = conn.execute(self.dialect.sql("select_events"),
                                {"run_id": run_id}).fetchall()
            return [{k: r[k] for k in ("id", "at", "type", "attempt", "lease_id", "step_key",
                                       "data")} for r in rows]

        return await self._run(txn)

    async def get_events_page(
        self, run_id: str, after: int, limit: int
    ) -> list[dict[str, Any]]:
        def txn(conn: Any) -> list[dict[str, Any]]:
            rows = conn.execute(self.dialect.sql("select_events_page"),
                                {"run_id": run_id, "after": after, "limit": limit}).fetchall()
            return [{k: r[k] for k in ("id", "at", "type", "attempt", "lease_id", "step_key",
                                       "data")} for r in rows]

        return await self._run(txn)

    async def append_events(self, events: Sequence[model.Event]) -> None:
        await self._run(lambda c: _rows.insert_events_txn(c, self.dialect, events))

    async def discard_run(self, env: str, run_id: str) -> model.Run | None:
        def txn(conn: Any) -> model.Run | None:
            now = clock.now()
            row = conn.execute(self.dialect.sql("discard_run"),
                               {"env": env, "id": run_id, "now": now}).fetchone()
            if row is None:
                return None
            _rows.insert_events_txn(conn, self.dialect, [model.Event(
                run_id=run_id, type=model.EventType.DISCARDED, at=now)])
            return _rows.run_from_row(row)

        return await self._run(txn)

    async def delete_finished(
        self, cutoff: float, limit: int, after: tuple[float, str] | None = None,
    ) -> tuple[int, tuple[float, str] | None]:
        return await self._run(
            lambda c: _runs.delete_finished_txn(c, self.dialect, cutoff, limit, after))

    async def replay_run(self, env: str, run_id: str, retry: model.Retry,
                         rerun_steps: Sequence[str] = ()) -> model.Run | None:
        def txn(conn: Any) -> model.Run | None:
            now = clock.now()
            row = conn.execute(self.dialect.sql("replay_run"), {
                "env": env, "id": run_id, "now": now,
                "retry": _rows.retry_to_json(retry)}).fetchone()
            if row is None:
                return None
            run = _rows.run_from_row(row)
            if run.parent_run_id is not None:
                _waits.children_reopened_txn(conn, self.dialect, [run.id])
            if rerun_steps:
                conn.cursor().executemany(self.dialect.sql("rerun_failed_step"), [
                    {"run_id": run.id, "key": key} for key in rerun_steps])
            _rows.insert_events_txn(conn, self.dialect, [model.Event(
                run_id=run.id, type=model.EventType.REPLAYED, at=now, attempt=run.attempt,
                data=json.dumps({"from": "last checkpoint",
                                 "max_attempts": retry.max_attempts,
                                 "rerun_steps": list(rerun_steps)}))])
            self._notify_txn(conn, {ready_topic(env, run.task_id)})
            return run

        return await self._run(txn)

    async def list_runs(
        self, flt: model.RunFilter, limit: int, cursor: tuple[float, str] | None
    ) -> list[model.Run]:
        return await self._run(
            lambda c: _runs.list_runs_txn(c, self.dialect, flt, limit, cursor))

    async def cancel_run(self, env: str, run_id: str, reason: str = "") -> model.Run | None:
        reached: list[tuple[str, str]] = []

        def txn(conn: Any) -> model.Run | None:
            now = clock.now()
            row = conn.execute(self.dialect.sql("cancel_run"),
                               {"env": env, "id": run_id, "now": now}).fetchone()
            if row is None:
                return None
            run = _rows.run_from_row(row)
            _rows.insert_events_txn(conn, self.dialect, [model.Event(
                run_id=run.id, type=model.EventType.CANCELED, at=now, attempt=run.attempt,
                lease_id=run.lease_id, data=json.dumps({"reason": reason}) if reason else None)])
            if run.parent_run_id is not None:
                reached[:] = self._children_final_txn(conn, [run.id])
            return run

        result = await self._run(txn)
        await self._end_child_waits(reached)
        return result

    # --- leases -----------------------------------------------------------------

    async def lease_ready(
        self, *, env: str, task_ids: Sequence[str], limit: int, owner: str, nonce: str,
        ttl: float, owners: Sequence[str] = (),
    ) -> list[model.LeasedRun]:
        def txn(conn: Any) -> list[model.LeasedRun]:
            now = clock.now()
            return _runs.lease_ready_txn(conn, self.dialect, env=env, task_ids=task_ids,
                                        limit=limit, owner=owner, nonce=nonce, now=now,
                                        expires_at=now + ttl, owners=owners)

        # One transaction (not autocommit, though leasing new runs is one
        # statement): the lease and the read of its runs' steps commit, or
        # are retried, together; a lease committed whose snapshot then could
        # not be read would sit undelivered until its TTL.
        return await self._run(txn)

    async def next_run_at(self, env: str, task_ids: Sequence[str]) -> float | None:
        d = self.dialect
        sql = d.sql("next_run_at")

        def txn(conn: Any) -> float | None:
            row = conn.execute(sql, {"env": env, "task_ids": d.in_param(task_ids)}).fetchone()
            return None if row is None else row["next"]

        return await self._run(txn)

    async def renew_leases(self, owner: str, lease_ids: Sequence[str], ttl: float) -> int:
        d = self.dialect
        sql = d.sql("renew_leases", lease_ids=d.in_list.format(param=":lease_ids"))

        def txn(conn: Any) -> int:
            cur = conn.execute(sql, {"owner": owner, "lease_ids": d.in_param(lease_ids),
                                     "expires_at": clock.now() + ttl})
            return int(cur.rowcount)

        return await self._run(txn)

    async def adopt_leases(
        self, env: str, lease_ids: Sequence[str], owner: str, ttl: float
    ) -> list[str]:
        d = self.dialect
        sql = d.sql("adopt_leases", lease_ids=d.in_list.format(param=":lease_ids"))

        def txn(conn: Any) -> list[str]:
            now = clock.now()
            rows = conn.execute(sql, {"env": env, "lease_ids": d.in_param(lease_ids),
                                      "owner": owner, "expires_at": now + ttl}).fetchall()
            _rows.insert_events_txn(conn, d, (model.Event(
                run_id=r["id"], type=model.EventType.LEASE_ADOPTED, at=now,
                attempt=r["attempt"], lease_id=r["lease_id"]) for r in rows))
            return [r["lease_id"] for r in rows]

        return await self._run(txn)

    async def expired_leases(self, limit: int) -> list[model.LeaseRef]:
        def txn(conn: Any) -> list[model.LeaseRef]:
            rows = conn.execute(self.dialect.sql("select_expired_leases"),
                                {"now": clock.now(), "limit": limit}).fetchall()
            return [_rows.lease_ref_from_row(r) for r in rows]

        return await self._run(txn)

    async def owned_leases(self, owner: str) -> list[model.LeaseRef]:
        def txn(conn: Any) -> list[model.LeaseRef]:
            rows = conn.execute(self.dialect.sql("select_owned_leases"),
                                {"owner": owner}).fetchall()
            return [_rows.lease_ref_from_row(r) for r in rows]

        return await self._run(txn)

    async def get_lease(self, run_id: str, lease_id: str) -> model.LeaseRef | None:
        def txn(conn: Any) -> model.LeaseRef | None:
            row = conn.execute(self.dialect.sql("select_lease"),
                               {"run_id": run_id, "lease_id": lease_id}).fetchone()
            return None if row is None else _rows.lease_ref_from_row(row)

        return await self._run(txn)

    async def apply(self, writes: Sequence[model.FencedWrite]) -> list[bool]:
        if _writes.one_statement(self.dialect, writes):
            # The per-step hot path: one round trip, no BEGIN and COMMIT.
            return await self._run_autocommit(lambda conn: _writes.apply_step_writes_txn(
                conn, self.dialect, writes, clock.now()))
        reached: list[tuple[str, str]] = []

        def txn(conn: Any) -> list[bool]:
            now = clock.now()
            children: set[str] = set()
            result = _writes.apply_writes_txn(conn, self.dialect, writes, now, children)
            reached[:] = self._children_final_txn(
                conn, _writes.made_final(writes, result, children))
            requeued = {w.run_id for w, ok in zip(writes, result, strict=True)
                        if ok and isinstance(w, model.RunTransition)
                        and w.status in (model.RunStatus.QUEUED, model.RunStatus.WAITING)}
            if requeued:
                self._notify_txn(conn, {"*"})
            return result

        applied = await (self._run_quick(txn) if _writes.quick(writes) else self._run(txn))
        await self._end_child_waits(reached)
        return applied

    # --- timers and waits ---------------------------------------------------------

    async def due_steps(self, limit: int) -> list[model.Step]:
        return await self._run(
            lambda conn: _waits.due_steps_txn(conn, self.dialect, clock.now(), limit))

    async def child_wait_candidates(
        self, limit: int
    ) -> list[tuple[str, str, list[model.Run]]]:
        return await self._run(
            lambda conn: _waits.child_wait_candidates_txn(conn, self.dialect, limit))

    async def find_token(
        self, env: str, token_id: str
    ) -> tuple[model.Step, model.RunStatus] | None:
        return await self._run(
            lambda conn: _waits.find_token_txn(conn, self.dialect, env, token_id))

    # --- wait tokens created outside runs (_tokens.py) --------------------------

    async def create_token(self, token: model.Token) -> tuple[model.Token, bool]:
        return await self._run(lambda c: _tokens.create_token_txn(c, self.dialect, token))

    async def get_token(self, env: str | None, token_id: str) -> model.Token | None:
        return await self._run(lambda c: _tokens.get_token_txn(c, self.dialect, env, token_id))

    async def list_tokens(self, flt: model.TokenFilter, limit: int,
                          cursor: tuple[float, str] | None) -> list[model.Token]:
        now = clock.now()
        return await self._run(
            lambda c: _tokens.list_tokens_txn(c, self.dialect, flt, limit, cursor, now))

    async def wait_on_token(self, write: model.StepWrite,
                            rule: model.TokenWaitRule) -> bool | str:
        try:
            return await self._run(lambda c: _tokens.wait_on_token_txn(
                c, self.dialect, write, rule, clock.now()))
        except _tokens.Undo as undone:
            return str(undone.result)

    async def complete_token(
        self, env: str, token_id: str, data: str,
        outcome: Callable[[model.Step], model.WaitResolution], rule: model.WakeRule,
    ) -> model.TokenCompletion | None:
        def txn(conn: Any) -> model.TokenCompletion | None:
            done = _tokens.complete_token_txn(conn, self.dialect, env, token_id, data,
                                              clock.now(), outcome, rule)
            if done is not None and done.woken:
                self._notify_txn(conn, {"*"})
            return done

        try:
            return await self._run(txn)
        except _tokens.Undo as undone:
            result: model.TokenCompletion = undone.result
            return result

    async def resolve_waits(
        self, resolutions: Sequence[model.WaitResolution], rule: model.WakeRule
    ) -> list[bool]:
        def txn(conn: Any) -> list[bool]:
            applied, woken = _waits.resolve_waits_txn(conn, self.dialect, resolutions, rule,
                                                      clock.now())
            if woken:
                self._notify_txn(conn, {"*"})
            return applied

        return await self._run(txn)

    async def unfinished_runs(
        self, env: str | None, after: str, limit: int, updated_before: float
    ) -> list[tuple[model.Run, tuple[str, ...], dict[str, model.Step]]]:
        """Unfinished runs that may hold a lease or wait (of `env`, or of
        every environment), in id order after `after`, each with the steps
        it waits on; runs changed since `updated_before` are left out."""
        return await self._run(lambda conn: _waits.unfinished_page_txn(
            conn, self.dialect, env, after, limit, updated_before))

    async def repair_run(self, run_id: str, still_stuck: _waits.StuckCheck) -> str | None:
        def txn(conn: Any) -> str | None:
            why = _waits.repair_txn(conn, self.dialect, run_id, still_stuck, clock.now())
            if why is not None:
                self._notify_txn(conn, {"*"})
            return why

        return await self._run(txn)

    async def expire_runs(self, limit: int) -> list[str]:
        d = self.dialect
        reached: list[tuple[str, str]] = []

        def txn(conn: Any) -> list[str]:
            now = clock.now()
            rows = conn.execute(d.sql("expire_runs", skip_locked=d.skip_locked),
                                {"now": now, "limit": limit}).fetchall()
            _rows.insert_events_txn(conn, d, (model.Event(
                run_id=r["id"], type=model.EventType.EXPIRED, at=now, attempt=r["attempt"])
                for r in rows))
            reached[:] = self._children_final_txn(conn, [r["id"] for r in rows])
            return [r["id"] for r in rows]

        expired = await self._run(txn)
        await self._end_child_waits(reached)
        return expired

    async def time_out_runs(self, limit: int, error: model.ErrorInfo) -> list[model.LeaseRef]:
        d = self.dialect
        reached: list[tuple[str, str]] = []

        def txn(conn: Any) -> list[model.LeaseRef]:
            now = clock.now()
            rows = conn.execute(d.sql("time_out_runs", skip_locked=d.skip_locked),
                                {"now": now, "limit": limit,
                                 "error": _rows.error_to_json(error)}).fetchall()
            _rows.insert_events_txn(conn, d, (model.Event(
                run_id=r["id"], type=model.EventType.TIMED_OUT, at=now, attempt=r["attempt"],
                lease_id=r["lease_id"]) for r in rows))
            reached[:] = self._children_final_txn(conn, [r["id"] for r in rows])
            return [model.LeaseRef(run_id=r["id"], lease_id=r["lease_id"] or "",
                                   attempt=r["attempt"], retry=model.NO_RETRY,
                                   lease_owner=r["lease_owner"]) for r in rows]

        refs = await self._run(txn)
        await self._end_child_waits(reached)
        return refs

    async def create_children(
        self, *, parent: str, lease_id: str, step_key: str,
        children: Sequence[model.NewRun], wait: bool,
    ) -> list[str] | None:
        def txn(conn: Any) -> list[str] | None:
            ids = _runs.create_children_txn(conn, self.dialect, parent=parent,
                                           lease_id=lease_id, step_key=step_key,
                                           children=children, wait=wait, now=clock.now())
            if ids:
                self._notify_txn(conn, {ready_topic(c.env, c.task_id) for c in children})
            return ids

        return await self._run(txn)

    async def cancel_children(self, parent_run_id: str) -> list[model.Run]:
        reached: list[tuple[str, str]] = []

        def txn(conn: Any) -> list[model.Run]:
            now = clock.now()
            rows = conn.execute(self.dialect.sql("cancel_children"),
                                {"parent": parent_run_id, "now": now}).fetchall()
            runs = [_rows.run_from_row(r) for r in rows]
            _rows.insert_events_txn(conn, self.dialect, (model.Event(
                run_id=r.id, type=model.EventType.CANCELED, at=now, attempt=r.attempt,
                lease_id=r.lease_id, data=json.dumps({"reason": "parent canceled"}))
                for r in runs))
            reached[:] = self._children_final_txn(conn, [r.id for r in runs])
            return runs

        canceled = await self._run(txn)
        await self._end_child_waits(reached)
        return canceled

    async def listen(self, callback: Callable[[str, str], None]) -> None:
        """Single-process stores have no other coordinator to hear from."""

    async def notify_ready(self, env: str) -> None:
        await self._run(lambda c: self._notify_txn(c, {ready_topic(env, "*")}))

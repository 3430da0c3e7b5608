"""The store contract: what the engine may ask of any store.

One protocol, two implementations (SQLite, Postgres) that pass the same
suite (tests/store/test_conformance.py). Each method is one transaction;
none decides an outcome: the engine hands in what to write, and where a
rule must meet the row locks (when a run counts as woken, whether a run is
stuck), the engine hands in the rule as a function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ratchet_server import model
from ratchet_server.store import _waits


class StoreUnavailable(RuntimeError):
    """The database could not be reached, or dropped the connection: try again."""


class StoreDataError(ValueError):
    """The database refused a value (a NUL character, a number out of range).
    The engine validates requests first; this is the last line of defence."""


def ready_topic(env: str, task_id: str) -> str:
    """What a "runs became ready" notification says: the environment and the
    task ("*": any)."""
    return json.dumps([env, task_id])


def parse_ready_topic(text: str) -> tuple[str, str]:
    """(env, task_id) from `ready_topic`; a bare environment or "*" (sent by
    coordinators before issue 11) concerns every task."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, str) for v in value)):
        return value[0], value[1]
    return text, "*"


def first_line(exc: BaseException) -> str:
    """A driver error's message, on one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Store(Protocol):
    """What the engine needs from storage. Every method is one transaction."""

    async def connect(self) -> None: ...
    async def migrate(self) -> list[str]: ...
    def use_child_wait_rules(self, outcome: model.ChildWaitRule, wake: model.WakeRule,
                             woke: Callable[[], None]) -> None:
        """The engine's rules for a child wait, applied by the transaction
        that makes its last child final; `woke()` after such a commit woke a run."""
        ...
    async def close(self) -> None: ...

    async def create_api_key(
        self, *, key_id: str, env: str, role: model.Role, name: str, key_hash: str
    ) -> None: ...
    async def find_api_key(self, key_hash: str) -> model.ApiKey | None: ...
    async def list_api_keys(self) -> list[model.ApiKeyInfo]: ...
    async def revoke_api_key(self, key_id: str, now: float) -> bool: ...

    async def upsert_tasks(self, tasks: Sequence[model.TaskDef]) -> None: ...
    async def get_task(self, env: str, task_id: str) -> model.TaskDef | None: ...
    async def list_tasks(self, env: str,
                         task_id: str = "") -> list[tuple[model.TaskDef, float]]:
        """The environment's tasks in id order ("" = all), with when each
        was last registered."""
        ...

    async def create_runs(self, runs: Sequence[model.NewRun]) -> list[tuple[model.Run, bool]]: ...
    async def get_run(self, env: str | None, run_id: str) -> model.Run | None: ...
    async def get_steps(self, run_id: str) -> list[model.Step]: ...
    async def get_events(self, run_id: str) -> list[dict[str, Any]]: ...
    async def get_events_page(
        self, run_id: str, after: int, limit: int
    ) -> list[dict[str, Any]]: ...
    async def append_events(self, events: Sequence[model.Event]) -> None: ...
    async def discard_run(self, env: str, run_id: str) -> model.Run | None: ...
    async def delete_finished(
        self, cutoff: float, limit: int, after: tuple[float, str] | None = None,
    ) -> tuple[int, tuple[float, str] | None]:
        """One retention batch (store/_runs.delete_finished_txn): how many went,
        and the cursor to pass as `after` next, None at the end of the walk."""
        ...
    async def replay_run(self, env: str, run_id: str, retry: model.Retry,
                         rerun_steps: Sequence[str] = ()) -> model.Run | None: ...
    async def list_runs(
        self, flt: model.RunFilter, limit: int, cursor: tuple[float, str] | None
    ) -> list[model.Run]: ...
    async def cancel_run(self, env: str, run_id: str, reason: str = "") -> model.Run | None:
        """CANCELED, with `reason` in its canceled event; None if not unfinished."""
        ...

    async def lease_ready(
        self, *, env: str, task_ids: Sequence[str], limit: int, owner: str, nonce: str,
        ttl: float, owners: Sequence[str] = (),
    ) -> list[model.LeasedRun]:
        """Lease up to `limit` ready runs of the tasks, higher priority first,
        then earlier run_at, then id. The n-th run in that order is owned by
        `owners[n]` when `owners` is given (at most len(owners) runs), else
        every run by `owner`."""
        ...
    async def next_run_at(self, env: str, task_ids: Sequence[str]) -> float | None: ...
    async def renew_leases(self, owner: str, lease_ids: Sequence[str], ttl: float) -> int: ...
    async def adopt_leases(
        self, env: str, lease_ids: Sequence[str], owner: str, ttl: float
    ) -> list[str]: ...
    async def expired_leases(self, limit: int) -> list[model.LeaseRef]: ...
    async def owned_leases(self, owner: str) -> list[model.LeaseRef]: ...
    async def get_lease(self, run_id: str, lease_id: str) -> model.LeaseRef | None: ...
    async def apply(self, writes: Sequence[model.FencedWrite]) -> list[bool]: ...

    async def due_steps(self, limit: int) -> list[model.Step]: ...
    async def child_wait_candidates(
        self, limit: int
    ) -> list[tuple[str, str, list[model.Run]]]: ...
    async def create_token(self, token: model.Token) -> tuple[model.Token, bool]:
        """Insert a token, or return the one with its idempotency key (created False)."""
        ...
    async def get_token(self, env: str | None, token_id: str) -> model.Token | None:
        """A token by id, in `env` (None: in any environment, for its URL)."""
        ...
    async def list_tokens(self, flt: model.TokenFilter, limit: int,
                          cursor: tuple[float, str] | None) -> list[model.Token]: ...
    async def wait_on_token(self, write: model.StepWrite,
                            rule: model.TokenWaitRule) -> bool | str:
        """A run starts waiting on an existing token: under the lease's fence
        and the token's row lock, record the step the rule returns. False for
        a stale lease, the rule's refusal as a string."""
        ...
    async def complete_token(
        self, env: str, token_id: str, data: str,
        outcome: Callable[[model.Step], model.WaitResolution], rule: model.WakeRule,
    ) -> model.TokenCompletion | None:
        """Complete a token created with create_token (None if unknown), and
        the step of the run waiting on it (`outcome`), waking the run by `rule`."""
        ...
    async def find_token(
        self, env: str, token_id: str
    ) -> tuple[model.Step, model.RunStatus] | None: ...
    async def resolve_waits(
        self, resolutions: Sequence[model.WaitResolution], rule: model.WakeRule
    ) -> list[bool]: ...
    async def expire_runs(self, limit: int) -> list[str]: ...
    async def time_out_runs(self, limit: int, error: model.ErrorInfo) -> list[model.LeaseRef]: ...
    async def unfinished_runs(
        self, env: str | None, after: str, limit: int, updated_before: float
    ) -> list[tuple[model.Run, tuple[str, ...], dict[str, model.Step]]]: ...
    async def repair_run(self, run_id: str, still_stuck: _waits.StuckCheck) -> str | None: ...
    async def cancel_children(self, parent_run_id: str) -> list[model.Run]: ...
    async def create_children(
        self, *, parent: str, lease_id: str, step_key: str,
        children: Sequence[model.NewRun], wait: bool,
    ) -> list[str] | None: ...

    async def listen(self, callback: Callable[[str, str], None]) -> None:
        """Call `callback(env, task_id)` when another coordinator made runs
        of that task ready ("*" for either: any)."""
        ...

    async def notify_ready(self, env: str) -> None: ...

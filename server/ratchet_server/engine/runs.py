"""What clients ask of runs: trigger, read, list, cancel, replay, retry,
discard, history, and completing a wait token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Sequence
from typing import Any

from ratchet_server import clock, model
from ratchet_server.engine import core, errors, policy, timers, validate
from ratchet_server.engine.core import (
    MAX_BATCH,
    MAX_PAYLOAD_BYTES,
    TriggerSpec,
    decode_json,
)

log = logging.getLogger("ratchet.engine")

class RunsMixin(core.EngineBase):
    """The RunService side of the engine."""

    async def trigger(
        self, env: str, specs: Sequence[TriggerSpec]
    ) -> list[tuple[model.Run, bool]]:
        """Validate and create runs, all or none. Raises before writing anything."""
        if not specs:
            raise errors.InvalidArgument("nothing to trigger")
        if len(specs) > MAX_BATCH:
            raise errors.ResourceExhausted(f"a batch holds at most {MAX_BATCH} runs")
        now = clock.now()
        new_runs = [await self._new_run(env, spec, now) for spec in specs]
        results = await self.store.create_runs(new_runs)
        for ready_env, task_id in {(r.env, r.task_id) for r, created in results if created}:
            self._runs_ready(ready_env, task_id)
        return results

    async def get_run(self, env: str, run_id: str) -> tuple[model.Run, list[model.Step]]:
        run = await self.store.get_run(env, run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        return run, await self.store.get_steps(run_id)

    async def list_runs(
        self, flt: model.RunFilter, page_size: int, page_token: str
    ) -> tuple[list[model.Run], str]:
        validate.run_filter(flt)
        limit = min(max(page_size or 50, 1), 1000)
        cursor = validate.list_page_token(page_token)
        runs = await self.store.list_runs(flt, limit + 1, cursor)
        limit = min(limit, validate.fit_page(runs[:limit]))  # the reply stays under 16 MiB
        if len(runs) <= limit:
            return runs, ""
        last = runs[limit - 1]
        return runs[:limit], f"{last.created_at!r}|{last.id}"

    async def stuck_runs(self, env: str, limit: int) -> list[timers.StuckRun]:
        """What the reconciler would repair in `env` (read only). Runs changed
        in the last second are left out: a reader may see half of a
        transition that is still committing."""
        limit = min(max(limit or 100, 1), 1000)
        found = await timers.find_stuck(self.store, env=env, settle=1.0, limit=limit)
        return found[:limit]

    async def cancel(self, env: str, run_id: str, reason: str = "") -> model.Run:
        validate.text(reason, "reason", validate.MAX_REASON)
        run = await self.store.cancel_run(env, run_id, reason)
        if run is None:
            await self._refuse(env, run_id, "is already {status}")
        if run.lease_id and run.lease_owner:
            self._tell_worker(run.id, run.lease_id, reason or "canceled")
        # Unfinished children go too, and theirs.
        parents = [run.id]
        while parents:
            children = await self.store.cancel_children(parents.pop())
            for child in children:
                if child.lease_id and child.lease_owner:
                    self._tell_worker(child.id, child.lease_id, "the parent run was canceled")
                parents.append(child.id)
        return run

    async def history(
        self, env: str, run_id: str, page_size: int, page_token: str
    ) -> tuple[list[dict[str, Any]], str]:
        """A run's history, oldest first, a page at a time."""
        if await self.store.get_run(env, run_id) is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        after = validate.history_page_token(page_token)
        limit = min(max(page_size or 200, 1), 1000)
        events = await self.store.get_events_page(run_id, after, limit + 1)
        if len(events) <= limit:
            return events, ""
        return events[:limit], str(events[limit - 1]["id"])

    async def replay(self, env: str, run_id: str, *, from_scratch: bool,
                     rerun_compensated: bool = False) -> model.Run:
        """A new attempt from the last checkpoint, or a new linked run from scratch.

        From the last checkpoint, the run's FAILED steps that run code get a
        fresh budget (policy.rerun_on_replay). A run whose compensations have
        run is refused unless `rerun_compensated`."""
        run = await self.store.get_run(env, run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        if from_scratch:
            return await self._rerun(run, run.payload.encode("utf-8"), "replayed from scratch")
        if run.status is model.RunStatus.COMPLETED or not run.status.is_final:
            raise errors.FailedPrecondition(
                f"run {run_id!r} is {run.status.value}: only a run that ended without "
                "completing can be replayed from its last checkpoint")
        steps = await self.store.get_steps(run_id)
        if policy.compensated(steps) and not rerun_compensated:
            raise errors.FailedPrecondition(
                f"run {run_id!r} was compensated (its undo steps {policy.UNDO_PREFIX}* have "
                "run): replaying it from its last checkpoint could redo forward steps whose "
                "effects were undone. Use --from-scratch for a new run, or "
                "--rerun-compensated (ReplayRunRequest.rerun_compensated) to replay it anyway")
        # The task's current policy (its fixed code may have changed it), with a
        # fresh budget counted from the attempts already made.
        task = await self._task(env, run.task_id)
        retry = task.retry if task is not None else run.retry
        budget = dataclasses.replace(retry, max_attempts=None if retry.max_attempts is None
                                     else run.attempt + retry.max_attempts,
                                     max_lease_losses=run.lease_losses + retry.max_lease_losses)
        replayed = await self.store.replay_run(env, run_id, budget,
                                               rerun_steps=policy.rerun_on_replay(steps))
        if replayed is None:
            raise errors.FailedPrecondition(f"run {run_id!r} changed meanwhile; try again")
        self._runs_ready(env, replayed.task_id)
        return replayed

    async def discard(self, env: str, run_id: str) -> model.Run:
        """Hide a final run from listings; its data stays until retention."""
        run = await self.store.discard_run(env, run_id)
        if run is None:
            await self._refuse(env, run_id, "is {status}: only a final run can be discarded")
        return run

    async def _refuse(self, env: str, run_id: str, why: str) -> typing.NoReturn:
        """An operation changed nothing: NOT_FOUND, or FAILED_PRECONDITION saying why."""
        existing = await self.store.get_run(env, run_id)
        if existing is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        raise errors.FailedPrecondition(
            f"run {run_id!r} " + why.format(status=existing.status.value))

    async def retry_with_payload(self, env: str, run_id: str, payload: bytes) -> model.Run:
        """A new run of the same task with a corrected payload, linked to the old one."""
        run = await self.store.get_run(env, run_id)
        if run is None:
            raise errors.NotFound(f"run {run_id!r} not found")
        return await self._rerun(run, payload, "retried with a new payload")

    async def _rerun(self, old: model.Run, payload: bytes, why: str) -> model.Run:
        spec = TriggerSpec(task_id=old.task_id, payload=payload, priority=old.priority,
                           tags=old.tags, metadata=old.metadata)
        new = dataclasses.replace(await self._new_run(old.env, spec, clock.now()),
                                  replay_of=old.id)
        [(run, _)] = await self.store.create_runs([new])
        now = clock.now()
        await self.store.append_events([
            model.Event(run_id=old.id, type=model.EventType.REPLAYED, at=now,
                        attempt=old.attempt, data=json.dumps({"new_run_id": run.id, "why": why})),
            model.Event(run_id=run.id, type=model.EventType.REPLAYED, at=now,
                        data=json.dumps({"replay_of": old.id, "why": why})),
        ])
        self._runs_ready(run.env, run.task_id)
        return run

    async def complete_token(self, env: str, token_id: str, data: bytes) -> tuple[bool, str, str]:
        """Deliver data to a waiting token; (completed, run id, why not)."""
        text = decode_json(data or b"null", "data", MAX_PAYLOAD_BYTES)
        found = await self.store.find_token(env, token_id)
        if found is None:
            raise errors.NotFound(f"token {token_id!r} not found")
        step, run_status = found
        if run_status.is_final:
            return False, step.run_id, f"the run is already {run_status.value}; nothing changed"
        if step.status is model.StepStatus.RUNNING:
            [done] = await self.store.resolve_waits(
                [policy.token_outcome(step, text, clock.now())], policy.counts_as_woken)
            if done:
                self._wake.set()
                return True, step.run_id, ""
            # Timed out or completed by someone else meanwhile: say which.
            found = await self.store.find_token(env, token_id)
            assert found is not None
            step = found[0]
        why = "timed out" if step.status in (model.StepStatus.FAILED,
                                             model.StepStatus.TIMED_OUT) else "already completed"
        return False, step.run_id, f"the token was {why}; nothing changed"

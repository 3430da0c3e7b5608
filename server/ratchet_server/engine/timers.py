"""Waits that end by themselves, and the safety net under every wake-up path.

- `fire_due_timers`: sleeps complete, tokens time out, retrying steps whose
  next attempt is due wake their run.
- `finish_child_waits`: the safety net under child waits, at a low rate
  (`child_sweep_interval`). A child wait ends in the transaction of its last
  child (store/_waits.children_final_txn counts the children down); a wait
  this sweep still finds ended is one that count missed, logged and counted.
- `Reconciler`: the invariant check of DESIGN §3 over unfinished runs; a run
  that nothing would ever move again is repaired (queued again, or handed to
  the lease reaper), logged with its id and counted.

Several coordinators may run these at once: each resolution is applied only
while its step is still pending, under the run's row lock, so each wait
ends once whoever gets there first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping

from ratchet_server import clock, model
from ratchet_server.engine import core, policy
from ratchet_server.store import Store

log = logging.getLogger("ratchet.timers")

# Retention begins its walk again at the oldest finished run every this many
# passes (retention_interval apart); between them it goes on from its cursor.
RETENTION_REWALK = 10


async def fire_due_timers(store: Store, limit: int) -> int:
    """End every wait whose due time has passed; the number that ended here."""
    due = await store.due_steps(limit)
    if not due:
        return 0
    now = clock.now()
    applied = await store.resolve_waits([policy.timer_outcome(s, now) for s in due],
                                        policy.counts_as_woken)
    return sum(applied)


async def finish_child_waits(store: Store, limit: int) -> int:
    """Complete child waits whose children have all finished: the number
    completed here, each one that the last child's transaction missed."""
    now = clock.now()
    resolutions = []
    for run_id, key, children in await store.child_wait_candidates(limit):
        resolution = policy.child_wait_outcome(run_id, key, children, now)
        if resolution is not None:
            resolutions.append(resolution)
    if not resolutions:
        return 0
    applied = await store.resolve_waits(resolutions, policy.counts_as_woken)
    missed = [f"{r.run_id}/{r.key}" for r, ok in zip(resolutions, applied, strict=True) if ok]
    if missed:
        log.warning("child-wait sweep: %d wait(s) ended here, missed by their children's "
                    "count: %s", len(missed), ", ".join(missed[:20]))
    return len(missed)


@dataclasses.dataclass(frozen=True, slots=True)
class StuckRun:
    run: model.Run
    why: str


async def find_stuck(store: Store, *, env: str | None = None, settle: float = 0.0,
                     page: int = 500, limit: int | None = None) -> list[StuckRun]:
    """Every unfinished run that nothing would move again (read only).
    `settle` skips runs changed in the last seconds (one transition may be
    half seen by a reader; a committed state never breaks the invariant)."""
    found: list[StuckRun] = []
    after = ""
    while True:
        now = clock.now()
        batch = await store.unfinished_runs(env, after, page, now - settle)
        for run, waiting_on, steps in batch:
            why = policy.stuck_reason(run, waiting_on, steps, now)
            if why is not None:
                found.append(StuckRun(run, why))
        if len(batch) < page or (limit is not None and len(found) >= limit):
            return found
        after = batch[-1][0].id


def _still_stuck(run: model.Run, waiting_on: tuple[str, ...],
                 steps: Mapping[str, model.Step]) -> str | None:
    return policy.stuck_reason(run, waiting_on, steps, clock.now())


class Reconciler:
    """Pages through unfinished runs, a page per tick, and repairs what the
    invariant check finds. One full pass takes (unfinished runs / page) ticks;
    every coordinator runs one, and a repair is fenced by the same check
    under the run's row lock, so two coordinators never repair twice."""

    def __init__(self, store: Store, *, page: int = 500, settle: float = 5.0) -> None:
        self.store = store
        self.page = page
        self.settle = settle
        self.repaired = 0
        self._after = ""

    async def tick(self) -> list[StuckRun]:
        now = clock.now()
        batch = await self.store.unfinished_runs(None, self._after, self.page,
                                                 now - self.settle)
        self._after = "" if len(batch) < self.page else batch[-1][0].id
        repaired: list[StuckRun] = []
        for run, waiting_on, steps in batch:
            if policy.stuck_reason(run, waiting_on, steps, now) is None:
                continue
            why = await self.store.repair_run(run.id, _still_stuck)
            if why is not None:
                self.repaired += 1
                repaired.append(StuckRun(run, why))
                log.warning("reconciler: repaired run %s (%s, was %s): %s", run.id,
                            run.task_id, run.status.value, why)
        return repaired


class TimersMixin(core.EngineBase):
    """The loops behind due times: timers, the reconciler, retention."""

    reconciler: Reconciler
    # Child waits the safety-net sweep ended (their children's count missed them).
    child_waits_missed: int = 0

    async def _retention_loop(self) -> None:
        """Delete finished runs past the retention period, in small batches."""
        if self.config.retention is None:
            return
        while True:
            try:
                deleted = await self._retention_loop_body()
                if deleted:
                    log.info("retention: deleted %d finished run(s)", deleted)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention failed; retrying")
            await asyncio.sleep(self.config.retention_interval)

    async def _child_sweep_loop(self) -> None:
        """The safety net under child waits (the last child's transaction ends
        them): what it ends is logged and counted in `child_waits_missed`."""
        if not self.config.child_sweep_interval:
            return
        while True:
            await asyncio.sleep(self.config.child_sweep_interval)
            try:
                missed = await finish_child_waits(self.store, limit=500)
                if missed:
                    self.child_waits_missed += missed
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("child-wait sweep failed; retrying")

    async def _reconcile_loop(self) -> None:
        """The safety net under every wake-up path (DESIGN §3)."""
        if not self.config.reconcile_interval:
            return
        while True:
            await asyncio.sleep(self.config.reconcile_interval)
            try:
                if await self.reconciler.tick():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciler failed; retrying")

    async def _timer_loop(self) -> None:
        """Every due time that needs an action goes through here: lease
        expiry, sleeps, token timeouts, TTL and max duration. (Child waits end
        in their last child's transaction; `_child_sweep_loop` is their safety
        net.) (Delays and retry backoff need no
        action: a run is ready once its run_at has passed, and the dispatcher
        wakes for the next one.) Each ends once, under its run's row lock,
        whichever coordinator gets there first, and none is lost when a
        coordinator restarts: the due times are columns."""
        interval = min(self.config.timer_interval, self.config.reap_interval,
                       self.config.lease_ttl / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._timers_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timers failed; retrying")

    async def _timers_once(self) -> None:
        refs = await self.store.expired_leases(limit=200)
        if refs:
            await self._lose_leases(refs, "the lease expired without a heartbeat",
                                    expired_before=clock.now())
        if await fire_due_timers(self.store, limit=500):
            self._wake.set()
        await self.store.expire_runs(limit=500)
        for ref in await self.store.time_out_runs(500, policy.MAX_DURATION_EXCEEDED):
            self._tell_worker(ref.run_id, ref.lease_id, "the run exceeded its max duration")

    async def fire_timers(self) -> None:
        """Act now on what is due, as the timer loop's next tick would, and
        wake the dispatcher (runs whose run_at passed are leased at once).
        For `ratchet.testing`: after `clock.advance()`, what became due
        happens without waiting for the loops' real-time intervals."""
        await self._timers_once()
        self._wake.set()

    # Retention's walk over finished runs (oldest first): where the last pass
    # stopped, and passes since the walk last began at the oldest run.
    _retention_after: tuple[float, str] | None = None
    _retention_passes = 0

    async def _retention_loop_body(self) -> int:
        """One pass: batches from a cursor, each reading the next
        `retention_batch` finished runs whatever it deletes, so a child kept
        for its unfinished parent is not read again by every batch. A pass
        goes on from where the last one stopped (runs that become old enough
        are newer than that); every RETENTION_REWALK passes it begins again at
        the oldest run, for children whose parents have finished since."""
        assert self.config.retention is not None
        cutoff = clock.now() - self.config.retention
        if self._retention_passes % RETENTION_REWALK == 0:
            self._retention_after = None
        self._retention_passes += 1
        deleted = 0
        while True:
            n, after = await self.store.delete_finished(cutoff, self.config.retention_batch,
                                                        self._retention_after)
            deleted += n
            if after is None:
                return deleted
            self._retention_after = after
            await asyncio.sleep(0)  # small batches: let other work in between

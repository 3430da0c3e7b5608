"""The engine: triggers, leases, checkpoints, completions, retries.

The engine owns every rule and state transition of DESIGN §3. It keeps only
soft state in memory (the sessions connected to this coordinator and what it
pushed to them); the store holds the truth, so any replica can take over.

Background loops, all started by `start()` and stopped by `stop()`:
- the dispatcher pushes ready runs to sessions with free slots, woken by
  triggers, freed slots, requeues and NOTIFY from other replicas (only for
  a task a session here serves with a free slot), and by the
  next due `run_at` (retry backoff, delay);
- the timer loop requeues (or fails) runs whose lease expired, and fires
  sleeps, token timeouts, TTL and max duration (a child wait ends in
  its last child's store call; the child sweep is its safety net);
- the writer applies fenced writes from many runs in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib

from ratchet_server.engine import timers
from ratchet_server.engine.core import (
    DEFAULT_TASK_RETRY,
    MAX_BATCH,
    MAX_PAYLOAD_BYTES,
    CancelPush,
    EndPush,
    EngineConfig,
    LeasePush,
    Push,
    Session,
    TriggerSpec,
)
from ratchet_server.engine.inventory import InventoryMixin
from ratchet_server.engine.leases import LeasesMixin
from ratchet_server.engine.runs import RunsMixin
from ratchet_server.engine.sessions import SessionsMixin
from ratchet_server.engine.tokens import TokensMixin
from ratchet_server.store import Store

__all__ = [
    "DEFAULT_TASK_RETRY", "MAX_BATCH", "MAX_PAYLOAD_BYTES", "CancelPush", "EndPush", "Engine",
    "EngineConfig", "LeasePush", "Push", "Session", "TriggerSpec",
]


class Engine(TokensMixin, RunsMixin, SessionsMixin, LeasesMixin, InventoryMixin,
             timers.TimersMixin):
    """The coordinator's rules: one object, one part per concern (core.py)."""

    def __init__(self, store: Store, config: EngineConfig | None = None) -> None:
        super().__init__(store, config)
        self.reconciler = timers.Reconciler(store, settle=self.config.reconcile_settle)

    async def start(self) -> None:
        await self.store.listen(self._runs_ready)
        for name, coro in (("dispatcher", self._dispatch_loop()),
                           ("writer", self.writes.run()), ("timers", self._timer_loop()),
                           ("retention", self._retention_loop()),
                           ("reconciler", self._reconcile_loop()),
                           ("child sweep", self._child_sweep_loop())):
            self._loops.append(asyncio.create_task(coro, name=f"ratchet-{name}"))

    async def stop(self) -> None:
        for handle in self._timers:
            handle.cancel()
        for task in [*self._loops, *self._background]:
            task.cancel()
        for task in [*self._loops, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops.clear()

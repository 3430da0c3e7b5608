"""An engine on a Postgres store for the races, and the check after each:
no run that nothing would move again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ratchet_server.engine import timers
from ratchet_server.engine.engine import Engine, EngineConfig
from ratchet_server.store import Store


@contextlib.asynccontextmanager
async def running_engine(store: Store, *, timer_interval: float) -> AsyncIterator[Engine]:
    eng = Engine(store, EngineConfig(timer_interval=timer_interval, reconcile_interval=0,
                                     lease_ttl=60.0))
    await eng.start()
    try:
        yield eng
    finally:
        await asyncio.wait_for(eng.stop(), 10.0)
        stuck = await timers.find_stuck(store)
        assert not stuck, [(s.run.id, s.why) for s in stuck]

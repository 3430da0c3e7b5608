"""An engine on a store for tests that drive the engine directly (no
gRPC): started, yielded, stopped; optionally checked afterwards for runs
that nothing would move again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ratchet_server.engine import timers
from ratchet_server.engine.engine import Engine, EngineConfig
from ratchet_server.store import Store


@contextlib.asynccontextmanager
async def running_engine(store: Store, *, check_stuck: bool = False, stop_within: float = 10.0,
                         **config: Any) -> AsyncIterator[Engine]:
    eng = Engine(store, EngineConfig(**config))
    await eng.start()
    try:
        yield eng
    finally:
        await asyncio.wait_for(eng.stop(), stop_within)
        if check_stuck:
            stuck = await timers.find_stuck(store)
            assert not stuck, [(s.run.id, s.why) for s in stuck]

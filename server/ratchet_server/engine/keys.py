"""Revoked API keys end the sessions they opened.

Each coordinator checks, every `interval` seconds, whether the key that
opened any of its open sessions has been revoked since. Each such session is
ended: it gets no new leases, its stream ends UNAUTHENTICATED, and the leases
it holds go back to the queue without costing an attempt (the worker did
nothing wrong; its operator withdrew it). The interval is the API key cache's
TTL, so new calls and open sessions stop within the same bound on every
replica (docs/operations.md, "Revoking a key").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ratchet_server.engine import errors
from ratchet_server.engine.engine import EndPush, Engine, Session

log = logging.getLogger("ratchet.engine")

REVOKED = "the API key that opened this session was revoked"


class RevokedKeySweep:
    """The loop that ends sessions of revoked keys on one coordinator."""

    def __init__(self, engine: Engine, interval: float,
                 on_revoked: Callable[[set[str]], None] | None = None) -> None:
        self._engine = engine
        self._interval = interval
        # Told the revoked key ids, so the auth cache forgets them at once.
        self._on_revoked = on_revoked
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ratchet-revoked-keys")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking for revoked API keys failed; retrying")

    async def sweep_once(self) -> list[Session]:
        """End the open sessions whose key is revoked; those sessions."""
        sessions = [s for s in self._engine.open_sessions() if s.key_id]
        if not sessions:
            return []
        keys = await self._engine.store.list_api_keys()
        revoked = {k.id for k in keys if k.revoked_at is not None}
        ended = [s for s in sessions if s.key_id in revoked and not s.closed]
        if not ended:
            return []
        if self._on_revoked is not None:
            self._on_revoked({s.key_id for s in ended})
        await asyncio.gather(*(self._end(s) for s in ended))
        return ended

    async def _end(self, session: Session) -> None:
        # No new leases; the leases go back; then the stream ends. A lease
        # granted by a dispatch already in flight is caught by the second pass
        # (or, if pushed after the end, given back when the session closes):
        # none costs an attempt.
        session.slots = 0
        given = await self._give_back(session)
        log.warning("session %s (worker %s): API key %s was revoked; gave back its %d "
                    "lease(s) without counting an attempt, ending the session",
                    session.id, session.worker_id, session.key_id, given)
        session.outbox.put_nowait(EndPush(REVOKED, key_revoked=True))
        await self._give_back(session)

    async def _give_back(self, session: Session) -> int:
        refs = await self._engine.store.owned_leases(session.id)

        async def one(run_id: str, lease_id: str) -> None:
            try:
                await self._engine.release(session, run_id=run_id, lease_id=lease_id,
                                           reason=REVOKED)
            except errors.EngineError:
                pass  # the run finished or moved on meanwhile: nothing to give back

        await asyncio.gather(*(one(r.run_id, r.lease_id) for r in refs))
        return len(refs)

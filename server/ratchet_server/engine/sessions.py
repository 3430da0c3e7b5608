"""Workers' sessions on this coordinator, and the dispatcher that pushes
ready runs to them.

Sessions are soft state: the store holds every lease (owner = session id),
so a session lost with its coordinator is recovered by the worker
reconnecting (adoption) or by the lease reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Sequence

from ratchet_server import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, clock, model
from ratchet_server.engine import core, errors
from ratchet_server.engine.core import (
    EndPush,
    LeasePush,
    Session,
    check_slots,
)

log = logging.getLogger("ratchet.engine")

# The most runs one group of sessions leases in one statement; a group that
# gets them all is served again at once.
DISPATCH_BATCH = 1000

class SessionsMixin(core.EngineBase):
    """Open, serve and close worker sessions; push leases to free slots."""

    async def open_session(
        self,
        env: str,
        worker_id: str,
        tasks: Sequence[model.TaskDef],
        slots: int,
        active_lease_ids: Sequence[str],
        *,
        protocol_version: int = PROTOCOL_VERSION,
        key_id: str = "",
    ) -> tuple[Session, list[str]]:
        """Register the worker's tasks, adopt its surviving leases, start pushing."""
        if protocol_version and protocol_version < MIN_PROTOCOL_VERSION:
            raise errors.FailedPrecondition(
                f"protocol version {protocol_version} is no longer supported; "
                f"this coordinator speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}")
        check_slots(slots)
        ids = [t.id for t in tasks]
        if len(set(ids)) != len(ids):
            raise errors.InvalidArgument("a task id appears twice in hello")
        await self.register_tasks(tasks)
        session = Session(env, worker_id, [t.id for t in tasks], slots, key_id)
        adopted: list[str] = []
        if active_lease_ids:
            adopted = await self.store.adopt_leases(
                env, list(active_lease_ids), session.id, self.config.lease_ttl)
            for lease_id in adopted:
                session.active.add(lease_id)
                self._lease_session[lease_id] = session
        self._sessions[session.id] = session
        log.info("session %s opened: worker %s, env %s, tasks %s, slots %d, adopted %d",
                 session.id, worker_id, env, ",".join(session.task_ids), slots, len(adopted))
        self._wake.set()
        return session, adopted

    def open_sessions(self) -> list[Session]:
        """The sessions connected to this coordinator now."""
        return list(self._sessions.values())

    def begin_shutdown(self) -> None:
        """This coordinator is stopping: lease nothing more, and leave the
        leases of the sessions that close to their workers, which reconnect
        (here after a restart, or to another replica) and adopt them; a lease
        nobody adopts is lost after the lease TTL, like a crashed coordinator's."""
        self._closing = True

    def end_sessions(self, reason: str) -> int:
        """Ask every open session's stream to end (the servicer ends it
        UNAVAILABLE); how many were open."""
        sessions = self.open_sessions()
        for session in sessions:
            session.outbox.put_nowait(EndPush(reason))
        return len(sessions)

    def close_session(self, session: Session) -> None:
        """The stream ended. Its leases are released after the grace period,
        unless the worker reconnected and adopted them by then (or this
        coordinator is shutting down: then they are not released at all)."""
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.id, None)
        for lease_id in session.active:
            if self._lease_session.get(lease_id) is session:
                del self._lease_session[lease_id]
        if self._closing:
            log.info("session %s closed by the coordinator's shutdown; its %d lease(s) stay "
                     "with the worker to adopt when it reconnects (lost after the lease TTL, "
                     "%.0fs, if it does not)", session.id, len(session.active),
                     self.config.lease_ttl)
            return
        log.info("session %s closed; its %d lease(s) are released in %.1fs unless the worker "
                 "reconnects and adopts them", session.id, len(session.active),
                 self.config.session_grace)
        # Leases pushed to the session but never sent: the worker never saw
        # them, so they go back without costing an attempt.
        while not session.outbox.empty():
            push = session.outbox.get_nowait()
            if isinstance(push, LeasePush) and push.leased.run.lease_id:
                self._spawn(self._give_back(push.leased.run.id, push.leased.run.lease_id,
                                            session.id))
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            self._spawn(self._release_session(session.id))

        handle = loop.call_later(self.config.session_grace, fire)
        self._timers.add(handle)

    async def _release_session(self, session_id: str) -> None:
        refs = await self.store.owned_leases(session_id)
        await self._lose_leases(refs, "the worker's session closed", expired_before=None)

    async def _give_back(self, run_id: str, lease_id: str, owner: str) -> None:
        write = model.RunTransition(
            run_id=run_id, lease_id=lease_id, status=model.RunStatus.QUEUED,
            run_at=clock.now(), refund_attempt=True, expect_owner=owner,
            events=(model.Event(run_id=run_id, type=model.EventType.LEASE_RELEASED,
                                at=clock.now(), lease_id=lease_id,
                                data=json.dumps({"reason": "never delivered"})),))
        if await self._write(write):
            self._forget_lease(lease_id)
            self._wake.set()

    async def heartbeat(self, session: Session, lease_ids: Sequence[str]) -> None:
        """Renew the leases the worker says it is executing (only those)."""
        session.seen()
        if lease_ids:
            await self.store.renew_leases(session.id, lease_ids, self.config.lease_ttl)

    def set_slots(self, session: Session, slots: int) -> None:
        check_slots(slots)
        session.slots = slots
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                more, next_due = await self._dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatch failed; retrying")
                more, next_due = False, clock.now() + 0.5
            if more:
                continue
            poll = self.config.poll_interval
            timeout = poll if next_due is None else min(poll, max(0.005, next_due - clock.now()))
            # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that
            # arrives as the event fires, and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _dispatch_once(self) -> tuple[bool, float | None]:
        """One pass: the sessions serving the same tasks in the same
        environment lease together (one statement for the sum of their free
        slots, the runs shared out among them); different groups lease
        concurrently. Returns whether a group got all it asked for (go round
        again at once), and the earliest next due time of those that got
        nothing."""
        if self._closing:
            return False, None
        # A session silent for two heartbeat intervals may belong to a stopped
        # process: lease nothing to it until it speaks again.
        silent_after = time.monotonic() - 2 * self.config.heartbeat_interval
        groups: dict[tuple[str, tuple[str, ...]], list[Session]] = {}
        for session in self._sessions.values():
            if session.closed or session.free == 0 or not session.task_ids:
                continue
            if session.last_seen < silent_after:
                continue
            groups.setdefault((session.env, session.task_ids), []).append(session)
        if not groups:
            return False, None
        results = await asyncio.gather(*(
            self._dispatch_group(env, task_ids, sessions)
            for (env, task_ids), sessions in groups.items()))
        more = any(m for m, _ in results)
        next_due = min((due for _, due in results if due is not None), default=None)
        return more, next_due

    async def _dispatch_group(
        self, env: str, task_ids: tuple[str, ...], sessions: list[Session]
    ) -> tuple[bool, float | None]:
        owners = share_slots(sessions, DISPATCH_BATCH)
        try:
            leased = await self.store.lease_ready(
                env=env, task_ids=task_ids, limit=len(owners), owner=owners[0],
                owners=owners, nonce=secrets.token_hex(6), ttl=self.config.lease_ttl)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dispatch to %s in %s failed; retrying", ",".join(task_ids), env)
            return False, clock.now() + 0.5
        by_id = {session.id: session for session in sessions}
        for item in leased:
            assert item.run.lease_id is not None and item.run.lease_owner is not None
            session = by_id[item.run.lease_owner]
            if session.closed:
                # Closed while we leased: the grace timer will release these.
                continue
            session.active.add(item.run.lease_id)
            self._lease_session[item.run.lease_id] = session
            session.outbox.put_nowait(LeasePush(item))
        if len(leased) == len(owners):
            return True, None
        if leased:
            # Not the next-due look-up now: its thread would compete with
            # sending the leases just pushed (start latency +0.5 ms
            # measured). Look again shortly instead: ready runs may remain
            # that a concurrent lease (another group, another replica) held
            # locked and then left; that pass asks for the next due time if
            # it finds nothing.
            return False, clock.now() + PARTIAL_LEASE_RECHECK
        try:
            return False, await self.store.next_run_at(env, task_ids)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("next due time of %s in %s failed", ",".join(task_ids), env)
            return False, clock.now() + 0.5


# After a lease that filled only some free slots, the next pass comes this
# much later (unless something wakes the dispatcher first).
PARTIAL_LEASE_RECHECK = 0.05


def share_slots(sessions: Sequence[Session], limit: int) -> list[str]:
    """One session id per run to lease, at most `limit`: a round over the
    sessions' free slots, most free first, so that fewer runs than slots are
    spread over the sessions rather than piled on the first."""
    free = sorted(((s.free, s.id) for s in sessions), key=lambda fs: -fs[0])
    owners: list[str] = []
    while free and len(owners) < limit:
        owners.extend(sid for _, sid in free[:limit - len(owners)])
        free = [(n - 1, sid) for n, sid in free if n > 1]
    return owners

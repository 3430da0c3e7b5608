"""What the environment has: its registered tasks and the worker sessions
connected to this coordinator (ListTasks, ListWorkers).

Registrations are stored (every hello upserts its tasks), so every
coordinator lists the same tasks. Sessions are soft state of the
coordinator a worker streams to: each coordinator lists only its own, and
says which it is (`COORDINATOR`).
"""

from __future__ import annotations

import dataclasses
import os
import socket

from ratchet_server import model
from ratchet_server.engine import core

# This coordinator process, as ListWorkers names it: "host:pid".
COORDINATOR = f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One session connected to this coordinator."""

    session_id: str
    worker_id: str
    task_ids: tuple[str, ...]
    slots: int
    slots_used: int
    connected_at: float
    last_seen_at: float
    coordinator: str = COORDINATOR


@dataclasses.dataclass(frozen=True, slots=True)
class TaskInfo:
    """One registered task, and the sessions here that serve it now."""

    task: model.TaskDef
    registered_at: float
    served_by: tuple[str, ...]


class InventoryMixin(core.EngineBase):
    """List the environment's tasks and this coordinator's sessions."""

    def list_workers(self, env: str, task_id: str = "") -> list[WorkerInfo]:
        """The open sessions of `env` on this coordinator (only those serving
        `task_id` unless it is ""), oldest first."""
        sessions = sorted(
            (s for s in self._sessions.values()
             if s.env == env and not s.closed and (not task_id or task_id in s.task_ids)),
            key=lambda s: (s.connected_at, s.id))
        return [WorkerInfo(session_id=s.id, worker_id=s.worker_id, task_ids=s.task_ids,
                           slots=s.slots, slots_used=len(s.active),
                           connected_at=s.connected_at, last_seen_at=s.last_seen_at)
                for s in sessions]

    async def list_tasks(self, env: str, task_id: str = "") -> list[TaskInfo]:
        """The tasks registered in `env` (only `task_id` unless it is ""), in
        id order, each with the sessions on this coordinator serving it."""
        workers = self.list_workers(env)
        return [TaskInfo(task=task, registered_at=registered_at,
                         served_by=tuple(w.session_id for w in workers
                                         if task.id in w.task_ids))
                for task, registered_at in await self.store.list_tasks(env, task_id)]

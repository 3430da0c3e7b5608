"""Group commit: fenced writes from many runs applied in one transaction.

Whatever is queued when a transaction can start goes into it; up to
`concurrency` transactions are in flight, so a slow commit does not hold
back the next batch. A write that finds nothing queued and a transaction
slot free is committed at once by its own caller, without a hand-off to the
writer loop (the sequential run's path: one write at a time). A run has at
most one write in flight (its worker awaits each acknowledgement), so
batches rarely touch the same rows; the store locks rows in run id order and
retries the rare deadlock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from ratchet_server import model
from ratchet_server.store import Store

log = logging.getLogger("ratchet.engine")


@dataclasses.dataclass(slots=True)
class _Pending:
    write: model.FencedWrite
    future: asyncio.Future[bool]


class GroupCommit:
    def __init__(self, store: Store, max_batch: int, concurrency: int) -> None:
        self.store = store
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        # True while the writer loop holds a write it took from the queue and
        # waits for a slot: a new write must then queue behind it.
        self._holding = False

    async def write(self, write: model.FencedWrite) -> bool:
        """Apply `write` in the next batch; True if its lease was current.
        Raises what the store raised for the whole batch."""
        if self._queue.empty() and not self._holding and not self._slots.locked():
            async with self._slots:  # free: acquired without waiting
                try:
                    [applied] = await self.store.apply([write])
                except Exception:
                    log.exception("group commit of 1 write failed")
                    raise
                return applied
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(write, future))
        return await future

    async def run(self) -> None:
        """The writer loop (runs until cancelled, with the batches in flight)."""
        slots = self._slots
        try:
            while True:
                first = await self._queue.get()
                self._holding = True
                await slots.acquire()
                self._holding = False
                batch = [first]
                while not self._queue.empty() and len(batch) < self.max_batch:
                    batch.append(self._queue.get_nowait())
                task = asyncio.create_task(self._commit(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            for task in self._in_flight:
                task.cancel()

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = await self.store.apply([p.write for p in batch])
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        except Exception as exc:
            log.exception("group commit of %d writes failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, ok in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(ok)

"""Render records written off the event loop, in groups: one thread commits whatever has queued up in one
transaction, so a burst of N answers costs one commit instead of N, and no request waits on SQLite unless it
must (a `url` answer links to the committed record; an inline answer does not wait). A record is acknowledged
(its future resolved) only after its transaction committed: a killed process loses no acknowledged record.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

log = logging.getLogger("prism.records")

_STOP = object()


class GroupCommitWriter:
    """`submit(record, pngs)` -> an asyncio future resolved (with the row's seq) once the record is committed."""

    def __init__(self, store, max_group: int = 64):
        self.store = store
        self.max_group = max_group
        self._queue: queue.Queue = queue.Queue()
        self.groups = 0
        self.records = 0
        self._thread = threading.Thread(target=self._run, name="render-records-writer", daemon=True)
        self._thread.start()

    def submit(self, record: dict, pngs: list[bytes]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((record, pngs, loop, fut))
        return fut

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout_s: float = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _next_group(self) -> tuple[list, bool]:
        """Block for one item, then take what else is queued (up to max_group) without waiting."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        group, stop = [first], False
        while len(group) < self.max_group:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            group.append(item)
        return group, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            group, stop = self._next_group()
            if not group:
                continue
            try:
                outcomes = self.store.put_many([(rec, pngs) for rec, pngs, _, _ in group])
            except Exception as e:  # one bad record must not fail the others: retry them one by one
                log.warning("group commit of %d records failed (%r); committing them one by one", len(group), e)
                outcomes = [self._put_one(rec, pngs) for rec, pngs, _, _ in group]
            self.groups += 1
            self.records += len(group)
            for (_, _, loop, fut), outcome in zip(group, outcomes, strict=True):
                loop.call_soon_threadsafe(_settle, fut, outcome)

    def _put_one(self, rec: dict, pngs: list[bytes]):
        try:
            return self.store.put(rec, pngs)
        except Exception as e:
            return e


def _settle(fut: asyncio.Future, outcome) -> None:
    if fut.done():
        return
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)

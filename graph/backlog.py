"""Batches from the backlog, not the clock: when the worker is free it takes what is queued, up to a batch, at once.

Ray Serve's @serve.batch closes a batch `batch_wait_timeout_s` after its first item even on an idle replica, and
forms the next batch while the current one computes, so batch size follows arrivals in a time window. Here an idle
worker starts on the first item without waiting; items that arrive while it computes wait in the backlog, and the
next batch is all of them (up to `max_size`), the way LitServe's batched loop and Triton's dynamic batcher take the
queue. Items whose caller went away are dropped before they cost anything. No Ray, no threads of its own: `run` is
the caller's (it runs the batch in a thread when the work is CPU-heavy).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Item:
    value: Any
    size: int
    key: Hashable
    future: asyncio.Future


class Backlog:
    """`await submit(x)` -> `run([...])`'s answer for x. One batch runs at a time; a batch shares one key (items
    with other keys wait for a batch of their own) and holds at most `max_size` units (an item's `size`)."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_size: int):
        self.run = run
        self.max_size = max(1, max_size)
        self._queue: deque[_Item] = deque()
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.items = 0
        self.last_batch_size = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    async def submit(self, value: Any, size: int = 1, key: Hashable = None) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(value, max(1, size), key, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await fut  # a cancelled caller cancels its future: _take skips it

    def take(self) -> list[_Item]:
        """The next batch: the oldest live item and the queued items with its key, in order, up to max_size units."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, units, rest = [first], first.size, deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.key == first.key and units + item.size <= self.max_size:
                batch.append(item)
                units += item.size
            else:
                rest.append(item)
        self._queue = rest
        return batch

    async def _drain(self) -> None:
        while batch := self.take():
            self.batches += 1
            self.items += len(batch)
            self.last_batch_size = len(batch)
            results = await self._run_batch(batch)
            for item, result in zip(batch, results or [], strict=False):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    async def _run_batch(self, batch: list[_Item]) -> list | None:
        """The batch's answers (an exception for all when it failed as a whole); None when its callers all left."""
        task = asyncio.ensure_future(self.run([item.value for item in batch]))

        def abandon(_):
            # Every caller of this batch went away (client disconnects, a job cancelled): stop its work now, so the
            # replica's slot is free for the next batch.
            if all(item.future.done() for item in batch) and not task.done():
                task.cancel()
        for item in batch:
            item.future.add_done_callback(abandon)
        try:
            return await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the backlog itself is being torn down
                raise
            return None
        except Exception as e:
            return [e] * len(batch)

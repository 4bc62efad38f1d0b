"""Batches from the backlog (graph/backlog.py) and records committed in groups off the event loop
(graph/writer.py), including a writer killed mid-stream that loses no acknowledged record."""

import asyncio
import multiprocessing
import os
import signal
import time

import pytest

from graph.backlog import Backlog
from graph.records import SqliteRenderStore
from graph.writer import GroupCommitWriter


class _Engine_held:
    """A fake engine for the backlog: each batch waits until released (a held GPU), and records its size."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = asyncio.Event()

    async def run(self, items: list) -> list:
        self.batches.append(list(items))
        await self.release.wait()
        return [f"done:{x}" for x in items]


def test_an_idle_engine_starts_at_once_without_a_timer():
    async def run():
        engine = _Engine_held()
        engine.release.set()
        backlog = Backlog(engine.run, max_size=8)
        t = time.perf_counter()
        out = await backlog.submit("a")
        return out, time.perf_counter() - t, engine.batches
    out, elapsed, batches = asyncio.run(run())
    assert out == "done:a" and batches == [["a"]] and elapsed < 0.01


def test_what_queues_while_the_engine_works_is_the_next_batch():
    async def run():
        engine = _Engine_held()
        backlog = Backlog(engine.run, max_size=3)
        first = asyncio.ensure_future(backlog.submit("a"))
        await asyncio.sleep(0.01)  # the engine holds "a"
        rest = [asyncio.ensure_future(backlog.submit(x)) for x in "bcde"]
        await asyncio.sleep(0.01)
        engine.release.set()
        return [await first, *[await r for r in rest]], engine.batches, backlog.mean_batch_size
    out, batches, mean = asyncio.run(run())
    assert batches == [["a"], ["b", "c", "d"], ["e"]]  # the backlog, up to max_size, when the engine freed
    assert out == [f"done:{x}" for x in "abcde"] and mean == pytest.approx(5 / 3)


def test_a_batch_shares_one_key_and_counts_images():
    async def run():
        engine = _Engine_held()
        backlog = Backlog(engine.run, max_size=4)
        block = asyncio.ensure_future(backlog.submit("x", key=1))
        await asyncio.sleep(0.01)
        jobs = [asyncio.ensure_future(backlog.submit(v, size=s, key=k))
                for v, s, k in (("a", 3, 2), ("b", 1, 3), ("c", 2, 2), ("d", 1, 2))]
        await asyncio.sleep(0.01)
        engine.release.set()
        await asyncio.gather(block, *jobs)
        return engine.batches
    assert asyncio.run(run()) == [["x"], ["a", "d"], ["b"], ["c"]]  # a(3)+d(1) fill 4 images; b has another key


def test_a_batch_whose_callers_all_left_is_stopped_and_frees_the_engine():
    async def run():
        engine = _Engine_held()
        backlog = Backlog(engine.run, max_size=2)
        gone = asyncio.ensure_future(backlog.submit("a"))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while its render ran
        await asyncio.sleep(0.01)
        engine.release.set()
        return await backlog.submit("b"), engine.batches
    out, batches = asyncio.run(run())
    assert out == "done:b" and batches == [["a"], ["b"]]


def test_a_failed_batch_fails_each_caller_with_its_error():
    async def boom(items):
        raise RuntimeError("engine broke")

    async def run():
        backlog = Backlog(boom, max_size=2)
        with pytest.raises(RuntimeError, match="engine broke"):
            await backlog.submit("a")
    asyncio.run(run())


# -- the group-commit writer ---------------------------------------------------------------------------------------

def _record(i: int) -> dict:
    return {"id": f"r{i}", "created": time.time(), "failed": False, "status": 200, "prompt": "p", "request": {},
            "request_hash": "h", "user_tier": "free", "route": "fast", "tier": "fast", "model": "m",
            "latency_ms": 1.0, "cost_usd": 0.0, "timings_ms": {}}


def test_a_burst_is_committed_in_groups_and_each_future_resolves(tmp_path):
    store = SqliteRenderStore(tmp_path)

    async def run():
        writer = GroupCommitWriter(store)
        futs = [writer.submit(_record(i), [f"png{i}".encode()]) for i in range(40)]
        seqs = await asyncio.gather(*futs)
        writer.close()
        return writer, seqs
    writer, seqs = asyncio.run(run())
    assert len(set(seqs)) == 40 and writer.records == 40 and writer.groups < 40  # grouped
    assert all(store.get(f"r{i}") is not None and store.image(f"r{i}", 0) == f"png{i}".encode() for i in range(40))


def test_one_bad_record_does_not_fail_its_group(tmp_path):
    store = SqliteRenderStore(tmp_path)

    async def run():
        writer = GroupCommitWriter(store)
        good = writer.submit(_record(1), [])
        bad = writer.submit({"id": "broken"}, [])  # no created/status: not a record
        other = writer.submit(_record(2), [])
        results = await asyncio.gather(good, bad, other, return_exceptions=True)
        writer.close()
        return results
    good, bad, other = asyncio.run(run())
    assert isinstance(bad, Exception) and not isinstance(good, Exception) and not isinstance(other, Exception)


def _write_and_ack(directory: str, acks) -> None:
    """Child process: submit records as fast as it can, printing each id once its commit is acknowledged."""
    async def run():
        writer = GroupCommitWriter(SqliteRenderStore(directory))
        i = 0
        while True:
            futs = [(f"r{i + k}", writer.submit(_record(i + k), [f"png{i + k}".encode()])) for k in range(8)]
            for rid, fut in futs:
                await fut
                acks.put(rid)
            i += 8
    asyncio.run(run())


def test_a_killed_writer_loses_no_acknowledged_record(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    acks = ctx.Queue()
    child = ctx.Process(target=_write_and_ack, args=(str(tmp_path), acks))
    child.start()
    acked = []
    deadline = time.monotonic() + 60
    while len(acked) < 200 and time.monotonic() < deadline:
        acked.append(acks.get(timeout=30))
    os.kill(child.pid, signal.SIGKILL)  # mid-stream: groups in flight die with it
    child.join(10)
    while not acks.empty():
        acked.append(acks.get_nowait())
    store = SqliteRenderStore(tmp_path)
    missing = [rid for rid in acked if store.get(rid) is None or store.image(rid, 0) != f"png{rid[1:]}".encode()]
    assert len(acked) >= 200 and not missing, missing[:5]


def test_close_commits_what_is_queued_before_the_thread_stops(tmp_path):
    """A replica's graceful stop (Serve calls the ingress's __del__) closes the writer: inline answers already sent
    must not lose their queued records."""
    store = SqliteRenderStore(tmp_path)

    async def run():
        writer = GroupCommitWriter(store)
        for i in range(30):
            writer.submit(_record(i), [f"png{i}".encode()])  # not awaited: an inline answer does not wait
        writer.close()  # at once, with records still queued
        return writer
    writer = asyncio.run(run())
    assert writer.records == 30
    assert all(store.get(f"r{i}") is not None for i in range(30))

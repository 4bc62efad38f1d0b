"""The render record store against real SQLite and real files in tmp_path, crashes included.

The crash tests kill real processes: one exits inside put's transaction (after its image files are on disk),
another is SIGKILLed while it puts records in a loop. Both then check what a fresh store sees.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from graph.records import (
    ENV_DIR,
    ROOT,
    RecordsSpec,
    SqliteRenderStore,
    open_store,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0
DAY = 86_400.0
SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter, as a second replica would be


@pytest.fixture(autouse=True)
def _no_env_dir(monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)


def png(tag: str) -> bytes:
    return PNG_MAGIC + tag.encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rec(rid: str, created: float, **fields) -> dict:
    return {"id": rid, "created": created, "failed": False, "status": 200, "prompt": f"prompt {rid}", **fields}


def spec(path: Path, **kw) -> RecordsSpec:
    kw = {"max_age_days": None, "max_count": None, "prune_every": 10_000, **kw}
    return RecordsSpec(dir=str(path), **kw)


def image_file(root: Path, h: str) -> Path:
    return root / "images" / h[:2] / f"{h}.png"


def all_records(store: SqliteRenderStore, **filters) -> list[dict]:
    out, cursor = [], None
    while True:
        page, cursor = store.list(limit=7, cursor=cursor, **filters)
        out += page
        if cursor is None:
            return out


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root):
    s = SqliteRenderStore(spec(root))
    yield s
    s.close()


# ---- put / get / image -----------------------------------------------------------------------------------------


def test_put_get_roundtrip_keeps_body_and_images(store, root):
    a, b = png("a"), png("b")
    record = rec("r1", T0, intent="photo", route="fast", rule="default", tier="turbo", model="sdxl",
                 model_version="sdxl@1", latency_ms=812.5, cost_usd=0.0031, user_tier="pro",
                 params={"width": 512, "steps": [1, 2]}, fallbacks=[{"from": "big", "why": "busy"}],
                 error=None, timings={"gen_ms": 800.0})
    original = dict(record)

    seq = store.put(record, [a, b])

    assert record == original  # the caller's dict is not mutated
    got = store.get("r1")
    assert got == {**original, "seq": seq, "image_hashes": [sha(a), sha(b)]}
    assert image_file(root, sha(a)).read_bytes() == a
    assert image_file(root, sha(b)).read_bytes() == b
    assert store.image("r1", 0) == a
    assert store.image("r1", 1) == b


@pytest.mark.parametrize("rid,index", [("r1", 2), ("r1", -1), ("missing", 0)])
def test_image_out_of_range_or_unknown_is_none(store, rid, index):
    store.put(rec("r1", T0), [png("a"), png("b")])
    assert store.image(rid, index) is None


def test_get_unknown_is_none(store):
    assert store.get("nope") is None


def test_minimal_record_is_accepted(store):
    seq = store.put({"id": "bare", "created": T0}, [])
    assert store.get("bare") == {"id": "bare", "created": T0, "seq": seq, "image_hashes": []}
    assert [r["id"] for r in all_records(store, failed=False)] == ["bare"]
    assert store.rows_since(0)[0] == {"created": T0, "intent": None, "route": None, "model": None, "tier": None,
                                      "user_tier": None, "failed": False, "latency_ms": None, "cost_usd": 0.0,
                                      "n_fallbacks": 0}


@pytest.mark.parametrize("bad", [
    pytest.param({"created": T0}, id="no_id"),
    pytest.param({"id": "", "created": T0}, id="empty_id"),
    pytest.param({"id": "x"}, id="no_created"),
    pytest.param({"id": "x", "created": float("nan")}, id="nan_created"),
    pytest.param({"id": "x", "created": True}, id="bool_created"),
])
def test_put_rejects_records_without_id_or_created(store, bad):
    with pytest.raises(ValueError):
        store.put(bad, [])
    assert all_records(store) == []


def test_get_prefers_latest_success_over_any_failure(store):
    store.put(rec("r", T0 + 1, failed=True, status=503), [])
    store.put(rec("r", T0 + 2, cost_usd=1.0), [png("first-success")])
    store.put(rec("r", T0 + 3, failed=True, status=500), [])  # a later failed retry does not hide the success
    assert store.get("r")["created"] == T0 + 2
    assert store.image("r", 0) == png("first-success")

    store.put(rec("r", T0 + 4), [png("second-success")])
    assert store.get("r")["created"] == T0 + 4
    assert store.image("r", 0) == png("second-success")


def test_get_falls_back_to_latest_failure(store):
    store.put(rec("f", T0 + 1, failed=True, status=503), [])
    store.put(rec("f", T0 + 2, failed=True, status=500), [])
    got = store.get("f")
    assert (got["failed"], got["status"]) == (True, 500)


def test_identical_images_share_one_file(store, root):
    same = png("same")
    store.put(rec("x", T0), [same])
    store.put(rec("y", T0 + 1), [same, same])
    assert store.get("x")["image_hashes"] == [sha(same)]
    assert store.get("y")["image_hashes"] == [sha(same), sha(same)]
    assert [p.name for p in (root / "images").rglob("*") if p.is_file()] == [f"{sha(same)}.png"]


# ---- list --------------------------------------------------------------------------------------------------------

DATASET = [
    rec("a", T0 + 1, intent="photo", route="fast", model="sdxl", model_version="sdxl@1", tier="turbo",
        user_tier="free"),
    rec("b", T0 + 2, intent="photo", route="quality", model="flux", model_version="flux@2", tier="big",
        user_tier="pro"),
    rec("c", T0 + 3, intent="text", route="typography", model="flux", model_version="flux@2", tier="big",
        user_tier="pro", failed=True, status=500),
    rec("d", T0 + 4, intent="text", route="fast", model="sdxl", model_version="sdxl@1", tier="turbo",
        user_tier="free", replay_of="b"),
    rec("e", T0 + 5, intent=None, route="fast", model="sdxl", model_version="sdxl@1", tier="turbo",
        user_tier="pro", replay_of="b", failed=True, status=504),
]


@pytest.fixture
def filled(store):
    for r in DATASET:
        store.put(r, [png(r["id"])])
    return store


@pytest.mark.parametrize("filters,expected", [
    pytest.param({}, "edcba", id="none"),
    pytest.param({"intent": "photo"}, "ba", id="intent"),
    pytest.param({"route": "fast"}, "eda", id="route"),
    pytest.param({"model": "flux"}, "cb", id="model_name"),
    pytest.param({"model": "sdxl@1"}, "eda", id="model_version"),
    pytest.param({"tier": "big"}, "cb", id="tier"),
    pytest.param({"user_tier": "free"}, "da", id="user_tier"),
    pytest.param({"failed": True}, "ec", id="failed"),
    pytest.param({"failed": False}, "dba", id="succeeded"),
    pytest.param({"since": T0 + 3}, "edc", id="since_inclusive"),
    pytest.param({"until": T0 + 3}, "ba", id="until_exclusive"),
    pytest.param({"since": T0 + 2, "until": T0 + 4}, "cb", id="window"),
    pytest.param({"replay_of": "b"}, "ed", id="replay_of"),
    pytest.param({"route": "fast", "failed": False, "user_tier": "free"}, "da", id="combined"),
    pytest.param({"intent": "nope"}, "", id="no_match"),
])
def test_list_filters(filled, filters, expected):
    page, cursor = filled.list(**filters)
    assert "".join(r["id"] for r in page) == expected
    assert cursor is None


def test_list_returns_full_records_with_images(filled):
    page, _ = filled.list(intent="photo", limit=1)
    assert page == [{**DATASET[1], "seq": page[0]["seq"], "image_hashes": [sha(png("b"))]}]


def test_list_pages_newest_first_without_duplicates(store):
    # created out of insertion order, with ties, so the order is by created and then seq, not by seq alone.
    createds = [T0 + (i * 7) % 11 for i in range(25)]
    seqs = {store.put(rec(f"r{i}", c), [png(f"{i}")]): c for i, c in enumerate(createds)}
    expected = sorted(seqs, key=lambda s: (seqs[s], s), reverse=True)

    page1, c1 = store.list(limit=10)
    store.put(rec("newer", T0 + 100), [])  # arrives mid-paging: must not shift the later pages
    page2, c2 = store.list(limit=10, cursor=c1)
    page3, c3 = store.list(limit=10, cursor=c2)

    assert [len(page1), len(page2), len(page3)] == [10, 10, 5]
    assert c1 is not None and c2 is not None and c3 is None
    got = [r["seq"] for r in page1 + page2 + page3]
    assert got == expected
    assert len(set(got)) == 25


def test_list_exact_multiple_of_limit_ends_with_none(store):
    for i in range(4):
        store.put(rec(f"r{i}", T0 + i), [])
    page, cursor = store.list(limit=2)
    page, cursor = store.list(limit=2, cursor=cursor)
    assert [r["id"] for r in page] == ["r1", "r0"]
    assert cursor is None


@pytest.mark.parametrize("kw", [{"limit": 0}, {"cursor": "garbage"}, {"cursor": "1.0:x"}])
def test_list_rejects_bad_paging(store, kw):
    with pytest.raises(ValueError):
        store.list(**kw)


# ---- stats -------------------------------------------------------------------------------------------------------


def test_rows_since_and_cost_by_user_tier(store):
    store.put(rec("old", T0, user_tier="pro", cost_usd=5.0, intent="photo"), [])
    store.put(rec("p1", T0 + 10, user_tier="pro", cost_usd=0.25, intent="photo", route="fast", model="m",
                  tier="turbo", latency_ms=100.0, fallbacks=[{"a": 1}, {"b": 2}]), [])
    store.put(rec("p2", T0 + 11, user_tier="pro", cost_usd=0.5, failed=True), [])
    store.put(rec("f1", T0 + 12, user_tier="free", cost_usd=0.125), [])
    store.put(rec("n1", T0 + 13, cost_usd=1.0), [])

    rows = store.rows_since(T0 + 10)  # inclusive
    assert len(rows) == 4
    p1 = next(r for r in rows if r["latency_ms"] == 100.0)
    assert p1 == {"created": T0 + 10, "intent": "photo", "route": "fast", "model": "m", "tier": "turbo",
                  "user_tier": "pro", "failed": False, "latency_ms": 100.0, "cost_usd": 0.25, "n_fallbacks": 2}
    assert sorted(r["failed"] for r in rows) == [False, False, False, True]

    assert store.cost_by_user_tier(T0 + 10) == {"pro": 0.75, "free": 0.125, "unknown": 1.0}
    assert store.cost_by_user_tier(T0) == {"pro": 5.75, "free": 0.125, "unknown": 1.0}
    assert store.cost_by_user_tier(T0 + 100) == {}


def _row(intent, latency, failed=False, fallbacks=0, cost=0.0, route="fast", model="m"):
    return {"intent": intent, "route": route, "model": model, "tier": "t", "user_tier": "pro", "failed": failed,
            "latency_ms": latency, "cost_usd": cost, "n_fallbacks": fallbacks}


def test_summarize_groups_and_percentiles():
    rows = [_row("text", float(v), failed=v % 5 == 0, fallbacks=1, cost=0.1) for v in range(20, 0, -1)]
    rows += [_row("photo", 10.0, fallbacks=2), _row("photo", 40.0, failed=True), _row("photo", 20.0),
             _row("photo", 30.0, cost=0.5), _row("photo", None, failed=True)]
    rows += [_row("sketch", None), _row("sketch", None, route="slow")]

    out = summarize(rows)

    assert [(g["intent"], g["route"], g["count"]) for g in out] == [
        ("text", "fast", 20), ("photo", "fast", 5), ("sketch", "fast", 1), ("sketch", "slow", 1)]
    text, photo, sketch = out[0], out[1], out[2]
    assert (text["p50_ms"], text["p95_ms"]) == (10.0, 19.0)  # ranks ceil(10) = 10 and ceil(19) = 19 of 1..20
    assert text["failure_rate"] == pytest.approx(4 / 20)
    assert text["fallbacks"] == 20
    assert text["cost_usd"] == 2.0
    assert (photo["p50_ms"], photo["p95_ms"]) == (20.0, 40.0)  # None latency ignored: [10, 20, 30, 40]
    assert photo["failure_rate"] == pytest.approx(2 / 5)
    assert (photo["fallbacks"], photo["cost_usd"]) == (2, 0.5)
    assert (sketch["p50_ms"], sketch["p95_ms"], sketch["failure_rate"]) == (None, None, 0.0)


def test_summarize_is_nearest_rank_not_interpolated():
    out = summarize([_row("odd", float(v)) for v in (5, 1, 4, 2, 3)])
    assert (out[0]["p50_ms"], out[0]["p95_ms"]) == (3.0, 5.0)  # ranks ceil(2.5) = 3 and ceil(4.75) = 5


def test_summarize_custom_group_by_and_empty():
    rows = [_row("a", 5.0, route="r1"), _row("b", 7.0, route="r1"), _row("c", 1.0, route="r2")]
    assert [(g["route"], g["count"], g["p50_ms"]) for g in summarize(rows, group_by=("route",))] == [
        ("r1", 2, 5.0), ("r2", 1, 1.0)]
    assert summarize([]) == []


# ---- retention ---------------------------------------------------------------------------------------------------


def test_retention_by_count_deletes_rows_and_unshared_files(root):
    shared = png("shared")
    with SqliteRenderStore(spec(root, max_count=3)) as s:
        s.put(rec("r0", T0), [shared, png("u0")])
        s.put(rec("r1", T0 + 1), [png("u1")])
        s.put(rec("r2", T0 + 2), [png("u2")])
        s.put(rec("r3", T0 + 3), [png("u3")])
        s.put(rec("r4", T0 + 4), [shared])

        assert s.prune() == 2

        assert [r["id"] for r in all_records(s)] == ["r4", "r3", "r2"]
        assert s.get("r0") is None and s.get("r1") is None
        assert not image_file(root, sha(png("u0"))).exists()
        assert not image_file(root, sha(png("u1"))).exists()
        assert image_file(root, sha(shared)).read_bytes() == shared  # still referenced by r4
        assert s.image("r4", 0) == shared
        assert s.image("r2", 0) == png("u2")
        assert s.prune() == 0


def test_retention_by_age_deletes_rows_and_unshared_files(root):
    now = T0 + 10 * DAY
    shared = png("shared")
    with SqliteRenderStore(spec(root, max_age_days=1)) as s:
        s.put(rec("old1", now - 3 * DAY), [shared, png("old1")])
        s.put(rec("old2", now - 2 * DAY), [png("old2")])
        s.put(rec("fresh", now - 3600), [shared])

        assert s.prune(now=now) == 2

        assert [r["id"] for r in all_records(s)] == ["fresh"]
        assert not image_file(root, sha(png("old1"))).exists()
        assert not image_file(root, sha(png("old2"))).exists()
        assert s.image("fresh", 0) == shared


def test_no_retention_limits_keeps_everything(store):
    for i in range(5):
        store.put(rec(f"r{i}", 1.0 + i), [png(str(i))])
    assert store.prune(now=T0 + 1000 * DAY) == 0
    assert len(all_records(store)) == 5


def test_put_runs_retention_every_prune_every_writes(root):
    with SqliteRenderStore(spec(root, max_count=2, prune_every=3)) as s:
        counts = []
        for i in range(7):
            s.put(rec(f"r{i}", T0 + i), [png(str(i))])
            s.wait_for_retention()  # retention runs in the background, off the put's path
            counts.append(len(all_records(s)))
        assert counts == [1, 2, 2, 3, 4, 2, 3]


# ---- sharing a store ---------------------------------------------------------------------------------------------


def test_two_instances_on_one_dir_see_each_others_writes(root):
    with SqliteRenderStore(spec(root)) as a, SqliteRenderStore(spec(root)) as b:
        a.put(rec("from-a", T0), [png("a")])
        assert b.get("from-a")["image_hashes"] == [sha(png("a"))]
        assert b.image("from-a", 0) == png("a")
        b.put(rec("from-b", T0 + 1), [png("a"), png("b")])
        assert [r["id"] for r in all_records(a)] == ["from-b", "from-a"]
        assert a.image("from-b", 1) == png("b")


def test_threads_share_one_store(store):
    def worker(w: int) -> None:
        for i in range(20):
            store.put(rec(f"w{w}-{i}", T0 + i), [png(f"{w}-{i}"), png("common")])

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = all_records(store)
    assert len(records) == 80
    assert len({r["seq"] for r in records}) == 80
    assert all(store.image(r["id"], 1) == png("common") for r in records[:5])


# ---- config ------------------------------------------------------------------------------------------------------


def test_spec_resolves_dir_against_repo_root_and_env(monkeypatch, tmp_path):
    assert RecordsSpec().resolved_dir() == ROOT / ".prism" / "renders"
    assert RecordsSpec(dir=str(tmp_path)).resolved_dir() == tmp_path
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "elsewhere"))
    assert RecordsSpec(dir="ignored").resolved_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv(ENV_DIR, "rel/dir")
    assert RecordsSpec().resolved_dir() == ROOT / "rel" / "dir"


@pytest.mark.parametrize("bad", [{"max_age_days": 0}, {"max_count": 0}, {"prune_every": 0}, {"typo": 1}])
def test_spec_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        RecordsSpec(**bad)


def test_open_store(root):
    assert open_store(RecordsSpec(enabled=False, dir=str(root))) is None
    store = open_store(RecordsSpec(dir=str(root)))
    try:
        assert isinstance(store, SqliteRenderStore)
        assert (root / "renders.db").exists()
    finally:
        store.close()


# ---- crashes -----------------------------------------------------------------------------------------------------


class InjectedFault(RuntimeError):
    pass


class CrashMidWriteStore_fault_injecting(SqliteRenderStore):  # noqa: N801 - the name says it injects faults
    """A real store with one fault injected: after put's rows are inserted, before its transaction commits.

    `fault="raise"` raises there; `fault="exit"` kills the process there with os._exit (no cleanup at all).
    By then put has already written the image files, so this is the worst moment to die.
    """

    def __init__(self, spec_or_dir, fault: str):
        super().__init__(spec_or_dir)
        self.fault = fault

    def _insert(self, conn, columns, hashes):
        seq = super()._insert(conn, columns, hashes)
        if self.fault == "exit":
            os._exit(17)
        if self.fault == "raise":
            raise InjectedFault("injected between insert and commit")
        return seq


class PruneBeforeCommitStore_fault_injecting(SqliteRenderStore):  # noqa: N801 - the name says it injects faults
    """A real store with one interleaving injected: right after put's first pass found (or wrote) its image
    files, and before it takes the write lock, another store instance on the same directory runs a real prune.

    That is what a second replica can do at any time; the prune may delete a file this put is about to reference.
    """

    def __init__(self, spec_or_dir, other: SqliteRenderStore, now: float):
        super().__init__(spec_or_dir)
        self.other, self.now = other, now

    def _ensure_image(self, data, digest=None):
        h = super()._ensure_image(data, digest)
        if digest is None:  # the first pass, outside the transaction
            self.other.prune(now=self.now)
        return h


def test_prune_by_another_store_between_file_write_and_commit_keeps_the_file(root):
    now = T0 + 10 * DAY
    shared = png("shared")
    with SqliteRenderStore(spec(root)) as s:
        s.put(rec("old", now - 5 * DAY), [shared])
    with SqliteRenderStore(spec(root, max_age_days=1)) as replica:
        racing = PruneBeforeCommitStore_fault_injecting(spec(root), other=replica, now=now)
        racing.put(rec("new", now), [shared])  # found the file already there, then "old" was pruned under it
        racing.close()
        assert replica.get("old") is None
        assert replica.image("new", 0) == shared
        assert image_file(root, sha(shared)).read_bytes() == shared


def _crash_inside_transaction(store_dir: str) -> None:
    """Child process: one put that dies with os._exit inside its transaction."""
    store = CrashMidWriteStore_fault_injecting(spec(Path(store_dir)), fault="exit")
    store.put(rec("doomed", time.time()), [png("shared"), png("doomed-only")])
    raise AssertionError("unreachable: the fault exits the process")


def _integrity(root: Path) -> str:
    conn = sqlite3.connect(root / "renders.db")
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_exception_inside_transaction_leaves_no_record_and_store_usable(root):
    faulty = CrashMidWriteStore_fault_injecting(spec(root), fault="raise")
    with pytest.raises(InjectedFault):
        faulty.put(rec("half", T0), [png("half")])
    assert image_file(root, sha(png("half"))).exists()  # the files were written before the transaction

    faulty.fault = None  # the same connection must not be left inside the failed transaction
    faulty.put(rec("whole", T0 + 1), [png("whole")])
    faulty.close()

    with SqliteRenderStore(spec(root)) as fresh:
        assert fresh.get("half") is None
        assert [r["id"] for r in all_records(fresh)] == ["whole"]


def test_process_killed_inside_transaction_leaves_no_half_record(root):
    now = time.time()
    with SqliteRenderStore(spec(root)) as s:
        s.put(rec("good", now), [png("shared")])

    child = SPAWN.Process(target=_crash_inside_transaction, args=(str(root),))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 17

    orphan = image_file(root, sha(png("doomed-only")))
    assert orphan.exists()  # it died after writing its files, inside the transaction
    stale_tmp = orphan.parent / f".{sha(png('doomed-only'))}.999.deadbeef.tmp"  # as a writer killed mid-file
    stale_tmp.write_bytes(b"partial")
    assert _integrity(root) == "ok"

    with SqliteRenderStore(spec(root)) as fresh:
        assert fresh.get("doomed") is None
        assert [r["id"] for r in all_records(fresh)] == ["good"]

        assert fresh.prune(now=now) == 0
        assert orphan.exists() and stale_tmp.exists()  # young: could be a put that has not committed yet

        assert fresh.prune(now=now + 120) == 0
        assert not orphan.exists() and not stale_tmp.exists()
        assert fresh.image("good", 0) == png("shared")  # shared with the dead put, still referenced


def _put_forever(store_dir: str, tag: str, ready) -> None:
    """Child process: put records as fast as possible until killed; retention runs every few writes."""
    store = SqliteRenderStore(spec(Path(store_dir), prune_every=5))
    i = 0
    while True:
        store.put(rec(f"{tag}-{i}", time.time(), fallbacks=[i] * (i % 3)), [png("shared"), os.urandom(4096)])
        i += 1
        if i == 1:
            ready.set()  # after a commit, so a loaded machine cannot kill a child that never wrote (no new records)


def _check_consistent(root: Path) -> list[dict]:
    assert _integrity(root) == "ok"
    with SqliteRenderStore(spec(root)) as s:
        records = all_records(s)
    for r in records:
        assert len(r["image_hashes"]) == 2, r
        for h in r["image_hashes"]:
            assert sha(image_file(root, h).read_bytes()) == h
    return records


def test_sigkill_during_put_loop_never_leaves_a_broken_record(root):
    counts = [0]
    for round_ in range(3):
        ready = SPAWN.Event()
        child = SPAWN.Process(target=_put_forever, args=(str(root), f"k{round_}", ready))
        child.start()
        assert ready.wait(timeout=30), "child never committed a record"
        time.sleep(0.7)
        child.kill()  # SIGKILL: no finally blocks, no atexit, mid-fsync or mid-commit
        child.join(timeout=10)
        assert child.exitcode == -9

        counts.append(len(_check_consistent(root)))
        assert counts[-1] > counts[-2], counts  # grew: the kill never lost what was committed before

    with SqliteRenderStore(spec(root)) as s:
        s.prune(now=time.time() + 120)  # sweep whatever the kills left behind
    records = _check_consistent(root)
    assert len(records) == counts[-1]
    referenced = {h for r in records for h in r["image_hashes"]}
    on_disk = {p.name for p in (root / "images").rglob("*") if p.is_file()}
    assert on_disk == {f"{h}.png" for h in referenced}  # no orphans or temp files survive the sweep


def test_fsync_mode_round_trips(tmp_path):
    spec = RecordsSpec(dir=str(tmp_path / "durable"), fsync=True)
    with SqliteRenderStore(spec) as durable:
        durable.put({"id": "d1", "created": T0}, [b"\x89PNG durable"])
        assert durable.image("d1", 0) == b"\x89PNG durable"
        assert durable._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_rendered_twice_lists_ids_with_two_successes(store):
    store.put({"id": "once", "created": T0, "failed": False}, [])
    store.put({"id": "twice", "created": T0, "failed": False}, [])
    store.put({"id": "twice", "created": T0 + 1, "failed": False}, [])
    store.put({"id": "retried", "created": T0, "failed": True}, [])
    store.put({"id": "retried", "created": T0 + 1, "failed": False}, [])
    assert store.rendered_twice() == ["twice"]


# ---- budget spend across ingress replicas ---------------------------------------------------------------------------


def test_store_spend_sees_every_replica_and_counts_each_charge_once(root):
    """Two ingress replicas' StoreSpend over one store (as the GPU profile's two ingress replicas share it)."""
    import asyncio
    import time

    from graph.cost import StoreSpend

    now = time.time()
    with SqliteRenderStore(spec(root)) as a_store, SqliteRenderStore(spec(root)) as b_store:
        a_store.put(rec("old", now - 2 * DAY, user_tier="pro", cost_usd=9.0), [])  # outside a 1-day window
        a_store.put(rec("before", now - 60, user_tier="pro", cost_usd=1.0), [])  # before either replica read
        a, b = StoreSpend(a_store, refresh_s=0.2), StoreSpend(b_store, refresh_s=0.2)

        async def run() -> list[float]:
            seen = []
            await a.refresh({DAY}), await b.refresh({DAY})
            seen += [a.spent("pro", DAY), b.spent("pro", DAY), a.spent("pro", 2 * DAY + 60)]
            # Replica A renders: record committed first, then charged. A counts it at once, B after its next read.
            a_store.put(rec("a1", time.time(), user_tier="pro", cost_usd=0.5), [])
            a.add("pro", 0.5)
            seen += [a.spent("pro", DAY), b.spent("pro", DAY)]
            await asyncio.sleep(0.25)
            await a.refresh({DAY}), await b.refresh({DAY})
            seen += [a.spent("pro", DAY), b.spent("pro", DAY), a.spent("free", DAY)]
            await a.refresh({DAY, 3 * DAY})  # a new window (a policy reload) is read at once, stale or not
            seen.append(a.spent("pro", 3 * DAY))
            return seen

        assert asyncio.run(run()) == [1.0, 1.0, 0.0, 1.5, 1.0, 1.5, 1.5, 0.0, 10.5]


def test_store_spend_reads_a_window_asked_for_during_another_read(root):
    """Two requests at once, the second with a window the read in flight does not cover (a policy reload)."""
    import asyncio
    import time

    from graph.cost import StoreSpend

    with SqliteRenderStore(spec(root)) as store:
        store.put(rec("two-days", time.time() - 2 * DAY, user_tier="pro", cost_usd=2.0), [])
        spend = StoreSpend(store)

        async def run() -> tuple[float, float]:
            await asyncio.gather(spend.refresh({DAY}), spend.refresh({DAY, 3 * DAY}))
            return spend.spent("pro", DAY), spend.spent("pro", 3 * DAY)

        assert asyncio.run(run()) == (0.0, 2.0)

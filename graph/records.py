"""The render record store: every render, success or failure, kept as a JSON record plus the PNGs it made.

Why a store at all: replays, `/v1/renders` browsing and `/v1/stats` all need the past, and they must survive a
restart. The default is embedded (SQLite + content-addressed files under one directory, no server); the
`RenderStore` interface lets a team swap in object storage later without touching callers.

Crash safety is the point of the write path. `put` makes every image file durable (temp name, fsync, atomic
rename) *before* it inserts the record's rows in one transaction, so a process killed at any instant leaves either
a complete record whose files all exist, or no row at all. The worst leftover is an orphan image file, which
`prune` sweeps once it is old enough that no writer can still be about to reference it.

Several processes (ingress replicas on one node) may open the same store. SQLite's WAL mode lets them read while
one writes; image files are shared between records (same bytes, same hash), so deleting a file and referencing a
file both happen while holding the database write lock, which makes the two serialise across processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("prism.records")

ROOT = Path(__file__).resolve().parents[1]
ENV_DIR = "PRISM_RECORDS_DIR"
ORPHAN_GRACE_S = 60.0  # an unreferenced file younger than this may belong to a put that has not committed yet
BUSY_TIMEOUT_MS = 5000
DAY_S = 86_400.0

# Columns copied out of the record so they can be filtered and aggregated; the whole record also lives in `body`.
_TEXT_COLUMNS = ("user_tier", "intent", "route", "tier", "model", "replay_of", "request_hash", "tenant", "key_id")
_EQ_FILTERS = ("intent", "route", "tier", "user_tier", "replay_of")  # list() filters that are plain equality
# Columns added after the first release: a store made before them gets them (NULL in old rows) when it is opened.
_ADDED_COLUMNS = {"tenant": "TEXT", "key_id": "TEXT"}
ANONYMOUS_TENANT = "anonymous"  # graph.auth.ANONYMOUS; old rows (NULL tenant) count as anonymous
_STATS_COLUMNS = ("created", "intent", "route", "model", "tier", "user_tier", "failed", "latency_ms", "cost_usd",
                  "n_fallbacks")
_DERIVED_KEYS = ("seq", "image_hashes")  # what get() adds; never stored in the body

_SCHEMA = """
CREATE TABLE IF NOT EXISTS renders (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    created REAL NOT NULL,
    failed INTEGER,
    status INTEGER,
    user_tier TEXT,
    intent TEXT,
    route TEXT,
    tier TEXT,
    model TEXT,
    latency_ms REAL,
    cost_usd REAL,
    replay_of TEXT,
    request_hash TEXT,
    n_fallbacks INTEGER,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS renders_id ON renders(id);
CREATE INDEX IF NOT EXISTS renders_created ON renders(created);
CREATE INDEX IF NOT EXISTS renders_replay_of ON renders(replay_of);
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER,
    idx INTEGER,
    hash TEXT,
    PRIMARY KEY (seq, idx)
);
CREATE INDEX IF NOT EXISTS images_hash ON images(hash);
"""
_INDEXES_ON_ADDED = """
CREATE INDEX IF NOT EXISTS renders_tenant ON renders(tenant, created);
CREATE INDEX IF NOT EXISTS renders_key ON renders(key_id, created);
"""


class RecordsSpec(BaseModel):
    """Where records live and how long they are kept (the `records` block of the app args)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    dir: str = ".prism/renders"
    max_age_days: float | None = Field(default=30, gt=0)
    max_count: int | None = Field(default=100_000, ge=1)
    prune_every: int = Field(default=200, ge=1)
    fsync: bool = Field(default=False, description=(
        "fsync each image file and each commit (SQLite synchronous=FULL): records survive a power loss, not only "
        "a replica's death. Off by default: a killed process loses nothing either way (the data is in the OS page "
        "cache), and the fsyncs cost several ms per render under concurrency (benchmarks/RESULTS.md)."))

    def resolved_dir(self) -> Path:
        """The store directory: $PRISM_RECORDS_DIR if set, else `dir`; relative paths hang off the repo root.

        Resolving against the repo root (not the cwd) keeps every replica, whatever directory Ray starts it in,
        on the same store.
        """
        path = Path(os.environ.get(ENV_DIR) or self.dir).expanduser()
        return path if path.is_absolute() else ROOT / path


class RenderStore(ABC):
    """What the server needs from a record store; `SqliteRenderStore` is the embedded implementation."""

    @abstractmethod
    def put(self, record: dict, images: list[bytes]) -> int:
        """Record one render and its images atomically; returns the record's sequence number."""

    def put_many(self, items: list[tuple[dict, list[bytes]]]) -> list[int]:
        """Several records (a store that can should commit them in one transaction)."""
        return [self.put(rec, images) for rec, images in items]

    @abstractmethod
    def get(self, rid: str) -> dict | None:
        """The latest successful record with this request id, else the latest failed one, else None."""

    @abstractmethod
    def image(self, rid: str, index: int) -> bytes | None:
        """PNG bytes of image `index` of get(rid); None when there is no such record or image."""

    @abstractmethod
    def list(self, *, intent: str | None = None, route: str | None = None, model: str | None = None,
             tier: str | None = None, user_tier: str | None = None, failed: bool | None = None,
             since: float | None = None, until: float | None = None, replay_of: str | None = None,
             limit: int = 50, cursor: str | None = None, tenant: str | None = None) -> tuple[list[dict], str | None]:
        """A page of records (of one tenant, or all), newest first, and the cursor for the next page (None on the
        last page)."""

    @abstractmethod
    def rows_since(self, since: float, tenant: str | None = None) -> list[dict]:
        """Lightweight rows (the `_STATS_COLUMNS`) of records created at or after `since`, for /v1/stats."""

    @abstractmethod
    def cost_by_user_tier(self, since: float, tenant: str | None = None) -> dict[str, float]:
        """Total cost of records created at or after `since`, per user tier."""

    @abstractmethod
    def prune(self, now: float | None = None) -> int:
        """Apply retention and sweep unreferenced files; returns how many records were deleted."""

    @abstractmethod
    def close(self) -> None:
        """Release the store's resources."""

    def __enter__(self) -> RenderStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SqliteRenderStore(RenderStore):
    """SQLite (WAL) for the records, content-addressed files for the images, all under one directory.

    One connection per instance, shared by the threads that call in (asyncio.to_thread) and guarded by a lock;
    several instances, in one process or several, may open the same directory.
    """

    def __init__(self, spec_or_dir: RecordsSpec | str | Path):
        # A bare directory is taken literally (no env override, no repo-root anchoring): callers that name a
        # directory, tests above all, must get exactly that one.
        if isinstance(spec_or_dir, RecordsSpec):
            self.spec, self.dir = spec_or_dir, spec_or_dir.resolved_dir()
        else:
            self.spec, self.dir = RecordsSpec(), Path(spec_or_dir)
        self.images_dir = self.dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._prune_lock = threading.Lock()
        self._puts = 0
        self._prune_thread: threading.Thread | None = None
        self._conn = _connect(self.dir / "renders.db", fsync=self.spec.fsync)

    # ---- writing -------------------------------------------------------------------------------------------

    def put(self, record: dict, images: list[bytes]) -> int:
        """Files first (durable, renamed into place), then all rows in one transaction; see the module doc."""
        return self.put_many([(record, images)])[0]

    def put_many(self, items: list[tuple[dict, list[bytes]]]) -> list[int]:
        """Several records in one transaction (graph/writer.py groups a burst): all their files first, then every
        row; either all of them are committed or none."""
        prepared = [(_columns(rec), [self._ensure_image(data) for data in images], images) for rec, images in items]
        with self._lock, self._write() as conn:
            seqs = []
            for columns, hashes, images in prepared:
                # Re-check under the write lock: another process's prune may have deleted a shared file since.
                for h, data in zip(hashes, images, strict=True):
                    self._ensure_image(data, h)
                seqs.append(self._insert(conn, columns, hashes))
            before, self._puts = self._puts, self._puts + len(items)
            due = before // self.spec.prune_every != self._puts // self.spec.prune_every
        if due:  # off the request's path: the caller has its committed record already
            self._prune_thread = threading.Thread(target=self._prune_after_put, name="render-store-prune",
                                                  daemon=True)
            self._prune_thread.start()
        return seqs

    def wait_for_retention(self, timeout_s: float = 60.0) -> None:
        """Wait for a retention run that a put started in the background (tests, shutdown)."""
        thread = self._prune_thread
        if thread is not None:
            thread.join(timeout_s)

    def _insert(self, conn: sqlite3.Connection, columns: dict[str, Any], hashes: list[str]) -> int:
        """Insert the renders row and its images rows; runs inside put's transaction (a seam for fault tests)."""
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        seq = conn.execute(f"INSERT INTO renders ({names}) VALUES ({marks})", tuple(columns.values())).lastrowid
        conn.executemany("INSERT INTO images (seq, idx, hash) VALUES (?, ?, ?)",
                         [(seq, i, h) for i, h in enumerate(hashes)])
        return int(seq)

    def _ensure_image(self, data: bytes, digest: str | None = None) -> str:
        """Make the file for these bytes exist under its content hash; identical images share one file."""
        h = digest or hashlib.sha256(data).hexdigest()
        path = self._image_path(h)
        if not path.exists():
            _write_durably(path, data, fsync=self.spec.fsync)
        return h

    def _image_path(self, h: str) -> Path:
        return self.images_dir / h[:2] / f"{h}.png"

    # ---- reading -------------------------------------------------------------------------------------------

    def get(self, rid: str) -> dict | None:
        with self._lock, self._read() as conn:
            row = conn.execute("SELECT seq, body FROM renders WHERE id = ? "
                               "ORDER BY failed ASC, created DESC, seq DESC LIMIT 1", (rid,)).fetchone()
            if row is None:
                return None
            return self._with_images(conn, [row])[0]

    def image(self, rid: str, index: int) -> bytes | None:
        record = self.get(rid)
        if record is None or not 0 <= index < len(record["image_hashes"]):
            return None
        try:
            return self._image_path(record["image_hashes"][index]).read_bytes()
        except FileNotFoundError:  # pruned by another process between the lookup and the read
            return None

    def list(self, *, intent: str | None = None, route: str | None = None, model: str | None = None,
             tier: str | None = None, user_tier: str | None = None, failed: bool | None = None,
             since: float | None = None, until: float | None = None, replay_of: str | None = None,
             limit: int = 50, cursor: str | None = None, tenant: str | None = None) -> tuple[list[dict], str | None]:
        """Newest first by `created` (ties by seq); keyset paging so pages stay stable while records arrive.

        `since` is inclusive and `until` exclusive; `model` matches the model name or the model version; `tenant`
        (None: every tenant) keeps one tenant's records.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        clauses, params = _filter_sql(eq={"intent": intent, "route": route, "tier": tier, "user_tier": user_tier,
                                          "replay_of": replay_of},
                                      model=model, failed=failed, since=since, until=until, tenant=tenant)
        if cursor is not None:
            created, seq = _parse_cursor(cursor)
            clauses.append("(created < ? OR (created = ? AND seq < ?))")
            params += [created, created, seq]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT seq, body FROM renders {where} ORDER BY created DESC, seq DESC LIMIT ?"
        with self._lock, self._read() as conn:
            rows = conn.execute(sql, (*params, limit + 1)).fetchall()
            records = self._with_images(conn, rows[:limit])
        more = len(rows) > limit
        return records, _cursor(records[-1]) if more else None

    def rows_since(self, since: float, tenant: str | None = None) -> list[dict]:
        clauses, params = _filter_sql(eq={}, model=None, failed=None, since=since, until=None, tenant=tenant)
        sql = f"SELECT {', '.join(_STATS_COLUMNS)} FROM renders WHERE {' AND '.join(clauses)}"
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        out = [dict(zip(_STATS_COLUMNS, row, strict=True)) for row in rows]
        for r in out:
            r["failed"] = bool(r["failed"])
        return out

    def rendered_twice(self) -> list[str]:
        """Request ids with more than one successful record: renders done twice (an audit for retry paths)."""
        with self._lock:
            rows = self._conn.execute("SELECT id FROM renders WHERE failed = 0 GROUP BY id HAVING COUNT(*) > 1")
            return [r[0] for r in rows.fetchall()]

    def cost_by_user_tier(self, since: float, tenant: str | None = None) -> dict[str, float]:
        """Spend per user tier (of one tenant, or all); records without a user tier count under "unknown"."""
        clauses, params = _filter_sql(eq={}, model=None, failed=None, since=since, until=None, tenant=tenant)
        with self._lock:
            rows = self._conn.execute("SELECT COALESCE(user_tier, 'unknown'), SUM(cost_usd) FROM renders "
                                      f"WHERE {' AND '.join(clauses)} GROUP BY 1", params).fetchall()
        return {tier: round(total or 0.0, 8) for tier, total in rows}

    def _with_images(self, conn: sqlite3.Connection, rows: Sequence[tuple[int, str]]) -> list[dict]:
        """Bodies decoded, plus seq and image_hashes; one query for the images of the whole page."""
        if not rows:
            return []
        seqs = [seq for seq, _ in rows]
        hashes: dict[int, list[str]] = {seq: [] for seq in seqs}
        marks = ", ".join("?" for _ in seqs)
        for seq, h in conn.execute(f"SELECT seq, hash FROM images WHERE seq IN ({marks}) ORDER BY seq, idx", seqs):
            hashes[seq].append(h)
        return [{**json.loads(body), "seq": seq, "image_hashes": hashes[seq]} for seq, body in rows]

    # ---- retention -----------------------------------------------------------------------------------------

    def prune(self, now: float | None = None) -> int:
        """Delete records past max_age_days or beyond max_count, then files nothing references any more.

        Files freed by the deleted records go at once; other unreferenced files (and temp files) only once they
        are older than ORPHAN_GRACE_S by mtime against `now`, since a young one may be a put about to commit.
        """
        with self._prune_lock:
            return self._prune(_now(now))

    def _prune_after_put(self) -> None:
        """Retention triggered by a put: skipped if a prune is already running, and never fails the put."""
        if not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._prune(_now(None))
        except Exception:  # the record is committed; a retention hiccup must not turn it into an error
            log.exception("render store prune failed")
        finally:
            self._prune_lock.release()

    def _prune(self, now: float) -> int:
        deleted, freed = self._delete_expired(now)
        self._unlink_unreferenced(self.images_dir / h[:2] / f"{h}.png" for h in freed)
        self._sweep_orphans(now)
        return deleted

    def _delete_expired(self, now: float) -> tuple[int, set[str]]:
        """One transaction: drop expired records and their image rows; returns (count, hashes they used)."""
        clauses, params = [], []
        if self.spec.max_age_days is not None:
            clauses.append("created < ?")
            params.append(now - self.spec.max_age_days * DAY_S)
        if self.spec.max_count is not None:
            clauses.append("seq IN (SELECT seq FROM renders ORDER BY created DESC, seq DESC LIMIT -1 OFFSET ?)")
            params.append(self.spec.max_count)
        if not clauses:
            return 0, set()
        with self._lock, self._write() as conn:
            seqs = [(s,) for (s,) in conn.execute(f"SELECT seq FROM renders WHERE {' OR '.join(clauses)}", params)]
            freed: set[str] = set()
            for (seq,) in seqs:
                freed.update(h for (h,) in conn.execute("SELECT hash FROM images WHERE seq = ?", (seq,)))
            conn.executemany("DELETE FROM images WHERE seq = ?", seqs)
            conn.executemany("DELETE FROM renders WHERE seq = ?", seqs)
        return len(seqs), freed

    def _sweep_orphans(self, now: float) -> None:
        """Shard by shard, so memory stays bounded by one shard's hashes however large the store grows."""
        for shard in sorted(p for p in self.images_dir.iterdir() if p.is_dir()):
            old_temps, old_orphans = self._orphan_candidates(shard, now)
            for path in old_temps:
                path.unlink(missing_ok=True)
            self._unlink_unreferenced(old_orphans)

    def _orphan_candidates(self, shard: Path, now: float) -> tuple[list[Path], list[Path]]:
        """(temp files, unreferenced images) in one shard older than the grace period; no write lock held."""
        names = [e.name for e in os.scandir(shard) if e.is_file(follow_symlinks=False)]
        temps = [shard / n for n in names if n.startswith(".") and n.endswith(".tmp")]
        pngs = {n[:-4]: shard / n for n in names if n.endswith(".png") and _is_hash(n[:-4])}
        if pngs:
            prefix = shard.name
            upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            with self._lock:
                referenced = {h for (h,) in self._conn.execute(
                    "SELECT DISTINCT hash FROM images WHERE hash >= ? AND hash < ?", (prefix, upper))}
            pngs = {h: p for h, p in pngs.items() if h not in referenced}
        return _older_than(temps, now), _older_than(pngs.values(), now)

    def _unlink_unreferenced(self, paths: Iterable[Path]) -> None:
        """Delete image files whose hash no images row mentions, deciding under the database write lock.

        put() re-checks its files under the same lock, so across processes either this sees the new reference
        and keeps the file, or put sees the file gone and writes it again.
        """
        paths = list(paths)
        if not paths:
            return
        with self._lock, self._write() as conn:
            for path in paths:
                if conn.execute("SELECT 1 FROM images WHERE hash = ? LIMIT 1", (path.stem,)).fetchone() is None:
                    path.unlink(missing_ok=True)

    # ---- plumbing ------------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front, so busy_timeout applies (a deferred read-then-write
        transaction can fail with SQLITE_BUSY at once instead of waiting)."""
        self._conn.execute("BEGIN IMMEDIATE")
        with self._finish_or_roll_back():
            yield self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One snapshot for several SELECTs, so a record and its image rows come from the same moment."""
        self._conn.execute("BEGIN")
        with self._finish_or_roll_back():
            yield self._conn

    @contextmanager
    def _finish_or_roll_back(self) -> Iterator[None]:
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.wait_for_retention()  # a background prune still holds the connection
        with self._lock:
            self._conn.close()


def open_store(spec: RecordsSpec) -> RenderStore | None:
    """The configured store, or None when recording is disabled."""
    return SqliteRenderStore(spec) if spec.enabled else None


def summarize(rows: list[dict], group_by: Sequence[str] = ("intent", "route", "model")) -> list[dict]:
    """Per group: count, p50/p95 latency (nearest rank), failure rate, fallbacks and cost; biggest groups first.

    Example: latencies [10, 20, 30, 40] -> p50 = 20 (rank ceil(0.5 * 4) = 2), p95 = 40 (rank ceil(0.95 * 4) = 4).
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in group_by), []).append(row)
    out = [{**dict(zip(group_by, key, strict=True)), **_group_stats(members)} for key, members in groups.items()]
    out.sort(key=lambda g: (-g["count"], tuple("" if g[k] is None else str(g[k]) for k in group_by)))
    return out


def _group_stats(rows: list[dict]) -> dict:
    latencies = sorted(r["latency_ms"] for r in rows if r.get("latency_ms") is not None)
    return {
        "count": len(rows),
        "p50_ms": _nearest_rank(latencies, 50),
        "p95_ms": _nearest_rank(latencies, 95),
        "failure_rate": sum(1 for r in rows if r.get("failed")) / len(rows),
        "fallbacks": sum(r.get("n_fallbacks") or 0 for r in rows),
        "cost_usd": round(sum(r.get("cost_usd") or 0.0 for r in rows), 8),
    }


def _nearest_rank(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _columns(record: dict) -> dict[str, Any]:
    """The renders row for a record; only `id` and `created` are required, everything else may be absent."""
    rid, created = record.get("id"), record.get("created")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"record id must be a non-empty string, got {rid!r}")
    if isinstance(created, bool) or not isinstance(created, int | float) or not math.isfinite(created):
        raise ValueError(f"record created must be a finite unix time, got {created!r}")
    latency, status = record.get("latency_ms"), record.get("status")
    body = {k: v for k, v in record.items() if k not in _DERIVED_KEYS}
    return {
        "id": rid, "created": float(created), "failed": int(bool(record.get("failed"))),
        "status": None if status is None else int(status),
        **{k: record.get(k) for k in _TEXT_COLUMNS},
        "latency_ms": None if latency is None else float(latency),
        "cost_usd": float(record.get("cost_usd") or 0.0),
        "n_fallbacks": len(record.get("fallbacks") or []),
        "body": json.dumps(body, separators=(",", ":")),
    }


def _filter_sql(*, eq: dict[str, Any], model: str | None, failed: bool | None, since: float | None,
                until: float | None, tenant: str | None = None) -> tuple[list[str], list[Any]]:
    """WHERE clauses and their parameters; column names come from a fixed list, values are always bound."""
    clauses, params = [], []
    if tenant == ANONYMOUS_TENANT:  # records from before tenants existed have none: they were anonymous
        clauses.append("(tenant = ? OR tenant IS NULL)")
        params.append(tenant)
    elif tenant is not None:
        clauses.append("tenant = ?")
        params.append(tenant)
    for column, value in eq.items():
        if column not in _EQ_FILTERS:
            raise ValueError(f"not a filterable column: {column!r}")
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if model is not None:
        clauses.append("(model = ? OR json_extract(body, '$.model_version') = ?)")
        params += [model, model]
    if failed is not None:
        clauses.append("failed = ?")
        params.append(int(failed))
    if since is not None:
        clauses.append("created >= ?")
        params.append(since)
    if until is not None:
        clauses.append("created < ?")
        params.append(until)
    return clauses, params


def _cursor(record: dict) -> str:
    """Opaque to callers: the (created, seq) sort key of the last record on the page."""
    return f"{float(record['created'])!r}:{record['seq']}"


def _parse_cursor(cursor: str) -> tuple[float, int]:
    try:
        created, seq = cursor.split(":")
        return float(created), int(seq)
    except ValueError:
        raise ValueError(f"invalid cursor {cursor!r}") from None


def _connect(path: Path, fsync: bool = False) -> sqlite3.Connection:
    """Autocommit connection (we issue BEGIN ourselves) in WAL mode, waiting up to 5 s for other writers.

    synchronous=NORMAL in WAL keeps the database consistent through crashes; at most the last commits before
    a power loss are lost, which is the trade for not fsyncing on every commit.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
    try:  # one transaction, so two processes creating the schema at once cannot interleave
        ensure_schema(conn)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        raise
    return conn


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the tables, or add the columns a store made by an older Prism lacks, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    have = {row[1] for row in conn.execute("PRAGMA table_info(renders)")}
    for column, kind in _ADDED_COLUMNS.items():
        if column not in have:
            conn.execute(f"ALTER TABLE renders ADD COLUMN {column} {kind}")
    for statement in _INDEXES_ON_ADDED.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("COMMIT")


def _write_durably(path: Path, data: bytes, fsync: bool = True) -> None:
    """Temp name in the same folder, (fsync,) atomic rename, (fsync the folder): the final name never holds a
    partial file, and once put commits a row the file it names is already written (on disk, with fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _older_than(paths: Iterable[Path], now: float) -> list[Path]:
    out = []
    for path in paths:
        try:
            if now - path.stat().st_mtime > ORPHAN_GRACE_S:
                out.append(path)
        except FileNotFoundError:
            continue
    return out


def _is_hash(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _now(now: float | None) -> float:
    return time.time() if now is None else now

"""API keys in the records database, and the CLI that manages them while the server runs.

    .venv/bin/python -m graph.keys create --tenant acme --tier pro [--admin] [--gateway] [--rpm 60] ...
    .venv/bin/python -m graph.keys list | disable KEY_ID | rotate KEY_ID

A key is shown once, at creation (its last line of output); the store keeps only its SHA-256. A fast hash is safe
here because a key is 256 random bits, not a password: there is no dictionary to try, and a slow KDF would cost
every request. Every ingress replica looks a key up on each request (one indexed read), so a disabled or rotated
key stops working at once everywhere. Per-key limits are counted in the same database, in one short transaction
per render, so they hold across ingress replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from graph.auth import (
    ANONYMOUS,
    KEY_PREFIX,
    RATE_WINDOW_S,
    Authenticator,
    AuthSpec,
    Caller,
    KeyInfo,
    KeyUsage,
    Links,
    RateLimitedRefusal,
    auth_mode,
    limit_refusal,
)
from graph.records import BUSY_TIMEOUT_MS, RecordsSpec, ensure_schema

USER_TIERS = ("free", "pro", "enterprise")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    tenant TEXT NOT NULL,
    user_tier TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    gateway INTEGER NOT NULL DEFAULT 0,
    rpm INTEGER,
    concurrent INTEGER,
    budget_usd REAL,
    budget_window_s REAL NOT NULL DEFAULT 86400,
    name TEXT,
    created REAL NOT NULL,
    disabled REAL,
    rotated_to TEXT
);
CREATE TABLE IF NOT EXISTS key_hits (key_id TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS key_hits_key ON key_hits(key_id, t);
CREATE TABLE IF NOT EXISTS key_inflight (
    key_id TEXT NOT NULL, rid TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key_id, rid)
);
CREATE TABLE IF NOT EXISTS prism_secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
_INFO_COLUMNS = "key_id, tenant, user_tier, admin, gateway, rpm, concurrent, budget_usd, budget_window_s, disabled"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, key): the id names the key in lists and logs; the key is `prism_<id>_<43 random characters>`."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def _info(row: tuple) -> KeyInfo:
    key_id, tenant, tier, admin, gateway, rpm, concurrent, budget, window, disabled = row
    return KeyInfo(key_id=key_id, tenant=tenant, user_tier=tier, admin=bool(admin), gateway=bool(gateway), rpm=rpm,
                   concurrent=concurrent, budget_usd=budget, budget_window_s=window, disabled=disabled is not None)


class KeyStore:
    """The keys, the per-key counters and the link-signing secret, in the records database (`renders.db`)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / "renders.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the write connection is shared by the threads that count limits
        self._conn = self._connect()
        # Lookups run on the ingress's event loop (one indexed read, tens of microseconds): their own connection, so
        # they never queue behind a counting transaction; WAL readers do not wait for writers.
        self._read = self._connect()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        ensure_schema(conn)  # the renders table too: key budgets sum its cost by key
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("COMMIT")
        return conn

    def close(self) -> None:
        self._conn.close()
        self._read.close()

    # ---- managing keys (the CLI) ---------------------------------------------------------------------------

    def create(self, tenant: str, user_tier: str, *, admin: bool = False, gateway: bool = False,
               rpm: int | None = None, concurrent: int | None = None, budget_usd: float | None = None,
               budget_window_s: float = 86_400.0, name: str | None = None) -> tuple[str, KeyInfo]:
        """A new key (returned once, never stored) and its settings."""
        check_settings(tenant, user_tier, rpm, concurrent, budget_usd, budget_window_s)
        key_id, key = new_key()
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys (key_id, hash, hint, tenant, user_tier, admin, gateway, rpm, concurrent, "
                "budget_usd, budget_window_s, name, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, hash_key(key), key[-4:], tenant, user_tier, int(admin), int(gateway), rpm, concurrent,
                 budget_usd, budget_window_s, name, time.time()))
        return key, self.info(key_id)

    def info(self, key_id: str) -> KeyInfo | None:
        row = self._conn.execute(f"SELECT {_INFO_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return _info(row) if row else None

    def list(self) -> list[dict]:
        """Every key's settings and state; never the key (the store does not have it) nor its hash."""
        cols = ("key_id", "hint", "tenant", "user_tier", "admin", "gateway", "rpm", "concurrent", "budget_usd",
                "budget_window_s", "name", "created", "disabled", "rotated_to")
        rows = self._conn.execute(f"SELECT {', '.join(cols)} FROM api_keys ORDER BY created").fetchall()
        return [dict(zip(cols, row, strict=True)) for row in rows]

    def disable(self, key_id: str) -> bool:
        """Stop a key now (every replica's next lookup refuses it); False when there is no such key."""
        with self._lock:
            cur = self._conn.execute("UPDATE api_keys SET disabled = COALESCE(disabled, ?) WHERE key_id = ?",
                                     (time.time(), key_id))
        return cur.rowcount > 0

    def rotate(self, key_id: str) -> tuple[str, KeyInfo]:
        """A new key with the same tenant, tier and limits; the old one stops at once (one transaction)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT tenant, user_tier, admin, gateway, rpm, concurrent, budget_usd, budget_window_s, name "
                    "FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
                if row is None:
                    raise KeyError(key_id)
                new_id, key = new_key()
                self._conn.execute(
                    "INSERT INTO api_keys (key_id, hash, hint, tenant, user_tier, admin, gateway, rpm, concurrent, "
                    "budget_usd, budget_window_s, name, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (new_id, hash_key(key), key[-4:], *row, time.time()))
                self._conn.execute("UPDATE api_keys SET disabled = COALESCE(disabled, ?), rotated_to = ? "
                                   "WHERE key_id = ?", (time.time(), new_id, key_id))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return key, self.info(new_id)

    # ---- serving -------------------------------------------------------------------------------------------

    def lookup(self, key: str) -> KeyInfo | None:
        """The settings of a key (disabled ones included: the caller says why it is refused); None if unknown."""
        row = self._read.execute(f"SELECT {_INFO_COLUMNS} FROM api_keys WHERE hash = ?", (hash_key(key),)).fetchone()
        return _info(row) if row else None

    def url_secret(self) -> bytes:
        """The secret that signs image links: made once per store, shared by every replica that opens it."""
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO prism_secrets (name, value) VALUES ('url_signing', ?)",
                               (secrets.token_bytes(32),))
            return bytes(self._conn.execute("SELECT value FROM prism_secrets WHERE name = 'url_signing'")
                         .fetchone()[0])

    def start(self, info: KeyInfo, rid: str, hold_s: float, now: float | None = None) -> RateLimitedRefusal | None:
        """Count a render against its key's limits, or say why it may not start: one write transaction, so
        concurrent replicas cannot both take the last place. The in-flight mark expires after `hold_s` (the
        request's deadline) in case its replica dies before `finish`."""
        now = time.time() if now is None else now
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM key_hits WHERE key_id = ? AND t <= ?", (info.key_id, now - RATE_WINDOW_S))
                conn.execute("DELETE FROM key_inflight WHERE key_id = ? AND expires <= ?", (info.key_id, now))
                hits, oldest = conn.execute("SELECT COUNT(*), MIN(t) FROM key_hits WHERE key_id = ?",
                                            (info.key_id,)).fetchone()
                inflight = conn.execute("SELECT COUNT(*) FROM key_inflight WHERE key_id = ?",
                                        (info.key_id,)).fetchone()[0]
                spent = 0.0
                if info.budget_usd is not None:
                    spent = conn.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM renders WHERE key_id = ? AND "
                                         "created >= ?", (info.key_id, now - info.budget_window_s)).fetchone()[0]
                refusal = limit_refusal(info, KeyUsage(hits, oldest, inflight, spent), now)
                if refusal is None:
                    conn.execute("INSERT INTO key_hits (key_id, t) VALUES (?, ?)", (info.key_id, now))
                    conn.execute("INSERT OR REPLACE INTO key_inflight (key_id, rid, expires) VALUES (?, ?, ?)",
                                 (info.key_id, rid, now + hold_s))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return refusal

    def finish(self, key_id: str, rid: str) -> None:
        """The render is answered: its place among the key's concurrent renders is free."""
        with self._lock:
            self._conn.execute("DELETE FROM key_inflight WHERE key_id = ? AND rid = ?", (key_id, rid))


@dataclass
class Access:
    """An ingress replica's view of who may call: the mode, the key store (with records, or whenever keys are on) and
    the image links it signs. `start`/`finish` count a keyed render against its key's limits."""

    mode: str
    keys: KeyStore | None
    links: Links
    hold_s: float = 600.0  # how long a key's in-flight mark outlives a dead replica: the longest route deadline

    @classmethod
    def open(cls, spec: AuthSpec, records: RecordsSpec, has_store: bool) -> Access:
        mode = auth_mode(spec)
        keys = KeyStore(records.resolved_dir()) if mode != "off" or has_store else None
        return cls(mode, keys, Links(keys.url_secret() if keys else None, spec.url_ttl_s))

    def authenticator(self) -> Authenticator:
        return Authenticator(self.mode, self.keys.lookup if self.keys else None)

    async def start(self, caller: Caller, rid: str) -> bool:
        """Count the render against its key's limits (True: counted, `finish` it once answered), or raise its 429."""
        if not limited(caller.key):
            return False
        refusal = await asyncio.to_thread(self.keys.start, caller.key, rid, self.hold_s)
        if refusal is not None:
            raise refusal.error()
        return True

    async def finish(self, caller: Caller, rid: str) -> None:
        await asyncio.to_thread(self.keys.finish, caller.key_id, rid)


def gateway_key(directory: str | Path, tenant: str = "loadtest") -> str:
    """A new gateway key in the store at `directory`: what load generators and benchmarks send, so the user tier in
    their bodies is honoured as a gateway's would be (a mixed free/enterprise spike)."""
    store = KeyStore(directory)
    try:
        return store.create(tenant, "free", gateway=True, name="load generator")[0]
    finally:
        store.close()


def limited(info: KeyInfo | None) -> bool:
    """Does this key's render need counting (any limit set)?"""
    return info is not None and (info.rpm is not None or info.concurrent is not None or info.budget_usd is not None)


def check_settings(tenant: str, user_tier: str, rpm: int | None, concurrent: int | None, budget_usd: float | None,
                   budget_window_s: float) -> None:
    """A key's settings, each checked and named (the CLI prints the message)."""
    if not tenant or len(tenant) > 64 or not tenant.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"--tenant must be 1-64 letters, digits, '-', '_' or '.' but is {tenant!r}")
    if tenant == ANONYMOUS:
        raise ValueError(f"--tenant {ANONYMOUS!r} is reserved for requests without a key")
    if user_tier not in USER_TIERS:
        raise ValueError(f"--tier must be one of {list(USER_TIERS)} but is {user_tier!r}")
    for flag, value in (("--rpm", rpm), ("--concurrent", concurrent)):
        if value is not None and not 1 <= value <= 1_000_000:
            raise ValueError(f"{flag} must be between 1 and 1000000 but is {value}")
    if budget_usd is not None and not budget_usd >= 0:
        raise ValueError(f"--budget-usd must be >= 0 but is {budget_usd}")
    if not 60 <= budget_window_s <= 31 * 86_400:
        raise ValueError(f"--budget-window-s must be between 60 and {31 * 86_400} but is {budget_window_s}")


# ---- the CLI --------------------------------------------------------------------------------------------------

def store_dir(args: argparse.Namespace) -> Path:
    """The store the server uses: --dir, else the records dir of --config's app, else $PRISM_RECORDS_DIR or the
    default profile's `.prism/renders` (resolved as the server resolves it)."""
    if args.dir:
        return Path(args.dir)
    spec = RecordsSpec()
    if args.config:
        from graph.config import load_serve_config, prism_app

        spec = RecordsSpec.model_validate(prism_app(load_serve_config(args.config), args.app)["args"].get("records")
                                          or {})
    return spec.resolved_dir()


def _show(info: KeyInfo) -> str:
    flags = [f for f, on in (("admin", info.admin), ("gateway", info.gateway)) if on]
    limits = [f"{name}={v}" for name, v in (("rpm", info.rpm), ("concurrent", info.concurrent),
                                             ("budget_usd", info.budget_usd)) if v is not None]
    return (f"key {info.key_id}: tenant {info.tenant}, tier {info.user_tier}"
            + (f", {' '.join(flags)}" if flags else "") + (f", {' '.join(limits)}" if limits else ""))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m graph.keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="the records directory (default: as the server resolves it)")
    parser.add_argument("--config", help="a serve config whose app's records dir to use, e.g. serve_config.gpu.yaml")
    parser.add_argument("--app", default="prism", help="the application in --config (default prism)")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="make a key; prints it once, as the last line")
    create.add_argument("--tenant", required=True, help="the user or team whose renders the key sees")
    create.add_argument("--tier", required=True, choices=USER_TIERS, help="the user tier its requests get")
    create.add_argument("--admin", action="store_true", help="sees every tenant; may call the operator routes")
    create.add_argument("--gateway", action="store_true", help="a gateway in front of Prism: the body's user_tier "
                                                               "is honoured")
    create.add_argument("--rpm", type=int, help="renders per minute (429 past it)")
    create.add_argument("--concurrent", type=int, help="renders at once (429 past it)")
    create.add_argument("--budget-usd", type=float, help="spend per budget window (429 past it)")
    create.add_argument("--budget-window-s", type=float, default=86_400.0, help="default one day")
    create.add_argument("--name", help="a label for lists")
    sub.add_parser("list", help="every key's settings (never the key)")
    for name, text in (("disable", "stop a key now"), ("rotate", "a new key with the same settings; the old one "
                                                                  "stops now; prints the new key last")):
        sub.add_parser(name, help=text).add_argument("key_id")
    return parser


def _create(store: KeyStore, args: argparse.Namespace) -> int:
    key, info = store.create(args.tenant, args.tier, admin=args.admin, gateway=args.gateway, rpm=args.rpm,
                             concurrent=args.concurrent, budget_usd=args.budget_usd,
                             budget_window_s=args.budget_window_s, name=args.name)
    print(f"created {_show(info)}. Shown once; keep it secret:")
    print(key)
    return 0


def _list(store: KeyStore, args: argparse.Namespace) -> int:
    for row in store.list():
        row["state"] = "disabled" if row["disabled"] else "active"
        for k in ("created", "disabled"):
            if row[k] is not None:
                row[k] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row[k]))
        row["hint"] = f"...{row['hint']}"
        print(" ".join(f"{k}={v}" for k, v in row.items() if v is not None))
    return 0


def _disable(store: KeyStore, args: argparse.Namespace) -> int:
    if not store.disable(args.key_id):
        raise KeyError(args.key_id)
    print(f"key {args.key_id} disabled")
    return 0


def _rotate(store: KeyStore, args: argparse.Namespace) -> int:
    key, info = store.rotate(args.key_id)
    print(f"key {args.key_id} disabled; new {_show(info)}. Shown once; keep it secret:")
    print(key)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    store = KeyStore(store_dir(args))
    try:
        return {"create": _create, "list": _list, "disable": _disable, "rotate": _rotate}[args.command](store, args)
    except ValueError as e:
        parser.error(str(e))
    except KeyError:
        print(f"no key {args.key_id!r}", file=sys.stderr)
        return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())

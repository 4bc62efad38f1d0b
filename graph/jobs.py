"""Async jobs (issue 18), the parts without Ray: the job table in the records database, what a job looks like to its
caller and when its progress is stored, the webhook signature of the Standard Webhooks specification, which webhook
targets a profile allows (SSRF), and the delivery of webhook events with their retries.

Standard Webhooks (https://www.standardwebhooks.com/, spec "Signature scheme"): headers `webhook-id`,
`webhook-timestamp` (unix seconds) and `webhook-signature` = space-separated `v1,<base64 HMAC-SHA256>` over
`<webhook-id>.<webhook-timestamp>.<raw body>`, keyed with the base64-decoded part of a `whsec_` secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx

from graph.records import BUSY_TIMEOUT_MS, ensure_schema

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
SECRET_PREFIX = "whsec_"
# Seconds before each retry of a failed delivery: quick first (a receiver restarting), then backing off to 10 min.
RETRY_DELAYS_S = (1.0, 5.0, 30.0, 120.0, 600.0)
TIMESTAMP_TOLERANCE_S = 300  # what the spec recommends a receiver accept
ENV_WEBHOOK_SECRET = "PRISM_WEBHOOK_SECRET"
PROGRESS_KEYS = ("stage", "step", "steps", "tier")  # what the store and the API keep of a progress event


# ---- what a caller sees ---------------------------------------------------------------------------------------

def wants_async(prefer: str | None) -> bool:
    """RFC 7240: `Prefer: respond-async` (among other preferences, any case)."""
    return prefer is not None and any(p.split("=")[0].strip().lower() == "respond-async"
                                      for p in prefer.split(","))


def sse(event: str, data: dict) -> bytes:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def job_view(job: dict) -> dict:
    """The job as the API shows it, but for a succeeded job's `result` (its stored answer, read by the caller)."""
    view = {"id": job["id"], "object": "image.generation.job", "status": job["status"], "created": job["created"],
            "updated": job["updated"], "progress": job.get("progress")}
    request = job.get("request") or {}
    if request.get("webhook"):
        view["webhook"] = {"url": request["webhook"], "events": request.get("webhook_events"),
                           "deliveries": job.get("deliveries", [])}
    if job["status"] == "failed":
        view["error"] = job.get("error")
    return view


def progress_of(event: dict) -> dict:
    return {k: v for k, v in event.items() if k in PROGRESS_KEYS}


def store_progress(progress: dict, last: tuple[float, str], now: float, every_s: float) -> bool:
    """Does this progress event go to the store (other replicas' listeners, a late GET)? On a stage change, on the last
    step (and any event without steps), else at most every `every_s` (`last`: when, and at what stage, it was last
    stored)."""
    last_at, last_stage = last
    return progress["stage"] != last_stage or now - last_at >= every_s or progress.get("step") == progress.get("steps")


# ---- webhook signatures ---------------------------------------------------------------------------------------

def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with {SECRET_PREFIX!r}")
    return base64.b64decode(secret[len(SECRET_PREFIX):])


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"v1,{base64.b64encode(mac).decode()}"


def verify_webhook(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """What a receiver does (the README's example): every header present, the timestamp within 5 minutes, one of
    the signatures matching in constant time."""
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, given = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not (msg_id and stamp and given and stamp.isdigit()):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > TIMESTAMP_TOLERANCE_S:
        return False
    expected = sign_webhook(secret, msg_id, int(stamp), body)
    return any(hmac.compare_digest(expected, sig) for sig in given.split())


def retry_delay(attempt: int) -> float | None:
    """Seconds to wait before delivery attempt `attempt + 1` (attempt counts from 1); None: give up."""
    return RETRY_DELAYS_S[attempt - 1] if 1 <= attempt <= len(RETRY_DELAYS_S) else None


def delivery_outcome(status: int | None, refused: bool, attempt: int) -> tuple[str, float | None]:
    """(outcome, seconds until the next attempt or None) of delivery attempt `attempt`: a 2xx is delivered, a refused
    target is not tried again, anything else is retried while the backoff lasts."""
    ok = status is not None and 200 <= status < 300
    delay = None if ok or refused else retry_delay(attempt)
    return ("delivered" if ok else "refused" if refused else "retried" if delay is not None else "failed"), delay


# ---- which targets a profile allows ---------------------------------------------------------------------------

def resolve_host(host: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})


def webhook_refusal(url: str, allow_private: bool, allow_hosts: Iterable[str] = (),
                    resolve: Callable[[str], list[str]] = resolve_host) -> str | None:
    """Why Prism will not call this URL, or None. A profile that serves on loopback may call loopback receivers;
    others refuse private, loopback, link-local and other non-public addresses (the cloud metadata service at
    169.254.169.254 first of all) unless the host is named in the allow-list. Every address the name resolves to
    is checked, and the check is repeated at delivery time (a name may be re-pointed after the request)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL with a host"
    if parts.username or parts.password:
        return "must not carry credentials"
    host = parts.hostname.lower()
    if host in {h.lower() for h in allow_hosts}:
        return None
    try:
        addresses = [ipaddress.ip_address(host)] if _is_ip(host) else [ipaddress.ip_address(a) for a in resolve(host)]
    except (OSError, ValueError):
        return f"host {host!r} does not resolve"
    for addr in addresses:
        if not addr.is_global and not allow_private:
            return (f"host {host!r} is a non-public address ({addr}); this profile calls only public receivers "
                    "(add the host to webhooks.allow_hosts to allow it)")
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# ---- the job table --------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    owner TEXT,
    heartbeat REAL NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_live ON jobs(status, heartbeat);
"""


class JobStore:
    """Jobs beside the renders (`renders.db`): every ingress replica sees every job; a job whose replica stopped
    beating is adopted by another (`adopt`), so a restart does not lose it."""

    def __init__(self, directory: str | Path):
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(Path(directory) / "renders.db", isolation_level=None, check_same_thread=False,
                                     timeout=BUSY_TIMEOUT_MS / 1000)
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        ensure_schema(self._conn)
        self._conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")

    def create(self, job_id: str, tenant: str, owner: str, body: dict, now: float | None = None) -> bool:
        """A new queued job; False when the id exists already (the same X-Request-ID sent again)."""
        now = time.time() if now is None else now
        with self._lock:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO jobs (id, tenant, status, created, updated, owner, heartbeat, body) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)", (job_id, tenant, now, now, owner, now, json.dumps(body)))
        return cur.rowcount == 1

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT id, tenant, status, created, updated, owner, cancel_requested, body "
                                     "FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        keys = ("id", "tenant", "status", "created", "updated", "owner", "cancel_requested")
        return {**json.loads(row[7]), **dict(zip(keys, row[:7], strict=True))}

    def update(self, job_id: str, status: str | None = None, now: float | None = None, **fields) -> None:
        """Merge `fields` into the job's body (progress, error, deliveries, ...), and set its status."""
        now = time.time() if now is None else now
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT body, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is not None:
                    body = {**json.loads(row[0]), **fields}
                    new = row[1] if status is None or row[1] in TERMINAL else status  # an ended job stays ended
                    self._conn.execute("UPDATE jobs SET body = ?, status = ?, updated = ? WHERE id = ?",
                                       (json.dumps(body), new, now, job_id))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def beat(self, owner: str, now: float | None = None) -> list[str]:
        """Mark this replica's live jobs as alive; the ids among them whose cancel was asked on another replica."""
        now = time.time() if now is None else now
        with self._lock:
            self._conn.execute("UPDATE jobs SET heartbeat = ? WHERE owner = ? AND status IN ('queued', 'running')",
                               (now, owner))
            rows = self._conn.execute("SELECT id FROM jobs WHERE owner = ? AND cancel_requested = 1 AND status IN "
                                      "('queued', 'running')", (owner,)).fetchall()
        return [r[0] for r in rows]

    def adopt(self, owner: str, stale_s: float, now: float | None = None) -> list[dict]:
        """Take over the live jobs whose replica has not beaten for `stale_s` (it died or was replaced)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._conn.execute(
                "UPDATE jobs SET owner = ?, heartbeat = ?, updated = ? WHERE status IN ('queued', 'running') AND "
                "heartbeat < ? RETURNING id", (owner, now, now, now - stale_s)).fetchall()
        return [job for job in (self.get(r[0]) for r in rows) if job is not None]

    def prune(self, before: float) -> int:
        """Forget ended jobs last updated before `before` (the records' retention: a job's result is its record)."""
        with self._lock:
            return self._conn.execute("DELETE FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled') AND "
                                      "updated < ?", (before,)).rowcount

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def close(self) -> None:
        self._conn.close()


# ---- delivering webhook events --------------------------------------------------------------------------------

class Webhooks:
    """A deployment's webhook deliveries: each event POSTed signed (Standard Webhooks, keyed by $PRISM_WEBHOOK_SECRET),
    retried with backoff, every attempt recorded on the job; the target is checked again at each attempt (a name may
    have been re-pointed) and redirects are not followed."""

    def __init__(self, jobs: JobStore | None, spec: dict, count: Callable[[str], None]):
        self.jobs, self.count = jobs, count  # count(outcome): the deliveries metric
        self.allow_private, self.allow_hosts = spec.get("allow_private", False), spec.get("allow_hosts") or ()
        self.http = None

    @staticmethod
    def secret_problem() -> str | None:
        if not os.environ.get(ENV_WEBHOOK_SECRET, "").startswith(SECRET_PREFIX):
            return (f"webhooks are signed with ${ENV_WEBHOOK_SECRET} (a {SECRET_PREFIX} secret), which this deployment "
                    "does not set")
        return None

    async def refusal(self, url: str) -> str | None:
        """Why this target is not called, or None (its name resolved off the event loop)."""
        return await asyncio.to_thread(webhook_refusal, url, self.allow_private, self.allow_hosts)

    async def deliver(self, jid: str, event: str, payload: dict) -> None:
        """POST one event of job `jid` (when it asked for that event), retrying until delivered or given up."""
        job = await asyncio.to_thread(self.jobs.get, jid)
        url = job["request"]["webhook"]
        if event not in (job["request"].get("webhook_events") or ["completed"]):
            return
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=10, follow_redirects=False)
        msg_id = f"msg_{jid}_{event}_{int(time.time() * 1000)}"
        body = json.dumps({**payload, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        attempt = 0
        while True:
            attempt += 1
            status, refusal = None, await self.refusal(url)
            error = refusal
            if refusal is None:
                stamp = int(time.time())
                headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(stamp),
                           "webhook-signature": sign_webhook(os.environ.get(ENV_WEBHOOK_SECRET, ""), msg_id, stamp,
                                                             body)}
                try:
                    status = (await self.http.post(url, content=body, headers=headers)).status_code
                except httpx.HTTPError as e:
                    error = type(e).__name__
            outcome, delay = delivery_outcome(status, refusal is not None, attempt)
            self.count(outcome)
            record = {"event": event, "id": msg_id, "attempt": attempt, "status": status, "error": error,
                      "outcome": outcome, "at": time.time()}
            deliveries = ((await asyncio.to_thread(self.jobs.get, jid)).get("deliveries") or []) + [record]
            await asyncio.to_thread(self.jobs.update, jid, None, deliveries=deliveries)
            if delay is None:
                return
            await asyncio.sleep(delay)

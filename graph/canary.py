"""Canary splits and automatic rollback: pure functions and a sliding-window monitor, tested without Ray.

A route may send `weight` percent of its traffic to a canary tier (a new model version). The split is sticky:
the same user (or, without a `user`, the same request id) always lands on the same side, so a user never
flips between two model versions mid-session. A canary failure falls back to the route's stable tier first,
so users are protected while the monitor counts the failure against the canary.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Rollback(BaseModel):
    """When the canary's recent outcomes breach a threshold, its weight goes to 0 (logged and exposed)."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(default=300.0, gt=0, le=86_400, description="Sliding window of canary outcomes.")
    min_samples: int = Field(default=20, ge=1, le=100_000, description="No verdict on fewer outcomes than this.")
    max_failure_rate: float | None = Field(
        default=0.2, ge=0, le=1, description="Failed checks, fallbacks, OCR misses over outcomes in the window.")
    max_p95_ms: float | None = Field(default=None, gt=0, description="p95 latency of canary renders in the window.")

    @model_validator(mode="after")
    def _some_threshold(self) -> Rollback:
        if self.max_failure_rate is None and self.max_p95_ms is None:
            raise ValueError("a rollback needs `max_failure_rate` or `max_p95_ms`")
        return self


class Canary(BaseModel):
    """The canary half of a route: `tier` takes `weight` percent of the route's traffic."""

    model_config = ConfigDict(extra="forbid")

    tier: str
    weight: float = Field(ge=0, le=100, description="Percent of the route's requests (0 = manual rollback).")
    sticky: Literal["user", "request_id"] = Field(
        default="user", description="Split key: the request's `user` (request id when absent) or the request id.")
    rollback: Rollback | None = Field(default_factory=Rollback)


def bucket(key: str, route: str) -> float:
    """A stable point in [0, 100) for (key, route): the same user always falls on the same side of a split."""
    digest = hashlib.sha256(f"{route}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def split_key(canary: Canary, user: str | None, request_id: str) -> str:
    return user if canary.sticky == "user" and user else request_id


def takes_canary(canary: Canary, weight: float, key: str, route: str) -> bool:
    """True when this key's bucket falls under the (effective) weight. Example: weight 10 -> ~10% of users."""
    return weight > 0 and bucket(key, route) < weight


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class CanaryMonitor:
    """Outcomes of one route's canary over a sliding window, and the verdict on them."""

    def __init__(self, canary: Canary):
        self.canary = canary
        self.outcomes: deque[tuple[float, bool, float]] = deque()
        self.rolled_back: dict | None = None

    def record(self, failed: bool, latency_ms: float, now: float | None = None) -> None:
        self.outcomes.append((time.time() if now is None else now, failed, latency_ms))

    def window(self, now: float | None = None) -> dict:
        """Counts over the window: samples, failures, failure rate, p95 latency."""
        now = time.time() if now is None else now
        spec = self.canary.rollback or Rollback()
        while self.outcomes and self.outcomes[0][0] < now - spec.window_s:
            self.outcomes.popleft()
        n = len(self.outcomes)
        failures = sum(1 for _, f, _ in self.outcomes if f)
        return {"samples": n, "failures": failures, "failure_rate": round(failures / n, 4) if n else None,
                "p95_ms": p95([ms for _, _, ms in self.outcomes])}

    def breach(self, now: float | None = None) -> str | None:
        """The reason to roll back now, or None (no rollback configured, too few samples, within thresholds)."""
        spec = self.canary.rollback
        if spec is None or self.rolled_back is not None:
            return None
        w = self.window(now)
        if w["samples"] < spec.min_samples:
            return None
        if spec.max_failure_rate is not None and w["failure_rate"] > spec.max_failure_rate:
            return (f"failure rate {w['failure_rate']:.2f} over the last {w['samples']} canary renders "
                    f"exceeds max_failure_rate {spec.max_failure_rate}")
        if spec.max_p95_ms is not None and w["p95_ms"] > spec.max_p95_ms:
            return (f"p95 latency {w['p95_ms']:.0f} ms over the last {w['samples']} canary renders "
                    f"exceeds max_p95_ms {spec.max_p95_ms:.0f}")
        return None

    def roll_back(self, route: str, reason: str, now: float | None = None) -> dict:
        """Set the effective weight to 0 and return the event (the caller logs it and counts it)."""
        self.rolled_back = {"route": route, "tier": self.canary.tier, "from_weight": self.canary.weight,
                            "reason": reason, "at": time.time() if now is None else now, **self.window(now)}
        return self.rolled_back

    @property
    def weight(self) -> float:
        """The weight in force: the configured one, or 0 after an automatic rollback."""
        return 0.0 if self.rolled_back is not None else self.canary.weight

    def same_canary(self, other: Canary) -> bool:
        """A policy reload that keeps tier and weight keeps this monitor (and a rollback stays in force)."""
        return (other.tier, other.weight) == (self.canary.tier, self.canary.weight)


class Canaries:
    """The policy's canary splits on one ingress replica: their monitors, and the rollbacks they made."""

    MAX_EVENTS = 50

    def __init__(self):
        self.monitors: dict[str, CanaryMonitor] = {}
        self.events: list[dict] = []

    def apply(self, routes: dict) -> None:
        """A new policy: a canary whose tier and weight did not change keeps its window (and a rollback stays in
        force); a new tier or weight starts afresh, which is how an operator re-enables a rolled-back canary."""
        kept = {}
        for name, route in routes.items():
            old = self.monitors.get(name)
            if route.canary is not None:
                kept[name] = old if old is not None and old.same_canary(route.canary) else CanaryMonitor(route.canary)
        self.monitors = kept

    def weights(self) -> dict[str, tuple[Canary, float]]:
        """route -> (its canary, the effective weight: configured, or 0 after a rollback)."""
        return {name: (m.canary, m.weight) for name, m in self.monitors.items()}

    def judge(self, route: str | None, canary: bool, failed: bool, latency_ms: float) -> dict | None:
        """Count a canary render against its route's window; the rollback event when this one breached it."""
        monitor = self.monitors.get(route or "")
        if not canary or monitor is None:
            return None
        monitor.record(failed, latency_ms)
        reason = monitor.breach()
        if reason is None:
            return None
        event = monitor.roll_back(route, reason)
        self.events = [*self.events, event][-self.MAX_EVENTS:]
        return event

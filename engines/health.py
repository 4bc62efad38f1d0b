"""Replica health for Serve's `check_health`: a real, time-bounded probe, and a gate that does not flap.

Serve calls `check_health` every `health_check_period_s`; a raise marks the replica unhealthy and the
controller replaces it. A probe that fails once (a slow moment, a busy CPU) must not cost a replica, so the
gate raises only after `threshold` consecutive failures; any success resets it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class ReplicaUnhealthy(RuntimeError):
    """Raised from check_health: Serve replaces this replica."""


@dataclass
class HealthGate:
    threshold: int = 3
    max_age_s: float = 30.0  # a real render (or probe) younger than this counts as a passing probe
    failures: int = 0
    last_ok: float = field(default_factory=time.monotonic)
    last_error: str = ""

    def fresh(self, now: float | None = None) -> bool:
        """True when a recent success makes a new probe unnecessary (keeps probes off a busy replica)."""
        return self.failures == 0 and ((now or time.monotonic()) - self.last_ok) < self.max_age_s

    def ok(self) -> None:
        self.failures, self.last_ok, self.last_error = 0, time.monotonic(), ""

    def failed(self, error: str) -> None:
        """Count one failed probe; raise ReplicaUnhealthy once `threshold` failures are consecutive."""
        self.failures += 1
        self.last_error = error
        if self.failures >= self.threshold:
            raise ReplicaUnhealthy(f"{self.failures} consecutive failed health probes; last: {error}")

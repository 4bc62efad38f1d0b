"""Load bookkeeping at the ingress and the decisions made from it: Retry-After and early shedding.

Pure functions over plain data. The ingress counts what it has in flight per tier and keeps an EWMA of each
tier's service time; from those it estimates how long new work would wait.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

MAX_RETRY_AFTER_S = 60


@dataclass
class TierLoad:
    inflight: int = 0
    ewma_s: float | None = None  # service time of one call, seconds
    completed: int = 0

    @contextmanager
    def track(self):
        """Count a call in flight for its duration; a call that returns (not raises) feeds the EWMA."""
        self.inflight += 1
        t = time.perf_counter()
        try:
            yield
            self.observe(time.perf_counter() - t)
        finally:
            self.inflight -= 1

    def snapshot(self) -> dict:
        return {"inflight": self.inflight, "ewma_ms": None if self.ewma_s is None else self.ewma_s * 1000,
                "completed": self.completed}

    def observe(self, seconds: float, alpha: float = 0.2) -> None:
        """Fold one finished call's duration into the EWMA."""
        self.completed += 1
        self.ewma_s = seconds if self.ewma_s is None else (1 - alpha) * self.ewma_s + alpha * seconds


def expected_wait_s(load: TierLoad, parallel: int) -> float:
    """Time until a new call on this tier finishes: the calls ahead drain `parallel` at a time, then ours.

    Example: EWMA 2 s, 6 in flight, 4 served together -> ceil(6 / 4) = 2 rounds ahead + ours = 6 s.
    """
    if load.ewma_s is None:
        return 0.0
    rounds_ahead = math.ceil(load.inflight / max(1, parallel))
    return load.ewma_s * (rounds_ahead + 1)


def retry_after_s(load: TierLoad, parallel: int) -> int:
    """Whole seconds a rejected client should wait: until what is in flight has drained (1-60 s)."""
    wait = expected_wait_s(load, parallel) - (load.ewma_s or 0.0)
    return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait))))


def should_shed(load: TierLoad, parallel: int, remaining_s: float) -> bool:
    """True when the tier cannot finish a new call before the request's deadline (needs a measured EWMA)."""
    return load.ewma_s is not None and load.inflight > 0 and expected_wait_s(load, parallel) > remaining_s

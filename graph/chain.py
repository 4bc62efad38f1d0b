"""The fallback chain of one request: which tier to try next, with what guidance, within the retry budget; what
an attempt costs; and the error when the whole chain failed. Pure functions and a small state object, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from graph.cost import attempt_cost
from graph.errors import CapacityError, GenerationFailed, PrismError
from graph.schemas import Fallback, RouteDecision
from graph.trace import CAPACITY_REASONS

# Reasons a generator attempt fails that a lower guidance may cure (artefacts, not infrastructure).
GUIDANCE_CURABLE = ("nan", "blank")


@dataclass
class ChainWalk:
    """Where a request is on its route's chain: the tier and guidance to try now, and what was tried.

    Example: chain [typography, standard], factor 0.5, a NaN on typography at guidance 3.0 -> typography again at
    1.5; a second NaN -> standard at the request's own guidance; a replica death -> the same tier once more (when
    the tier has no live replica left: the next live tier at once, or, on the chain's last tier, a live tier before
    it that admission skipped because it was full).
    """

    tiers: list[str]
    budget: int
    factor: float | None = None
    guidance: float | None = None  # None: the tier's default
    base_guidance: float | None = None
    index: int = 0
    lowered: bool = False
    died: set[str] = field(default_factory=set)
    failed_on: set[str] = field(default_factory=set)  # tiers whose model failed an attempt (not a replica death)
    attempts: int = 0

    @classmethod
    def of(cls, decision: RouteDecision, guidance: float | None) -> ChainWalk:
        tiers = [decision.tier, *decision.fallbacks]
        budget = decision.max_attempts or len(tiers) * (2 if decision.retry_guidance_factor else 1)
        return cls(tiers=tiers, budget=budget, factor=decision.retry_guidance_factor, guidance=guidance,
                   base_guidance=guidance)

    @property
    def tier(self) -> str | None:
        """The tier to try now, or None when the chain or its budget is spent."""
        return self.tiers[self.index] if self.index < len(self.tiers) and self.attempts < self.budget else None

    def failed(self, reason: str, tier_guidance: float, alive: Callable[[str], bool] | None = None) -> None:
        """Move on after a failed attempt on the current tier (whose default guidance is `tier_guidance`; `alive`:
        whether a tier has a live replica, every tier when not given)."""
        tier = self.tiers[self.index]
        if reason == "replica_died" and tier not in self.died:
            # The dead replica returned nothing: the render runs once more, outside the retry budget (the model did
            # not fail), on a live replica of the same tier; with none left, on another live tier now rather than
            # waiting out a replacement's start past the deadline (a 504). A second death counts as a failure.
            self.died.add(tier)
            if alive is not None and not alive(tier) and (i := self._live_elsewhere(alive)) != self.index:
                self.index, self.guidance, self.lowered = i, self.base_guidance, False
            return
        self.attempts += 1
        self.failed_on.add(tier)
        if reason in GUIDANCE_CURABLE and self.factor and not self.lowered:
            base = self.guidance if self.guidance is not None else tier_guidance
            self.guidance, self.lowered = round(base * self.factor, 3), True
            return
        self.index, self.guidance, self.lowered = self.index + 1, self.base_guidance, False

    def _live_elsewhere(self, alive: Callable[[str], bool]) -> int:
        """The next live tier down the chain; past its end, the first live one before it whose model has not failed
        (a render admitted on a fallback because its own tier was full); none: this tier, to wait for a replacement.
        """
        for i in [*range(self.index + 1, len(self.tiers)), *range(self.index)]:
            t = self.tiers[i]
            if alive(t) and t not in self.died and t not in self.failed_on:
                return i
        return self.index


def result_cost(cost: dict, images: int, compute_s: float, failed: bool, extra: dict) -> float:
    """One attempt's cost from the tier's price sheet and the replica's answer. A per-image fee is charged only for
    images that came back (a hosted API bills no refused or failed call), at the price the provider reported where
    it did; compute is charged either way, on the GPU share the replica holds unless the sheet names one."""
    fraction = cost.get("gpu_fraction")
    fraction = extra.get("gpu_fraction", 0.0) if fraction is None else fraction
    return attempt_cost(cost, 0 if failed else images, compute_s, fraction, extra.get("usd_reported", 0.0),
                        extra.get("images_reported", 0))


def chain_failed(route: str, fallbacks: list[Fallback], retry_after: dict[str, float], status: int = 503) -> PrismError:
    """The error when every attempt failed: 503/429 + Retry-After when each failure was for capacity (come back
    later, when the soonest tier tried should be free), else 502 naming every attempt."""
    reasons = "; ".join(f"{f.model}: {f.reason}" for f in fallbacks)
    details = [f.model_dump() for f in fallbacks]
    if fallbacks and all(f.reason in CAPACITY_REASONS for f in fallbacks):
        wait = min((retry_after.get(f.tier or "", 1.0) for f in fallbacks), default=1.0)
        err = CapacityError(f"every model on route {route!r} is at capacity ({reasons})",
                            retry_after_s=max(1, math.ceil(wait)), details=details)
        err.status_code = status
        return err
    return GenerationFailed(f"every model on route {route!r} failed ({reasons})", details=details)

"""Cost per render (a pure function of the tier's price sheet and the compute it used) and spend per user tier."""

from __future__ import annotations

import time
from collections import defaultdict


def render_cost(usd_per_image: float, usd_per_second: float, n_images: int, compute_s: float, *,
                usd_per_gpu_hour: float = 0.0, gpu_fraction: float = 0.0) -> float:
    """Price = per-image fee x images (remote tiers) + gpu_fraction x GPU seconds x price per GPU hour / 3600
    (self-hosted tiers) + a flat replica price per second of compute (CPU tiers).

    Example: a quarter of a $4/h GPU for 1.8 s costs 0.25 x 1.8 x 4 / 3600 = $0.0005; a remote tier at
    $0.04 per image for 2 images costs $0.08 whatever its latency.
    """
    seconds = max(compute_s, 0.0)
    return round(usd_per_image * n_images + gpu_fraction * seconds * usd_per_gpu_hour / 3600
                 + usd_per_second * seconds, 8)


class SpendLedger:
    """Spend per user tier in one-minute buckets, summed over a rolling window (budgets, `/v1/stats`).

    Per ingress replica; seeded from the render records when the replica starts, so a restart does not reset
    a budget. With several ingress replicas each sees its own traffic plus what the records held at its start.
    """

    def __init__(self):
        self.buckets: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, user_tier: str, usd: float, now: float | None = None) -> None:
        if usd > 0:
            self.buckets[user_tier][int((time.time() if now is None else now) // 60)] += usd

    def spent(self, user_tier: str, window_s: float, now: float | None = None) -> float:
        """USD spent by this user tier in the last window_s seconds (minute resolution)."""
        now = time.time() if now is None else now
        oldest = int((now - window_s) // 60)
        buckets = self.buckets.get(user_tier, {})
        for minute in [m for m in buckets if m < oldest - 60 * 24 * 31]:
            del buckets[minute]  # older than any window a budget may set
        return round(sum(v for m, v in buckets.items() if m > oldest), 8)

    def totals(self) -> dict[str, float]:
        return {tier: round(sum(b.values()), 8) for tier, b in self.buckets.items()}

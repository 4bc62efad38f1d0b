"""Cost per render (a pure function of the tier's price sheet and the compute it used) and spend per user tier."""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

MTOK = 1_000_000


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


class TokenPrices(BaseModel):
    """A token-priced hosted model's rates in USD per million tokens, as its provider lists them."""

    model_config = ConfigDict(extra="forbid")

    text_input: float = Field(ge=0, description="Prompt text tokens.")
    image_input: float = Field(default=0.0, ge=0, description="Input image tokens (edits, references).")
    image_output: float = Field(gt=0, description="Generated image tokens: what a render mostly costs.")
    text_output: float | None = Field(
        default=None, ge=0, description="Output text (and reasoning) tokens; unset: charged at `image_output`, "
                                        "the highest rate, so a render is never under-charged.")


@dataclass(frozen=True)
class TokenUsage:
    """What one provider call says it used (OpenAI's `usage`, Gemini's `usageMetadata`), split by modality."""

    text_input: int = 0
    image_input: int = 0
    text_output: int = 0
    image_output: int = 0


def usage_cost(usage: TokenUsage, prices: TokenPrices) -> float:
    """USD for one call's reported usage. Example: 20 prompt tokens at $5/M + 7024 image tokens at $30/M =
    0.0001 + 0.21072 = $0.21082."""
    text_out = prices.image_output if prices.text_output is None else prices.text_output
    usd = (usage.text_input * prices.text_input + usage.image_input * prices.image_input
           + usage.text_output * text_out + usage.image_output * prices.image_output) / MTOK
    return round(usd, 8)


def attempt_cost(cost: dict, n_images: int, compute_s: float, gpu_fraction: float = 0.0,
                 usd_reported: float = 0.0, images_reported: int = 0) -> float:
    """One attempt's cost from its tier's price sheet (a CostSpec as a dict): what the provider said the images cost
    where it said so, the list price for the rest, plus compute. Example: 2 images, one priced by the response at
    $0.2108 and one not -> 0.2108 + 1 x usd_per_image."""
    listed = max(n_images - images_reported, 0)
    return round(usd_reported + render_cost(cost.get("usd_per_image", 0.0), cost.get("usd_per_second", 0.0), listed,
                                            compute_s, usd_per_gpu_hour=cost.get("usd_per_gpu_hour", 0.0),
                                            gpu_fraction=gpu_fraction), 8)


PRICE_FIELDS = ("usd_per_image", "tokens", "checked", "source")


def price_card(cost: dict | None) -> dict | None:
    """A hosted tier's price as /v1/models shows it: per-image list price, token rates, when and where it was
    checked. None for tiers priced by compute (self-hosted)."""
    if not cost or not (cost.get("usd_per_image") or cost.get("tokens")):
        return None
    card = {k: cost.get(k) for k in PRICE_FIELDS if cost.get(k) is not None}
    if "checked" in card:
        card["checked"] = str(card["checked"])
    return card


def model_price(name: str, tier_specs: dict, policy) -> dict:
    """{"price": {...}} for a /v1/models id (a tier, a route or a model alias) whose tier has a list price; {} else."""
    target = policy.model_aliases.get(name, name)
    tier = policy.routes[target].tier if target in policy.routes else target
    card = price_card((tier_specs.get(tier) or {}).get("cost"))
    return {"price": {"tier": tier, **card}} if card else {}


class SpendLedger:
    """Spend per user tier in one-minute buckets, summed over a rolling window (budgets, `/v1/stats`).

    Per ingress replica: what budgets use when records are disabled (with records, StoreSpend), and this
    replica's own totals in /v1/stats.
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

    async def freshen(self, windows: set[float]) -> None:
        """Nothing to re-read: this replica's own charges are always current."""


class StoreSpend:
    """Budget spend across every ingress replica that writes to one render store (the GPU and hybrid profiles run
    two): the store's sum per user tier over each budget window, re-read at most every `refresh_s`, plus what this
    replica charged since that read began. Another replica's spend shows up within `refresh_s`; a restarted replica
    starts from the records, not from zero.

    Without a store (records disabled) use SpendLedger: each replica then sees only its own traffic.
    """

    def __init__(self, store, refresh_s: float = 1.0):
        self.store, self.refresh_s = store, refresh_s
        self._sums: dict[float, dict[str, float]] = {}  # window_s -> user tier -> USD, as of the last read
        self._read_at = -math.inf  # monotonic
        self._local: list[tuple[float, str, float]] = []  # (wall time, user tier, USD) charged here since the read
        self._reading: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        """The store's sums were read at least once."""
        return self._read_at > -math.inf

    def add(self, user_tier: str, usd: float) -> None:
        """A render this replica charged (its record already committed to the store)."""
        if usd > 0:
            self._local.append((time.time(), user_tier, usd))

    def spent(self, user_tier: str, window_s: float) -> float:
        """USD spent by this user tier in the last window_s seconds, as of the last read plus local charges since."""
        base = self._sums.get(window_s, {}).get(user_tier, 0.0)
        return round(base + sum(usd for _, tier, usd in self._local if tier == user_tier), 8)

    async def freshen(self, windows: set[float]) -> None:
        """Before a budget decision: re-read in the background, awaited only when the store was never read (a
        restarted replica must not decide from zero)."""
        refresh = asyncio.ensure_future(self.refresh(windows))
        refresh.add_done_callback(lambda f: f.cancelled() or f.exception())
        if not self.ready:
            await asyncio.shield(refresh)

    async def refresh(self, windows: set[float]) -> None:
        """Re-read the store's sums when the last read is older than refresh_s or lacks a window (one read at a
        time: a caller joins the read in flight, and starts another if that one was for other windows)."""
        while time.monotonic() - self._read_at >= self.refresh_s or not windows <= set(self._sums):
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(self._read(sorted(windows)))
            await asyncio.shield(self._reading)

    async def _read(self, windows: list[float]) -> None:
        started = time.time()
        # A charge is added after its record commits, so every charge made before the read began is in the sums;
        # charges from then on stay local (counted twice until the next read at worst: never under-counted).
        sums = await asyncio.to_thread(lambda: {w: self.store.cost_by_user_tier(started - w) for w in windows})
        self._sums, self._read_at = sums, time.monotonic()
        self._local = [entry for entry in self._local if entry[0] >= started]

"""RoutingPolicy: ordered rules from YAML -> a route (tier + params + fallbacks + latency budget).

Pure Python and pure functions over plain data, so every decision is unit-tested without Ray.
The policy arrives as the ingress's `user_config` and is swapped atomically by `reconfigure()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graph.admission import AdmissionPolicy
from graph.canary import Canary, takes_canary
from graph.errors import BudgetExceeded
from graph.schemas import INTENTS, Intent, Quality, RouteDecision, UserTier


class Match(BaseModel):
    """Conditions of one rule; all given conditions must hold (an empty match always holds)."""

    model_config = ConfigDict(extra="forbid")

    intents: list[Intent] | None = None
    keywords: list[str] | None = Field(default=None, description="Any of these words in the prompt (case-insensitive).")
    regex: str | None = Field(default=None, description="Python regex searched in the prompt (case-insensitive).")
    user_tiers: list[UserTier] | None = None
    quality: list[Quality] | None = None
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    min_inflight: int | None = Field(default=None, ge=0, description="Holds when in-flight requests >= this.")
    has_text: bool | None = Field(default=None, description="Request carries text to render (field or extracted).")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"`regex` {v!r} does not compile: {e}") from e
        return v


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    match: Match = Field(default_factory=Match)
    route: str


class Brownout(BaseModel):
    """Past this load on the route's tier, degrade to another route instead of rejecting (seed 000)."""

    model_config = ConfigDict(extra="forbid")

    max_inflight: int = Field(ge=1, description="Requests in flight on the route's tier at which to degrade.")
    route: str = Field(description="The (cheaper) route to degrade to.")


class Route(BaseModel):
    """What a matched rule sends the request to."""

    model_config = ConfigDict(extra="forbid")

    tier: str
    steps: int | None = Field(default=None, ge=1, le=200, description="Override the tier's default steps.")
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)
    fallbacks: list[str] = Field(default_factory=list, description="Ordered tiers to try when this one fails.")
    max_latency_ms: int = Field(default=60_000, ge=100, le=600_000, description="The request's total deadline.")
    attempt_timeout_ms: int | None = Field(default=None, ge=100, le=600_000,
                                           description="Stage deadline per model attempt; past it, the next model.")
    max_attempts: int | None = Field(default=None, ge=1, le=20,
                                     description="Retry budget: generator attempts on this route, all models together.")
    retry_guidance_factor: float | None = Field(
        default=None, gt=0, lt=1, description="On a failed check, retry the same model once with guidance x this "
                                              "before switching model (typography: high CFG artefacts).")
    brownout: Brownout | None = None
    canary: Canary | None = Field(default=None, description="Send a share of this route to another tier.")


class Budget(BaseModel):
    """A user tier's spend limit over a rolling window, and what happens past it."""

    model_config = ConfigDict(extra="forbid")

    usd: float = Field(gt=0, description="Spend allowed per window (sum of cost_usd of its renders).")
    window_s: float = Field(default=86_400, ge=60, le=31 * 86_400, description="Rolling window (default a day).")
    action: Literal["downgrade", "reject"] = Field(
        default="downgrade", description="downgrade: serve through `route` (cheaper); reject: 429 + Retry-After.")
    route: str | None = Field(default=None, description="The cheaper route for action downgrade.")


class PolicyConfig(BaseModel):
    """The routing YAML (the ingress's user_config `routing:` block)."""

    model_config = ConfigDict(extra="forbid")

    version: str = "1"
    default_route: str
    routes: dict[str, Route]
    rules: list[Rule] = Field(default_factory=list)
    model_aliases: dict[str, str] = Field(
        default_factory=dict, description="OpenAI model names (e.g. dall-e-3) -> a Prism route or tier.")
    budgets: dict[UserTier, Budget] = Field(default_factory=dict, description="Spend limits per user tier.")
    admission: AdmissionPolicy = Field(default_factory=AdmissionPolicy,
                                       description="Who is let in when the tiers are full (graph/admission.py).")

    @model_validator(mode="after")
    def _references_resolve(self) -> PolicyConfig:
        for tier, budget in self.budgets.items():
            if budget.action == "downgrade" and budget.route not in self.routes:
                raise ValueError(f"budget for {tier!r} downgrades to route {budget.route!r}, not one of "
                                 f"{sorted(self.routes)}")
        if self.default_route not in self.routes:
            raise ValueError(f"`default_route` {self.default_route!r} is not one of routes {sorted(self.routes)}")
        for name, route in self.routes.items():
            if route.brownout and route.brownout.route not in self.routes:
                raise ValueError(f"route {name!r} browns out to {route.brownout.route!r}, not one of "
                                 f"{sorted(self.routes)}")
            if route.brownout and route.brownout.route == name:
                raise ValueError(f"route {name!r} cannot brown out to itself")
        names = set()
        for rule in self.rules:
            if rule.route not in self.routes:
                raise ValueError(f"rule {rule.name!r} names route {rule.route!r}, not one of {sorted(self.routes)}")
            if rule.name in names:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            names.add(rule.name)
        return self

    def check_tiers(self, tiers: set[str]) -> None:
        """Raise ValueError when a route or alias names a tier the app does not deploy."""
        for name, route in self.routes.items():
            for t in [route.tier, *route.fallbacks, *([route.canary.tier] if route.canary else [])]:
                if t not in tiers:
                    raise ValueError(f"route {name!r} names tier {t!r}, not one of the deployed tiers {sorted(tiers)}")
        for alias, target in self.model_aliases.items():
            if target not in self.routes and target not in tiers:
                raise ValueError(f"model alias {alias!r} -> {target!r} is neither a route nor a tier")


def load_policy(raw: dict, tiers: set[str] | None = None) -> PolicyConfig:
    """Validate a raw routing dict; raises ValueError with every problem named."""
    try:
        policy = PolicyConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'routing'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"invalid routing policy: {problems}") from None
    if tiers is not None:
        try:
            policy.check_tiers(tiers)
        except ValueError as e:
            raise ValueError(f"invalid routing policy: {e}") from None
    return policy


@dataclass(frozen=True)
class Features:
    """What a decision looks at: plain values extracted from the request and the intent stage."""

    prompt: str
    intent: str | None  # None: the intent stage was unavailable; rules that name intents do not match
    confidence: float
    user_tier: str = "free"
    quality: str = "standard"
    has_text: bool = False
    inflight: int = 0


def rule_matches(m: Match, f: Features) -> bool:
    """True when every condition that the match sets holds for these features."""
    prompt = f.prompt.lower()
    checks = (
        m.intents is None or f.intent in m.intents,
        m.keywords is None or any(re.search(rf"\b{re.escape(k.lower())}\b", prompt) for k in m.keywords),
        m.regex is None or re.search(m.regex, f.prompt, re.IGNORECASE) is not None,
        m.user_tiers is None or f.user_tier in m.user_tiers,
        m.quality is None or f.quality in m.quality,
        m.min_confidence is None or f.confidence >= m.min_confidence,
        m.min_inflight is None or f.inflight >= m.min_inflight,
        m.has_text is None or f.has_text == m.has_text,
    )
    return all(checks)


def decide(policy: PolicyConfig, f: Features, forced: str | None = None) -> RouteDecision:
    """First matching rule wins; `forced` (a route or tier name) bypasses the rules.

    Example: with rules [typography->typography, hero+pro->premium] and a pro user's hero prompt,
    the first rule does not match (intent is hero), the second does: route premium.
    """
    if forced is not None:
        if forced in policy.routes:
            return _decision(policy, forced, rule="forced:model", reason=f"`model` named route {forced!r}")
        # A tier name: its own route-less decision, falling back along the default route's chain.
        base = policy.routes[policy.default_route]
        chain = [t for t in [*base.fallbacks] if t != forced]
        return RouteDecision(route=f"tier:{forced}", tier=forced, rule="forced:model", fallbacks=chain,
                             max_latency_ms=base.max_latency_ms, attempt_timeout_ms=base.attempt_timeout_ms,
                             max_attempts=base.max_attempts, reason=f"`model` named tier {forced!r}")
    for rule in policy.rules:
        if rule_matches(rule.match, f):
            d = _decision(policy, rule.route, rule=rule.name, reason=f"rule {rule.name!r} matched")
            # A rule that fires on load is itself a brownout: say so in the response.
            d.degraded = rule.match.min_inflight is not None
            return d
    return _decision(policy, policy.default_route, rule="default", reason="no rule matched")


def apply_brownout(policy: PolicyConfig, d: RouteDecision, tier_inflight: dict[str, int]) -> RouteDecision:
    """Degrade a decision whose route's tier is past its brownout load; otherwise return it unchanged.

    Example: premium browns out to fast at 4 in flight; with premium at 4, a hero request goes to fast,
    marked degraded, keeping the rule that matched it for the record.
    """
    route = policy.routes.get(d.route)
    if route is None or route.brownout is None:
        return d
    load = tier_inflight.get(route.tier, 0)
    if load < route.brownout.max_inflight:
        return d
    out = _decision(policy, route.brownout.route, rule=d.rule,
                    reason=f"{d.reason}; browned out: tier {route.tier!r} has {load} in flight "
                           f"(limit {route.brownout.max_inflight})")
    out.degraded = True
    return out


def apply_budget(policy: PolicyConfig, d: RouteDecision, user_tier: str, spent: float) -> tuple[RouteDecision, str]:
    """Past its user tier's budget a request is downgraded to the budget's route (marked degraded) or refused
    (BudgetExceeded, 429). Returns (decision, note for the response; "" when under budget).

    Example: free tier, budget $1/day downgrade to fast, $1.20 spent: a premium decision becomes route fast.
    """
    budget = policy.budgets.get(user_tier)
    if budget is None or spent < budget.usd:
        return d, ""
    over = (f"user tier {user_tier!r} spent ${spent:.4f} of its ${budget.usd:g} budget per "
            f"{budget.window_s / 3600:g} h")
    if budget.action == "reject":
        raise BudgetExceeded(f"{over}; requests are refused until spend falls below the budget", param="user_tier",
                             retry_after_s=60)
    if d.route == budget.route:
        return d, f"{over}; already on route {budget.route!r}"
    out = _decision(policy, budget.route, rule=d.rule, reason=f"{d.reason}; over budget")
    out.degraded = True
    return out, f"{over}; served by the cheaper route {budget.route!r}"


def apply_canary(policy: PolicyConfig, d: RouteDecision, weight: float, key: str) -> RouteDecision:
    """Send this decision to its route's canary tier when the sticky key falls under `weight` (the effective
    weight: the configured one, or 0 after a rollback). The stable tier becomes the first fallback.

    Example: route standard {tier: standard, canary: {tier: standard_v2, weight: 10}, fallbacks: [fast]}: a
    user in the lowest 10% of buckets gets tier standard_v2 with fallbacks [standard, fast].
    """
    route = policy.routes.get(d.route)
    if route is None or route.canary is None or d.degraded or d.tier != route.tier:
        return d
    if not takes_canary(route.canary, weight, key, d.route):
        return d
    chain = [t for t in [route.tier, *d.fallbacks] if t != route.canary.tier]
    return d.model_copy(update={"tier": route.canary.tier, "fallbacks": list(dict.fromkeys(chain)), "canary": True,
                                "reason": f"{d.reason}; canary {route.canary.tier!r} at {weight:g}%"})


def _decision(policy: PolicyConfig, route_name: str, *, rule: str, reason: str) -> RouteDecision:
    r = policy.routes[route_name]
    return RouteDecision(route=route_name, tier=r.tier, rule=rule, steps=r.steps, guidance=r.guidance,
                         fallbacks=[t for t in r.fallbacks if t != r.tier], max_latency_ms=r.max_latency_ms,
                         attempt_timeout_ms=r.attempt_timeout_ms, max_attempts=r.max_attempts,
                         retry_guidance_factor=r.retry_guidance_factor, reason=reason)


def resolve_model(policy: PolicyConfig, model: str | None, tiers: set[str]) -> tuple[str | None, str | None]:
    """Map the request's `model` to a forced route/tier name; returns (forced, note for the response)."""
    if not model:
        return None, None
    if model in policy.routes or model in tiers:
        return model, None
    if model in policy.model_aliases:
        target = policy.model_aliases[model]
        return target, f"model {model!r} mapped to {target!r} by model_aliases"
    return None, f"model {model!r} is not a Prism route, tier or alias; ignored (routes: {sorted(policy.routes)})"


__all__ = ["INTENTS", "Budget", "Features", "Match", "PolicyConfig", "Route", "Rule", "apply_budget", "apply_canary",
           "decide", "load_policy", "resolve_model", "rule_matches"]

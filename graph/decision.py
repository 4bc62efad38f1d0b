"""The route decision of one request, in order: rules -> (intent-unavailable degrade) -> brownout -> budget -> canary.
Pure: plain values in (policy, features, load, spend, canary weight), a decision and notes out."""

from __future__ import annotations

from dataclasses import dataclass

from graph.canary import split_key
from graph.routing import Features, PolicyConfig, apply_brownout, apply_budget, apply_canary, decide, resolve_model
from graph.schemas import RouteDecision


@dataclass(frozen=True)
class Situation:
    """What the decision reads beyond the request: load per tier, the user tier's spend, canary weights."""

    tier_inflight: dict[str, int]
    spent: float = 0.0  # the user tier's spend over its budget window (0 without a budget)
    canary_weights: dict | None = None  # route -> (Canary, effective weight)


def route_request(policy: PolicyConfig, features: Features, model: str | None, tiers: set[str], situation: Situation,
                  user: str | None, rid: str, intent_unavailable: bool = False) -> tuple[RouteDecision, list[str]]:
    """Rules, then load (brownout), then the user tier's budget (BudgetExceeded = 429), then the route's canary.

    Example: a pro user's hero prompt matches hero-paid-premium -> route premium; premium's tier has 2 in flight and
    browns out at 2 -> route fast, degraded; no budget for pro; fast has no canary -> fast, degraded.
    """
    notes = []
    forced, note = resolve_model(policy, model, tiers)
    if note:
        notes.append(note)
    decision = decide(policy, features, forced=forced)
    if intent_unavailable and not forced:
        decision.degraded = True
        notes.append(f"intent classifier unavailable: routed by rule {decision.rule!r} without an intent")
    decision = apply_brownout(policy, decision, situation.tier_inflight)
    if features.user_tier in policy.budgets:
        decision, note = apply_budget(policy, decision, features.user_tier, situation.spent)
        notes += [note] if note else []
    canary = (situation.canary_weights or {}).get(decision.route)
    if canary is not None:
        spec, weight = canary
        decision = apply_canary(policy, decision, weight, split_key(spec, user, rid))
    return decision, notes


def reachable_tiers(policy: PolicyConfig, tiers: set[str], model: str | None, user_tier: str) -> set[str]:
    """Every tier a request could be sent to before it is classified: the forced route's or tier's chain, or the
    chains of every route a rule (for this user tier) or the default could pick, with brownout, budget and canary
    targets. The door refuses only when none of them has room."""
    forced, _ = resolve_model(policy, model, tiers)
    if forced in tiers and forced not in policy.routes:
        base = policy.routes[policy.default_route]
        return {forced, *base.fallbacks}
    names = {forced} if forced else {policy.default_route} | {
        r.route for r in policy.rules if r.match.user_tiers is None or user_tier in r.match.user_tiers}
    budget = policy.budgets.get(user_tier)
    if budget is not None and budget.route:
        names.add(budget.route)
    out: set[str] = set()
    todo = list(names)
    while todo:
        route = policy.routes[todo.pop()]
        out |= {route.tier, *route.fallbacks, *([route.canary.tier] if route.canary else [])}
        if route.brownout and route.brownout.route not in names:
            names.add(route.brownout.route)
            todo.append(route.brownout.route)
    return out & tiers

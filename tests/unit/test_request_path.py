"""The request path's pure decisions, without Ray: the fallback chain walk, attempt cost, the chain-failure error, the
route decision (rules -> brownout -> budget -> canary), the tiers the door checks, the request-id claims."""

import asyncio

import pytest

from graph.chain import ChainWalk, chain_failed, result_cost
from graph.claims import Claims
from graph.decision import Situation, reachable_tiers, route_request
from graph.errors import BudgetExceeded, CapacityError, GenerationFailed
from graph.routing import Features, load_policy
from graph.schemas import Fallback, RouteDecision

POLICY = load_policy({
    "version": "t", "default_route": "standard",
    "routes": {"fast": {"tier": "fast", "fallbacks": ["standard"]},
               "standard": {"tier": "standard", "fallbacks": ["fast"]},
               "premium": {"tier": "premium", "fallbacks": ["standard", "fast"], "brownout": {"max_inflight": 1,
                                                                                           "route": "fast"}},
               "typography": {"tier": "typography", "fallbacks": ["standard"], "retry_guidance_factor": 0.5},
               "canaried": {"tier": "standard", "canary": {"tier": "premium", "weight": 100}}},
    "rules": [{"name": "text", "match": {"has_text": True}, "route": "typography"},
              {"name": "hero-paid", "match": {"intents": ["hero"], "user_tiers": ["pro", "enterprise"]},
               "route": "premium"},
              {"name": "icons", "match": {"intents": ["icon"]}, "route": "fast"}],
    "budgets": {"free": {"usd": 1.0, "route": "fast"}, "pro": {"usd": 1.0, "action": "reject"}},
}, tiers={"fast", "standard", "premium", "typography"})
TIERS = {"fast", "standard", "premium", "typography"}


def _decision(**kw) -> RouteDecision:
    return RouteDecision(**{"route": "r", "tier": "a", "rule": "x", "fallbacks": ["b"], "max_latency_ms": 1000, **kw})


# -- the chain walk ----------------------------------------------------------------------------------------------

def test_a_failed_check_moves_down_the_chain():
    walk = ChainWalk.of(_decision(), guidance=None)
    assert walk.tier == "a"
    walk.failed("nan", tier_guidance=3.0)
    assert walk.tier == "b" and walk.guidance is None
    walk.failed("error", tier_guidance=3.0)
    assert walk.tier is None  # chain spent


def test_a_replica_death_retries_the_same_tier_once():
    walk = ChainWalk.of(_decision(), guidance=None)
    walk.failed("replica_died", 3.0)
    assert walk.tier == "a"
    walk.failed("replica_died", 3.0)
    assert walk.tier == "b"


def test_a_replica_death_with_no_live_replica_left_moves_on_at_once_outside_the_budget():
    walk = ChainWalk.of(_decision(max_attempts=1), guidance=None)
    walk.failed("replica_died", 3.0, alive=lambda t: t != "a")
    assert walk.tier == "b"  # not waiting for a's replacement; the budget of one attempt is still whole
    walk.failed("replica_died", 3.0, alive=lambda t: False)
    assert walk.tier == "b"  # no live tier anywhere: wait for b's replacement, within the deadline


def test_a_death_with_no_live_replica_skips_a_next_tier_that_has_none_either():
    walk = ChainWalk.of(_decision(fallbacks=["b", "c"]), guidance=None)
    walk.failed("replica_died", 3.0, alive=lambda t: t == "c")
    assert walk.tier == "c"


def test_a_death_on_the_chains_last_tier_goes_back_to_a_live_tier_admission_skipped_as_full():
    # Admitted on the fallback b because a was full; b's only replica dies: a (full, but alive) takes the render
    # rather than the request waiting for b's replacement past its deadline.
    walk = ChainWalk.of(_decision(fallbacks=["b"], max_attempts=1), guidance=None)
    walk.index = 1
    walk.failed("replica_died", 3.0, alive=lambda t: t == "a")
    assert walk.tier == "a" and walk.attempts == 0


def test_a_death_on_the_last_tier_does_not_go_back_to_a_tier_whose_model_failed():
    walk = ChainWalk.of(_decision(fallbacks=["b"]), guidance=None)
    walk.failed("nan", 3.0)
    assert walk.tier == "b"
    walk.failed("replica_died", 3.0, alive=lambda t: t == "a")
    assert walk.tier == "b"  # a's model failed this request: wait for b's replacement instead


def test_a_death_with_nowhere_else_to_go_keeps_the_lowered_guidance_for_the_replacement():
    walk = ChainWalk.of(_decision(fallbacks=[], retry_guidance_factor=0.5), guidance=None)
    walk.failed("nan", tier_guidance=3.0)
    walk.failed("replica_died", 3.0, alive=lambda t: False)
    assert (walk.tier, walk.guidance) == ("a", 1.5)


def test_nan_lowers_guidance_on_the_same_model_before_switching():
    walk = ChainWalk.of(_decision(retry_guidance_factor=0.5), guidance=None)
    walk.failed("nan", tier_guidance=3.0)
    assert (walk.tier, walk.guidance) == ("a", 1.5)
    walk.failed("nan", tier_guidance=3.0)
    assert (walk.tier, walk.guidance) == ("b", None)


def test_the_retry_budget_stops_the_walk():
    walk = ChainWalk.of(_decision(fallbacks=["b", "c"], max_attempts=2), guidance=None)
    walk.failed("nan", 3.0)
    walk.failed("nan", 3.0)
    assert walk.tier is None


def test_attempt_cost_charges_images_only_when_they_came_back():
    cost = {"usd_per_image": 0.04, "usd_per_second": 0.001}
    assert result_cost(cost, 2, 10.0, False, {}) == pytest.approx(0.08 + 0.01)
    assert result_cost(cost, 2, 10.0, True, {}) == pytest.approx(0.01)  # a failed call bills no images
    assert result_cost({"usd_per_image": 0.2}, 2, 1.0, False, {"usd_reported": 0.15, "images_reported": 1}) \
        == pytest.approx(0.35)
    gpu = {"usd_per_gpu_hour": 3.6}
    assert result_cost(gpu, 1, 10.0, False, {"gpu_fraction": 0.5}) == pytest.approx(0.005)


def _fallback(reason: str, tier: str = "a") -> Fallback:
    return Fallback(model=f"m-{tier}", tier=tier, reason=reason, elapsed_ms=1.0)


def test_a_chain_failed_only_for_capacity_is_503_with_the_soonest_retry_after():
    err = chain_failed("r", [_fallback("overloaded", "a"), _fallback("replica_died", "b")], {"a": 9.2, "b": 2.5})
    assert isinstance(err, CapacityError) and err.status_code == 503 and err.headers["Retry-After"] == "3"
    assert chain_failed("r", [_fallback("deadline")], {}, status=429).status_code == 429


def test_a_chain_with_a_bad_model_is_502_naming_every_attempt():
    err = chain_failed("r", [_fallback("nan", "a"), _fallback("overloaded", "b")], {})
    assert isinstance(err, GenerationFailed) and err.status_code == 502
    assert "m-a: nan; m-b: overloaded" in err.message and len(err.details) == 2


# -- the route decision --------------------------------------------------------------------------------------------

def _features(**kw) -> Features:
    return Features(**{"prompt": "p", "intent": "photoreal", "confidence": 0.9, **kw})


def test_rules_then_brownout():
    calm, _ = route_request(POLICY, _features(intent="hero", user_tier="pro"), None, TIERS, Situation({}), None, "r1")
    busy, _ = route_request(POLICY, _features(intent="hero", user_tier="pro"), None, TIERS,
                            Situation({"premium": 1}), None, "r1")
    assert (calm.route, calm.degraded) == ("premium", False)
    assert (busy.route, busy.rule, busy.degraded) == ("fast", "hero-paid", True)


def test_budget_downgrades_or_refuses():
    d, notes = route_request(POLICY, _features(), None, TIERS, Situation({}, spent=1.5), None, "r1")
    assert d.route == "fast" and d.degraded and "budget" in notes[0]
    with pytest.raises(BudgetExceeded):
        route_request(POLICY, _features(user_tier="pro"), None, TIERS, Situation({}, spent=1.5), None, "r1")


def test_canary_takes_its_weight_and_keeps_the_stable_tier_first_in_the_chain():
    canary = POLICY.routes["canaried"].canary
    d, _ = route_request(POLICY, _features(), "canaried", TIERS, Situation({}, canary_weights={"canaried": (canary,
                                                                                                        100.0)}),
                         None, "r1")
    assert d.canary and d.tier == "premium" and d.fallbacks[0] == "standard"
    rolled, _ = route_request(POLICY, _features(), "canaried", TIERS,
                              Situation({}, canary_weights={"canaried": (canary, 0.0)}), None, "r1")
    assert not rolled.canary and rolled.tier == "standard"


def test_without_an_intent_the_request_is_routed_by_the_rules_that_need_none_and_degraded():
    d, notes = route_request(POLICY, _features(intent=None, has_text=True), None, TIERS, Situation({}), None, "r1",
                             intent_unavailable=True)
    assert d.route == "typography" and d.degraded and "intent classifier unavailable" in notes[0]


def test_the_door_checks_every_tier_the_request_could_reach():
    assert reachable_tiers(POLICY, TIERS, "fast", "free") == {"fast", "standard"}  # a forced route's chain
    # A free user can hit the text, icon and default rules, and the budget route; not hero-paid's premium chain.
    assert reachable_tiers(POLICY, TIERS, None, "free") == {"typography", "standard", "fast"}
    assert "premium" in reachable_tiers(POLICY, TIERS, None, "pro")
    assert reachable_tiers(POLICY, TIERS, "premium", "free") == {"premium", "standard", "fast"}


# -- request-id claims -------------------------------------------------------------------------------------------

def test_a_retry_of_an_id_in_flight_waits_for_the_one_render_then_reads_its_record():
    async def run():
        claims, records, order = Claims(), {}, []

        async def lookup():
            return records.get("id1")

        stored, claim = await claims.claim("id1", lookup)
        retry = asyncio.ensure_future(claims.claim("id1", lookup))
        await asyncio.sleep(0.01)
        assert not retry.done()  # waiting for the first
        records["id1"] = "the answer"
        order.append("committed")
        claims.release("id1", claim)
        return stored, await retry, order
    first, (again, claim2), order = asyncio.run(run())
    assert first is None and again == "the answer" and claim2 is None and order == ["committed"]

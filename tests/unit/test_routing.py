"""RoutingPolicy: pure decisions over the real profiles' policies."""

import copy

import pytest

from graph.config import ROOT, deployment_block, load_serve_config, prism_app, validate_profile
from graph.routing import Features, decide, load_policy, resolve_model

CPU = prism_app(load_serve_config(ROOT / "serve_config.yaml"))
RAW = deployment_block(CPU, "Ingress")["user_config"]["routing"]
TIERS = set(CPU["args"]["tiers"])
POLICY = load_policy(RAW, tiers=TIERS)

DECISIONS = [
    pytest.param(Features("poster", "typography", 0.9), "typography", "typography-intent", id="typography"),
    pytest.param(Features("a dog", "photoreal", 0.9, has_text=True), "typography", "exact-text", id="has_text"),
    pytest.param(Features("app icon", "icon", 0.9), "fast", "icons-backgrounds-fast", id="icon"),
    pytest.param(Features("wallpaper", "background", 0.9), "fast", "icons-backgrounds-fast", id="background"),
    pytest.param(Features("hero", "hero", 0.9, user_tier="pro"), "premium", "hero-paid-premium", id="hero_pro"),
    pytest.param(Features("hero", "hero", 0.9, user_tier="enterprise"), "premium", "hero-paid-premium",
                 id="hero_enterprise"),
    pytest.param(Features("hero", "hero", 0.9, quality="hd"), "premium", "hero-hd-premium", id="hero_hd"),
    pytest.param(Features("hero", "hero", 0.9), "standard", "default", id="hero_free_default"),
    pytest.param(Features("photo", "photoreal", 0.9), "standard", "photoreal-illustration-standard", id="photoreal"),
    pytest.param(Features("art", "illustration", 0.9), "standard", "photoreal-illustration-standard",
                 id="illustration"),
    pytest.param(Features("hero", "hero", 0.9, user_tier="pro", inflight=500), "fast", "brownout", id="brownout"),
    # The intent stage unavailable: rules naming intents do not match, the rest still do.
    pytest.param(Features("app icon", None, 0.0), "standard", "default", id="no_intent_default"),
    pytest.param(Features("a dog", None, 0.0, has_text=True), "typography", "exact-text", id="no_intent_has_text"),
    pytest.param(Features("x", None, 0.0, inflight=500), "fast", "brownout", id="no_intent_brownout"),
]


@pytest.mark.parametrize("features,route,rule", DECISIONS)
def test_default_policy_decisions(features, route, rule):
    d = decide(POLICY, features)
    assert (d.route, d.rule) == (route, rule)
    assert d.tier == POLICY.routes[route].tier
    assert d.tier not in d.fallbacks


def test_first_match_wins():
    raw = copy.deepcopy(RAW)
    raw["rules"].insert(0, {"name": "all-premium", "match": {}, "route": "premium"})
    assert decide(load_policy(raw, TIERS), Features("icon", "icon", 0.9)).route == "premium"


MATCHERS = [
    pytest.param({"keywords": ["logo"]}, Features("a Logo for acme", "icon", 0.9), True, id="keyword_word"),
    pytest.param({"keywords": ["logo"]}, Features("logotype", "icon", 0.9), False, id="keyword_not_substring"),
    pytest.param({"regex": r"\b4k\b"}, Features("a 4K wallpaper", "background", 0.9), True, id="regex"),
    pytest.param({"min_confidence": 0.8}, Features("x", "icon", 0.5), False, id="low_confidence"),
    pytest.param({"intents": ["hero"], "user_tiers": ["pro"]}, Features("x", "hero", 1, user_tier="free"), False,
                 id="all_conditions"),
]


@pytest.mark.parametrize("match,features,expected", MATCHERS)
def test_matchers(match, features, expected):
    raw = {"default_route": "standard", "routes": RAW["routes"], "rules": [{"name": "r", "match": match,
                                                                             "route": "premium"}]}
    assert (decide(load_policy(raw, TIERS), features).rule == "r") is expected


INVALID = [
    pytest.param({"default_route": "nope"}, "default_route", id="unknown_default"),
    pytest.param({"rules": [{"name": "x", "match": {}, "route": "nope"}]}, "names route 'nope'", id="unknown_route"),
    pytest.param({"rules": [{"name": "x", "match": {"intents": ["video"]}, "route": "fast"}]}, "intents",
                 id="bad_intent"),
    pytest.param({"rules": [{"name": "x", "match": {"regex": "("}, "route": "fast"}]}, "does not compile",
                 id="bad_regex"),
    pytest.param({"routes": {**RAW["routes"], "x": {"tier": "gpu9"}}}, "tier 'gpu9'", id="unknown_tier"),
    pytest.param({"rules": [{"name": "x", "match": {"colour": "red"}, "route": "fast"}]}, "colour",
                 id="unknown_field"),
]


@pytest.mark.parametrize("patch,fragment", INVALID)
def test_invalid_policy_is_rejected_with_its_problem_named(patch, fragment):
    raw = {**copy.deepcopy(RAW), **patch}
    with pytest.raises(ValueError, match="invalid routing policy") as e:
        load_policy(raw, TIERS)
    assert fragment in str(e.value)


MODELS = [
    pytest.param("fast", "fast", None, id="tier_or_route"),
    pytest.param("dall-e-3", "premium", "mapped", id="alias"),
    pytest.param("midjourney", None, "ignored", id="unknown"),
    pytest.param(None, None, None, id="none"),
]


@pytest.mark.parametrize("model,forced,note", MODELS)
def test_resolve_model(model, forced, note):
    got, got_note = resolve_model(POLICY, model, TIERS)
    assert got == forced
    assert (note is None and got_note is None) or note in got_note


def test_forced_tier_keeps_a_fallback_chain():
    d = decide(POLICY, Features("x", "icon", 0.9), forced="premium")
    assert d.rule == "forced:model" and d.tier == "premium"


@pytest.mark.parametrize("profile", ["serve_config.yaml", "serve_config.gpu.yaml", "serve_config.sim.yaml"])
def test_profiles_are_valid(profile):
    assert validate_profile(ROOT / profile) == []


def _with_brownout(max_inflight=2):
    raw = copy.deepcopy(RAW)
    raw["routes"]["premium"]["brownout"] = {"max_inflight": max_inflight, "route": "fast"}
    return load_policy(raw, TIERS)


BROWNOUT = [
    pytest.param({"premium": 1}, "premium", False, id="below_limit"),
    pytest.param({"premium": 2}, "fast", True, id="at_limit"),
    pytest.param({"fast": 99}, "premium", False, id="other_tier_busy"),
]


@pytest.mark.parametrize("inflight,route,degraded", BROWNOUT)
def test_brownout_degrades_premium_past_its_load(inflight, route, degraded):
    from graph.routing import apply_brownout

    policy = _with_brownout()
    d = apply_brownout(policy, decide(policy, Features("hero", "hero", 0.9, user_tier="pro")), inflight)
    assert (d.route, d.degraded, d.rule) == (route, degraded, "hero-paid-premium")


def test_load_rule_marks_degraded():
    assert decide(POLICY, Features("hero", "hero", 0.9, inflight=500)).degraded is True
    assert decide(POLICY, Features("hero", "hero", 0.9)).degraded is False


def test_brownout_to_unknown_route_is_rejected():
    raw = copy.deepcopy(RAW)
    raw["routes"]["premium"]["brownout"] = {"max_inflight": 2, "route": "nowhere"}
    with pytest.raises(ValueError, match="browns out to 'nowhere'"):
        load_policy(raw, TIERS)

"""Canary split, sticky keys, the rollback monitor and budgets: pure logic, no Ray."""

import pytest

from graph.canary import Canary, CanaryMonitor, Rollback, bucket, split_key, takes_canary
from graph.errors import (
    BudgetExceeded,
    CapacityError,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    PrismError,
    StageFailed,
)
from graph.routing import Features, apply_budget, apply_canary, decide, load_policy
from graph.schemas import Fallback, GenerationRequest
from graph.trace import Trace


def _policy(weight=10.0, budgets=None, rollback=None):
    canary = {"tier": "standard_v2", "weight": weight}
    if rollback is not None:
        canary["rollback"] = rollback
    return load_policy({
        "default_route": "standard",
        "routes": {"standard": {"tier": "standard", "fallbacks": ["fast"], "canary": canary},
                   "fast": {"tier": "fast"}},
        "budgets": budgets or {},
    }, tiers={"standard", "standard_v2", "fast"})


def test_split_share_matches_weight_and_is_sticky():
    canary = Canary(tier="v2", weight=10)
    keys = [f"user-{i}" for i in range(4000)]
    share = sum(takes_canary(canary, 10, k, "standard") for k in keys) / len(keys)
    assert 0.085 < share < 0.115
    assert all(takes_canary(canary, 10, k, "standard") == takes_canary(canary, 10, k, "standard") for k in keys[:50])
    # Raising the weight only adds users: nobody on the canary at 10% leaves it at 30%.
    assert all(takes_canary(canary, 30, k, "standard") for k in keys if takes_canary(canary, 10, k, "standard"))
    assert not any(takes_canary(canary, 0, k, "standard") for k in keys)


def test_split_key_prefers_user_when_sticky_user():
    assert split_key(Canary(tier="v2", weight=5), "alice", "rid-1") == "alice"
    assert split_key(Canary(tier="v2", weight=5), None, "rid-1") == "rid-1"
    assert split_key(Canary(tier="v2", weight=5, sticky="request_id"), "alice", "rid-1") == "rid-1"
    assert 0 <= bucket("alice", "standard") < 100 and bucket("alice", "standard") != bucket("alice", "fast")


def test_apply_canary_puts_stable_tier_first_in_fallbacks():
    policy = _policy(weight=100)
    d = decide(policy, Features(prompt="a photo", intent="photoreal", confidence=0.9))
    c = apply_canary(policy, d, 100, "anyone")
    assert (c.tier, c.fallbacks, c.canary) == ("standard_v2", ["standard", "fast"], True)
    assert apply_canary(policy, d, 0, "anyone").tier == "standard"  # rolled back: weight 0


def test_monitor_rolls_back_on_failure_rate_only_past_min_samples():
    m = CanaryMonitor(Canary(tier="v2", weight=50, rollback=Rollback(min_samples=5, max_failure_rate=0.5)))
    for t in range(4):
        m.record(True, 100, now=1000 + t)
    assert m.breach(now=1004) is None  # 4 < min_samples
    m.record(True, 100, now=1004)
    reason = m.breach(now=1004)
    assert reason and "failure rate 1.00" in reason
    event = m.roll_back("standard", reason, now=1004)
    assert m.weight == 0 and event["samples"] == 5 and event["from_weight"] == 50
    assert m.breach(now=1005) is None  # one rollback per canary


def test_monitor_window_slides_and_p95_threshold():
    m = CanaryMonitor(Canary(tier="v2", weight=50, rollback=Rollback(window_s=60, min_samples=3, max_failure_rate=None,
                                                                       max_p95_ms=1000)))
    for t, ms in enumerate([200, 300, 5000]):
        m.record(False, ms, now=t)
    assert "p95 latency 5000 ms" in m.breach(now=3)
    m2 = CanaryMonitor(Canary(tier="v2", weight=50, rollback=Rollback(window_s=60, min_samples=3)))
    for t in range(3):
        m2.record(True, 10, now=t)
    assert m2.window(now=100)["samples"] == 0 and m2.breach(now=100) is None  # old failures left the window


def test_rollback_needs_a_threshold_and_canary_tier_must_be_deployed():
    with pytest.raises(ValueError, match="max_failure_rate"):
        Rollback(max_failure_rate=None, max_p95_ms=None)
    with pytest.raises(ValueError, match="standard_v2"):
        _policy().check_tiers({"standard", "fast"})


def test_budget_downgrades_or_rejects():
    policy = _policy(budgets={"free": {"usd": 1.0, "route": "fast"},
                              "pro": {"usd": 5.0, "action": "reject"}})
    d = decide(policy, Features(prompt="a photo", intent="photoreal", confidence=0.9))
    same, note = apply_budget(policy, d, "free", 0.5)
    assert same is d and note == ""
    down, note = apply_budget(policy, d, "free", 1.2)
    assert (down.route, down.degraded) == ("fast", True) and "spent $1.2000 of its $1 budget" in note
    with pytest.raises(BudgetExceeded) as e:
        apply_budget(policy, d, "pro", 5.0)
    assert e.value.status_code == 429 and e.value.headers["Retry-After"] == "60"
    with pytest.raises(ValueError, match="nowhere"):
        load_policy({"default_route": "fast", "routes": {"fast": {"tier": "fast"}},
                     "budgets": {"free": {"usd": 1, "route": "nowhere"}}})


@pytest.mark.parametrize("error,blamed", [
    (CapacityError("queue full"), False), (DeadlineExceeded("late"), False), (InvalidRequest("bad n"), False),
    (BudgetExceeded("spent"), False), (GenerationFailed("every model failed"), True),
    (StageFailed("post", "died twice"), True), (PrismError("bug"), True),
])
def test_only_model_failures_count_against_a_canary(error, blamed):
    trace = Trace(rid="r", req=GenerationRequest(prompt="a red star"), error=error)
    assert trace.canary_failed("standard_v2") is blamed
    # A capacity refusal on the canary's own attempt is load too; a garbage render on it is not.
    clean = Trace(rid="r", req=GenerationRequest(prompt="a red star"))
    clean.fallbacks = [Fallback(model="m", tier="standard_v2", reason="overloaded", elapsed_ms=1.0)]
    assert not clean.canary_failed("standard_v2")
    clean.fallbacks.append(Fallback(model="m", tier="standard_v2", reason="nan", elapsed_ms=1.0))
    assert clean.canary_failed("standard_v2")


def test_retry_after_is_whole_seconds_rounded_up():
    assert CapacityError("x", retry_after_s=6.2).headers["Retry-After"] == "7"
    assert CapacityError("x", retry_after_s=0).headers["Retry-After"] == "1"
    assert BudgetExceeded("x").headers["Retry-After"] == "60" and PrismError("x").headers == {}

"""Admission at the door (graph/admission.py), without Ray: slots from the latency target, the whole application's
view from replica reports, priorities under saturation, refusals at once with Retry-After."""

import asyncio
import time

import pytest

from graph.admission import (
    Admission,
    AdmissionPolicy,
    ClassPolicy,
    ReplicaReport,
    class_limit,
    others_inflight,
    retry_after_s,
    slots_per_replica,
    tier_slots,
)
from graph.errors import CapacityError

SLOTS = [
    pytest.param(0.35, 8, 1.2, 1, id="gpu_model_tight_target"),  # a pair would take 1.35x
    pytest.param(0.35, 8, 2.0, 3, id="gpu_model_loose_target"),  # 1 + floor(1.0 / 0.35)
    pytest.param(0.35, 2, 2.0, 2, id="capped_by_batch_size"),
    pytest.param(0.9, 8, 1.2, 1, id="cpu_model"),
    pytest.param(0.0, 4, 1.2, 4, id="free_batching"),
    pytest.param(0.2, 8, 1.2, 2, id="exactly_at_target"),  # a pair takes 1.2x: allowed
]


@pytest.mark.parametrize("efficiency,batch,slowdown,slots", SLOTS)
def test_slots_per_replica_from_batch_efficiency_and_latency_target(efficiency, batch, slowdown, slots):
    assert slots_per_replica(efficiency, batch, slowdown) == slots


def test_tier_slots_honours_max_concurrency_and_hosted_calls():
    assert tier_slots({"kind": "builtin", "batch_efficiency": 0.6, "max_batch_size": 8}, 1.2) == 1
    assert tier_slots({"kind": "builtin", "max_concurrency": 3}, 1.2) == 3
    assert tier_slots({"kind": "openai", "max_batch_size": 1}, 1.2) == 8  # network-bound calls run side by side


def test_class_limit_and_the_other_ingresses_work():
    assert class_limit(4, 0.5) == 2 and class_limit(1, 0.5) == 1 and class_limit(0, 1.0) == 0
    reports = [ReplicaReport("r1", 3, 1.0, 0.0, {"me": 2, "other": 1}), ReplicaReport("r2", 2, 1.0, 0.0, {"other": 2})]
    assert others_inflight(reports, "me") == 3  # this ingress's own 2 it counts itself, without the reports' lag
    assert retry_after_s(0.2) == 1 and retry_after_s(6.1) == 7 and retry_after_s(500) == 60


def _admission(slots=1, replicas=1, **policy) -> Admission:
    adm = Admission({"a": slots, "b": slots}, AdmissionPolicy(**policy))
    now = time.time()
    for tier in ("a", "b"):
        adm.update(tier, [ReplicaReport(f"{tier}{i}", 0, 1.0, now) for i in range(replicas)], now)
    return adm


def test_admits_onto_the_first_tier_with_a_slot_then_refuses_at_once():
    async def run():
        adm = _admission()
        first = await adm.admit(["a", "b"], "free")
        second = await adm.admit(["a", "b"], "free")  # a is full: its fallback b has a slot
        t = time.perf_counter()
        with pytest.raises(CapacityError) as info:
            await adm.admit(["a", "b"], "free")
        return first, second, info.value, time.perf_counter() - t
    first, second, err, elapsed = asyncio.run(run())
    assert (first.tier, second.tier) == ("a", "b")
    assert err.status_code == 503 and int(err.headers["Retry-After"]) >= 1 and elapsed < 0.05
    assert "'free'" in err.message and "1 of 1 slots in use" in err.message
    assert err.details[0]["user_tier"] == "free" and err.details[0]["reason"] == "capacity"


def _timed(a_s: float | None, b_s: float | None, **policy) -> Admission:
    """Tiers a and b, one slot each, whose replicas report these service times (None: not known yet)."""
    adm = Admission({"a": 1, "b": 1}, AdmissionPolicy(**policy))
    now = time.time()
    adm.update("a", [ReplicaReport("a0", 0, a_s, now)], now)
    adm.update("b", [ReplicaReport("b0", 0, b_s, now)], now)
    return adm


@pytest.mark.parametrize("a_s,b_s,policy,admitted", [
    pytest.param(0.45, 2.2, {}, False, id="much_slower_fallback_refused"),
    pytest.param(0.45, 0.5, {}, True, id="fallback_within_max_slowdown"),
    pytest.param(2.2, 0.45, {}, True, id="faster_fallback"),
    pytest.param(0.45, None, {}, True, id="fallback_time_unknown"),
    pytest.param(0.45, 2.2, {"capacity_fallback": "any"}, True, id="any_tier_when_configured"),
    pytest.param(0.45, 2.2, {"max_slowdown": 5.0}, True, id="looser_latency_target"),
])
def test_a_full_tier_overflows_only_onto_fallbacks_near_its_own_time(a_s, b_s, policy, admitted):
    async def run():
        adm = _timed(a_s, b_s, **policy)
        await adm.admit(["a", "b"], "free")  # a's one slot
        try:
            return (await adm.admit(["a", "b"], "free")).tier
        except CapacityError as e:
            return e
    out = asyncio.run(run())
    if admitted:
        assert out == "b"
    else:  # refused at once rather than answered ~5x slower than the route's tier when idle
        assert isinstance(out, CapacityError) and out.details[0]["tiers"] == ["a"], out


def test_a_route_whose_tier_is_gone_overflows_onto_a_slower_fallback():
    async def run():
        adm = _timed(0.45, 2.2)
        adm.set_running({"a": 0, "b": 1})  # a's replicas are all gone: a slow answer beats none
        return (await adm.admit(["a", "b"], "free")).tier
    assert asyncio.run(run()) == "b"


def test_a_released_slot_admits_the_next_request():
    async def run():
        adm = _admission()
        ticket = await adm.admit(["a"], "free")
        adm.release(ticket, service_s=0.5)
        again = await adm.admit(["a"], "free")
        return adm, again
    adm, again = asyncio.run(run())
    assert again.tier == "a" and adm.tiers["a"].service_s == 0.5


def test_replica_reports_set_capacity_and_other_ingresses_work():
    async def run():
        adm = Admission({"a": 1}, AdmissionPolicy(), me="me")
        now = time.time()
        adm.update("a", [ReplicaReport("r1", 1, 1.0, now, {"other": 1}), ReplicaReport("r2", 0, 1.0, now)], now)
        one = await adm.admit(["a"], "free")  # r2 is free: another ingress holds r1
        with pytest.raises(CapacityError):
            await adm.admit(["a"], "free")
        # A report that still shows this ingress's finished render does not hold its slot: its own it counts itself.
        adm.release(one)
        adm.update("a", [ReplicaReport("r1", 1, 1.0, now, {"other": 1}), ReplicaReport("r2", 1, 1.0, now, {"me": 1})],
                   now)
        assert adm.has_room("a", "free")
        stale = now - 60  # r1 and r2 stopped reporting: gone
        adm.update("a", [ReplicaReport("r1", 1, 1.0, stale), ReplicaReport("r2", 0, 1.0, stale)], now)
        return adm, one
    adm, one = asyncio.run(run())
    assert one.tier == "a" and adm.snapshot()["a"]["capacity"] == 0


def test_a_dead_replica_takes_its_slots_away_before_any_report():
    async def run():
        adm = _admission(replicas=2)
        await adm.admit(["a"], "free")
        adm.replica_died("a")  # one of two replicas died under load
        with pytest.raises(CapacityError):
            await adm.admit(["a"], "free")
    asyncio.run(run())


def test_fallbacks_of_admitted_work_are_never_refused():
    async def run():
        adm = _admission()
        await adm.admit(["a"], "free")
        return adm.force("a", "free")  # a is full, but this request was admitted: its retry is not refused
    assert asyncio.run(run()).forced


async def _held_and_awaited(adm: Admission) -> tuple:
    """Tier a's one slot held by a free request, and an enterprise request queued for it: (the ticket, the waiter)."""
    held = await adm.admit(["a"], "free")
    waiting = asyncio.ensure_future(adm.admit(["a"], "enterprise"))
    await asyncio.sleep(0.01)
    return held, waiting


def test_paid_tiers_wait_for_the_next_slot_ahead_of_free():
    policy = {"classes": {"free": ClassPolicy(), "enterprise": ClassPolicy(max_wait_ms=2000)}}

    async def run():
        adm = _admission(**policy)
        held, waiting = await _held_and_awaited(adm)
        with pytest.raises(CapacityError):  # free never waits, and the freed slot is promised to enterprise
            await adm.admit(["a"], "free")
        adm.release(held)
        got = await waiting
        with pytest.raises(CapacityError):
            await adm.admit(["a"], "free")
        return got
    got = asyncio.run(run())
    assert got.tier == "a" and got.user_tier == "enterprise" and got.waited_ms >= 5


def test_a_cancel_that_meets_the_grant_still_cancels_and_frees_the_slot():
    # The slot frees and the job is cancelled in the same loop turn: Python 3.11's wait_for returned the ticket there
    # (cpython gh-86296) and the cancelled job rendered anyway (seen in CI: a cancelled queued job "succeeded").
    policy = {"classes": {"free": ClassPolicy(), "enterprise": ClassPolicy(max_wait_ms=5000)}}

    async def run():
        adm = _admission(**policy)
        held, waiting = await _held_and_awaited(adm)
        adm.release(held)  # grants the waiter its slot now
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return adm.snapshot()["a"]
    snap = asyncio.run(run())
    assert snap["used"] == 0 and snap["waiting"] == 0


def test_a_wait_that_runs_out_is_a_refusal():
    policy = {"classes": {"pro": ClassPolicy(max_wait_ms=50)}}

    async def run():
        adm = _admission(**policy)
        await adm.admit(["a"], "pro")
        t = time.perf_counter()
        with pytest.raises(CapacityError):
            await adm.admit(["a"], "pro")
        return time.perf_counter() - t, adm
    waited, adm = asyncio.run(run())
    assert 0.04 <= waited < 0.5 and adm.snapshot()["a"]["waiting"] == 0


def test_a_waiter_that_is_cancelled_is_never_granted_the_slot():
    # A job cancelled while it waits at the door (or a client gone): the slot that frees must not go to it, where
    # nobody would ever release it.
    policy = {"classes": {"free": ClassPolicy(), "enterprise": ClassPolicy(max_wait_ms=5000)}}

    async def run():
        adm = _admission(**policy)
        held, waiting = await _held_and_awaited(adm)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        adm.release(held)
        return adm.snapshot()["a"], await adm.admit(["a"], "free")
    snap, again = asyncio.run(run())
    assert snap["used"] == 0 and snap["waiting"] == 0 and again.tier == "a"


def test_shares_keep_slots_for_higher_tiers():
    async def run():
        adm = _admission(slots=4, classes={"free": ClassPolicy(share=0.5), "pro": ClassPolicy()})
        free = [await adm.admit(["a"], "free") for _ in range(2)]
        with pytest.raises(CapacityError):
            await adm.admit(["a"], "free")  # 2 of 4 slots is free's share
        pro = [await adm.admit(["a"], "pro") for _ in range(2)]
        return free, pro
    free, pro = asyncio.run(run())
    assert len(free) == len(pro) == 2


def test_max_total_caps_renders_across_tiers_sharing_a_machine():
    async def run():
        adm = _admission(slots=2, max_total=2)
        await adm.admit(["a"], "free")
        await adm.admit(["b"], "free")
        with pytest.raises(CapacityError):
            await adm.admit(["a", "b"], "free")  # each tier has a slot left, the cores do not
    asyncio.run(run())


def test_the_door_refuses_before_anything_when_no_reachable_tier_has_room():
    async def run():
        adm = _admission(classes={"free": ClassPolicy(), "enterprise": ClassPolicy(max_wait_ms=100)})
        await adm.admit(["a"], "free")
        adm.door_check({"a", "b"}, "free")  # b has room
        await adm.admit(["b"], "free")
        with pytest.raises(CapacityError):
            adm.door_check({"a", "b"}, "free")
        adm.door_check({"a", "b"}, "enterprise")  # enterprise may wait: it goes on to classification
    asyncio.run(run())


def test_a_tier_slower_than_the_deadline_is_skipped():
    async def run():
        adm = _admission()
        t = await adm.admit(["a"], "free")
        adm.release(t, service_s=5.0)
        return await adm.admit(["a", "b"], "free", deadline_s=2.0)
    assert asyncio.run(run()).tier == "b"


def test_the_controllers_running_count_sets_capacity_and_absorbs_deaths_seen_here():
    adm = _admission(replicas=2)
    adm.set_running({"a": 2})
    adm.replica_died("a")
    assert adm.snapshot()["a"]["capacity"] == 1  # at once, before the controller knows
    assert adm.alive("a")
    adm.set_running({"a": 1})  # the controller caught up: the death is not subtracted twice
    assert adm.snapshot()["a"]["capacity"] == 1
    adm.set_running({"a": 2})  # the replacement is running
    assert adm.snapshot()["a"]["capacity"] == 2


def test_a_replica_that_dies_holding_several_calls_is_one_death():
    adm = _admission(replicas=2, slots=4)
    adm.set_running({"a": 2})
    for _ in range(4):  # its four renders in flight all see it die
        adm.replica_died("a", "actor-1")
    assert adm.snapshot()["a"]["capacity"] == 4 and adm.alive("a")  # the other replica's 4 slots
    adm.set_running({"a": 1})  # the controller counts the death
    adm.replica_died("a", "actor-1")  # a late call on the same dead replica
    assert adm.snapshot()["a"]["capacity"] == 4 and adm.alive("a")
    adm.replica_died("a", None)  # a death Ray did not name the replica of (a lost node): counted as it comes
    assert adm.snapshot()["a"]["capacity"] == 0 and not adm.alive("a")


def test_a_tier_whose_only_replica_died_is_not_alive_until_one_runs_again():
    adm = _admission(replicas=1)
    adm.set_running({"a": 1})
    adm.replica_died("a")
    assert not adm.alive("a") and adm.alive("b")
    adm.set_running({"a": 0})  # the controller counts the death
    adm.set_running({"a": 1})  # and then the replacement
    assert adm.alive("a")


def test_a_flood_arriving_at_once_passes_the_door_only_as_far_as_there_are_free_slots():
    """Requests past the door but not yet admitted speak for free slots: 100 free requests at once with 2 free slots
    send 2 on to the classifier and refuse 98 at the door (before, all 100 passed: none was admitted yet)."""
    adm = _admission(slots=1)  # tiers a and b, one slot each
    passed, refused = [], 0
    for _ in range(100):
        try:
            passed.append(adm.door_check({"a", "b"}, "free"))
        except CapacityError as e:
            refused += 1
            assert e.retry_after_s >= 1
    assert len(passed) == 2 and refused == 98 and adm.pending == 2


def test_a_closed_door_pass_frees_its_claim_once_and_admission_takes_the_slot():
    async def run():
        adm = _admission(slots=1)
        door = adm.door_check({"a"}, "free")
        with pytest.raises(CapacityError):
            adm.door_check({"a"}, "free")  # the one slot is spoken for
        ticket = await adm.admit(["a"], "free")
        door.close()
        door.close()  # idempotent: a second close (the request's end) changes nothing
        assert adm.pending == 0
        with pytest.raises(CapacityError):
            adm.door_check({"a"}, "free")  # now held by the admitted render
        adm.release(ticket)
        adm.door_check({"a"}, "free")
        assert adm.pending == 1
    asyncio.run(run())


def test_paid_tiers_pass_a_full_door_and_count_against_free_ones():
    adm = _admission(slots=1, classes={"free": ClassPolicy(), "enterprise": ClassPolicy(max_wait_ms=100)})
    for _ in range(3):
        adm.door_check({"a"}, "enterprise")  # may wait for a slot: goes on to classification
    with pytest.raises(CapacityError):
        adm.door_check({"a", "b"}, "free")  # the two free slots are spoken for by the paid requests ahead


def test_a_refusal_while_no_replica_runs_says_so_rather_than_full():
    """Right after `serve run` the ingress answers before the generators have loaded: the 503 should say why."""
    adm = _admission()
    adm.set_running({"a": 0, "b": 0})
    with pytest.raises(CapacityError) as refused:
        adm.door_check({"a", "b"}, "free")
    assert "no replica of the tiers this request could use is running yet" in str(refused.value)
    assert refused.value.retry_after_s >= 1 and refused.value.details[0]["reason"] == "capacity"
    adm.set_running({"a": 1, "b": 0})  # one tier up and full: "full" again
    asyncio.run(adm.admit(["a"], "free"))
    with pytest.raises(CapacityError) as full:
        adm.door_check({"a", "b"}, "free")
    assert "is full" in str(full.value)

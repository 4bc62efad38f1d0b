"""benchmarks/capacity.py: the arithmetic on hand-computable cases, and a table that grows with load."""

import math

import pytest

from benchmarks import capacity
from benchmarks.capacity import Tier, erlang_c, max_rate, p95_wait_s, pack, size_tier
from graph.config import ROOT, load_serve_config
from graph.placement import ReplicaDemand

GPU = load_serve_config(ROOT / "serve_config.gpu.yaml")
SIM = load_serve_config(ROOT / "serve_config.sim.yaml")


def flat_tier(**kw) -> Tier:
    """p50 = p95 = 1 s (no spread: mean 1 s), batch 2 at efficiency 0.5, half a GPU."""
    spec = {"name": "t", "p50_s": 1.0, "p95_s": 1.0, "batch_efficiency": 0.5, "batch": 2, "num_gpus": 0.5,
            "memory_gb": 10.0}
    return Tier(**{**spec, **kw})


def test_one_request_costs_a_batch_share_of_h100_seconds():
    t = flat_tier()
    assert t.mean_s == pytest.approx(1.0)
    assert t.batch_cost(1.0) == pytest.approx(1.5)        # 1 + 0.5 x (2 - 1)
    assert t.gpu_s_per_request == pytest.approx(0.75)     # 1.5 s for a batch of 2


def test_lognormal_mean_from_p50_and_p95():
    sigma = 0.5
    t = flat_tier(p95_s=math.exp(1.6449 * sigma))
    assert t.mean_s == pytest.approx(math.exp(sigma * sigma / 2))   # exp(mu + sigma^2 / 2), mu = ln 1


def test_littles_law_with_headroom_on_a_hand_case():
    # 2 req/s x 0.75 H100-s = 1.5 busy GPUs; at 75 % that is 2 GPUs, held by 4 replicas of half a GPU each.
    s = size_tier(flat_tier(), rate=2.0, utilisation=0.75)
    assert s.busy_gpus == pytest.approx(1.5)
    assert s.replicas == 4
    assert s.gpus == pytest.approx(2.0)
    assert s.replicas_no_contention == 2      # if each half-GPU replica ran at full speed
    assert s.gpus_no_contention == pytest.approx(1.0)


def test_a_rate_gets_at_least_one_replica_and_zero_gets_none():
    assert size_tier(flat_tier(), rate=0.01).replicas == 1
    assert size_tier(flat_tier(), rate=0.0).replicas == 0


def test_max_rate_inverts_the_replica_count():
    t = flat_tier()
    for n in (1, 3, 40):
        assert size_tier(t, max_rate(t, n, 0.7), 0.7).replicas == n


ERLANG_CASES = [
    pytest.param(1, 0.5, 0.5, id="mm1_waits_with_probability_rho"),
    pytest.param(2, 1.0, 1 / 3, id="mm2_at_half_load"),
    pytest.param(3, 3.0, 1.0, id="saturated_always_waits"),
]


@pytest.mark.parametrize(("servers", "offered", "expected"), ERLANG_CASES)
def test_erlang_c(servers, offered, expected):
    assert erlang_c(servers, offered) == pytest.approx(expected)


def test_p95_wait_of_mm1():
    # M/M/1, lambda 0.5, mu 1: P(W > t) = 0.5 exp(-0.5 t), so t95 = ln(0.5 / 0.05) / 0.5 = 2 ln 10.
    assert p95_wait_s(1, 0.5, 1.0) == pytest.approx(2 * math.log(10))
    assert p95_wait_s(4, 0.5, 1.0) == 0.0     # P(wait) below 5 %


def test_p95_range_is_a_batch_alone_to_a_batch_sharing_its_gpu():
    s = size_tier(flat_tier(), rate=0.001, utilisation=0.7)   # no queue at this rate
    assert s.p95_low_s == pytest.approx(1.5)                   # batch p95 on a whole GPU
    assert s.p95_high_s == pytest.approx(3.0)                  # at half the GPU's speed


def test_pack_uses_the_planner_on_the_fewest_nodes():
    demands = [ReplicaDemand("Generator_t", 0.5, 10.0, 1.0)] * 3
    p = pack(demands, gpus_per_node=1, gpu_memory_gb=80.0)
    assert len({g.node for g in p.gpus if g.replicas}) == 2
    with pytest.raises(ValueError, match="more than a GPU holds"):
        pack([ReplicaDemand("Generator_big", 1.0, 90.0, 1.0)], gpus_per_node=1, gpu_memory_gb=80.0)


def test_the_mix_routes_as_the_seeds_describe():
    shares = capacity.route_shares(capacity.policy_of(GPU))
    assert shares == {"fast": ("fast", pytest.approx(0.55)), "standard": ("standard", pytest.approx(0.20)),
                      "typography": ("typography", pytest.approx(0.15)), "premium": ("premium", pytest.approx(0.10))}


def test_tiers_take_latency_from_sim_and_batch_and_fraction_from_gpu():
    tiers = capacity.tiers_from_profiles(GPU, SIM)
    assert tiers["fast"] == Tier("fast", 0.45, 0.70, 0.35, 4, 0.5, 28.0, 1.0)
    assert tiers["premium"].batch == 1 and tiers["premium"].num_gpus == 1.0


@pytest.fixture(scope="module")
def loads():
    tiers = capacity.tiers_from_profiles(GPU, SIM)
    shares = capacity.route_shares(capacity.policy_of(GPU))
    fixed = capacity.fixed_gpu_demands(GPU)
    return [capacity.size_load(r, tiers, shares, fixed) for r in (1, 10, 30, 100, 1000)]


def test_the_table_is_monotone_in_load(loads):
    for low, high in zip(loads, loads[1:], strict=False):
        assert high.gpus_requested >= low.gpus_requested
        assert high.gpus_used >= low.gpus_used
        assert high.nodes >= low.nodes
        assert high.gpus_no_contention >= low.gpus_no_contention
        assert high.cpu_cores >= low.cpu_cores
        for (route, _, a), (route_b, _, b) in zip(low.tiers, high.tiers, strict=True):
            assert route == route_b
            assert b.replicas >= a.replicas and b.busy_gpus >= a.busy_gpus


def test_packing_holds_every_replica_it_was_given(loads):
    for load in loads:
        assert load.packed.ok
        assert load.gpus_used >= math.ceil(load.gpus_requested - 1e-9)
        assert load.nodes == math.ceil(load.gpus_used / capacity.GPUS_PER_NODE)  # nodes fill one by one


def test_profile_capacity_is_bounded_by_its_smallest_tier():
    tiers = capacity.tiers_from_profiles(GPU, SIM)
    shares = capacity.route_shares(capacity.policy_of(GPU))
    rate, bound = capacity.profile_capacity(GPU, tiers, shares)
    t = tiers["typography"]   # 4 replicas x 0.33 GPU at 70 %, 15 % of the mix
    assert bound == "typography"
    assert rate == pytest.approx(4 * 0.33 * 0.7 / t.gpu_s_per_request / 0.15)


def test_main_prints_the_tables(capsys):
    assert capacity.main(["--rates", "10", "100"]) == 0
    out = capsys.readouterr().out
    assert "| 10 | fast (fast) |" in out and "| 100 |" in out and "nodes of 8" in out


def test_main_refuses_a_utilisation_outside_0_1():
    with pytest.raises(SystemExit):
        capacity.main(["--utilisation", "1.5"])

import copy
import subprocess
import sys

import pytest

from engines.post import PostSpec
from graph.config import ROOT, deployment_block, load_serve_config, prism_app
from graph.placement import (
    UPSCALER_DEFAULT_GB,
    NodeShape,
    ReplicaDemand,
    demands_from_app,
    format_plan,
    max_gpus_needed,
    plan,
    replicas_at_max_scale,
    worst_gpu_mix,
)

GPU_CONFIG = ROOT / "serve_config.gpu.yaml"
H100 = 80.0


def many(name: str, num_gpus: float, memory_gb: float, n: int = 1, num_cpus: float = 1.0) -> list[ReplicaDemand]:
    return [ReplicaDemand(name, num_gpus, memory_gb, num_cpus)] * n


def layout(p) -> list[tuple[int, int, dict[str, int]]]:
    """(node, gpu, {deployment: replicas}) for every used GPU."""
    out = []
    for g in p.gpus:
        if g.replicas:
            counts: dict[str, int] = {}
            for d in g.replicas:
                counts[d.deployment] = counts.get(d.deployment, 0) + 1
            out.append((g.node, g.index, counts))
    return out


def gpu_app() -> dict:
    return prism_app(load_serve_config(GPU_CONFIG))


# (demands, shape, used GPUs as (node, gpu, {deployment: replicas}), unplaced replicas)
PACKING_CASES = [
    pytest.param(many("s", 0.25, 10, 4), NodeShape(2, H100), [(0, 0, {"s": 4})], 0, id="four_quarters_share_one_gpu"),
    pytest.param(many("a", 0.5, 10) + many("b", 0.5, 10) + many("c", 0.25, 10), NodeShape(2, H100),
                 [(0, 0, {"a": 1, "b": 1}), (0, 1, {"c": 1})], 0, id="half_half_quarter_opens_second_gpu"),
    pytest.param(many("s", 0.25, 10, 2) + many("p", 1.0, 30), NodeShape(2, H100),
                 [(0, 0, {"p": 1}), (0, 1, {"s": 2})], 0, id="whole_gpu_replica_takes_its_own_gpu"),
    pytest.param(many("q", 0.5, 10) + many("t", 2, 60), NodeShape(3, H100),
                 [(0, 0, {"t": 1}), (0, 1, {"t": 1}), (0, 2, {"q": 1})], 0, id="two_gpu_replica_takes_two_whole"),
    pytest.param(many("u", 0.1, 1, 10), NodeShape(1, H100), [(0, 0, {"u": 10})], 0,
                 id="ten_tenths_fill_a_gpu_exactly"),
    pytest.param(many("h", 0.5, 10, 3), NodeShape(1, H100, nodes=2),
                 [(0, 0, {"h": 2}), (1, 0, {"h": 1})], 0, id="node_0_fills_before_node_1"),
    pytest.param(many("p", 1.0, 30, 3), NodeShape(2, H100), [(0, 0, {"p": 1}), (0, 1, {"p": 1})], 1,
                 id="more_demand_than_cluster_unplaced"),
    pytest.param(many("t", 2, 60), NodeShape(1, H100, nodes=2), [], 1, id="multi_gpu_replica_cannot_span_nodes"),
    pytest.param(many("x", 1.5, 30), NodeShape(2, H100), [], 1, id="non_whole_above_one_refused"),
]


@pytest.mark.parametrize("demands,shape,expected,n_unplaced", PACKING_CASES)
def test_packing(demands, shape, expected, n_unplaced):
    p = plan(demands, shape)
    assert layout(p) == expected
    assert len(p.unplaced) == n_unplaced
    assert p.ok == (n_unplaced == 0)
    if n_unplaced:
        assert any(p.unplaced[0].deployment in problem for problem in p.problems)


# (demands, shape, words every problem line together must contain; empty = ok)
MEMORY_CASES = [
    pytest.param(many("Generator_fast", 0.25, 28, 4), NodeShape(1, H100),
                 ["node 0 GPU 0", "Generator_fast x4 (0.25)", "112 GB", "78 GB usable"], id="packed_gpu_over_memory"),
    pytest.param(many("big", 1.0, 90), NodeShape(1, H100), ["big", "90 GB", "78 GB usable"],
                 id="whole_replica_bigger_than_gpu"),
    pytest.param(many("big", 0.5, 79), NodeShape(1, H100), ["big", "79 GB"], id="fractional_replica_bigger_than_gpu"),
    pytest.param(many("t", 2, 150), NodeShape(2, H100), [], id="two_gpu_replica_memory_split"),
    pytest.param(many("s", 0.25, 19.5, 4), NodeShape(1, H100, reserve_gb=2), [], id="reserve_2_leaves_78_fits"),
    pytest.param(many("s", 0.25, 19.5, 4), NodeShape(1, H100, reserve_gb=3), ["78 GB", "77 GB usable"],
                 id="reserve_3_leaves_77_over"),
    pytest.param(many("s", 0.25, 10, 4, num_cpus=2), NodeShape(1, H100, cpus_per_node=8), [], id="cpus_fit"),
    pytest.param(many("s", 0.25, 10, 4, num_cpus=2), NodeShape(1, H100, cpus_per_node=6), ["CPUs", "8 > 6"],
                 id="cpus_over"),
]


@pytest.mark.parametrize("demands,shape,words", MEMORY_CASES)
def test_memory_and_cpu_checks(demands, shape, words):
    p = plan(demands, shape)
    assert p.ok == (not words), p.problems
    text = "\n".join(p.problems)
    for word in words:
        assert word in text


def test_over_memory_gpu_reads_over_in_the_table():
    shape = NodeShape(1, H100)
    text = format_plan(plan(many("Generator_fast", 0.25, 28, 4), shape), shape)
    assert "OVER" in text and "FAIL" in text


def test_other_start_order_risk_is_a_warning():
    # Largest first puts a (0.5) with two b's: 10 + 2 x 30 = 70 GB; b x4 started first would stack 120 GB.
    demands = many("a", 0.5, 10) + many("b", 0.25, 30, 4)
    p = plan(demands, NodeShape(2, H100))
    assert p.ok and layout(p) == [(0, 0, {"a": 1, "b": 2}), (0, 1, {"b": 2})]
    assert len(p.warnings) == 1 and "b x4 (0.25)" in p.warnings[0] and "120 GB" in p.warnings[0]


WORST_MIX_CASES = [
    pytest.param(many("a", 0.5, 28, 8) + many("b", 0.25, 18, 8) + many("u", 0.1, 2, 4), 72.0, id="quarters_win"),
    pytest.param(many("a", 0.5, 50, 2) + many("b", 0.25, 18, 8), 100.0, id="halves_win"),
    pytest.param(many("a", 0.5, 28, 1) + many("b", 0.25, 18, 1), 46.0, id="bounded_by_replica_count"),
    pytest.param(many("p", 1.0, 34, 4), 0.0, id="whole_gpus_never_share"),
]


@pytest.mark.parametrize("demands,expected", WORST_MIX_CASES)
def test_worst_gpu_mix(demands, expected):
    worst, mix = worst_gpu_mix(demands)
    assert worst == pytest.approx(expected)
    assert sum(d.num_gpus for d in mix) <= 1 + 1e-9 and sum(d.memory_gb for d in mix) == pytest.approx(worst)


@pytest.mark.parametrize("block,expected", [
    pytest.param({"autoscaling_config": {"min_replicas": 1, "max_replicas": 8}}, 8, id="max_replicas"),
    pytest.param({"num_replicas": 3}, 3, id="num_replicas"),
    pytest.param({}, 1, id="default_one"),
])
def test_replicas_at_max_scale(block, expected):
    assert replicas_at_max_scale(block) == expected


def test_demands_from_real_gpu_profile():
    demands = demands_from_app(gpu_app())
    by_name = {}
    for d in demands:
        by_name.setdefault(d.deployment, []).append(d)
    assert {name: len(ds) for name, ds in by_name.items()} == {
        "Generator_fast": 8, "Generator_standard": 8, "Generator_premium": 4, "Generator_typography": 4}
    # Each replica's model plus the upscaler it runs on its GPU (post.gpuid 0, 2 GB).
    assert {name: (ds[0].num_gpus, ds[0].memory_gb) for name, ds in by_name.items()} == {
        "Generator_fast": (0.5, 30.0), "Generator_standard": (0.33, 20.0),
        "Generator_premium": (1.0, 36.0), "Generator_typography": (0.33, 20.0)}
    assert max_gpus_needed(demands) == pytest.approx(11.96)
    everything = demands_from_app(gpu_app(), include_cpu_only=True)
    assert sum(d.num_cpus for d in everything) == pytest.approx(26.0)  # Ingress 2 x 1 + 24 generators x 1


def test_real_gpu_profile_needs_twelve_h100s_at_max_scale():
    demands = demands_from_app(gpu_app())
    fits = [n for n in range(1, 16) if plan(demands, NodeShape(1, H100, nodes=n)).ok]
    assert min(fits) == 12  # 4 premium + 4 fast pairs + 12 standard/typography replicas three to a GPU
    two_nodes = plan(demands, NodeShape(8, H100, nodes=2))
    assert two_nodes.ok and not two_nodes.warnings and sum(bool(g.replicas) for g in two_nodes.gpus) == 12
    assert max(g.memory_gb for g in two_nodes.gpus) == 60.0
    assert not plan(demands, NodeShape(1, H100)).ok
    assert not plan(demands, NodeShape(8, H100)).ok


def test_upscaler_memory_joins_each_generator_replica_when_post_runs_on_the_gpu():
    app = copy.deepcopy(gpu_app())
    app["args"]["post"]["gpu_memory_gb"] = 6
    assert {d.memory_gb for d in demands_from_app(app) if d.deployment == "Generator_standard"} == {24.0}
    app["args"]["post"]["gpuid"] = -1  # post on the CPU: the model's memory alone
    assert {d.memory_gb for d in demands_from_app(app) if d.deployment == "Generator_standard"} == {18.0}
    assert UPSCALER_DEFAULT_GB == PostSpec().gpu_memory_gb


def _without_standard_memory(app: dict) -> None:
    del app["args"]["tiers"]["standard"]["gpu_memory_gb"]


def _gpu_sidecar(app: dict) -> None:
    app["deployments"].append({"name": "Sidecar", "ray_actor_options": {"num_gpus": 0.1}})


def _fast_one_and_a_half(app: dict) -> None:
    deployment_block(app, "Generator_fast")["ray_actor_options"]["num_gpus"] = 1.5


@pytest.mark.parametrize("edit,words", [
    pytest.param(_without_standard_memory, ["'standard'", "gpu_memory_gb"], id="generator_without_memory"),
    pytest.param(_gpu_sidecar, ["'Sidecar'"], id="unknown_gpu_deployment"),
    pytest.param(_fast_one_and_a_half, ["'Generator_fast'", "1.5"], id="non_whole_above_one"),
])
def test_demands_from_app_rejects(edit, words):
    app = copy.deepcopy(gpu_app())
    edit(app)
    with pytest.raises(ValueError) as e:
        demands_from_app(app)
    for word in words:
        assert word in str(e.value)


def test_node_shape_rejects_bad_values():
    with pytest.raises(ValueError, match="reserve_gb"):
        NodeShape(8, 80, reserve_gb=80)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graph.placement", str(GPU_CONFIG), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("args,rc,words", [
    pytest.param(["--gpus-per-node", "8", "--gpu-memory-gb", "80", "--nodes", "2"], 0,
                 ["Generator_standard x3 (0.33)", "60.0 / 78", "OK: 12 of 16 GPUs"], id="fits_two_8x80_nodes"),
    pytest.param(["--gpus-per-node", "8", "--gpu-memory-gb", "80"], 1,
                 ["Generator_fast x2 (0.5)", "PENDING", "FAIL"], id="one_8x80_node_too_small"),
    pytest.param(["--gpus-per-node", "8", "--gpu-memory-gb", "40", "--nodes", "4"], 1,
                 ["OVER", "60 GB > 38 GB usable"], id="40gb_gpus_over_memory"),
    pytest.param(["--gpus-per-node", "8", "--gpu-memory-gb", "80", "--nodes", "2", "--cpus-per-node", "12"], 1,
                 ["CPUs: the replicas ask for 26 > 24"], id="cpus_over"),
])
def test_cli_exit_codes(args, rc, words):
    out = _cli(*args)
    assert out.returncode == rc, out.stderr
    for word in words:
        assert word in out.stdout


def test_cli_rejects_a_bad_config_with_exit_2():
    out = subprocess.run([sys.executable, "-m", "graph.placement", str(ROOT / "no_such.yaml"), "--gpus-per-node", "8",
                          "--gpu-memory-gb", "80"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "no_such.yaml" in out.stderr

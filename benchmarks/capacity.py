"""Capacity: H100 80 GB GPUs and 8-GPU nodes for N req/s of the seeds' mixed traffic (pure Python, no Ray).

    .venv/bin/python -m benchmarks.capacity                        # the table in benchmarks/RESULTS.md
    .venv/bin/python -m benchmarks.capacity --rates 10 100 1000 --utilisation 0.7 --batch-1

Method (benchmarks/RESULTS.md, "Capacity: GPUs for N requests/s"): the mix (benchmarks/serving.py MIX) goes through
serve_config.gpu.yaml's routing policy to get each tier's share. Each tier costs H100-seconds per request: the mean of
its latency profile (serve_config.sim.yaml) for one full batch (serve_config.gpu.yaml's max_batch_size, the sim
profile's batch_efficiency) divided by the batch. Little's law gives the busy GPUs (rate x H100-s per request).
Divided by the utilisation target, that gives the GPUs a tier needs, held by replicas of the profile's GPU fraction.
graph.placement packs those replicas onto 8 x 80 GB nodes. An M/M/c (Erlang C) queue per tier checks the p95
against loadtests/targets.yaml.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass

import yaml

from benchmarks.serving import MIX
from engines.intent import extract_text
from graph.config import ROOT, deployment_block, load_serve_config, prism_app
from graph.placement import NodeShape, Plan, ReplicaDemand, demands_from_app, plan, replicas_at_max_scale
from graph.routing import Features, PolicyConfig, decide, load_policy

GPUS_PER_NODE = 8
GPU_MEMORY_GB = 80.0
UTILISATION = 0.7       # target busy fraction of each tier's GPUs: headroom for bursts and the autoscaler's delay
EPS = 1e-9
# The seeds' labels for the MIX prompts (benchmarks/RESULTS.md "Routed vs monolith": 30 % backgrounds, 25 % icons,
# 20 % photoreal, 15 % typography, 10 % hero for pro users); the classifier gets 93-97 % of such prompts right.
INTENTS = {
    "soft teal to purple gradient background for slides": "background",
    "flat minimal app icon of a rocket": "icon",
    "a photo of a golden retriever on a beach at sunset, 35mm": "photoreal",
    'a poster that says "GRAND OPENING"': "typography",
    "hero image for our saas landing page, cinematic": "hero",
}
# Measured on this repo's 2-core CPU machine (benchmarks/RESULTS.md): graph overhead per request at concurrency 1
# (full graph 79.9 ms vs ingress only 33.7 ms), rapidocr median per image, MiniLM per prompt in batches of 16.
GRAPH_OVERHEAD_S = 0.046
OCR_S = 0.736
INTENT_S = 0.0065


@dataclass(frozen=True)
class Tier:
    """One generator tier: its H100 latency profile, batch and GPU share."""

    name: str
    p50_s: float
    p95_s: float
    batch_efficiency: float   # each extra item of a batch costs this fraction of one call
    batch: int                # max_batch_size, assumed full under load
    num_gpus: float           # the replica's GPU fraction
    memory_gb: float
    num_cpus: float = 1.0

    @property
    def mean_s(self) -> float:
        """Mean of the lognormal fitted to p50 / p95 (engines.generators.SimulatedEngine's fit)."""
        sigma = math.log(self.p95_s / self.p50_s) / 1.6449
        return self.p50_s * math.exp(sigma * sigma / 2)

    def batch_cost(self, one_s: float) -> float:
        """A full batch's time on a whole H100, from one call's time."""
        return one_s * (1 + self.batch_efficiency * (self.batch - 1))

    @property
    def gpu_s_per_request(self) -> float:
        """H100-seconds one request costs at full batches."""
        return self.batch_cost(self.mean_s) / self.batch


@dataclass(frozen=True)
class TierSizing:
    """A tier at one arrival rate: GPUs, replicas, and the p95 that the queue model gives them."""

    tier: Tier
    rate: float
    busy_gpus: float          # Little's law: rate x H100-seconds per request
    replicas: int             # holding busy_gpus / utilisation GPUs, at the tier's fraction each
    replicas_no_contention: int   # if co-located replicas ran at full speed each (the sim profile's assumption)
    p95_low_s: float          # queue p95 + a batch's p95 with the GPU to itself
    p95_high_s: float         # queue p95 + a batch's p95 with every co-located replica busy

    @property
    def gpus(self) -> float:
        return self.replicas * self.tier.num_gpus

    @property
    def gpus_no_contention(self) -> float:
        return self.replicas_no_contention * self.tier.num_gpus


def ceil(x: float) -> int:
    """Ceiling that ignores float noise: ceil(4.000000001) is 4."""
    return math.ceil(x - EPS)


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with `servers` and offered load `offered` (lambda / mu)."""
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):  # Erlang B by recursion: stable for thousands of servers
        b = offered * b / (k + offered * b)
    return servers * b / (servers - offered * (1 - b))


def p95_wait_s(servers: int, rate: float, service_s: float) -> float:
    """95th percentile of the wait in M/M/c: P(W > t) = C exp(-(c mu - lambda) t)."""
    if rate <= 0:
        return 0.0
    waits = erlang_c(servers, rate * service_s)
    if waits <= 0.05:
        return 0.0
    return math.log(waits / 0.05) / (servers / service_s - rate)


def size_tier(tier: Tier, rate: float, utilisation: float = UTILISATION, extra_s: float = 0.0) -> TierSizing:
    """Replicas for `rate` req/s at the utilisation target, and the p95 they give (plus `extra_s` per request)."""
    if rate <= 0:
        return TierSizing(tier, 0.0, 0.0, 0, 0, 0.0, 0.0)
    busy = rate * tier.gpu_s_per_request
    replicas = max(1, ceil(busy / (utilisation * tier.num_gpus)))
    # Shared compute: a replica holding a fraction f of a GPU runs at f of the GPU's speed when all its co-located
    # peers are busy (high), at full speed when they are idle (low).
    low, high = ((p95_wait_s(replicas, rate, tier.gpu_s_per_request / share) + tier.batch_cost(tier.p95_s) / share
                  + extra_s) for share in (1.0, tier.num_gpus))
    return TierSizing(tier, rate, busy, replicas, max(1, ceil(busy / utilisation)), low, high)


def max_rate(tier: Tier, replicas: int, utilisation: float = UTILISATION) -> float:
    """The req/s `replicas` of a tier serve at the utilisation target (the inverse of size_tier's replica count)."""
    return replicas * tier.num_gpus * utilisation / tier.gpu_s_per_request


def tiers_from_profiles(gpu: dict, sim: dict) -> dict[str, Tier]:
    """Each tier's latency profile (sim) with the batch size, GPU fraction and memory of the GPU profile."""
    gpu_app, sim_app = prism_app(gpu), prism_app(sim)
    out = {}
    for name, spec in gpu_app["args"]["tiers"].items():
        lat = sim_app["args"]["tiers"][name]
        options = deployment_block(gpu_app, f"Generator_{name}").get("ray_actor_options") or {}
        out[name] = Tier(name, lat["latency_ms_p50"] / 1000, lat["latency_ms_p95"] / 1000,
                         lat.get("batch_efficiency", 0.6), spec.get("max_batch_size", 1), float(options["num_gpus"]),
                         float(spec["gpu_memory_gb"]), float(options.get("num_cpus", 1)))
    return out


def policy_of(gpu: dict) -> PolicyConfig:
    app = prism_app(gpu)
    return load_policy(deployment_block(app, "Ingress")["user_config"]["routing"], tiers=set(app["args"]["tiers"]))


def route_shares(policy: PolicyConfig, mix: list[tuple[str, str]] = MIX) -> dict[str, tuple[str, float]]:
    """route -> (tier, share of requests) for the mix, decided by the policy's rules with nothing in flight."""
    counts: Counter = Counter()
    for prompt, user_tier in mix:
        features = Features(prompt=prompt, intent=INTENTS[prompt], confidence=1.0, user_tier=user_tier,
                            has_text=extract_text(prompt) is not None)
        d = decide(policy, features)
        counts[(d.route, d.tier)] += 1
    return {route: (tier, n / len(mix)) for (route, tier), n in counts.items()}


def fixed_gpu_demands(gpu: dict) -> list[ReplicaDemand]:
    """GPU replicas that are not generators (the Upscaler), at the profile's max scale: no latency profile to size."""
    return [d for d in demands_from_app(prism_app(gpu)) if not d.deployment.startswith("Generator_")]


def pack(demands: list[ReplicaDemand], gpus_per_node: int = GPUS_PER_NODE,
         gpu_memory_gb: float = GPU_MEMORY_GB) -> Plan:
    """The planner's packing on the fewest nodes where it has no problem (from the fractions' lower bound up)."""
    nodes = max(1, ceil(sum(d.num_gpus for d in demands) / gpus_per_node))
    while True:
        result = plan(demands, NodeShape(gpus_per_node, gpu_memory_gb, nodes))
        if result.ok:
            return result
        if not result.unplaced:  # something other than room (memory, a bad request): more nodes will not help
            raise ValueError("; ".join(result.problems))
        nodes += 1


@dataclass(frozen=True)
class LoadSizing:
    """Every tier at one total rate, and their packing."""

    rate: float
    tiers: list[tuple[str, float, TierSizing]]   # (route, share, sizing)
    packed: Plan
    fixed: list[ReplicaDemand]
    utilisation: float = UTILISATION

    @property
    def gpus_requested(self) -> float:
        return sum(s.gpus for _, _, s in self.tiers) + sum(d.num_gpus for d in self.fixed)

    @property
    def gpus_used(self) -> int:
        return sum(1 for g in self.packed.gpus if g.replicas)

    @property
    def nodes(self) -> int:
        return len({g.node for g in self.packed.gpus if g.replicas})

    @property
    def gpus_no_contention(self) -> float:
        return sum(s.gpus_no_contention for _, _, s in self.tiers) + sum(d.num_gpus for d in self.fixed)

    @property
    def cpu_cores(self) -> float:
        """CPU cores for OCR (typography route) and intent classification, at the utilisation target."""
        ocr = sum(s.rate for route, _, s in self.tiers if route == "typography") * OCR_S
        return (ocr + self.rate * INTENT_S) / self.utilisation


def size_load(rate: float, tiers: dict[str, Tier], shares: dict[str, tuple[str, float]],
              fixed: list[ReplicaDemand], utilisation: float = UTILISATION) -> LoadSizing:
    """Size every tier for `rate` req/s of the mix, then pack all GPU replicas with the planner."""
    sized, demands = [], list(fixed)
    for route, (tier_name, share) in sorted(shares.items(), key=lambda kv: -kv[1][1]):
        tier = tiers[tier_name]
        extra = GRAPH_OVERHEAD_S + (OCR_S if route == "typography" else 0.0)
        s = size_tier(tier, rate * share, utilisation, extra)
        sized.append((route, share, s))
        demands += [ReplicaDemand(f"Generator_{tier_name}", tier.num_gpus, tier.memory_gb, tier.num_cpus)] * s.replicas
    return LoadSizing(rate, sized, pack(demands), fixed, utilisation)


def profile_capacity(gpu: dict, tiers: dict[str, Tier], shares: dict[str, tuple[str, float]],
                     utilisation: float = UTILISATION) -> tuple[float, str]:
    """Total req/s of the mix the GPU profile serves at its max_replicas, and the tier that bounds it."""
    app = prism_app(gpu)
    per_tier: dict[str, float] = {}
    for tier_name, share in shares.values():
        per_tier[tier_name] = per_tier.get(tier_name, 0.0) + share
    rates = {name: max_rate(tiers[name], replicas_at_max_scale(deployment_block(app, f"Generator_{name}")),
                            utilisation) / share for name, share in per_tier.items()}
    bound = min(rates, key=rates.get)
    return rates[bound], bound


def route_targets(targets: dict, tiers: dict[str, Tier], shares: dict[str, tuple[str, float]],
                  profile: str = "sim") -> dict[str, float]:
    """p95 target in seconds per route: loadtests/targets.yaml's max_accepted_p95_ratio times the route's unloaded
    p95 (its tier's p95, the graph's own time, OCR on typography)."""
    ratio = targets[profile]["max_accepted_p95_ratio"]
    return {route: ratio * (tiers[tier].p95_s + GRAPH_OVERHEAD_S + (OCR_S if route == "typography" else 0.0))
            for route, (tier, _) in shares.items()}


def verdict(s: TierSizing, target: float) -> str:
    if s.p95_high_s <= target:
        return "within"
    return "at risk" if s.p95_low_s <= target else "over"


def format_tiers(loads: list[LoadSizing], targets: dict[str, float]) -> str:
    """Per load and tier: rate, batch, H100-s per request, busy GPUs, replicas, GPUs, p95 vs target."""
    lines = ["| load | route (tier) | share | req/s | batch | H100 s/req | busy H100s | replicas x GPU | GPUs "
             "| p95 est. s (GPU alone - shared) | p95 target s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for load in loads:
        for route, share, s in load.tiers:
            t = s.tier
            lines.append(f"| {load.rate:g} | {route} ({t.name}) | {share:.0%} | {s.rate:g} | {t.batch} "
                         f"| {t.gpu_s_per_request:.3f} | {s.busy_gpus:.2f} | {s.replicas} x {t.num_gpus:g} "
                         f"| {s.gpus:g} | {s.p95_low_s:.1f} - {s.p95_high_s:.1f} "
                         f"| {targets[route]:.1f} ({verdict(s, targets[route])}) |")
    return "\n".join(lines)


def format_totals(loads: list[LoadSizing], utilisation: float) -> str:
    lines = [f"| load (req/s) | GPU replicas | GPUs requested (sum of fractions) | H100 80 GB used (planner) "
             f"| nodes of {GPUS_PER_NODE} (planner) | GPUs if co-located replicas did not contend "
             f"| CPU cores, OCR + intent |",
             "|---|---|---|---|---|---|---|"]
    for load in loads:
        replicas = sum(s.replicas for _, _, s in load.tiers) + len(load.fixed)
        lines.append(f"| {load.rate:g} | {replicas} | {load.gpus_requested:g} | {load.gpus_used} | {load.nodes} "
                     f"| {load.gpus_no_contention:g} | {load.cpu_cores:.0f} |")
    lines.append(f"\nutilisation target {utilisation:.0%}; fixed GPU replicas at the profile's max scale: "
                 f"{', '.join(sorted({d.deployment for d in loads[0].fixed})) or 'none'} "
                 f"x{len(loads[0].fixed)} (no latency profile to size them by)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 100, 1000], help="total req/s of the mix")
    parser.add_argument("--utilisation", type=float, default=UTILISATION, help="target busy fraction, in (0, 1)")
    parser.add_argument("--batch-1", action="store_true", help="no batching gain: every batch holds one request")
    a = parser.parse_args(argv)
    if not 0 < a.utilisation < 1:
        parser.error(f"`--utilisation` must be in (0, 1) but is {a.utilisation}")
    gpu, sim = load_serve_config(ROOT / "serve_config.gpu.yaml"), load_serve_config(ROOT / "serve_config.sim.yaml")
    tiers = tiers_from_profiles(gpu, sim)
    if a.batch_1:
        tiers = {n: Tier(t.name, t.p50_s, t.p95_s, t.batch_efficiency, 1, t.num_gpus, t.memory_gb, t.num_cpus)
                 for n, t in tiers.items()}
    shares = route_shares(policy_of(gpu))
    fixed = fixed_gpu_demands(gpu)
    loads = [size_load(r, tiers, shares, fixed, a.utilisation) for r in sorted(a.rates)]
    targets = route_targets(yaml.safe_load((ROOT / "loadtests" / "targets.yaml").read_text()), tiers, shares)
    print(format_tiers(loads, targets))
    print()
    print(format_totals(loads, a.utilisation))
    rate, bound = profile_capacity(gpu, tiers, shares, a.utilisation)
    print(f"serve_config.gpu.yaml as configured (max_replicas): about {rate:.1f} req/s of this mix at "
          f"{a.utilisation:.0%}, bounded by the {bound} tier")
    return 0


if __name__ == "__main__":
    sys.exit(main())

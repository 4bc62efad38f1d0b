"""GPU placement planner: how Ray packs a profile's GPU replicas at max scale, and whether their memory fits.

Fractional `num_gpus` packs replicas onto one GPU but does not limit their memory (ray-project/ray#41432), so a
profile can be schedulable and still OOM at runtime. `plan` places every replica the way Ray would on a node
shape and checks each GPU's summed stated memory (`gpu_memory_gb`) against its capacity minus a reserve.

    python -m graph.placement serve_config.gpu.yaml --gpus-per-node 8 --gpu-memory-gb 80 --nodes 2
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field

import yaml

from graph.config import load_serve_config, prism_app

# Ray counts resources in fixed point, 1/10000 of a unit (FixedPoint, ray/common/scheduling); so does the
# planner, so ten 0.1 replicas fill a GPU exactly instead of leaving 1e-16 of it free.
UNIT = 10_000
EPS_GB = 1e-9
GENERATOR_PREFIX = "Generator_"
UPSCALER_DEFAULT_GB = 2.0  # engines.post.PostSpec.gpu_memory_gb's default (kept equal by a unit test)
SERVE_DEFAULT_NUM_CPUS = 1.0  # Ray Serve reserves one CPU per replica when ray_actor_options omits num_cpus


@dataclass(frozen=True)
class NodeShape:
    """A homogeneous cluster: `nodes` nodes of `gpus_per_node` GPUs of `gpu_memory_gb` each."""

    gpus_per_node: int
    gpu_memory_gb: float
    nodes: int = 1
    cpus_per_node: float | None = None
    reserve_gb: float = 2.0  # per GPU: CUDA context, allocator fragmentation

    def __post_init__(self):
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise ValueError(f"`gpus_per_node` and `nodes` must be >= 1 but are {self.gpus_per_node} and {self.nodes}")
        if not 0 <= self.reserve_gb < self.gpu_memory_gb:
            raise ValueError(f"`reserve_gb` must be in [0, gpu_memory_gb) but is {self.reserve_gb} "
                             f"(gpu_memory_gb {self.gpu_memory_gb})")
        if self.cpus_per_node is not None and self.cpus_per_node <= 0:
            raise ValueError(f"`cpus_per_node` must be > 0 but is {self.cpus_per_node}")

    @property
    def usable_gb(self) -> float:
        """Memory one GPU offers its replicas: capacity minus the reserve."""
        return self.gpu_memory_gb - self.reserve_gb


@dataclass(frozen=True)
class ReplicaDemand:
    """One replica's request: a GPU fraction (or whole GPUs), its stated peak GPU memory and its CPUs."""

    deployment: str
    num_gpus: float
    memory_gb: float
    num_cpus: float


@dataclass
class GpuSlot:
    """One GPU of the cluster and the replicas Ray would put on it."""

    node: int
    index: int
    replicas: list[ReplicaDemand] = field(default_factory=list)
    used_units: int = 0
    memory_gb: float = 0.0

    @property
    def used(self) -> float:
        """Fraction of this GPU's 1.0 handed out."""
        return self.used_units / UNIT

    @property
    def free_units(self) -> int:
        return UNIT - self.used_units


@dataclass
class Plan:
    """Where every GPU replica lands, what cannot be placed, and why the profile cannot run as configured."""

    gpus: list[GpuSlot]
    unplaced: list[ReplicaDemand]
    problems: list[str]
    warnings: list[str] = field(default_factory=list)  # risks that do not fail the plan

    @property
    def ok(self) -> bool:
        return not self.problems


def _units(num_gpus: float) -> int:
    return round(num_gpus * UNIT)


def replicas_at_max_scale(block: dict) -> int:
    """A deployment's replica count at max scale: autoscaling max_replicas, else num_replicas, else 1."""
    n = (block.get("autoscaling_config") or {}).get("max_replicas", block.get("num_replicas", 1))
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"deployment {block.get('name')!r}: state an integer `autoscaling_config.max_replicas` "
                         f"or `num_replicas` for the planner, not {n!r}")
    return n


def _memory_gb(name: str, args: dict) -> float:
    """Stated peak GPU memory of one replica of a GPU deployment: its model's, plus the upscaler's when post runs on
    the GPU (a generator replica finishes its renders where the pixels are, upscaler included)."""
    if name.startswith(GENERATOR_PREFIX):
        tier = name.removeprefix(GENERATOR_PREFIX)
        spec = (args.get("tiers") or {}).get(tier)
        if spec is None:
            raise ValueError(f"deployment {name!r} asks for GPUs but the app has no tier {tier!r}")
        memory = spec.get("gpu_memory_gb")
        if memory is None:
            raise ValueError(f"tier {tier!r} ({name}) asks for num_gpus but states no `gpu_memory_gb`: "
                             f"the planner cannot check what shares its GPU")
        post = args.get("post") or {}
        if post.get("gpuid", -1) >= 0:
            memory += post.get("gpu_memory_gb", UPSCALER_DEFAULT_GB)
    else:
        raise ValueError(f"deployment {name!r} asks for GPUs but has no stated memory "
                         f"(only {GENERATOR_PREFIX}<tier> states one)")
    if memory < 0:
        raise ValueError(f"deployment {name!r}: `gpu_memory_gb` must be >= 0 but is {memory}")
    return float(memory)


def demands_from_app(app: dict, include_cpu_only: bool = False) -> list[ReplicaDemand]:
    """One ReplicaDemand per GPU replica at max scale, in config order (all replicas with `include_cpu_only`)."""
    args = app.get("args") or {}
    demands = []
    for block in app.get("deployments") or []:
        name = block.get("name", "?")
        options = block.get("ray_actor_options") or {}
        num_gpus = float(options.get("num_gpus") or 0)
        if num_gpus < 0 or (num_gpus > 1 and not num_gpus.is_integer()):
            raise ValueError(f"deployment {name!r}: `num_gpus` must be a fraction in (0, 1] or a whole number "
                             f"but is {num_gpus:g}")
        if num_gpus == 0 and not include_cpu_only:
            continue
        memory = _memory_gb(name, args) if num_gpus > 0 else 0.0
        num_cpus = options.get("num_cpus")
        demand = ReplicaDemand(name, num_gpus, memory, SERVE_DEFAULT_NUM_CPUS if num_cpus is None else num_cpus)
        demands += [demand] * replicas_at_max_scale(block)
    return demands


def max_gpus_needed(demands: list[ReplicaDemand]) -> float:
    """Sum of the GPU requests: a lower bound on GPUs, reached only if the fractions pack perfectly."""
    return sum(_units(d.num_gpus) for d in demands if d.num_gpus > 0) / UNIT


def _slots_on_node(node: list[GpuSlot], units: int) -> list[GpuSlot] | None:
    """The GPUs of one node the raylet hands a request (Ray's NodeResourceInstanceSet::TryAllocate), or None."""
    if units >= UNIT:  # whole GPUs: the first wholly free ones
        free = [g for g in node if g.used_units == 0]
        return free[:units // UNIT] if len(free) >= units // UNIT else None
    fits = [g for g in node if g.free_units >= units]  # a fraction: best fit, the lowest index on a tie
    return [min(fits, key=lambda g: g.free_units)] if fits else None


def plan(demands: list[ReplicaDemand], shape: NodeShape) -> Plan:
    """Place every GPU replica the way Ray would and list what cannot run or cannot fit in GPU memory."""
    # The planner's model of Ray: replicas arrive largest request first (config order among equals); each goes
    # to the first node that can take it, and on that node the raylet gives a fraction the GPU it fills most
    # tightly, a whole request the first free GPUs. So fractions pack together: the dense case for memory.
    # Example, 1 node x 3 GPUs x 80 GB (78 usable), premium 1.0 (34 GB), fast 0.5 x 2 (28 GB), standard
    # 0.25 x 3 (18 GB): premium takes GPU 0 whole; fast #1 ties between GPUs 1 and 2 (1.0 free) -> GPU 1;
    # fast #2: GPU 1 (0.5 free, leaves 0) beats GPU 2 -> GPU 1, 56 GB; standard x 3 -> GPU 2, 0.75 and 54 GB.
    # Everything within 78 GB: ok. On 2 GPUs the standards find no 0.25 free: unplaced, PENDING forever in Ray.
    # Ray's real order is the order replicas start (and Serve spreads them over nodes), so `warnings` also
    # says when some other order could stack more memory on one GPU than it holds.
    gpus = [GpuSlot(n, i) for n in range(shape.nodes) for i in range(shape.gpus_per_node)]
    nodes = [gpus[n * shape.gpus_per_node:(n + 1) * shape.gpus_per_node] for n in range(shape.nodes)]
    unplaced = []
    for d in sorted((d for d in demands if d.num_gpus > 0), key=lambda d: -d.num_gpus):
        units = _units(d.num_gpus)
        slots = None if units > UNIT and units % UNIT else next(
            (s for s in (_slots_on_node(node, units) for node in nodes) if s), None)
        if slots is None:
            unplaced.append(d)
            continue
        for g in slots:
            g.replicas.append(d)
            g.used_units += min(units, UNIT)
            g.memory_gb += d.memory_gb / len(slots)  # a multi-GPU replica's memory split evenly
    problems = [*_over_memory(gpus, shape), *_too_big(demands, shape), *_unplaced(unplaced, gpus, demands),
                *_cpu_over(demands, shape)]
    return Plan(gpus, unplaced, problems, _order_risk(demands, gpus, shape))


def _mix(replicas: list[ReplicaDemand]) -> str:
    """'Generator_fast x2 (0.5), Upscaler x1 (0.1)': replicas grouped by deployment, in order of first appearance."""
    counts = Counter((d.deployment, d.num_gpus) for d in replicas)
    return ", ".join(f"{name} x{n} ({gpus:g})" for (name, gpus), n in counts.items())


def _capacity(shape: NodeShape) -> str:
    return f"{shape.usable_gb:g} GB usable ({shape.gpu_memory_gb:g} GB - {shape.reserve_gb:g} GB reserve)"


def _over_memory(gpus: list[GpuSlot], shape: NodeShape) -> list[str]:
    """Co-located replicas whose stated memory adds up to more than their GPU holds."""
    return [f"node {g.node} GPU {g.index}: {_mix(g.replicas)} together need {g.memory_gb:g} GB > {_capacity(shape)}"
            for g in gpus if len(g.replicas) > 1 and g.memory_gb > shape.usable_gb + EPS_GB]


def _too_big(demands: list[ReplicaDemand], shape: NodeShape) -> list[str]:
    """Deployments one replica of which is larger than a GPU (per GPU, for a multi-GPU replica)."""
    big = {}
    for d in demands:
        per_gpu = d.memory_gb / d.num_gpus if d.num_gpus >= 1 else d.memory_gb
        if d.num_gpus > 0 and per_gpu > shape.usable_gb + EPS_GB:
            big.setdefault(d.deployment, per_gpu)
    return [f"{name}: one replica needs {gb:g} GB per GPU, more than a GPU holds: {_capacity(shape)}"
            for name, gb in big.items()]


def _unplaced(unplaced: list[ReplicaDemand], gpus: list[GpuSlot], demands: list[ReplicaDemand]) -> list[str]:
    """Replicas Ray would leave PENDING forever: no GPU has room, or the request is not valid for one."""
    if not unplaced:
        return []
    bad = [d for d in unplaced if d.num_gpus > 1 and not float(d.num_gpus).is_integer()]
    notes = [f"{_mix(bad)}: num_gpus above 1 must be whole; Ray refuses the request"] if bad else []
    rest = [d for d in unplaced if d not in bad]
    if rest:
        span = "; a multi-GPU replica must fit on one node" if any(d.num_gpus > 1 for d in rest) else ""
        notes.append(f"unplaced, Ray leaves them PENDING: {_mix(rest)} (the cluster has {len(gpus)} GPUs, "
                     f"the requests sum to {max_gpus_needed(demands):g}{span})")
    return notes


def _cpu_over(demands: list[ReplicaDemand], shape: NodeShape) -> list[str]:
    """Total CPU requests above the cluster's CPUs (an aggregate check: it does not place CPUs per node)."""
    if shape.cpus_per_node is None:
        return []
    total, have = sum(d.num_cpus for d in demands), shape.cpus_per_node * shape.nodes
    return [f"CPUs: the replicas ask for {total:g} > {have:g} ({shape.nodes} x {shape.cpus_per_node:g})"] \
        if total > have + EPS_GB else []


def worst_gpu_mix(demands: list[ReplicaDemand]) -> tuple[float, list[ReplicaDemand]]:
    """The most stated memory any one GPU can be handed in some start order: fractions that sum to <= 1."""
    fractional = [d for d in demands if 0 < d.num_gpus < 1]
    if not fractional:
        return 0.0, []
    step = math.gcd(UNIT, *(_units(d.num_gpus) for d in fractional))
    cap = UNIT // step
    items = []  # a 0/1 knapsack over copies, at most as many of a kind as fit one GPU
    for d, n in Counter(fractional).items():
        items += [d] * min(n, cap // (_units(d.num_gpus) // step))
    best, keep = [0.0] * (cap + 1), []
    for d in items:
        size, took = _units(d.num_gpus) // step, [False] * (cap + 1)
        for c in range(cap, size - 1, -1):
            if best[c - size] + d.memory_gb > best[c]:
                best[c], took[c] = best[c - size] + d.memory_gb, True
        keep.append(took)
    chosen, c = [], cap
    for d, took in zip(reversed(items), reversed(keep), strict=True):
        if took[c]:
            chosen.append(d)
            c -= _units(d.num_gpus) // step
    return best[cap], chosen[::-1]


def _order_risk(demands: list[ReplicaDemand], gpus: list[GpuSlot], shape: NodeShape) -> list[str]:
    """A warning when some start order could put more memory on one GPU than it holds, though this plan fits."""
    if any(g.memory_gb > shape.usable_gb + EPS_GB for g in gpus):
        return []  # already a problem
    worst, mix = worst_gpu_mix(demands)
    if worst <= shape.usable_gb + EPS_GB:
        return []
    return [f"another start order could put {_mix(mix)} on one GPU: {worst:g} GB > {_capacity(shape)}"]


def format_plan(plan: Plan, shape: NodeShape) -> str:
    """The plan as a table, one line per used GPU, then what is unplaced, the problems and a verdict."""
    used = [g for g in plan.gpus if g.replicas]
    width = max([len("replicas"), *(len(_mix(g.replicas)) for g in used)])
    lines = [f"GPU placement at max scale: {shape.nodes} node(s) x {shape.gpus_per_node} GPU(s), "
             f"{_capacity(shape)} per GPU",
             f"{'node':>4} {'gpu':>3}  {'replicas':<{width}}  {'used':>4}  {'memory GB':>13}  fit"]
    for g in used:
        fit = "OK" if g.memory_gb <= shape.usable_gb + EPS_GB else "OVER"
        memory = f"{g.memory_gb:.1f} / {shape.usable_gb:g}"
        lines.append(f"{g.node:>4} {g.index:>3}  {_mix(g.replicas):<{width}}  {g.used:>4.2f}  {memory:>13}  {fit}")
    lines.append(f"idle GPUs: {len(plan.gpus) - len(used)}")
    if plan.unplaced:
        lines.append(f"unplaced (PENDING in Ray): {_mix(plan.unplaced)}")
    for title, notes in (("problems", plan.problems), ("warnings", plan.warnings)):
        lines += [f"{title}:", *(f"  - {n}" for n in notes)] if notes else []
    placed = round(sum(1 / max(1, d.num_gpus) for g in used for d in g.replicas))  # a 2-GPU replica is on 2
    gpu_replicas = placed + len(plan.unplaced)
    lines.append(f"{'OK' if plan.ok else 'FAIL'}: {len(used)} of {len(plan.gpus)} GPUs used, "
                 f"{len(plan.unplaced)} of {gpu_replicas} GPU replicas unplaced, {len(plan.problems)} problem(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the plan for a serve config on a node shape; exit 1 when it has problems, 2 on a bad config."""
    parser = argparse.ArgumentParser(prog="python -m graph.placement", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a serve config, e.g. serve_config.gpu.yaml")
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--reserve-gb", type=float, default=2.0, help="per-GPU headroom (CUDA context, fragmentation)")
    parser.add_argument("--cpus-per-node", type=float, default=None, help="also check the total CPU requests")
    parser.add_argument("--app", default="prism", help="the application's name in the serve config")
    a = parser.parse_args(argv)
    try:
        shape = NodeShape(a.gpus_per_node, a.gpu_memory_gb, a.nodes, a.cpus_per_node, a.reserve_gb)
        demands = demands_from_app(prism_app(load_serve_config(a.config), a.app), include_cpu_only=True)
    except (OSError, ValueError, yaml.YAMLError) as e:
        parser.error(str(e))
    result = plan(demands, shape)
    print(format_plan(result, shape))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Render the KubeRay RayService of the GPU profile from serve_config.gpu.yaml and the placement planner's plan.

    .venv/bin/python -m deploy.kuberay.render > deploy/kuberay/rayservice-gpu.yaml

The manifest is generated, never edited by hand: `serveConfigV2` is the profile's text verbatim, and the GPU worker
group is sized by graph.placement on nodes of GPUS_PER_NODE x GPU_MEMORY_GB. tests/unit/test_kuberay.py compares the
committed manifest with this script's output, so a changed profile fails the unit tests until it is regenerated.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from graph.config import ROOT, load_serve_config, prism_app
from graph.placement import NodeShape, Plan, ReplicaDemand, demands_from_app, plan

PROFILE = ROOT / "serve_config.gpu.yaml"
MANIFEST = Path(__file__).resolve().parent / "rayservice-gpu.yaml"
REQUIREMENTS = ROOT / "requirements.txt"

NAME = "prism"
APP = "prism"                    # the application in the profile
IMAGE = "prism:latest"           # built from this repository (deploy/kuberay/README.md)
GPUS_PER_NODE = 8                # one GPU worker Pod = one node of 8 x H100 80 GB
GPU_MEMORY_GB = 80.0
MAX_NODES = 64                   # how far the search for a plan goes; far above the profile's max scale
SYSTEM_CPUS = 2                  # per Pod beyond the replicas' num_cpus: raylet, agent, proxy (head: + GCS, dashboard)
HEAD_GIB_PER_CPU = 4             # head memory per CPU: MiniLM, OCR, the ingress, Ray's object store
BASE_GIB = 16                    # per GPU Pod beyond the replicas' weights: Ray's processes and object store
METRICS_PORT = 8080
DASHBOARD_PORT = 8265
MODEL_CACHE_PVC = "prism-model-cache"
HF_HOME = "/models/huggingface"
# KubeRay's own readiness probe for a RayService worker checks these two; a probe we declare replaces it whole
# (ray-operator/controllers/ray/common/pod.go, initLivenessAndReadinessProbe), so ours repeats them.
RAYLET_HEALTH_URL = "http://localhost:52365/api/local_raylet_healthz"
SCALES = {"min": ("min_replicas",), "initial": ("initial_replicas", "min_replicas"), "max": ("max_replicas",)}


@dataclass(frozen=True)
class GpuGroup:
    """The GPU worker group: Pods of one node each, how many at min / initial / max scale, and each Pod's size."""

    gpus_per_pod: int
    min_replicas: int
    replicas: int
    max_replicas: int
    num_cpus: int        # rayStartParams num-cpus: the CPUs of the replicas on the plan's busiest node
    cpu: int             # container request = limit
    memory_gib: int
    gpus_used: int       # at max scale
    gpu_replicas: int    # at max scale


@dataclass(frozen=True)
class Head:
    """The head Pod: the CPU-only replicas at max scale, and Ray's own processes."""

    num_cpus: int
    cpu: int
    memory_gib: int


def ray_version(requirements: Path = REQUIREMENTS) -> str:
    """The Ray version pinned in requirements.txt (the image installs that file)."""
    m = re.search(r"^ray(?:\[[^\]]*\])?==([\w.]+)\s*$", requirements.read_text(), re.MULTILINE)
    if m is None:
        raise ValueError(f"{requirements} pins no `ray==X.Y.Z`; the manifest's rayVersion must match the image")
    return m.group(1)


def at_scale(app: dict, scale: str) -> dict:
    """A copy of the app whose autoscaled deployments have `max_replicas` = their replica count at `scale`."""
    out = copy.deepcopy(app)
    for block in out.get("deployments") or []:
        auto = block.get("autoscaling_config")
        if auto:  # Serve's defaults: min_replicas 1, initial_replicas = min_replicas
            auto["max_replicas"] = next((auto[k] for k in SCALES[scale] if k in auto), 1)
    return out


def smallest_plan(demands: list[ReplicaDemand], gpus_per_node: int = GPUS_PER_NODE,
                  gpu_memory_gb: float = GPU_MEMORY_GB, max_nodes: int = MAX_NODES) -> Plan:
    """The plan on the fewest nodes of this shape that places every GPU replica with no problem."""
    for nodes in range(1, max_nodes + 1):
        result = plan(demands, NodeShape(gpus_per_node, gpu_memory_gb, nodes))
        if result.ok:
            return result
    raise ValueError(f"the profile does not fit {max_nodes} nodes of {gpus_per_node} x {gpu_memory_gb:g} GB: "
                     f"{'; '.join(result.problems)}")


def nodes_used(result: Plan) -> int:
    return len({g.node for g in result.gpus if g.replicas})


def per_node_load(result: Plan) -> dict[int, tuple[float, float]]:
    """(CPUs, stated GPU memory in GB) of the replicas the plan puts on each node."""
    load: dict[int, tuple[float, float]] = {}
    for g in result.gpus:
        for d in g.replicas:
            share = 1 / max(1.0, d.num_gpus)  # a multi-GPU replica is listed on each of its GPUs: count it once
            cpus, gb = load.get(g.node, (0.0, 0.0))
            load[g.node] = (cpus + d.num_cpus * share, gb + d.memory_gb * share)
    return load


def size_gpu_group(app: dict) -> GpuGroup:
    """Pods from the plans at min / initial / max scale; each Pod sized for the busiest node at max scale."""
    plans = {scale: smallest_plan(demands_from_app(at_scale(app, scale))) for scale in SCALES}
    top = plans["max"]
    load = per_node_load(top).values()
    num_cpus = math.ceil(max((c for c, _ in load), default=0))
    # Host RAM: diffusers stages a pipeline's weights in host memory while loading it, so a node needs room for the
    # stated size of every model the plan puts there, plus Ray's own.
    memory = math.ceil(max((gb for _, gb in load), default=0)) + BASE_GIB
    return GpuGroup(GPUS_PER_NODE, nodes_used(plans["min"]), nodes_used(plans["initial"]), nodes_used(top), num_cpus,
                    num_cpus + SYSTEM_CPUS, memory, sum(1 for g in top.gpus if g.replicas),
                    len(demands_from_app(app)))


def size_head(app: dict) -> Head:
    """The head hosts the CPU-only deployments (ingress, intent, typography) at max scale: the head has no GPUs."""
    cpus = math.ceil(sum(d.num_cpus for d in demands_from_app(app, include_cpu_only=True) if d.num_gpus == 0))
    return Head(cpus, cpus + SYSTEM_CPUS, (cpus + SYSTEM_CPUS) * HEAD_GIB_PER_CPU)


def serve_port(config: dict) -> int:
    """The Serve HTTP port; refuses a loopback host, which no Service or probe outside the Pod could reach."""
    http = config.get("http_options") or {}
    if http.get("host", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"http_options.host is {http.get('host', '127.0.0.1 (the default)')}: a Pod's proxy must bind "
                         f"0.0.0.0 for the Serve Service and the readiness probe to reach it")
    return int(http.get("port", 8000))


def _pod_metadata(component: str) -> dict:
    return {"labels": {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": component},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                            "prometheus.io/path": "/metrics"}}


def _resources(cpu: int, memory_gib: int, gpus: int = 0) -> dict:
    quantities = {"cpu": str(cpu), "memory": f"{memory_gib}Gi"}
    limits = {**quantities, "nvidia.com/gpu": str(gpus)} if gpus else dict(quantities)
    return {"requests": quantities, "limits": limits}


def _ports(port: int, *extra: tuple[str, int]) -> list[dict]:
    return [{"name": name, "containerPort": number} for name, number in (*extra, ("serve", port),
                                                                          ("metrics", METRICS_PORT))]


def worker_readiness_probe(port: int) -> dict:
    """Raylet alive, this node's Serve proxy up, and Prism's /healthz answered through it."""
    checks = [f"wget --tries 1 -T 2 -q -O- {RAYLET_HEALTH_URL} | grep -q success",
              f"wget --tries 1 -T 2 -q -O- http://localhost:{port}/-/healthz | grep -q success",
              f"wget --tries 1 -T 5 -q -O- http://localhost:{port}/healthz | grep -q '\"status\":\"ok\"'"]
    return {"exec": {"command": ["bash", "-c", " &&\n".join(checks)]},
            "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 10, "failureThreshold": 3,
            "successThreshold": 1}


def head_group(head: Head, port: int) -> dict:
    """Head group: no GPUs, so no generator lands there; no /healthz probe (see the manifest's header)."""
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT),
                           "num-cpus": str(head.num_cpus), "num-gpus": "0"},
        "template": {
            "metadata": _pod_metadata("ray-head"),
            "spec": {"containers": [{
                "name": "ray-head",
                "image": IMAGE,
                "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                "ports": _ports(port, ("gcs-server", 6379), ("dashboard", DASHBOARD_PORT), ("client", 10001)),
                "resources": _resources(head.cpu, head.memory_gib),
            }]},
        },
    }


def worker_group(group: GpuGroup, port: int) -> dict:
    """One GPU worker group of whole nodes, with the weights' cache mounted read-only."""
    return {
        "groupName": f"gpu-h100x{group.gpus_per_pod}",
        "replicas": group.replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT), "num-cpus": str(group.num_cpus),
                           "num-gpus": str(group.gpus_per_pod)},
        "template": {
            "metadata": _pod_metadata("ray-worker-gpu"),
            "spec": {
                "containers": [{
                    "name": "ray-worker",
                    "image": IMAGE,
                    "env": [{"name": "HF_HOME", "value": HF_HOME}, {"name": "HF_HUB_OFFLINE", "value": "1"}],
                    "ports": _ports(port),
                    "resources": _resources(group.cpu, group.memory_gib, group.gpus_per_pod),
                    "readinessProbe": worker_readiness_probe(port),
                    "volumeMounts": [{"name": "model-cache", "mountPath": HF_HOME, "readOnly": True}],
                }],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "volumes": [{"name": "model-cache",
                             "persistentVolumeClaim": {"claimName": MODEL_CACHE_PVC, "readOnly": True}}],
            },
        },
    }


def idle_timeout_s(app: dict) -> int:
    """Node idle timeout: the longest downscale delay, so a node outlives the replicas Serve keeps warm on it."""
    delays = [(b.get("autoscaling_config") or {}).get("downscale_delay_s", 0) for b in app.get("deployments") or []]
    return int(max([60, *delays]))


def manifest(config: dict, profile_text: str, rayver: str) -> dict:
    """The RayService as a dict: serveConfigV2 verbatim, a CPU head, one GPU worker group sized by the planner."""
    app = prism_app(config, APP)
    port = serve_port(config)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": NAME}},
        "spec": {
            "serveConfigV2": profile_text,
            "rayClusterConfig": {
                "rayVersion": rayver,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": idle_timeout_s(app)},
                "authOptions": {"mode": "token"},
                "headGroupSpec": head_group(size_head(app), port),
                "workerGroupSpecs": [worker_group(size_gpu_group(app), port)],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so serveConfigV2 reads as the profile file it is."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def header(config: dict, rayver: str) -> str:
    """The manifest's leading comment: its source, the plan it encodes, and the choices that are not obvious."""
    app = prism_app(config, APP)
    g, h = size_gpu_group(app), size_head(app)
    lines = [
        "GENERATED by `python -m deploy.kuberay.render > deploy/kuberay/rayservice-gpu.yaml` from",
        "serve_config.gpu.yaml and graph/placement.py. Do not edit: change the profile and regenerate",
        "(tests/unit/test_kuberay.py fails until the two agree). How to apply it: deploy/kuberay/README.md.",
        "",
        f"GPU plan (graph.placement, nodes of {GPUS_PER_NODE} x H100 {GPU_MEMORY_GB:g} GB): at max scale "
        f"{g.gpu_replicas} GPU replicas use {g.gpus_used} GPUs on {g.max_replicas} node(s);",
        f"min scale {g.min_replicas} node(s), initial {g.replicas}. One worker Pod = one node: {g.gpus_per_pod} GPUs, "
        f"{g.num_cpus} CPUs for replicas + {SYSTEM_CPUS} for Ray,",
        f"memory = stated weights on the busiest node + {BASE_GIB} GiB. Head: {h.num_cpus} CPUs for the CPU-only "
        f"replicas at max scale + {SYSTEM_CPUS}.",
        "",
        "serveConfigV2 is serve_config.gpu.yaml verbatim: no adaptation was needed (it already binds 0.0.0.0 with",
        "proxy_location EveryNode; the renderer refuses a loopback host).",
        "Token auth (Ray 2.60): authOptions.mode token makes KubeRay (v1.5.1+) create a Secret with the token and set",
        "RAY_AUTH_MODE / RAY_AUTH_TOKEN in every Ray container; its dashboard client sends the token when it submits",
        "serveConfigV2. Health endpoints and the Serve HTTP port are not behind the token.",
        "Readiness: the worker probe repeats KubeRay's default checks (raylet, Serve proxy /-/healthz) and adds",
        "Prism's /healthz, because a declared probe replaces KubeRay's. The head gets none: KubeRay submits",
        "serveConfigV2 only once the head is ready, so a /healthz probe there would never pass, and it",
        "manages the head's Serve endpoint itself.",
        "serviceUnhealthySecondThreshold / deploymentUnhealthySecondThreshold are left out: KubeRay marks them",
        "deprecated and no longer reads them (ray-project/kuberay#1665, #1688).",
    ]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines) + f"# Ray {rayver}, image {IMAGE}.\n"


def render(profile: Path = PROFILE, requirements: Path = REQUIREMENTS) -> str:
    """The manifest's full text."""
    text = profile.read_text()
    config = load_serve_config(profile)
    rayver = ray_version(requirements)
    body = yaml.dump(manifest(config, text, rayver), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    return header(config, rayver) + body


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())

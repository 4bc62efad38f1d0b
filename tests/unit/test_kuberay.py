"""The KubeRay RayService manifest (deploy/kuberay/): schema-level checks, no cluster."""

import re

import pytest
import yaml

from deploy.kuberay import render
from graph.config import ROOT, load_serve_config, prism_app
from graph.placement import NodeShape, ReplicaDemand, demands_from_app, plan

GPU_PROFILE = ROOT / "serve_config.gpu.yaml"
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice-gpu.yaml"
GPUS_PER_NODE, H100_GB = 8, 80.0


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def cluster(manifest) -> dict:
    return manifest["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def gpu_group(cluster) -> dict:
    groups = cluster["workerGroupSpecs"]
    assert len(groups) == 1, f"one GPU worker group expected, got {[g['groupName'] for g in groups]}"
    return groups[0]


def pods(cluster) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"]["template"]),
            *((g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"])]


def container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def gpu_demands(app: dict, scale: str) -> list[ReplicaDemand]:
    """The profile's GPU replicas at min or max scale, counted here rather than by the renderer."""
    at_max = demands_from_app(app)  # one ReplicaDemand per GPU replica at max scale
    if scale == "max":
        return at_max
    out = []
    for block in app["deployments"]:
        kind = [d for d in at_max if d.deployment == block["name"]]
        auto = block.get("autoscaling_config")
        n = auto.get("min_replicas", 1) if auto else block.get("num_replicas", 1)  # Serve's default min is 1
        out += kind[:1] * n
    return out


def fits(demands: list[ReplicaDemand], nodes: int) -> bool:
    """Does the planner place every one of these GPU replicas on `nodes` nodes of 8 x 80 GB?"""
    return nodes >= 1 and plan(demands, NodeShape(GPUS_PER_NODE, H100_GB, nodes)).ok


def test_manifest_is_a_rayservice(manifest):
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"] == "prism"


def test_serve_config_is_the_gpu_profile(manifest):
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve == load_serve_config(GPU_PROFILE)  # no adaptation: the profile already binds 0.0.0.0
    app = prism_app(serve)
    assert app["import_path"] == "graph.app:build_app"
    assert serve["http_options"]["host"] == "0.0.0.0"


def test_render_output_equals_the_committed_manifest():
    assert render.render() == MANIFEST.read_text(), (
        "deploy/kuberay/rayservice-gpu.yaml is stale: run "
        "`.venv/bin/python -m deploy.kuberay.render > deploy/kuberay/rayservice-gpu.yaml`")


def test_a_changed_profile_changes_the_manifest(tmp_path):
    text = GPU_PROFILE.read_text()
    bigger = re.sub(r"(- name: Generator_premium\n(?:.*\n)*?.*max_replicas: )4", r"\g<1>12", text, count=1)
    assert bigger != text
    profile = tmp_path / "serve_config.gpu.yaml"
    profile.write_text(bigger)
    out = yaml.safe_load(render.render(profile=profile))
    group = out["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    demands = demands_from_app(prism_app(load_serve_config(profile)))
    assert fits(demands, group["maxReplicas"]) and not fits(demands, group["maxReplicas"] - 1)
    assert group["maxReplicas"] > yaml.safe_load(MANIFEST.read_text())["spec"]["rayClusterConfig"][
        "workerGroupSpecs"][0]["maxReplicas"]  # 8 more premium replicas need more nodes
    assert render.render(profile=profile) != MANIFEST.read_text()


def test_gpu_group_matches_the_planner(gpu_group):
    app = prism_app(load_serve_config(GPU_PROFILE))
    limits = container(gpu_group["template"])["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(GPUS_PER_NODE)
    assert gpu_group["rayStartParams"]["num-gpus"] == str(GPUS_PER_NODE)
    # Each bound is the fewest nodes its scale fits: it fits, and one node fewer does not (checked here without the
    # renderer's own search, so a renderer that sized the group wrongly fails).
    for scale, key in (("max", "maxReplicas"), ("min", "minReplicas")):
        demands = gpu_demands(app, scale)
        assert fits(demands, gpu_group[key]), (scale, gpu_group[key])
        assert not fits(demands, gpu_group[key] - 1), (scale, gpu_group[key])
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]


def test_gpu_pod_has_cpus_for_every_replica_the_plan_puts_on_a_node(gpu_group):
    app = prism_app(load_serve_config(GPU_PROFILE))
    p = plan(demands_from_app(app), NodeShape(GPUS_PER_NODE, H100_GB, gpu_group["maxReplicas"]))
    per_node: dict[int, float] = {}
    for g in p.gpus:
        for d in g.replicas:
            per_node[g.node] = per_node.get(g.node, 0.0) + d.num_cpus / max(1.0, d.num_gpus)
    num_cpus = int(gpu_group["rayStartParams"]["num-cpus"])
    assert num_cpus >= max(per_node.values())
    requests = container(gpu_group["template"])["resources"]["requests"]
    assert int(requests["cpu"]) > num_cpus  # room for Ray's own processes
    assert requests == {k: v for k, v in container(gpu_group["template"])["resources"]["limits"].items()
                        if k != "nvidia.com/gpu"}


def test_head_has_no_gpus_and_exports_metrics(cluster):
    head = cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-gpus"] == "0"
    assert params["dashboard-host"] == "0.0.0.0"
    assert params["metrics-export-port"] == "8080"
    resources = container(head["template"])["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    cpu_only = sum(d.num_cpus for d in demands_from_app(prism_app(load_serve_config(GPU_PROFILE)),
                                                      include_cpu_only=True) if d.num_gpus == 0)
    assert int(params["num-cpus"]) >= cpu_only


def test_every_pod_carries_the_scrape_annotations_and_metrics_port(cluster):
    for name, template in pods(cluster):
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == "8080", name
        assert {"name": "metrics", "containerPort": 8080} in container(template)["ports"], name


def test_worker_readiness_probe_hits_healthz_on_the_serve_port(cluster, gpu_group):
    probe = container(gpu_group["template"])["readinessProbe"]
    script = probe["exec"]["command"][-1]
    assert "http://localhost:8000/healthz" in script
    assert "http://localhost:8000/-/healthz" in script  # KubeRay's own Serve proxy check, kept
    assert "api/local_raylet_healthz" in script          # and its raylet check
    # The head has none: KubeRay submits serveConfigV2 only once the head is ready (render.py's header).
    assert "readinessProbe" not in container(cluster["headGroupSpec"]["template"])


def test_weights_come_from_a_read_only_cache_offline(gpu_group):
    spec = gpu_group["template"]["spec"]
    env = {e["name"]: e["value"] for e in container(gpu_group["template"])["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    mounts = {m["mountPath"]: m for m in container(gpu_group["template"])["volumeMounts"]}
    assert mounts[env["HF_HOME"]]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts[env["HF_HOME"]]["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "prism-model-cache", "readOnly": True}


def test_token_auth_and_no_deprecated_fields(manifest, cluster):
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == render.ray_version()
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(manifest["spec"])
    for _, template in pods(cluster):
        assert container(template)["image"] == "prism:latest"


LOOPBACK_CASES = [
    pytest.param({"http_options": {"host": "127.0.0.1", "port": 8000}}, id="loopback"),
    pytest.param({"http_options": {"port": 8000}}, id="serve_default_host_is_loopback"),
    pytest.param({}, id="no_http_options"),
]


@pytest.mark.parametrize("config", LOOPBACK_CASES)
def test_a_loopback_proxy_is_refused(config):
    with pytest.raises(ValueError, match="0.0.0.0"):
        render.serve_port(config)


def test_a_replica_larger_than_a_gpu_fits_no_plan():
    with pytest.raises(ValueError, match="does not fit 3 nodes"):
        render.smallest_plan([ReplicaDemand("Generator_huge", 1.0, 90.0, 1.0)], max_nodes=3)


def test_at_scale_uses_serve_defaults():
    app = {"deployments": [{"name": "a", "autoscaling_config": {"max_replicas": 5}},
                           {"name": "b", "autoscaling_config": {"min_replicas": 0, "initial_replicas": 2,
                                                                "max_replicas": 5}},
                           {"name": "c", "num_replicas": 3}]}
    replicas = {s: [(b.get("autoscaling_config") or {}).get("max_replicas", b.get("num_replicas"))
                    for b in render.at_scale(app, s)["deployments"]] for s in render.SCALES}
    assert replicas == {"min": [1, 0, 3], "initial": [1, 2, 3], "max": [5, 5, 3]}
    assert app["deployments"][0]["autoscaling_config"] == {"max_replicas": 5}  # the input is not changed

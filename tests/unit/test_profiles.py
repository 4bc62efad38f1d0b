"""Both serve profiles load as Ray Serve configs and state what the GPU plan needs."""

import pytest
from ray.serve.schema import ServeDeploySchema

from graph.app import AppArgs, generator_deployment_name
from graph.config import ROOT, deployment_block, load_serve_config, prism_app

PROFILES = ["serve_config.yaml", "serve_config.gpu.yaml", "serve_config.sim.yaml"]


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_is_a_valid_serve_config(profile):
    cfg = ServeDeploySchema.model_validate(load_serve_config(ROOT / profile))
    assert cfg.applications[0].import_path == "graph.app:build_app"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_deployment_sets_its_queue_and_resources(profile):
    app = prism_app(load_serve_config(ROOT / profile))
    args = AppArgs.model_validate(app["args"])
    for name in ["Ingress", "IntentClassifier", "Upscaler", *map(generator_deployment_name, args.tiers)]:
        block = deployment_block(app, name)
        assert block, f"{profile} has no deployments entry for {name}"
        assert "max_ongoing_requests" in block and "max_queued_requests" in block, name
        assert "num_cpus" in block["ray_actor_options"]


def test_cpu_profile_fits_two_cores_at_max_scale():
    app = prism_app(load_serve_config(ROOT / "serve_config.yaml"))
    total = 0.0
    for block in app["deployments"]:
        replicas = block.get("autoscaling_config", {}).get("max_replicas", block.get("num_replicas", 1))
        total += replicas * block["ray_actor_options"]["num_cpus"]
        assert "num_gpus" not in block["ray_actor_options"]
    assert total <= 2.0


def test_gpu_profile_uses_fractional_gpus_diffusers_and_scale_to_zero():
    app = prism_app(load_serve_config(ROOT / "serve_config.gpu.yaml"))
    args = AppArgs.model_validate(app["args"])
    gpus = {t: deployment_block(app, generator_deployment_name(t))["ray_actor_options"]["num_gpus"]
            for t in args.tiers}
    assert any(0 < g < 1 for g in gpus.values()) and gpus["premium"] == 1.0
    assert deployment_block(app, "Generator_premium")["autoscaling_config"]["min_replicas"] == 0
    for spec in args.tiers.values():
        assert spec.kind == "diffusers" and spec.local_files_only and spec.gpu_memory_gb
    # Fractions leave room for the stated memory on one 80 GB GPU (fractional GPUs do not limit memory).
    for tier, spec in args.tiers.items():
        per_gpu = int(1 / gpus[tier])
        assert per_gpu * spec.gpu_memory_gb <= 80, tier

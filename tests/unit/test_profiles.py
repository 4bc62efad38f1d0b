"""Every serve profile loads as a Ray Serve config and states what the GPU plan needs."""

import pytest
from ray.serve.schema import ServeDeploySchema

from engines.generators import REMOTE_KINDS
from graph.app import AppArgs, generator_deployment_name
from graph.config import ROOT, deployment_block, load_serve_config, prism_app, validate_profile
from graph.routing import load_policy

PROFILES = ["serve_config.yaml", "serve_config.gpu.yaml", "serve_config.sim.yaml", "serve_config.hybrid.yaml"]


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


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_validates_without_api_keys(profile, monkeypatch):
    for env in ("OPENAI_API_KEY", "IDEOGRAM_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    assert validate_profile(ROOT / profile) == []


def test_hybrid_profile_hosted_tiers_are_light_priced_and_fall_back_to_self_hosted():
    app = prism_app(load_serve_config(ROOT / "serve_config.hybrid.yaml"))
    args = AppArgs.model_validate(app["args"])
    hosted = {t for t, spec in args.tiers.items() if spec.kind in REMOTE_KINDS}
    assert {args.tiers[t].kind for t in hosted} == set(REMOTE_KINDS)
    for tier in hosted:
        spec, block = args.tiers[tier], deployment_block(app, generator_deployment_name(tier))
        assert spec.api_key_env and spec.cost.usd_per_image > 0, tier
        assert "num_gpus" not in block["ray_actor_options"] and block["ray_actor_options"]["num_cpus"] <= 0.25
        assert block["max_ongoing_requests"] >= 32
    policy = load_policy(deployment_block(app, "Ingress")["user_config"]["routing"], tiers=set(args.tiers))
    for name, route in policy.routes.items():
        if route.tier in hosted:
            assert route.fallbacks and not set(route.fallbacks) & hosted, name
    assert args.tiers["premium"].provider_model == "dall-e-3" and args.tiers["premium"].quality == "hd"

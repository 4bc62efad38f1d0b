"""Every serve profile loads as a Ray Serve config and states what the GPU plan needs."""

import pytest
from ray.serve.schema import ServeDeploySchema

from engines.generators import REMOTE_KINDS
from graph.app import AppArgs, generator_deployment_name
from graph.config import ROOT, concurrency_problems, deployment_block, load_serve_config, prism_app, validate_profile
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
    for name in ["Ingress", *map(generator_deployment_name, args.tiers)]:
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
    assert args.tiers["premium"].provider_model == "gpt-image-2.6-sunburst" and args.tiers["premium"].quality == "high"


LINE_UP = [
    pytest.param("typography", "typography", "ideogram", "ideogram-4-5", id="typography_ideogram"),
    pytest.param("premium", "premium", "openai", "gpt-image-2.6-sunburst", id="hero_gpt_image"),
    pytest.param("backgrounds", "backgrounds", "google", "gemini-3.1-flash-lite-image", id="backgrounds_nb2_lite"),
    pytest.param("standard", "standard", "google", "gemini-3.1-flash-image", id="workhorse_nano_banana_2"),
    pytest.param("pro", "pro", "google", "gemini-3-pro-image", id="pro_branch_nano_banana_pro"),
]


@pytest.mark.parametrize(("route", "tier", "kind", "model"), LINE_UP)
def test_hybrid_line_up_routes_to_living_dated_hosted_models(route, tier, kind, model):
    from graph.lifecycle import lifecycle, today

    app = prism_app(load_serve_config(ROOT / "serve_config.hybrid.yaml"))
    spec = AppArgs.model_validate(app["args"]).tiers[tier]
    policy = load_policy(deployment_block(app, "Ingress")["user_config"]["routing"])
    assert policy.routes[route].tier == tier and (spec.kind, spec.provider_model) == (kind, model)
    assert lifecycle(kind, model, today()).status == "active"
    assert spec.cost.usd_per_image > 0 and spec.cost.checked and spec.cost.source.startswith("https://")


def test_hybrid_defaults_to_the_workhorse_and_branches_paid_users_to_nano_banana_pro():
    app = prism_app(load_serve_config(ROOT / "serve_config.hybrid.yaml"))
    policy = load_policy(deployment_block(app, "Ingress")["user_config"]["routing"])
    assert policy.default_route == "standard"
    branch = next(r for r in policy.rules if r.route == "pro")
    assert set(branch.match.user_tiers) == {"pro", "enterprise"} and branch.match.intents is None
    names = [r.name for r in policy.rules]
    # Hero shots and text go to their own models first; the branch takes paying users' everyday images.
    assert names.index("hero-paid-premium") < names.index(branch.name)
    assert names.index("exact-text") < names.index(branch.name)


RETIRED_COPIES = [
    pytest.param("gpt-image-2.6-sunburst", "dall-e-3", "gpt-image-2.5-sunburst", id="dall_e_3"),
    pytest.param("gemini-3.1-flash-lite-image", "imagen-4.0-fast-generate-001", "gemini-3.1-flash-image",
                 id="imagen_4_fast"),
]


@pytest.mark.parametrize(("live", "retired", "successor"), RETIRED_COPIES)
def test_a_hybrid_copy_naming_a_retired_model_is_refused_naming_the_successor(tmp_path, live, retired, successor):
    text = (ROOT / "serve_config.hybrid.yaml").read_text()
    assert f"provider_model: {live}" in text
    copy = tmp_path / "hybrid-copy.yaml"
    copy.write_text(text.replace(f"provider_model: {live}", f"provider_model: {retired}"))
    problems = validate_profile(copy)
    assert len(problems) == 1 and f"{retired!r} was shut down" in problems[0] and f"use {successor!r}" in problems[0]


def test_graph_config_warns_of_an_announced_retirement_and_a_stale_price(tmp_path, monkeypatch):
    import datetime as dt

    import graph.lifecycle
    from graph.config import profile_warnings
    from graph.lifecycle import Retirement

    assert profile_warnings(ROOT / "serve_config.hybrid.yaml") == []
    soon = Retirement("google", "gemini-3-pro-image", dt.date(2099, 6, 1), "gemini-9-pro-image", "https://x.test/d")
    monkeypatch.setattr(graph.lifecycle, "CATALOGUE", (soon,))
    text = (ROOT / "serve_config.hybrid.yaml").read_text().replace("checked: 2026-12-03", "checked: 2020-01-01", 1)
    copy = tmp_path / "hybrid-copy.yaml"
    copy.write_text(text)
    warnings = profile_warnings(copy)
    assert any("tiers.pro" in w and "announced for retirement on 2099-06-01" in w for w in warnings)
    assert any("tiers.typography" in w and "checked on 2020-01-01" in w for w in warnings)


# A local model's max_ongoing_requests is admission's slots per replica (graph/config.py: concurrency_problems).
def _with_generator(ongoing: int, kind: str = "builtin") -> tuple[dict, dict]:
    app = {"deployments": [{"name": "Generator_fast", "max_ongoing_requests": ongoing}]}
    return app, {"fast": {"kind": kind, "max_batch_size": 4, "batch_efficiency": 0.5}}


def test_a_local_generator_taking_more_renders_than_its_slots_is_a_problem_naming_the_fix():
    app, tiers = _with_generator(8)
    assert concurrency_problems(app, tiers, 1.2) == [
        "deployments: Generator_fast max_ongoing_requests is 8, but admission gives a replica 1 slot(s) "
        "(batch_efficiency 0.5, max_slowdown 1.2): set it to 1"]
    assert concurrency_problems(*_with_generator(1), 1.2) == []


def test_a_generator_capped_below_its_slots_is_a_problem_hosted_or_not():
    app, tiers = _with_generator(1)
    assert "set it to 3" in concurrency_problems(app, tiers, 2.0)[0]  # 1 + (2.0 - 1) / 0.5 = 3 slots
    assert "set it to 8" in concurrency_problems(*_with_generator(4, kind="openai"), 1.2)[0]  # hosted: 8 side by side


def test_a_hosted_generator_may_take_more_than_its_slots():
    assert concurrency_problems(*_with_generator(64, kind="openai"), 1.2) == []

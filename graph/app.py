"""Builds and binds the DAG from typed args: the `import_path` of serve_config*.yaml (graph.app:build_app).

Only binding happens here. Replicas, autoscaling, queues and GPU fractions live in the serve config; the routing
policy (with admission) is the Ingress's `user_config` (live-reloaded by `serve deploy`). The graph has two kinds of
deployment: the Ingress (HTTP, the door, intent in-process, routing, admission, records) and one Generator per tier,
which renders and finishes (post, typography, PNG) where the pixels are.
"""

from __future__ import annotations

from ray.serve import Application

from graph.settings import AppArgs, generator_deployment_name

__all__ = ["AppArgs", "build_app", "generator_deployment_name"]


def build_app(args: AppArgs) -> Application:
    """Bind Ingress({tier: Generator(spec, finish)}, settings)."""
    from deployments.generator import Generator
    from deployments.ingress import Ingress

    if isinstance(args, dict):  # Python callers may pass the YAML block as a dict
        args = AppArgs.model_validate(args)
    finish = {"post": args.post.model_dump(), "typography": args.typography.model_dump()}
    generators = {
        tier: Generator.options(name=generator_deployment_name(tier)).bind(spec.model_dump(), finish, tier)
        for tier, spec in args.tiers.items()
    }
    settings = args.model_dump(
        include={"profile", "max_width", "max_height", "max_body_bytes", "overload_status", "tiers", "records",
                 "intent", "typography", "auth", "webhooks"})
    return Ingress.bind(generators, settings)

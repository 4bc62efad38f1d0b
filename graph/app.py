"""Builds and binds the DAG from typed args: the `import_path` of serve_config*.yaml (graph.app:build_app).

Only binding happens here. Replicas, autoscaling, queues and GPU fractions live in the serve config;
the routing policy is the Ingress's `user_config` (live-reloaded by `serve deploy`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from engines.generators import ModelSpec
from engines.post import PostSpec
from graph.records import RecordsSpec
from graph.schemas import SIZE_MAX, SIZE_MIN, SIZE_STEP, TypographySpec


class IntentSpec(BaseModel):
    """The intent stage: how long a request waits for it before it is routed without an intent."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(
        default=10.0, gt=0, le=300,
        description="Past this (or when the classifier's replicas are gone or die twice) the request is routed by "
                    "the rules that need no intent (text, keywords, regex, tiers), marked degraded.")
    fault_marker_path: str | None = Field(
        default=None, description="Fault injection for tests: while this file exists, classify hangs.")


class AppArgs(BaseModel):
    """The application's args block in serve_config*.yaml."""

    model_config = ConfigDict(extra="forbid")

    profile: str = Field(default="cpu", description="A name for logs and responses (cpu, gpu, ...).")
    max_width: int = Field(default=512, ge=SIZE_MIN, le=SIZE_MAX, multiple_of=SIZE_STEP)
    max_height: int = Field(default=512, ge=SIZE_MIN, le=SIZE_MAX, multiple_of=SIZE_STEP)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    overload_status: Literal[503, 429] = Field(
        default=503, description="Status when every model of a route is at capacity (with Retry-After).")
    tiers: dict[str, ModelSpec] = Field(min_length=1)
    post: PostSpec = Field(default_factory=PostSpec)
    typography: TypographySpec = Field(default_factory=TypographySpec)
    records: RecordsSpec = Field(default_factory=RecordsSpec, description="Render records: where and how long.")
    intent: IntentSpec = Field(default_factory=IntentSpec)

    @model_validator(mode="after")
    def _tier_names(self) -> AppArgs:
        for name in self.tiers:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"tier name {name!r} must be letters, digits and underscores")
        return self


def generator_deployment_name(tier: str) -> str:
    """The deployment name a tier gets (what serve_config's `deployments:` entries refer to)."""
    return f"Generator_{tier}"


def build_app(args: AppArgs) -> Application:
    """Bind Ingress(IntentClassifier, {tier: Generator(spec)}, Upscaler(post), Typography(ocr), settings)."""
    from deployments.generator import Generator
    from deployments.ingress import Ingress
    from deployments.intent import IntentClassifier
    from deployments.typography import Typography
    from deployments.upscaler import Upscaler

    if isinstance(args, dict):  # Python callers may pass the YAML block as a dict
        args = AppArgs.model_validate(args)
    generators = {
        tier: Generator.options(name=generator_deployment_name(tier)).bind(spec.model_dump())
        for tier, spec in args.tiers.items()
    }
    settings = args.model_dump(
        include={"profile", "max_width", "max_height", "max_body_bytes", "overload_status", "tiers", "records",
                 "intent"})
    return Ingress.bind(IntentClassifier.bind(args.intent.fault_marker_path), generators,
                        Upscaler.bind(args.post.model_dump()), Typography.bind(args.typography.model_dump()), settings)

"""The application's typed args (the `args:` block of serve_config*.yaml), as data: no Ray, no deployments.

graph/app.py binds the deployments from these; graph/config.py validates a profile with them before `serve deploy`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.generators import ModelSpec
from engines.post import PostSpec
from graph.auth import AuthSpec
from graph.records import RecordsSpec
from graph.schemas import SIZE_MAX, SIZE_MIN, SIZE_STEP, TypographySpec


class IntentSpec(BaseModel):
    """The intent stage (MiniLM + head, in the ingress process): how long a request waits for it before it is routed
    without an intent."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(
        default=10.0, gt=0, le=300,
        description="Past this (or when the classifier fails) the request is routed by the rules that need no "
                    "intent (text, keywords, regex, tiers), marked degraded.")
    fault_marker_path: str | None = Field(
        default=None, description="Fault injection for tests: while this file exists, classify hangs.")


class WebhookSpec(BaseModel):
    """Where async jobs' webhooks may go (graph/jobs.py): a profile serving on loopback may call loopback receivers;
    the others call public addresses only, unless a host is allow-listed."""

    model_config = ConfigDict(extra="forbid")

    allow_private: bool = Field(default=False, description="Allow private, loopback and link-local targets.")
    allow_hosts: list[str] = Field(default_factory=list, description="Hosts allowed whatever they resolve to.")


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
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API keys: required, optional or off (graph/auth.py).")
    webhooks: WebhookSpec = Field(default_factory=WebhookSpec, description="Async jobs' webhook targets.")

    @model_validator(mode="after")
    def _tier_names(self) -> AppArgs:
        for name in self.tiers:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"tier name {name!r} must be letters, digits and underscores")
        return self


def generator_deployment_name(tier: str) -> str:
    """The deployment name a tier gets (what serve_config's `deployments:` entries refer to)."""
    return f"Generator_{tier}"

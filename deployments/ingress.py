"""Ingress deployment: the HTTP API and the request's path (DESIGN.md), one numbered step at a time."""

# No `from __future__ import annotations` here: FastAPI must see real types on the methods Serve wraps.


import asyncio
import dataclasses
import logging
import random
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from engines.intent import extract_text
from graph.cost import render_cost
from graph.errors import (
    CapacityError,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    NotSupported,
    PrismError,
    StageFailed,
)
from graph.http import make_app, request_id_of
from graph.images import b64_png
from graph.load import TierLoad, retry_after_s, should_shed
from graph.prefilter import PrefilterConfig, check_prompt
from graph.routing import Features, PolicyConfig, apply_brownout, decide, load_policy, resolve_model
from graph.schemas import (
    Fallback,
    GenerateJob,
    GenerationRequest,
    GenerationResponse,
    ImageDatum,
    IntentResult,
    OcrInfo,
    PrismInfo,
    RouteDecision,
    RouteResponse,
)

log = logging.getLogger("ray.serve")
app = make_app()


# Reasons a generator attempt fails that a lower guidance may cure (artefacts, not infrastructure).
GUIDANCE_CURABLE = ("nan", "blank")
# Reasons that mean "no capacity now" rather than "the models produced garbage": a chain that failed only for
# these answers 503 + Retry-After (come back later), otherwise 502.
CAPACITY_REASONS = ("overloaded", "shed", "deadline", "oom")


class _ReplicaDied(Exception):
    def __init__(self, stage: str, error: str):
        super().__init__(f"{stage}: {error}")
        self.stage, self.error = stage, error


class _AttemptTimeout(Exception):
    """A model attempt passed the route's attempt_timeout_ms while the request's deadline still holds."""


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, intent, generators: dict, upscaler, typography, settings: dict):
        """Hold the downstream handles and the profile's limits; the policy comes in reconfigure()."""
        self.intent = intent
        self.generators = generators
        self.upscaler = upscaler
        self.typography = typography
        self.settings = settings
        self.prefilter = PrefilterConfig()
        self.tier_specs: dict[str, dict] = settings["tiers"]
        self.policy: PolicyConfig | None = None
        self.policy_loaded_at: float | None = None
        self.policy_rejected: dict | None = None
        self.inflight = 0
        self.load = {tier: TierLoad() for tier in generators}
        # CPU-bound stages after generation are shed the same way when they cannot finish in time.
        self.stage_load = {"post": TierLoad(), "typography": TierLoad()}
        self._versions: dict[str, str] = {}
        app.state.max_body_bytes = settings.get("max_body_bytes", app.state.max_body_bytes)
        app.state.behind_serve_proxy = True

    def reconfigure(self, config: dict) -> None:
        """Apply a routing policy from user_config; an invalid one is rejected and the old one keeps serving."""
        try:
            policy = load_policy((config or {}).get("routing", {}), tiers=set(self.generators))
            prefilter = PrefilterConfig.model_validate((config or {}).get("prefilter", {}))
        except ValueError as e:  # pydantic's ValidationError is a ValueError too
            if self.policy is None:
                raise  # nothing to keep serving: fail the deploy with the message
            self.policy_rejected = {"error": str(e), "at": time.time()}
            log.error("routing policy rejected, keeping version %s: %s", self.policy.version, e)
            return
        self.policy, self.prefilter = policy, prefilter
        self.policy_loaded_at, self.policy_rejected = time.time(), None
        log.info("routing policy version %s applied (%d rules)", policy.version, len(policy.rules))

    # ---- HTTP routes -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness of the ingress and the policy it serves."""
        return {"status": "ok", "policy_version": self.policy.version if self.policy else None,
                "tiers": sorted(self.generators), "replica": serve.get_replica_context().replica_id.unique_id}

    @app.get("/v1/policy")
    async def get_policy(self) -> dict:
        """The routing policy in force, and the last rejected update if any."""
        return {"policy": self.policy.model_dump() if self.policy else None, "loaded_at": self.policy_loaded_at,
                "rejected": self.policy_rejected}

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        """OpenAI-style model list: every route and tier a request may name in `model`."""
        names = sorted(self.policy.routes) + sorted(self.generators) + sorted(self.policy.model_aliases)
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "prism"} for n in names]}

    @app.get("/v1/load")
    async def get_load(self) -> dict:
        """This ingress replica's view of load: requests in flight, and per tier in flight and EWMA service time."""
        return {"inflight": self.inflight, "tiers": {t: ld.snapshot() for t, ld in self.load.items()},
                "stages": {s: ld.snapshot() for s, ld in self.stage_load.items()}}

    @app.get("/v1/tiers")
    async def tiers(self) -> dict:
        """Each tier's model, version, kind and counters (batches, OOM splits, failed checks, cancellations)."""
        infos = await asyncio.gather(*(h.info.remote() for h in self.generators.values()), return_exceptions=True)
        return {tier: (info if isinstance(info, dict) else {"error": type(info).__name__})
                for tier, info in zip(self.generators, infos, strict=True)}

    @app.post("/v1/route", response_model=RouteResponse)
    async def route(self, req: GenerationRequest, request: Request) -> RouteResponse:
        """Classify and route without generating."""
        rid, timings, t0 = request_id_of(request), {}, time.perf_counter()
        self._check_limits(req)
        check_prompt(req.prompt, self.prefilter)
        intent = await self._classify(req, timings)
        decision, notes = self._decide(req, intent, timings)
        model, version = await self._model_of(decision.tier)
        timings["total"] = _ms(t0)
        return RouteResponse(request_id=rid, intent=intent, decision=decision, model=model, model_version=version,
                             notes=notes, timings_ms=timings)

    @app.post("/v1/images/generations", response_model=GenerationResponse)
    async def generations(self, req: GenerationRequest, request: Request) -> JSONResponse:
        """OpenAI-compatible image generation through the whole graph."""
        self.inflight += 1
        try:
            body = await self._render(req, request_id_of(request))
        finally:
            self.inflight -= 1
        return JSONResponse(body.model_dump())

    # ---- the request's path ------------------------------------------------------------------------

    async def _render(self, req: GenerationRequest, rid: str) -> GenerationResponse:
        t0, timings = time.perf_counter(), {}
        # 1. Validate what the schema cannot know: this profile's limits, unsupported options, prompt sanity.
        width, height = self._check_limits(req)
        check_prompt(req.prompt, self.prefilter)
        timings["validate"] = _ms(t0)
        # 2. Intent.
        intent = await self._classify(req, timings)
        # 3. Route; the route's latency budget becomes the request's deadline.
        decision, notes = self._decide(req, intent, timings)
        deadline = t0 + decision.max_latency_ms / 1000
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        job = GenerateJob(prompt=req.prompt, seed=seed, n=req.n, steps=decision.steps, guidance=decision.guidance,
                          request_id=rid)
        # 4. Generate, walking the fallback chain on failed checks, errors, OOM and stage deadlines.
        t = time.perf_counter()
        result, tier, fallbacks = await self._generate_with_fallbacks(job, decision, deadline)
        timings["generate"] = _ms(t)
        # 5. Post: denoise, upscale to the requested size, normalise colour. (Before typography, unlike
        #    DESIGN.md's list: text composited after upscaling keeps exact, sharp glyphs.)
        t = time.perf_counter()
        post = await self._stage("post", lambda: self.upscaler.process.remote(result.images, width, height), deadline)
        timings["post"] = _ms(t)
        images = post["images"]
        # 6. Typography: exact text composited, then OCR-checked (when the request carries text).
        ocr = None
        if intent.text_to_render:
            t = time.perf_counter()
            images, ocr = await self._typeset(images, intent.text_to_render, req.prompt, deadline)
            timings["typography"] = _ms(t)
        # 8. Respond.
        t = time.perf_counter()
        data = await asyncio.to_thread(lambda: [ImageDatum(b64_json=b64_png(im)) for im in images])
        timings["encode"] = _ms(t)
        timings["total"] = _ms(t0)
        cost = self.tier_specs[tier].get("cost", {})
        native = self.tier_specs[tier]["native_size"]
        if result.extra.get("note"):
            notes.append(result.extra["note"])
        if post["backend"] != "none":
            notes.append(f"upscaled x{post['scale']} by {post['backend']} from {native}px")
        prism = PrismInfo(
            request_id=rid, intent=intent, route=decision.route, rule=decision.rule, tier=tier, model=result.model,
            model_version=result.model_version, seed=seed, steps=result.steps, guidance=result.guidance,
            native_size=f"{native}x{native}", timings_ms=timings,
            cost_usd=render_cost(cost.get("usd_per_image", 0.0), cost.get("usd_per_second", 0.0), req.n,
                                 result.compute_s),
            degraded=decision.degraded, fallbacks=fallbacks, ocr=ocr, notes=notes, ignored_fields=req.ignored_fields)
        return GenerationResponse(created=int(time.time()), data=data, prism=prism)

    async def _typeset(self, images: list, text: str, prompt: str, deadline: float) -> tuple[list, OcrInfo]:
        out = await self._stage("typography", lambda: self.typography.render.remote(images, text, prompt), deadline)
        if out.get("error") == "text_does_not_fit":
            raise InvalidRequest(f"`text` does not fit the requested size: {out['detail']}", param="text")
        ocr = OcrInfo.model_validate(out["ocr"])
        if not out["passed"]:
            raise GenerationFailed(
                f"the text could not be rendered readably: after {ocr.layouts_tried} layouts {ocr.backend} read "
                f"{ocr.read!r} for {text!r} (character error rate {ocr.cer:.2f})", param="text")
        return out["images"], ocr

    def _check_limits(self, req: GenerationRequest) -> tuple[int, int]:
        width, height = req.width_height
        max_w, max_h = self.settings["max_width"], self.settings["max_height"]
        if width > max_w or height > max_h:
            raise InvalidRequest(f"`size` must be at most {max_w}x{max_h} in this profile but is {req.size}",
                                 param="size")
        if req.response_format == "url":
            raise NotSupported("`response_format` 'url' is not yet supported (needs render records); use 'b64_json'",
                               param="response_format")
        return width, height

    async def _classify(self, req: GenerationRequest, timings: dict) -> IntentResult:
        t = time.perf_counter()
        if req.intent is not None:
            result = IntentResult(label=req.intent, confidence=1.0, scores={req.intent: 1.0}, source="override",
                                  text_to_render=req.text or extract_text(req.prompt))
        else:
            raw = await self._until(self.intent.classify.remote(req.prompt), None, "intent")
            result = IntentResult.model_validate(raw)
            if req.text:
                result.text_to_render = req.text
        timings["intent"] = _ms(t)
        return result

    def _decide(self, req: GenerationRequest, intent: IntentResult, timings: dict) -> tuple[RouteDecision, list]:
        t = time.perf_counter()
        notes = []
        forced, note = resolve_model(self.policy, req.model, set(self.generators))
        if note:
            notes.append(note)
        features = Features(prompt=req.prompt, intent=intent.label, confidence=intent.confidence,
                            user_tier=req.user_tier, quality=req.quality, has_text=bool(intent.text_to_render),
                            inflight=self.inflight)
        decision = decide(self.policy, features, forced=forced)
        decision = apply_brownout(self.policy, decision, {t: ld.inflight for t, ld in self.load.items()})
        timings["route"] = _ms(t)
        return decision, notes

    async def _model_of(self, tier: str) -> tuple[str, str]:
        if tier not in self._versions:
            info = await self.generators[tier].info.remote()
            self._versions[tier] = info["model_version"]
        return self.tier_specs[tier]["name"], self._versions[tier]

    async def _generate_with_fallbacks(self, job: GenerateJob, decision: RouteDecision, deadline: float):
        """Try the route's tier, then each fallback, within the retry budget; every failure is reported.

        A failed check that lower guidance may cure (NaN, blank) first retries the same model with
        guidance x retry_guidance_factor, when the route sets one (seed 000: artefacts at high CFG).
        """
        tiers = [decision.tier, *decision.fallbacks]
        budget = decision.max_attempts or (len(tiers) * (2 if decision.retry_guidance_factor else 1))
        fallbacks: list[Fallback] = []
        died: set[str] = set()
        i, guidance, lowered = 0, job.guidance, False
        while i < len(tiers) and len(fallbacks) < budget:
            tier, t = tiers[i], time.perf_counter()
            reason, detail, result = await self._attempt(tier, dataclasses.replace(job, guidance=guidance),
                                                         decision, deadline)
            if reason is None:
                return result, tier, fallbacks
            fallbacks.append(Fallback(model=self.tier_specs[tier]["name"], tier=tier, reason=reason,
                                      elapsed_ms=_ms(t), guidance=guidance, detail=detail[:300]))
            if reason == "replica_died" and tier not in died:
                # Idempotent retry: the dead replica returned nothing, so the render runs once more on a
                # live (or replacement) replica of the same tier; a second death moves down the chain.
                died.add(tier)
                continue
            if reason in GUIDANCE_CURABLE and decision.retry_guidance_factor and not lowered:
                base = guidance if guidance is not None else self.tier_specs[tier]["guidance"]
                guidance, lowered = round(base * decision.retry_guidance_factor, 3), True
                continue
            i, guidance, lowered = i + 1, job.guidance, False
        self._raise_chain_failed(decision, fallbacks)

    async def _attempt(self, tier: str, job: GenerateJob, decision: RouteDecision, deadline: float):
        """One model attempt -> (failure reason or None, detail, result); sheds early what cannot finish in time."""
        load, parallel = self.load[tier], self.tier_specs[tier].get("max_batch_size", 1)
        attempt_deadline = None
        if decision.attempt_timeout_ms:
            attempt_deadline = time.perf_counter() + decision.attempt_timeout_ms / 1000
        # Shed now what would only time out later: a fast 503 beats a slow one.
        limit = deadline if attempt_deadline is None else min(deadline, attempt_deadline)
        if should_shed(load, parallel, limit - time.perf_counter()):
            return "shed", f"{load.inflight} in flight at ~{load.ewma_s:.2f}s each: cannot finish in time", None
        try:
            with load.track():
                result = await self._until(self.generators[tier].generate.remote(job), deadline, f"generate:{tier}",
                                           attempt_deadline=attempt_deadline)
        except _AttemptTimeout:
            return "deadline", f"no answer within attempt_timeout_ms={decision.attempt_timeout_ms}", None
        except _ReplicaDied as e:
            return "replica_died", f"the {e.stage} replica died mid-render ({e.error})", None
        except CapacityError as e:
            return "overloaded", e.message, None
        except PrismError as e:
            if isinstance(e, DeadlineExceeded):
                raise
            return e.code, e.message, None
        except Exception as e:  # a replica crashed or the call failed: try the next model
            log.warning("tier %s failed: %r", tier, e)
            return "error", type(e).__name__, None
        if result.failure:
            return result.failure, result.detail, None
        self._versions[tier] = result.model_version
        return None, "", result

    def _raise_chain_failed(self, decision: RouteDecision, fallbacks: list[Fallback]):
        reasons = "; ".join(f"{f.model}: {f.reason}" for f in fallbacks)
        details = [f.model_dump() for f in fallbacks]
        if fallbacks and all(f.reason in CAPACITY_REASONS for f in fallbacks):
            # Retry-After from the queue state: when the soonest of the tiers tried has drained what it holds.
            retry = min(retry_after_s(self.load[f.tier], self.tier_specs[f.tier].get("max_batch_size", 1))
                        for f in fallbacks)
            err = CapacityError(f"every model on route {decision.route!r} is at capacity ({reasons})",
                                retry_after_s=retry, details=details)
            err.status_code = self.settings.get("overload_status", 503)
            raise err
        raise GenerationFailed(f"every model on route {decision.route!r} failed ({reasons})", details=details)

    async def _stage(self, stage: str, call, deadline: float):
        """A post-generation stage call, shed (503 + Retry-After) when its queue cannot finish it in time."""
        load = self.stage_load[stage]
        if should_shed(load, 1, deadline - time.perf_counter()):
            raise CapacityError(f"stage {stage} is overloaded: {load.inflight} in flight at ~{load.ewma_s:.2f}s each "
                                f"cannot finish before the request's deadline", retry_after_s=retry_after_s(load, 1))
        for attempt in (1, 2):
            try:
                with load.track():
                    return await self._until(call(), deadline, stage)
            except _ReplicaDied as e:
                if attempt == 2:
                    raise StageFailed(stage, f"stage {stage} failed: its replica died twice ({e.error})") from None
                log.warning("stage %s: replica died mid-call (%s); retrying once", stage, e.error)

    async def _until(self, response, deadline: float | None, stage: str, attempt_deadline: float | None = None):
        """Await a downstream call within the deadline; map Serve's overload and availability errors."""
        limit = deadline if attempt_deadline is None else min(deadline, attempt_deadline)
        timeout = None if limit is None else limit - time.perf_counter()
        try:
            if timeout is not None and timeout <= 0:
                raise TimeoutError
            return await asyncio.wait_for(response, timeout)
        except TimeoutError:
            response.cancel()
            if attempt_deadline is not None and attempt_deadline < deadline:
                raise _AttemptTimeout from None
            raise DeadlineExceeded(f"stage {stage} did not finish within the request's deadline") from None
        except BackPressureError:
            raise CapacityError(f"stage {stage} is at capacity (its queue is full)", retry_after_s=1) from None
        except DeploymentUnavailableError:
            raise CapacityError(f"stage {stage} has no replica available", retry_after_s=5) from None
        except RayActorError as e:
            # The replica died while holding the call (Serve retries only calls not yet started, ray#47237):
            # the caller decides whether to run it again. Named by stage, not by whoever noticed (ray#61758).
            raise _ReplicaDied(stage, type(e).__name__) from None
        except RayServeException as e:
            raise PrismError(f"stage {stage} failed: {type(e).__name__}") from None

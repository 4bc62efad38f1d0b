"""Ingress deployment: the HTTP API and the request's path (DESIGN.md), one numbered step at a time."""

# No `from __future__ import annotations` here: FastAPI must see real types on the methods Serve wraps.


import asyncio
import base64
import dataclasses
import logging
import math
import random
import time
from pathlib import Path

from fastapi import Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import (
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from engines.intent import extract_text
from graph.canary import CanaryMonitor, split_key
from graph.cost import SpendLedger, StoreSpend, attempt_cost, model_price
from graph.errors import (
    CapacityError,
    Conflict,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    NotSupported,
    PrismError,
    StageFailed,
)
from graph.http import make_app, request_id_of
from graph.images import png_bytes
from graph.load import TierLoad, retry_after_s, should_shed
from graph.metrics import PrismMetrics
from graph.prefilter import PrefilterConfig, check_prompt
from graph.records import RecordsSpec, open_store, summarize
from graph.routing import (
    Features,
    PolicyConfig,
    apply_brownout,
    apply_budget,
    apply_canary,
    decide,
    load_policy,
    resolve_model,
)
from graph.schemas import (
    Fallback,
    GenerateJob,
    GenerationRequest,
    GenerationResponse,
    IntentResult,
    OcrInfo,
    PrismInfo,
    ReplayRequest,
    RouteDecision,
    RouteResponse,
)
from graph.trace import CAPACITY_REASONS, Trace, request_hash

log = logging.getLogger("ray.serve")
# The playground (web/): one page and its two assets, read once per replica (at import), not per request on the
# event loop; no build step, no CDN.
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
WEB_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
WEB_FILES = {name: (WEB_DIR / name).read_bytes() for name in ("index.html", *WEB_ASSETS)}
app = make_app()


# Reasons a generator attempt fails that a lower guidance may cure (artefacts, not infrastructure).
GUIDANCE_CURABLE = ("nan", "blank")
# CAPACITY_REASONS (graph/trace.py) mean "no capacity now" rather than "the models produced garbage": a chain
# that failed only for these answers 503 + Retry-After (come back later), otherwise 502.
MAX_CANARY_EVENTS = 50


# What a call sees when the replica holding it is gone: the actor died (RayActorError, ActorUnavailableError), its
# node died, the worker process crashed, or the result's owner went with it (ObjectLostError, OwnerDiedError).
_REPLICA_LOST = (RayActorError, NodeDiedError, WorkerCrashedError, ObjectLostError, LocalRayletDiedError)


class _ReplicaDied(Exception):
    def __init__(self, stage: str, error: str):
        super().__init__(f"{stage}: {error}")
        self.stage, self.error = stage, error


class _AttemptTimeout(Exception):
    """A model attempt passed the route's attempt_timeout_ms while the request's deadline still holds."""


async def call_retrying(stage: str, call, deadline: float | None):
    """A stage call that runs once more when its replica dies holding it (the call is idempotent): a second
    death is a 502 naming the stage. Intent, upscaler and typography replicas can live on a node that dies."""
    for attempt in (1, 2):
        try:
            return await call_within(call(), deadline, stage)
        except _ReplicaDied as e:
            if attempt == 2:
                raise StageFailed(stage, f"stage {stage} failed: its replica died twice ({e.error})") from None
            log.warning("stage %s: replica died mid-call (%s); retrying once", stage, e.error)


async def call_within(response, deadline: float | None, stage: str, attempt_deadline: float | None = None):
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
    except _REPLICA_LOST as e:
        # The replica (or its node, or the worker holding the result) died while holding the call: Serve
        # retries only calls not yet started (ray#47237), so the caller decides whether to run it again.
        # Named by stage, not by whoever noticed (ray#61758).
        raise _ReplicaDied(stage, type(e).__name__) from None
    except PrismError:  # a replica's own PrismError (Ray re-raises it as one) keeps its status
        raise
    except (RayServeException, RayError) as e:  # anything else Ray raises: a clean 502 naming the stage
        raise StageFailed(stage, f"stage {stage} failed: {type(e).__name__}") from None


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
        self.model_of_tier = {t: spec["name"] for t, spec in self.tier_specs.items()}
        self.policy: PolicyConfig | None = None
        self.policy_loaded_at: float | None = None
        self.policy_rejected: dict | None = None
        self.inflight = 0
        self.load = {tier: TierLoad() for tier in generators}
        # CPU-bound stages after generation are shed the same way when they cannot finish in time.
        self.stage_load = {"post": TierLoad(), "typography": TierLoad()}
        self._versions: dict[str, str] = {}
        # A hosted tier that answered 429: when it said to come back (Retry-After of a chain failing on it).
        self.rate_limited_until: dict[str, float] = {}
        self.records = RecordsSpec.model_validate(settings.get("records") or {})
        self.store = open_store(self.records)
        self.ledger = SpendLedger()  # this replica's spend; budgets read `spend`: the store's, across replicas
        self.spend = StoreSpend(self.store) if self.store is not None else self.ledger
        self.canaries: dict[str, CanaryMonitor] = {}
        # Request ids being rendered on this replica: a retry of one waits for it instead of rendering again.
        self._pending: dict[str, asyncio.Future] = {}
        self.canary_events: list[dict] = []
        self.metrics = PrismMetrics(routes=set(), tiers=set(generators), models=set(self.model_of_tier.values()))
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
        self.metrics.allowed["route"] = set(policy.routes) | {f"tier:{t}" for t in self.generators}
        # A canary whose tier and weight did not change keeps its window (and a rollback stays in force);
        # a new tier or weight starts afresh: that is how an operator re-enables a rolled-back canary.
        kept = {}
        for name, route in policy.routes.items():
            old = self.canaries.get(name)
            if route.canary is not None:
                kept[name] = old if old is not None and old.same_canary(route.canary) else CanaryMonitor(route.canary)
        self.canaries = kept
        log.info("routing policy version %s applied (%d rules)", policy.version, len(policy.rules))

    # ---- HTTP routes -------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The playground and compare page (web/index.html)."""
        return HTMLResponse(WEB_FILES["index.html"], headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        """The page's script and stylesheet: a fixed list, so no path from the URL reaches the filesystem."""
        if name not in WEB_ASSETS:
            raise NotFound(f"no static file {name!r}; have {sorted(WEB_ASSETS)}", param="name")
        return Response(WEB_FILES[name], media_type=WEB_ASSETS[name],
                        headers={"Cache-Control": "no-cache"})

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
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "prism",
                                            **model_price(n, self.tier_specs, self.policy)} for n in names]}

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

    @app.get("/v1/canary")
    async def canary(self) -> dict:
        """Every canary split: configured and effective weight, the window's outcomes, and rollback events."""
        routes = {name: {"tier": m.canary.tier, "weight": m.canary.weight, "effective_weight": m.weight,
                         "sticky": m.canary.sticky, "rollback": m.canary.rollback.model_dump() if m.canary.rollback
                         else None, "window": m.window(), "rolled_back": m.rolled_back}
                  for name, m in self.canaries.items()}
        return {"routes": routes, "events": self.canary_events}

    @app.get("/v1/stats")
    async def stats(self, minutes: float = Query(15, gt=0, le=43_200, description="Window in minutes.")) -> dict:
        """Per intent, route and model over the last N minutes: count, p50/p95, failure rate, fallbacks, cost."""
        store = self._store()
        since = time.time() - minutes * 60
        rows = await asyncio.to_thread(store.rows_since, since)
        return {"window_minutes": minutes, "since": since, "total": (summarize(rows, group_by=()) or [{}])[0],
                **{f"by_{key}": summarize(rows, group_by=(key,)) for key in ("intent", "route", "model")},
                "cost_by_user_tier": await asyncio.to_thread(store.cost_by_user_tier, since),
                "spend_by_user_tier": self.ledger.totals()}

    @app.get("/v1/renders")
    async def list_renders(
        self, intent: str | None = None, route: str | None = None, model: str | None = None,
        tier: str | None = None, user_tier: str | None = None, failed: bool | None = None,
        since: float | None = Query(None, ge=0, description="Unix seconds, inclusive."),
        until: float | None = Query(None, ge=0, description="Unix seconds, exclusive."),
        replay_of: str | None = None, limit: int = Query(50, ge=1, le=500),
        cursor: str | None = Query(None, max_length=64, description="next_cursor of the previous page."),
    ) -> dict:
        """Render records, newest first, filtered and paged (pass `next_cursor` back as `cursor`)."""
        try:
            page, nxt = await asyncio.to_thread(
                self._store().list, intent=intent, route=route, model=model, tier=tier, user_tier=user_tier,
                failed=failed, since=since, until=until, replay_of=replay_of, limit=limit, cursor=cursor)
        except ValueError as e:  # a cursor not made by this API
            raise InvalidRequest(f"`cursor` must be a `next_cursor` from a previous page ({e})",
                                 param="cursor") from None
        return {"object": "list", "data": [self._public(r) for r in page], "next_cursor": nxt}

    @app.get("/v1/renders/{rid}")
    async def get_render(self, rid: str, request: Request) -> dict:
        """One render record: request, intent, route, model + version, seed, fallbacks, OCR, timings, cost."""
        rec = await self._record_of(rid)
        replays, _ = await asyncio.to_thread(self._store().list, replay_of=rid, limit=100)
        base = str(request.base_url).rstrip("/")
        return {**self._public(rec), "replays": [r["id"] for r in replays],
                "image_urls": [self._image_url(base, rid, i) for i in range(len(rec.get("image_hashes") or []))]}

    @app.get("/v1/renders/{rid}/image.png")
    async def get_render_image(self, rid: str, index: int = Query(0, ge=0, le=3)) -> Response:
        """The recorded PNG (image `index` of an n>1 render)."""
        png = await asyncio.to_thread(self._store().image, rid, index)
        if png is None:
            raise NotFound(f"render {rid!r} has no image {index} (never recorded, failed, or past retention)",
                           param="index")
        return Response(content=png, media_type="image/png", headers={"Cache-Control": "public, max-age=31536000, "
                                                                                       "immutable"})

    @app.post("/v1/renders/{rid}/replay", response_model=GenerationResponse)
    async def replay(self, rid: str, body: ReplayRequest, request: Request) -> JSONResponse:
        """Re-run a recorded render's prompt, seed and params on another model or route; the records link."""
        rec = await self._record_of(rid)
        req = self._replay_request(rec, body)
        trace = Trace(rid=request_id_of(request), req=req, base_url=str(request.base_url).rstrip("/"),
                      replay_of=rec["id"])
        return await self._serve(trace)

    @app.post("/v1/route", response_model=RouteResponse)
    async def route(self, req: GenerationRequest, request: Request) -> RouteResponse:
        """Classify and route without generating."""
        rid, timings, t0 = request_id_of(request), {}, time.perf_counter()
        self._check_limits(req)
        check_prompt(req.prompt, self.prefilter)
        intent = await self._classify(req, timings)
        await self._refresh_spend()
        decision, notes = self._decide(req, intent, timings, rid)
        model, version = await self._model_of(decision.tier)
        timings["total"] = _ms(t0)
        return RouteResponse(request_id=rid, intent=intent, decision=decision, model=model, model_version=version,
                             notes=notes, timings_ms=timings)

    @app.post("/v1/images/generations", response_model=GenerationResponse)
    async def generations(self, req: GenerationRequest, request: Request) -> JSONResponse:
        """OpenAI-compatible image generation through the whole graph."""
        return await self._serve(Trace(rid=request_id_of(request), req=req,
                                       base_url=str(request.base_url).rstrip("/")))

    # ---- the request's path ------------------------------------------------------------------------

    async def _serve(self, trace: Trace) -> JSONResponse:
        """Render (or answer a retried request id from its record), then record, count and respond."""
        self.inflight += 1
        mine = None
        try:
            stored, mine = await self._claim(trace)
            if stored is not None:
                return stored
            try:
                body = await self._render(trace)
            except PrismError as e:
                trace.error = e
                await self._finish(trace)
                raise
            await self._finish(trace)
        finally:
            self.inflight -= 1
            self._release(trace.rid, mine)
        body.prism.recorded = trace.recorded
        if "record" in trace.timings:
            body.prism.timings_ms["record"] = trace.timings["record"]
        return self._respond(body, trace)

    async def _render(self, trace: Trace) -> GenerationResponse:
        req, t0, timings = trace.req, trace.t0, trace.timings
        # 1. Validate what the schema cannot know: this profile's limits, unsupported options, prompt sanity.
        width, height = self._check_limits(req)
        check_prompt(req.prompt, self.prefilter)
        timings["validate"] = _ms(t0)
        # 2. Intent.
        trace.intent = intent = await self._classify(req, timings)
        # 3. Route (rules, brownout, budget, canary); the route's latency budget becomes the request's deadline.
        await self._refresh_spend()
        decision, trace.notes = self._decide(req, intent, timings, trace.rid)
        trace.decision = decision
        deadline = t0 + decision.max_latency_ms / 1000
        trace.seed = seed = req.seed if req.seed is not None else random.randrange(2**31)
        job = GenerateJob(prompt=req.prompt, seed=seed, n=req.n, steps=decision.steps, guidance=decision.guidance,
                          request_id=trace.rid)
        # 4. Generate, walking the fallback chain on failed checks, errors, OOM and stage deadlines.
        t = time.perf_counter()
        result, tier = await self._generate_with_fallbacks(job, decision, deadline, trace)
        timings["generate"] = _ms(t)
        trace.tier, trace.model, trace.model_version = tier, result.model, result.model_version
        trace.steps, trace.guidance = result.steps, result.guidance
        # 5. Post: denoise, upscale to the requested size, normalise colour. (Before typography, unlike
        #    DESIGN.md's list: text composited after upscaling keeps exact, sharp glyphs.)
        t = time.perf_counter()
        post = await self._stage("post", lambda: self.upscaler.process.remote(result.images, width, height), deadline)
        timings["post"] = _ms(t)
        images = post["images"]
        # 6. Typography: exact text composited, then OCR-checked (when the request carries text).
        if intent.text_to_render:
            t = time.perf_counter()
            images, trace.ocr = await self._typeset(images, intent.text_to_render, req.prompt, deadline, trace)
            timings["typography"] = _ms(t)
        # 7. Encode (the record stores these PNG bytes; the response inlines or links them).
        t = time.perf_counter()
        trace.pngs = await asyncio.to_thread(lambda: [png_bytes(im) for im in images])
        timings["encode"] = _ms(t)
        timings["total"] = _ms(t0)
        native = self.tier_specs[tier]["native_size"]
        notes = trace.notes
        if result.extra.get("note"):
            notes.append(result.extra["note"])
        if post["backend"] != "none":
            notes.append(f"upscaled x{post['scale']} by {post['backend']} from {native}px")
        prism = PrismInfo(
            request_id=trace.rid, intent=intent, route=decision.route, rule=decision.rule, tier=tier,
            model=result.model, model_version=result.model_version, seed=seed, steps=result.steps,
            guidance=result.guidance, native_size=f"{native}x{native}", timings_ms=timings, cost_usd=trace.cost_usd,
            degraded=decision.degraded, fallbacks=trace.fallbacks, ocr=trace.ocr, notes=notes,
            ignored_fields=req.ignored_fields, canary=decision.canary, replay_of=trace.replay_of)
        trace.prism = prism.model_dump()
        return GenerationResponse(created=int(trace.created), data=[], prism=prism)

    def _respond(self, body: GenerationResponse, trace: Trace) -> JSONResponse:
        """8. Respond: PNGs inline (b64_json) or as links to the committed record (url)."""
        if trace.req.response_format == "url":
            data = [{"url": self._image_url(trace.base_url, trace.rid, i)} for i in range(len(trace.pngs))]
        else:
            data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in trace.pngs]
        out = body.model_dump(exclude={"data"})
        return JSONResponse({"created": out["created"], "data": data, "prism": out["prism"]})

    async def _finish(self, trace: Trace) -> None:
        """After every render, success or failure: commit its record (before the response leaves, so a url
        works at once and a retried request id finds it), count it, charge it, judge the canary."""
        rec = trace.record(self.model_of_tier)
        try:
            await self._commit(trace, rec)
        finally:
            self.ledger.add(trace.req.user_tier, trace.cost_usd)
            if self.spend is not self.ledger:
                self.spend.add(trace.req.user_tier, trace.cost_usd)
            self.metrics.observe(rec)
            self._judge_canary(trace)

    async def _commit(self, trace: Trace, rec: dict) -> None:
        if self.store is None:
            return
        t = time.perf_counter()
        try:
            await asyncio.to_thread(self.store.put, rec, trace.pngs)
        except Exception as e:  # a full disk must not fail a render that succeeded (unless it asked for a url)
            log.error("render record %s not written: %r", trace.rid, e)
            trace.notes.append(f"render record not written ({type(e).__name__}); see the server log")
            if trace.error is None and trace.req.response_format == "url":
                trace.error = StageFailed("record", f"the render record could not be written ({type(e).__name__}), "
                                                    "so there is no url to serve; retry with b64_json")
                raise trace.error from None
            return
        trace.timings["record"] = _ms(t)
        trace.recorded = True

    def _judge_canary(self, trace: Trace) -> None:
        """Count a canary render against its route's window; roll the canary back on a breach."""
        d = trace.decision
        if d is None or not d.canary or d.route not in self.canaries:
            return
        monitor = self.canaries[d.route]
        monitor.record(trace.canary_failed(monitor.canary.tier), _ms(trace.t0))
        reason = monitor.breach()
        if reason is None:
            return
        event = monitor.roll_back(d.route, reason)
        self.canary_events = [*self.canary_events, event][-MAX_CANARY_EVENTS:]
        self.metrics.canary_rollbacks.inc(tags=self.metrics.tags(route=d.route))
        log.error("canary %r on route %r rolled back to weight 0: %s", monitor.canary.tier, d.route, reason)

    async def _claim(self, trace: Trace) -> tuple[JSONResponse | None, asyncio.Future | None]:
        """(the recorded answer, None) for a request id already rendered, else (None, a claim on the id).

        A retry (same X-Request-ID) of a render still running on this replica waits for it, then is answered
        from its record: one render, two answers. No await between the check and the claim, so two arrivals
        of one id cannot both claim it.
        """
        while True:
            while (pending := self._pending.get(trace.rid)) is not None:
                await asyncio.shield(pending)
            stored = await self._already_rendered(trace)
            if stored is not None:
                return stored, None
            if trace.rid not in self._pending:
                claim = asyncio.get_running_loop().create_future()
                self._pending[trace.rid] = claim
                return None, claim

    def _release(self, rid: str, claim: asyncio.Future | None) -> None:
        """Wake the retries waiting on this id: its record is committed by now (or the render failed)."""
        if claim is not None and self._pending.get(rid) is claim:
            del self._pending[rid]
            claim.set_result(None)

    async def _already_rendered(self, trace: Trace) -> JSONResponse | None:
        """A retried X-Request-ID (a client whose connection dropped) gets the committed render back instead
        of a second render; the same id on a different request is a 409."""
        if self.store is None or trace.replay_of is not None:
            return None
        rec = await asyncio.to_thread(self.store.get, trace.rid)
        if rec is None or rec.get("failed") or not rec.get("prism"):
            return None
        if rec.get("request_hash") != request_hash(trace.req):
            raise Conflict(f"X-Request-ID {trace.rid!r} was already used for a different request; send a new id",
                           param="X-Request-ID")
        pngs = await asyncio.to_thread(lambda: [self.store.image(trace.rid, i)
                                                for i in range(len(rec.get("image_hashes") or []))])
        if any(p is None for p in pngs):
            return None  # its images are past retention: render again
        trace.pngs = pngs
        prism = PrismInfo.model_validate({**rec["prism"], "recorded": True})
        prism.notes.append("answered from the render record: this X-Request-ID was already rendered")
        return self._respond(GenerationResponse(created=int(rec["created"]), data=[], prism=prism), trace)

    async def _record_of(self, rid: str) -> dict:
        rec = await asyncio.to_thread(self._store().get, rid)
        if rec is None:
            raise NotFound(f"no render record {rid!r} (never recorded, or past retention)", param="id")
        return rec

    def _store(self):
        if self.store is None:
            raise NotSupported("render records are disabled in this deployment (app args records.enabled)",
                               param="records")
        return self.store

    @staticmethod
    def _public(rec: dict) -> dict:
        return {k: v for k, v in rec.items() if k != "prism"}

    @staticmethod
    def _image_url(base: str, rid: str, index: int) -> str:
        return f"{base}/v1/renders/{rid}/image.png?index={index}"

    def _replay_request(self, rec: dict, body: ReplayRequest) -> GenerationRequest:
        """The recorded request with its seed and intent pinned, sent to the named model or route."""
        if body.route is not None:
            if body.route not in self.policy.routes:
                raise InvalidRequest(f"`route` must be one of {sorted(self.policy.routes)} but is {body.route!r}",
                                     param="route")
            target = body.route
        else:
            by_name = {name: tier for tier, name in self.model_of_tier.items()}
            target = body.model if body.model in self.generators else by_name.get(body.model)
            if target is None:
                raise InvalidRequest(f"`model` must be a tier {sorted(self.generators)} or a model name "
                                     f"{sorted(by_name)} but is {body.model!r}", param="model")
        params = {**rec.get("request", {}), "prompt": rec["prompt"], "model": target}
        params["seed"] = rec.get("seed") if rec.get("seed") is not None else params.get("seed")
        if rec.get("intent"):
            params["intent"] = rec["intent"]
            text = rec.get("text_to_render")
            params["text"] = text if text and len(text) <= 200 else params.get("text")
        return GenerationRequest.model_validate(params)

    async def _typeset(self, images: list, text: str, prompt: str, deadline: float,
                       trace: Trace) -> tuple[list, OcrInfo]:
        out = await self._stage("typography", lambda: self.typography.render.remote(images, text, prompt), deadline)
        if out.get("error") == "text_does_not_fit":
            raise InvalidRequest(f"`text` does not fit the requested size: {out['detail']}", param="text")
        trace.ocr = ocr = OcrInfo.model_validate(out["ocr"])
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
        if req.response_format == "url" and self.store is None:
            raise NotSupported("`response_format` 'url' needs render records, which this deployment disables "
                               "(app args records.enabled); use 'b64_json'", param="response_format")
        return width, height

    async def _classify(self, req: GenerationRequest, timings: dict) -> IntentResult:
        t = time.perf_counter()
        if req.intent is not None:
            result = IntentResult(label=req.intent, confidence=1.0, scores={req.intent: 1.0}, source="override",
                                  text_to_render=req.text or extract_text(req.prompt))
        else:
            try:
                raw = await call_retrying("intent", lambda: self.intent.classify.remote(req.prompt),
                                          time.perf_counter() + self.settings.get("intent", {}).get("timeout_s", 10))
                result = IntentResult.model_validate(raw)
            except (StageFailed, CapacityError, DeadlineExceeded) as e:
                # The classifier is an optimisation of the route, not a reason to fail the render: without it the
                # request goes by the rules that need no intent (text, keywords, regex, user tier), degraded.
                log.warning("intent stage unavailable (%s); routing without an intent", e.message)
                result = IntentResult(label=None, confidence=0.0, scores={}, source="unavailable",
                                      text_to_render=extract_text(req.prompt))
            if req.text:
                result.text_to_render = req.text
        timings["intent"] = _ms(t)
        return result

    async def _refresh_spend(self) -> None:
        """Budgets decide on the spend of every ingress replica: re-read the store's sums when they are stale."""
        if self.policy.budgets and self.spend is not self.ledger:
            try:
                await self.spend.refresh({b.window_s for b in self.policy.budgets.values()})
            except Exception as e:  # an unreadable store must not fail the request: decide on the last sums
                log.warning("budget spend not re-read from the render records: %r", e)

    def _decide(self, req: GenerationRequest, intent: IntentResult, timings: dict,
                rid: str) -> tuple[RouteDecision, list]:
        """Rules, then load (brownout), then the user tier's budget, then the route's canary split."""
        t = time.perf_counter()
        notes = []
        forced, note = resolve_model(self.policy, req.model, set(self.generators))
        if note:
            notes.append(note)
        features = Features(prompt=req.prompt, intent=intent.label, confidence=intent.confidence,
                            user_tier=req.user_tier, quality=req.quality, has_text=bool(intent.text_to_render),
                            inflight=self.inflight)
        decision = decide(self.policy, features, forced=forced)
        if intent.source == "unavailable" and not forced:
            decision.degraded = True
            notes.append(f"intent classifier unavailable: routed by rule {decision.rule!r} without an intent")
        decision = apply_brownout(self.policy, decision, {t: ld.inflight for t, ld in self.load.items()})
        budget = self.policy.budgets.get(req.user_tier)
        if budget is not None:
            decision, note = apply_budget(self.policy, decision, req.user_tier,
                                          self.spend.spent(req.user_tier, budget.window_s))
            notes += [note] if note else []
        monitor = self.canaries.get(decision.route)
        if monitor is not None:
            decision = apply_canary(self.policy, decision, monitor.weight,
                                    split_key(monitor.canary, req.user, rid))
        timings["route"] = _ms(t)
        return decision, notes

    async def _model_of(self, tier: str) -> tuple[str, str]:
        if tier not in self._versions:
            info = await self.generators[tier].info.remote()
            self._versions[tier] = info["model_version"]
        return self.tier_specs[tier]["name"], self._versions[tier]

    async def _generate_with_fallbacks(self, job: GenerateJob, decision: RouteDecision, deadline: float,
                                       trace: Trace):
        """Try the route's tier, then each fallback, within the retry budget; every failure is reported.

        A failed check that lower guidance may cure (NaN, blank) first retries the same model with
        guidance x retry_guidance_factor, when the route sets one (seed 000: artefacts at high CFG).
        """
        tiers = [decision.tier, *decision.fallbacks]
        budget = decision.max_attempts or (len(tiers) * (2 if decision.retry_guidance_factor else 1))
        fallbacks: list[Fallback] = trace.fallbacks
        died: set[str] = set()
        i, guidance, lowered = 0, job.guidance, False
        while i < len(tiers) and len(fallbacks) < budget:
            tier, t = tiers[i], time.perf_counter()
            reason, detail, result = await self._attempt(tier, dataclasses.replace(job, guidance=guidance),
                                                         decision, deadline)
            if result is not None:  # failed checks cost compute too: the render pays for every attempt
                trace.cost_usd += self._cost(tier, result)
                if result.extra.get("retry_after_s") is not None:  # a hosted API's 429: when to come back
                    self.rate_limited_until[tier] = time.monotonic() + float(result.extra["retry_after_s"])
            if reason is None:
                return result, tier
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
                result = await call_within(self.generators[tier].generate.remote(job), deadline, f"generate:{tier}",
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
            return result.failure, result.detail, result
        self._versions[tier] = result.model_version
        return None, "", result

    def _cost(self, tier: str, result) -> float:
        """This attempt's cost from the tier's price sheet (graph/cost.py). A per-image fee is charged only for
        images that came back (a hosted API bills no refused or failed call); compute is charged either way."""
        cost = self.tier_specs[tier].get("cost") or {}
        n = len(result.images) if not result.failure else 0
        fraction = cost.get("gpu_fraction")
        fraction = result.extra.get("gpu_fraction", 0.0) if fraction is None else fraction
        return attempt_cost(cost, n, result.compute_s, fraction, result.extra.get("usd_reported", 0.0),
                            result.extra.get("images_reported", 0))

    def _raise_chain_failed(self, decision: RouteDecision, fallbacks: list[Fallback]):
        reasons = "; ".join(f"{f.model}: {f.reason}" for f in fallbacks)
        details = [f.model_dump() for f in fallbacks]
        if fallbacks and all(f.reason in CAPACITY_REASONS for f in fallbacks):
            # Retry-After from the queue state: when the soonest of the tiers tried has drained what it holds.
            retry = min(max(retry_after_s(self.load[f.tier], self.tier_specs[f.tier].get("max_batch_size", 1)),
                            math.ceil(self.rate_limited_until.get(f.tier, 0) - time.monotonic()))
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
        with load.track():
            return await call_retrying(stage, call, deadline)

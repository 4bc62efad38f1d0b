"""Ingress deployment: the render routes and the request's path (DESIGN.md), one numbered step at a time.

Every decision is a call into graph/ (admission, routing, the fallback chain, cost, records); the operator and
records routes live in the mixins deployments.ops_api and deployments.records_api.
"""

# No `from __future__ import annotations` here: FastAPI must see real types on the methods Serve wraps.

import logging
import random
import time

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from ray import serve

from deployments.jobs_api import ASYNC_RESPONSES, PREFER_DOC, JobRoutes
from deployments.ops_api import OpsRoutes, app
from deployments.records_api import RecordRoutes
from deployments.reports import ReportPoller
from deployments.tiers import Tiers
from engines.intent import IntentStage
from graph import schemas
from graph.admission import Admission, DoorPass, tier_slots
from graph.auth import AuthSpec, apply_caller
from graph.canary import Canaries
from graph.claims import Claims
from graph.cost import SpendLedger, StoreSpend
from graph.decision import Situation, reachable_tiers, route_request
from graph.errors import InvalidRequest, PrismError
from graph.http import caller_of, request_id_of
from graph.jobs import wants_async
from graph.keys import Access
from graph.metrics import PrismMetrics
from graph.outcomes import Outcomes, answer_body, prism_info
from graph.prefilter import PrefilterConfig, check_request
from graph.records import RecordsSpec, open_store
from graph.routing import Features, PolicyConfig, load_policy
from graph.schemas import GenerateJob, GenerationRequest, GenerationResponse, IntentResult
from graph.trace import Trace, ms_since
from graph.writer import GroupCommitWriter

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress(OpsRoutes, RecordRoutes, JobRoutes):
    def __init__(self, generators: dict, settings: dict):
        """Handles to the tiers, the profile's limits, the intent model, the render store; policy in reconfigure()."""
        # @serve.ingress gives the mixins' route methods their injected `self` when this module is imported. The class
        # reaches the replica pickled by value (the module's `Ingress` is the Deployment), so nothing else is sure to
        # import the module here: without this every mixin route (/healthz, /v1/load, jobs, records) answers 422.
        import deployments.ingress  # noqa: F401
        self.generators, self.settings = generators, settings
        self.tier_specs: dict[str, dict] = settings["tiers"]
        self.model_of_tier = {t: spec["name"] for t, spec in self.tier_specs.items()}
        self.policy: PolicyConfig | None = None
        self.policy_loaded_at, self.policy_rejected = None, None
        self.prefilter, self.inflight = PrefilterConfig(), 0
        self.intent = IntentStage(fault_marker_path=(settings.get("intent") or {}).get("fault_marker_path"))
        records = RecordsSpec.model_validate(settings.get("records") or {})
        self.store = open_store(records)
        # Who may call ($PRISM_AUTH over the profile): keys and the link secret beside the records (graph/keys.py).
        self.access = Access.open(AuthSpec.model_validate(settings.get("auth") or {}), records, self.store is not None)
        self.auth_mode, self.links = self.access.mode, self.access.links
        self.writer = GroupCommitWriter(self.store) if self.store is not None else None
        self.ledger = SpendLedger()  # this replica's spend; budgets read `spend`: the store's, across replicas
        self.spend = StoreSpend(self.store) if self.store is not None else self.ledger
        self.me = serve.get_replica_context().replica_id.unique_id  # how the generators' load reports name us
        self.admission = Admission({t: 1 for t in generators}, status=settings.get("overload_status", 503), me=self.me)
        self.canaries, self.claims = Canaries(), Claims()
        self.fallback_chain = Tiers(generators, self.tier_specs, self.admission)  # deployments/tiers.py
        self.metrics = PrismMetrics(routes=set(), tiers=set(generators), models=set(self.model_of_tier.values()))
        self.outcomes = Outcomes(self.store, self.writer, self.metrics, self.ledger, self.spend, self.canaries,
                                 self.claims, self.model_of_tier, self.links)
        self.reports = ReportPoller(self.admission, list(generators))
        self._init_jobs(settings.get("webhooks") or {})  # async jobs (deployments/jobs_api.py)
        self.versions: dict[str, str] = {}  # tier -> model version, as its last render reported it
        app.state.max_body_bytes = settings.get("max_body_bytes", app.state.max_body_bytes)
        app.state.behind_serve_proxy, app.state.auth = True, self.access.authenticator()

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
        self.canaries.apply(policy.routes)
        self.admission.policy = policy.admission
        self.access.hold_s = max(r.max_latency_ms for r in policy.routes.values()) / 1000 + 30
        self.admission.set_slots({t: tier_slots(spec, policy.admission.max_slowdown)
                                  for t, spec in self.tier_specs.items()})
        log.info("routing policy version %s applied (%d rules)", policy.version, len(policy.rules))

    def __del__(self):  # a graceful stop (scale-down, redeploy): inline answers already sent keep their records
        if getattr(self, "writer", None) is not None:
            self.writer.close()

    @app.post("/v1/route", response_model=schemas.RouteResponse)
    async def route(self, req: GenerationRequest, request: Request) -> schemas.RouteResponse:
        """Classify and route without generating."""
        trace = Trace(rid=request_id_of(request), req=req, caller=caller_of(request))
        trace.ignored = apply_caller(req, trace.caller)
        self._check_request(req)
        intent, _ = await self._classify(trace)
        decision = await self._decide(trace, intent)
        trace.timings["total"] = ms_since(trace.t0)
        model = self.tier_specs[decision.tier]["name"]
        return schemas.RouteResponse(request_id=trace.rid, intent=intent, decision=decision, model=model,
                             model_version=self.versions.get(decision.tier, self.tier_specs[decision.tier]["kind"]),
                             notes=trace.notes, timings_ms=trace.timings)

    @app.post("/v1/images/generations", response_model=GenerationResponse, responses=ASYNC_RESPONSES)
    async def generations(self, req: GenerationRequest, request: Request,
                          prefer: str | None = Header(None, description=PREFER_DOC)) -> JSONResponse:
        """OpenAI-compatible image generation through the whole graph; `Prefer: respond-async` makes it a job."""
        base = str(request.base_url).rstrip("/")
        trace = Trace(rid=request_id_of(request), req=req, base_url=base, caller=caller_of(request))
        trace.ignored = apply_caller(req, trace.caller)
        if wants_async(prefer):
            return await self._submit(trace)
        if req.webhook is not None:
            raise InvalidRequest("`webhook` needs an async job: send the header `Prefer: respond-async`",
                                 param="webhook")
        return await self._serve(trace)

    async def _serve(self, trace: Trace) -> JSONResponse:  # the request's path, in the numbered steps below
        """Door, claim the request id, render, record (and count, charge, judge the canary), respond."""
        door, counted = await self._door(trace)
        return await self._complete(trace, door, counted)

    async def _door(self, trace: Trace) -> tuple[DoorPass, bool]:
        """Step 0, answered at once: bad input, no room for this user tier, or the key's own limits."""
        self.reports.start()
        door = None
        try:
            # 0. The door: bad input (4xx) and, when no tier this request could use has room for its user tier, a
            #    refusal with Retry-After now: no classifier, no store read, no awaited write. Then the key's own
            #    limits (per minute, at once, budget), counted in the store across replicas.
            self._check_request(trace.req)
            door = self.admission.door_check(reachable_tiers(self.policy, set(self.generators), trace.req.model,
                                                             trace.req.user_tier), trace.req.user_tier)
            counted = await self.access.start(trace.caller, trace.rid)
        except PrismError as e:
            if door is not None:
                door.close()
            trace.error = e
            self.outcomes.finish(trace, None)
            raise
        return door, counted

    async def _complete(self, trace: Trace, door: DoorPass, counted: bool, wait_commit: bool = False) -> JSONResponse:
        """Past the door: claim the request id, render, record, answer (`wait_commit`: an async job's result is read
        from its record)."""
        self.inflight += 1
        try:
            stored, claim = await self.claims.claim(trace.rid, lambda: self.outcomes.from_record(trace))
            if stored is not None:
                return JSONResponse(stored)
            try:
                body = await self._render(trace, door)
            except PrismError as e:
                trace.error = e
                self.outcomes.finish(trace, claim)
                raise
            trace.emit("record")
            committed = self.outcomes.finish(trace, claim)
            if trace.req.response_format == "url" or wait_commit:  # the links must work at once: wait for it
                await self.outcomes.committed(trace, committed)
                body.prism.timings_ms["record"] = trace.timings["record"]
        finally:
            self.inflight -= 1
            door.close()
            if counted:  # before the answer: the client's next render must find its place free
                await self.access.finish(trace.caller, trace.rid)
        body.prism.recorded = trace.recorded
        return JSONResponse(answer_body(body, trace, self.links))

    async def _render(self, trace: Trace, door: DoorPass) -> GenerationResponse:
        req, timings = trace.req, trace.timings
        # 1. Intent, in this process: MiniLM once, its embedding kept for the built-in models.
        trace.emit("intent")
        trace.intent, embedding = await self._classify(trace)
        # 2. Route: rules -> brownout -> budget -> canary; the route's latency budget is the request's deadline.
        trace.decision = decision = await self._decide(trace, trace.intent)
        deadline = trace.t0 + decision.max_latency_ms / 1000
        # 3. Admit: a slot on a tier of the route's chain, or 503/429 + Retry-After now (paid tiers may wait).
        t = time.perf_counter()
        try:
            ticket = await self.admission.admit([decision.tier, *decision.fallbacks], req.user_tier,
                                                deadline - time.perf_counter())
        finally:
            door.close()  # decided: the slot it spoke for at the door is taken or free again
        timings["admit"] = ms_since(t)
        trace.emit("generate", tier=ticket.tier, queued_ms=timings["admit"])  # an async job is running from here
        # 4. Render and finish on the tier's replica (post, typography, PNG there), walking the fallback chain.
        trace.seed = req.seed if req.seed is not None else random.randrange(2**31)
        width, height = req.width_height
        job = GenerateJob(prompt=req.prompt, seed=trace.seed, n=req.n, steps=decision.steps,
                          guidance=decision.guidance, request_id=trace.rid, width=width, height=height,
                          text=trace.intent.text_to_render, embedding=embedding, caller=self.me,
                          previews=req.previews and trace.on_event is not None)
        t = time.perf_counter()
        result, tier = await self.fallback_chain.render(job, decision, ticket, deadline, trace)
        timings["generate"] = ms_since(t)
        timings.update({k: v for k, v in result.timings_ms.items() if k != "model"})
        trace.tier, trace.model, trace.model_version = tier, result.model, result.model_version
        self.versions[tier] = result.model_version
        trace.steps, trace.guidance, trace.pngs = result.steps, result.guidance, result.pngs
        trace.ocr = schemas.OcrInfo.model_validate(result.ocr) if result.ocr else None
        timings["total"] = ms_since(trace.t0)
        # 5. The answer's facts (graph/outcomes.py).
        prism = prism_info(trace, result, self.tier_specs[tier]["native_size"],
                           {"tier": ticket.tier, "waited_ms": ticket.waited_ms})
        trace.prism = prism.model_dump()
        return GenerationResponse(created=int(trace.created), data=[], prism=prism)

    def _check_request(self, req: GenerationRequest) -> None:
        check_request(req, (self.settings["max_width"], self.settings["max_height"]), self.store is not None,
                      self.prefilter)

    async def _classify(self, trace: Trace) -> tuple[IntentResult, list[float] | None]:
        t, req = time.perf_counter(), trace.req
        out = await self.intent.intent_of(req.prompt, req.intent, req.text,
                                          (self.settings.get("intent") or {}).get("timeout_s", 10))
        trace.timings["intent"] = ms_since(t)
        return out

    async def _decide(self, trace: Trace, intent: IntentResult) -> schemas.RouteDecision:
        """Rules, then load (brownout), then the user tier's budget, then the route's canary (graph/decision.py)."""
        req, t = trace.req, time.perf_counter()
        budget = self.policy.budgets.get(req.user_tier)
        if budget is not None:  # budgets decide on every replica's spend: the store's sums, re-read (graph/cost.py)
            await self.spend.freshen({b.window_s for b in self.policy.budgets.values()})
        load = {tier: s["used"] for tier, s in self.admission.snapshot().items()}
        features = Features(prompt=req.prompt, intent=intent.label, confidence=intent.confidence,
                            user_tier=req.user_tier, quality=req.quality, has_text=bool(intent.text_to_render),
                            inflight=self.inflight)
        situation = Situation(tier_inflight=load, canary_weights=self.canaries.weights(),
                              spent=self.spend.spent(req.user_tier, budget.window_s) if budget else 0.0)
        decision, notes = route_request(self.policy, features, req.model, set(self.generators), situation, req.user,
                                        trace.rid, intent_unavailable=intent.source == "unavailable")
        trace.notes += notes
        trace.timings["route"] = ms_since(t)
        return decision

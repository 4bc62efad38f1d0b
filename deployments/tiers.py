"""The tiers an ingress renders on: their handles and specs, and the fallback chain walked attempt by attempt from
the tier admission placed a request on (the decisions are graph/chain.py's; the calls are deployments/calls.py's)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from deployments.calls import attempt
from graph.admission import Admission, Ticket
from graph.chain import ChainWalk, chain_failed, result_cost
from graph.errors import GenerationFailed, InvalidRequest
from graph.schemas import Fallback, GenerateJob, GenerateResult, RouteDecision
from graph.trace import Trace, ms_since


@dataclass
class Tiers:
    handles: dict  # tier -> the Generator deployment's handle
    specs: dict[str, dict]  # tier -> its model spec (name, kind, cost, guidance, native_size)
    admission: Admission
    rate_limited_until: dict[str, float] = field(default_factory=dict)  # a hosted tier that answered 429: until when

    async def render(self, job: GenerateJob, decision: RouteDecision, ticket: Ticket, deadline: float,
                     trace: Trace) -> tuple[GenerateResult, str]:
        """Attempt by attempt down the chain; every failed attempt is reported and charged. Admitted work is never
        refused for capacity on a fallback tier: its slot moves with it."""
        walk = ChainWalk.of(decision, job.guidance)
        walk.index = walk.tiers.index(ticket.tier)
        try:
            while (tier := walk.tier) is not None:
                if tier != ticket.tier:
                    self.admission.release(ticket)
                    ticket = self.admission.force(tier, trace.req.user_tier)
                t = time.perf_counter()
                job.guidance = walk.guidance
                tried = await attempt(self.handles[tier], tier, job, decision, deadline, trace.on_event)
                reason, detail, result = tried.failure, tried.detail, tried.result
                if reason == "replica_died":  # its slots are gone now, before any report says so
                    self.admission.replica_died(tier, tried.dead_replica)
                if result is not None:
                    trace.cost_usd += result_cost(self.specs[tier].get("cost") or {}, len(result.pngs),
                                                  result.compute_s, result.failure is not None, result.extra)
                    if result.extra.get("retry_after_s") is not None:
                        self.rate_limited_until[tier] = time.monotonic() + float(result.extra["retry_after_s"])
                if reason is None:
                    self.admission.release(ticket, time.perf_counter() - t)
                    return result, tier
                if reason == "text_does_not_fit":  # the text, not the model: no other model helps
                    raise InvalidRequest(f"`text` does not fit the requested size: {detail}", param="text")
                if reason == "ocr_miss":
                    raise GenerationFailed(f"the text could not be rendered readably: {detail}", param="text")
                trace.fallbacks.append(Fallback(model=self.specs[tier]["name"], tier=tier, reason=reason,
                                                elapsed_ms=ms_since(t), guidance=walk.guidance, detail=detail[:300]))
                walk.failed(reason, self.specs[tier]["guidance"], self.admission.alive)
        finally:
            self.admission.release(ticket)
        now = time.monotonic()
        waits = {f.tier: max(self.admission.tiers[f.tier].seconds_until_free(now),
                             self.rate_limited_until.get(f.tier, 0) - now) for f in trace.fallbacks}
        raise chain_failed(decision.route, trace.fallbacks, waits, self.admission.status)

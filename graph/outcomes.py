"""What happens after a request is answered or refused: its record written (in a group, off the event loop), its
metrics counted, its cost charged, its canary judged, the claim on its id released once the record is committed;
and the answer's body (inline PNGs or links). No Ray: the ingress hands in its store, writer and metrics."""

from __future__ import annotations

import asyncio
import base64
import logging
import time

from graph.auth import Links, can_see
from graph.canary import Canaries
from graph.claims import Claims
from graph.cost import SpendLedger
from graph.errors import Conflict, GenerationFailed
from graph.schemas import GenerateResult, GenerationResponse, PrismInfo
from graph.trace import Trace, ms_since, request_hash

log = logging.getLogger("prism.outcomes")


def answer_body(body: GenerationResponse, trace: Trace, links: Links) -> dict:
    """The JSON answer: PNGs inline (b64_json) or as links to the committed record (url, signed and expiring)."""
    if trace.req.response_format == "url":
        data = [{"url": links.url(trace.base_url, trace.rid, i)} for i in range(len(trace.pngs))]
    else:
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in trace.pngs]
    out = body.model_dump(exclude={"data"})
    return {"created": out["created"], "data": data, "prism": out["prism"]}


def prism_info(trace: Trace, result: GenerateResult, native: int, admitted: dict) -> PrismInfo:
    """The answer's facts: intent, route and rule, the model that served it, timings, cost, fallbacks, OCR, notes."""
    d = trace.decision
    notes = trace.notes + [n for n in (result.extra.get("note"),) if n]
    if result.post.get("backend", "none") != "none":
        notes.append(f"upscaled x{result.post['scale']} by {result.post['backend']} from {native}px")
    return PrismInfo(
        request_id=trace.rid, intent=trace.intent, route=d.route, rule=d.rule, tier=trace.tier, model=result.model,
        model_version=result.model_version, seed=trace.seed, steps=result.steps, guidance=result.guidance,
        native_size=f"{native}x{native}", timings_ms=trace.timings, cost_usd=trace.cost_usd, degraded=d.degraded,
        fallbacks=trace.fallbacks, ocr=trace.ocr, notes=notes,
        ignored_fields=sorted(set(trace.req.ignored_fields) | set(trace.ignored)), canary=d.canary,
        replay_of=trace.replay_of, batch_size=result.batch_size, admitted=admitted, user_tier=trace.req.user_tier)


class Outcomes:
    """The ingress's bookkeeping for every request that reached it."""

    def __init__(self, store, writer, metrics, ledger: SpendLedger, spend, canaries: Canaries, claims: Claims,
                 model_of_tier: dict[str, str], links: Links):
        self.store, self.writer, self.metrics, self.links = store, writer, metrics, links
        self.ledger, self.spend, self.canaries, self.claims = ledger, spend, canaries, claims
        self.model_of_tier = model_of_tier

    def finish(self, trace: Trace, claim) -> asyncio.Future | None:
        """Count, charge and judge now; the record goes to the writer, and the claim on the id is released once the
        record is committed (a retry of the id until then waits, then finds it)."""
        rec = trace.record(self.model_of_tier)
        self.metrics.observe(rec)
        self.ledger.add(trace.req.user_tier, trace.cost_usd)
        self._judge(trace, rec)
        if self.writer is None:
            self.claims.release(trace.rid, claim)
            return None
        committed = self.writer.submit(rec, trace.pngs)

        def done(fut: asyncio.Future) -> None:
            self.claims.release(trace.rid, claim)
            if fut.cancelled() or fut.exception() is not None:
                log.error("render record %s not written: %r", trace.rid, None if fut.cancelled() else fut.exception())
            elif self.spend is not self.ledger:
                self.spend.add(trace.req.user_tier, trace.cost_usd)  # committed: counted from the store's sums next
        committed.add_done_callback(done)
        return committed

    async def committed(self, trace: Trace, committed: asyncio.Future | None) -> None:
        """Wait for the record (a `url` answer links to it); a write that failed fails that answer only."""
        t = time.perf_counter()
        try:
            await asyncio.shield(committed)
        except Exception as e:
            raise GenerationFailed(f"the render record could not be written ({type(e).__name__}), so there is no "
                                   "url to serve; retry with b64_json", param="response_format") from None
        trace.timings["record"] = ms_since(t)
        trace.recorded = True

    async def from_record(self, trace: Trace) -> dict | None:
        """A retried X-Request-ID gets its committed render back instead of a second render; the same id on a
        different request is a 409."""
        if self.store is None or trace.replay_of is not None:
            return None
        rec = await asyncio.to_thread(self.store.get, trace.rid)
        if rec is None or rec.get("failed") or not rec.get("prism"):
            return None
        if rec.get("request_hash") != request_hash(trace.req) or not can_see(trace.caller, rec.get("tenant")):
            # Another tenant's id looks like any clash: the answer must not say whose it is, or that it exists.
            raise Conflict(f"X-Request-ID {trace.rid!r} was already used for a different request; send a new id",
                           param="X-Request-ID")
        return await self.stored_answer(trace, rec, "answered from the render record: this X-Request-ID was "
                                                    "already rendered")

    async def stored_answer(self, trace: Trace, rec: dict | None = None, note: str | None = None) -> dict | None:
        """The synchronous answer of a committed render, rebuilt from its record (an async job's `result`); None
        when there is no such successful record or its images are past retention."""
        if self.store is None:
            return None
        rec = rec or await asyncio.to_thread(self.store.get, trace.rid)
        if rec is None or rec.get("failed") or not rec.get("prism"):
            return None
        pngs = await asyncio.to_thread(lambda: [self.store.image(trace.rid, i)
                                                for i in range(len(rec.get("image_hashes") or []))])
        if any(p is None for p in pngs):
            return None
        trace.pngs = pngs
        prism = PrismInfo.model_validate({**rec["prism"], "recorded": True})
        if note:
            prism.notes.append(note)
        return answer_body(GenerationResponse(created=int(rec["created"]), data=[], prism=prism), trace, self.links)

    def _judge(self, trace: Trace, rec: dict) -> None:
        monitor = self.canaries.monitors.get(rec["route"] or "")
        failed = monitor is not None and trace.canary_failed(monitor.canary.tier)
        event = self.canaries.judge(rec["route"], rec["canary"], failed,
                                    ms_since(trace.t0))
        if event is not None:
            self.metrics.canary_rollbacks.inc(tags=self.metrics.tags(route=event["route"]))
            log.error("canary on route %r rolled back to weight 0: %s", event["route"], event["reason"])

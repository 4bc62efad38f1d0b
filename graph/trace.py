"""What one render leaves behind: a Trace filled in as the request moves down the path, and the record,
the metrics and the canary monitor all read from it (success or failure alike)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from graph.auth import OPEN_CALLER, Caller
from graph.errors import PrismError
from graph.schemas import Fallback, GenerationRequest, IntentResult, OcrInfo, RouteDecision

# Failure reasons that say "no capacity now", not "this model is bad": not held against a canary.
CAPACITY_REASONS = ("overloaded", "shed", "deadline", "oom", "rate_limited", "replica_died")


def ms_since(t0: float) -> float:
    """Milliseconds since a perf_counter() reading, as `prism.timings_ms` shows them."""
    return round((time.perf_counter() - t0) * 1000, 2)


def blames_model(error: PrismError) -> bool:
    """Does a request's error count against the model that served it? The same line CAPACITY_REASONS draws for one
    attempt, drawn for the whole request: a 4xx is the client's (or its budget's), a 503/429 for capacity and a 504
    past the deadline are load. What is left blames the model: 502 (the chain produced garbage, a stage failed) and
    500."""
    return error.status_code >= 500 and error.status_code not in (503, 504)


def request_hash(req: GenerationRequest) -> str:
    """A stable hash of everything the client asked for (extras included): same X-Request-ID + same hash =
    the same request retried; same id + another hash = a clash."""
    body = json.dumps(req.model_dump(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class Trace:
    """The render's facts as they become known; `record()` turns them into the stored record."""

    rid: str
    req: GenerationRequest
    base_url: str = ""
    replay_of: str | None = None
    caller: Caller = OPEN_CALLER  # who asked (graph/auth.py): the record's tenant and key
    on_event: Callable[[dict], None] | None = None  # an async job's progress listener (stages, denoising steps)
    ignored: list[str] = field(default_factory=list)  # body fields the caller may not set (user_tier without a key)
    created: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    intent: IntentResult | None = None
    decision: RouteDecision | None = None
    seed: int | None = None
    tier: str | None = None
    model: str | None = None
    model_version: str | None = None
    steps: int | None = None
    guidance: float | None = None
    fallbacks: list[Fallback] = field(default_factory=list)
    ocr: OcrInfo | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cost_usd: float = 0.0
    notes: list[str] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list)
    prism: dict | None = None
    error: PrismError | None = None
    recorded: bool = False

    def emit(self, stage: str, **fields) -> None:
        """A stage change of an async job (a synchronous request has no listener)."""
        if self.on_event is not None:
            self.on_event({"stage": stage, **fields})

    @property
    def status(self) -> int:
        return self.error.status_code if self.error is not None else 200

    def canary_failed(self, canary_tier: str) -> bool:
        """Did the canary fail this render? Failed checks or errors on it, a failed chain, or an OCR miss;
        capacity refusals are load, not the canary's fault."""
        if self.error is not None and blames_model(self.error):
            return True
        if self.ocr is not None and not self.ocr.passed:
            return True
        return any(f.tier == canary_tier and f.reason not in CAPACITY_REASONS for f in self.fallbacks)

    def record(self, model_of_tier: dict[str, str]) -> dict:
        """The render record (graph/records.py stores it with the PNGs)."""
        d, i = self.decision, self.intent
        tier = self.tier or (d.tier if d else None)
        err = None if self.error is None else {"code": self.error.code, "message": self.error.message,
                                               "status": self.error.status_code, "param": self.error.param}
        return {
            "id": self.rid, "created": self.created, "failed": self.error is not None, "status": self.status,
            "prompt": self.req.prompt, "request": self.req.model_dump(exclude={"prompt"}),
            "request_hash": request_hash(self.req), "user_tier": self.req.user_tier,
            "tenant": self.caller.tenant, "key_id": self.caller.key_id,
            "intent": i.label if i else None, "intent_scores": i.scores if i else None,
            "intent_source": i.source if i else None, "text_to_render": i.text_to_render if i else None,
            "route": d.route if d else None, "rule": d.rule if d else None, "tier": tier,
            "model": self.model or model_of_tier.get(tier or ""), "model_version": self.model_version,
            "seed": self.seed, "steps": self.steps, "guidance": self.guidance,
            "degraded": bool(d and d.degraded), "canary": bool(d and d.canary),
            "fallbacks": [f.model_dump() for f in self.fallbacks],
            "ocr": self.ocr.model_dump() if self.ocr else None, "timings_ms": dict(self.timings),
            "latency_ms": self.timings.get("total", round((time.perf_counter() - self.t0) * 1000, 2)),
            "cost_usd": round(self.cost_usd, 8), "notes": list(self.notes),
            "replay_of": self.replay_of, "error": err, "prism": self.prism,
        }

"""Prometheus metrics through ray.serve.metrics: exported by every node's Ray metrics agent
(`ray start --metrics-export-port=8080`, series prefixed `ray_`), so several ingress replicas on several nodes
sum correctly in Prometheus, which a `/metrics` route on one replica could not do behind a load balancer.

Label values are bounded: intents and user tiers are fixed sets, routes, tiers and models come from the
config, reasons and stages from the code; anything else is counted as "other" (a prompt never becomes a label).
"""

from __future__ import annotations

from graph.schemas import INTENTS

USER_TIERS = ("free", "pro", "enterprise")
STAGES = ("validate", "intent", "route", "generate", "post", "typography", "encode", "record", "total")
REASONS = ("nan", "blank", "undecodable", "wrong_size", "oom", "deadline", "overloaded", "shed", "error",
           "replica_died", "rate_limited", "invalid_value", "not_supported", "generation_failed", "stage_failed",
           "deadline_exceeded", "budget_exceeded", "conflict", "not_found", "internal_error", "ocr_miss",
           "model_retired", "rate_limit_exceeded", "invalid_api_key", "permission_denied")
# Milliseconds: a 2 ms cache hit up to a 3-minute CPU render.
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 40000, 90000, 180000]
OTHER = "other"


def bounded(value: str | None, allowed) -> str:
    """The value when it is one of the allowed ones, else "other" ("none" for no value)."""
    if value is None:
        return "none"
    return value if value in allowed else OTHER


class PrismMetrics:
    """The ingress's metrics. Built inside a replica (ray.serve.metrics needs a running Ray worker)."""

    def __init__(self, routes: set[str], tiers: set[str], models: set[str]):
        from ray.serve.metrics import Counter, Histogram

        self.allowed = {"route": set(routes) | {f"tier:{t}" for t in tiers}, "tier": set(tiers),
                        "model": set(models), "intent": set(INTENTS), "user_tier": set(USER_TIERS),
                        "stage": set(STAGES), "reason": set(REASONS)}
        render = ("intent", "route", "model", "user_tier")
        self.requests = Counter("prism_requests_total", description="Renders answered, by status code.",
                                tag_keys=(*render, "status"))
        self.latency = Histogram("prism_request_latency_ms", description="End-to-end render latency.",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route", "model"))
        self.stage_latency = Histogram("prism_stage_latency_ms", description="Latency of each stage of a render.",
                                       boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("stage",))
        self.failures = Counter("prism_failures_total", description="Failed renders by reason (the error code).",
                                tag_keys=("route", "reason"))
        self.fallbacks = Counter("prism_fallbacks_total", description="Failed model attempts that moved on.",
                                 tag_keys=("tier", "reason"))
        self.ocr = Counter("prism_ocr_checks_total", description="Typography OCR checks by result.",
                           tag_keys=("result",))
        self.degraded = Counter("prism_degraded_total", description="Renders moved to a cheaper route by load or "
                                                                    "budget (brownout).", tag_keys=("route",))
        self.rejections = Counter("prism_rejections_total", description="Requests refused for capacity (503/429), "
                                  "by reason and the user tier that was shed.", tag_keys=("reason", "user_tier"))
        self.cost = Counter("prism_cost_usd_total", description="Cost of renders in USD.",
                            tag_keys=("user_tier", "model"))
        self.canary_rollbacks = Counter("prism_canary_rollbacks_total", description="Automatic canary rollbacks.",
                                        tag_keys=("route",))
        self.jobs = Counter("prism_jobs_total", description="Async jobs by the status they reached (queued when "
                            "accepted, then succeeded, failed or canceled).", tag_keys=("status",))
        self.job_queued = Histogram("prism_job_queued_ms", description="Time an async job waited before its model "
                                    "started.", boundaries=LATENCY_BOUNDARIES_MS)
        self.webhooks = Counter("prism_webhook_deliveries_total", description="Webhook delivery attempts by outcome "
                                "(delivered, retried, failed, refused).", tag_keys=("outcome",))

    def tags(self, **values) -> dict[str, str]:
        return {k: bounded(v, self.allowed[k]) if k in self.allowed else str(v) for k, v in values.items()}

    def observe(self, rec: dict) -> None:
        """Count one finished render from its record (success or failure)."""
        render = self.tags(intent=rec.get("intent"), route=rec.get("route"), model=rec.get("model"),
                           user_tier=rec.get("user_tier"))
        self.requests.inc(tags={**render, "status": str(rec.get("status", 0))})
        if rec.get("latency_ms") is not None:
            self.latency.observe(rec["latency_ms"], tags={"route": render["route"], "model": render["model"]})
        for stage, ms in (rec.get("timings_ms") or {}).items():
            self.stage_latency.observe(ms, tags=self.tags(stage=stage))
        for fb in rec.get("fallbacks") or []:
            self.fallbacks.inc(tags=self.tags(tier=fb.get("tier"), reason=fb.get("reason")))
        if rec.get("ocr") is not None:
            self.ocr.inc(tags={"result": "pass" if rec["ocr"].get("passed") else "fail"})
        if rec.get("degraded"):
            self.degraded.inc(tags={"route": render["route"]})
        if rec.get("cost_usd"):
            self.cost.inc(rec["cost_usd"], tags={"user_tier": render["user_tier"], "model": render["model"]})
        if rec.get("failed"):
            code = (rec.get("error") or {}).get("code")
            self.failures.inc(tags={"route": render["route"], **self.tags(reason=code)})
            if rec.get("status") in (429, 503):
                self.rejections.inc(tags=self.tags(reason=code, user_tier=rec.get("user_tier")))

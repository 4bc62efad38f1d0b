"""The ingress's operator routes (a mixin of deployments.ingress.Ingress): the playground page, health, the policy,
models, load, tiers, canaries and stats. None of them is on a render's path."""

# No `from __future__ import annotations`: FastAPI must see real types on the methods Serve wraps.

import asyncio
import time
from pathlib import Path

from fastapi import Query, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve

from graph.auth import require_admin
from graph.cost import model_price
from graph.errors import NotFound, NotSupported
from graph.http import caller_of, make_app
from graph.records import summarize

# The playground (web/): one page and its two assets, read once per replica (at import), not per request on the
# event loop; no build step, no CDN.
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
WEB_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
WEB_FILES = {name: (WEB_DIR / name).read_bytes() for name in ("index.html", *WEB_ASSETS)}
# The one FastAPI app of the ingress: these routes, deployments.records_api's and the render routes share it.
app = make_app()


class OpsRoutes:
    """Routes for people and dashboards; `self` is the Ingress."""

    @app.get("/", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The playground and compare page (web/index.html)."""
        return HTMLResponse(WEB_FILES["index.html"], headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        """The page's script and stylesheet: a fixed list, so no path from the URL reaches the filesystem."""
        if name not in WEB_ASSETS:
            raise NotFound(f"no static file {name!r}; have {sorted(WEB_ASSETS)}", param="name")
        return Response(WEB_FILES[name], media_type=WEB_ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness of the ingress and the policy it serves (200 while it serves at all), and `ready`: every tier has
        a replica running, so each route renders on its own tier (before that, on a fallback tier that is up, or a
        503 + Retry-After). Start-up scripts wait for `ready`; a scaled-to-zero tier reads not ready."""
        self.reports.start()  # the controller's replica counts are polled from the first request (or this)
        replicas = self.admission.running()
        return {"status": "ok", "auth": self.auth_mode, "policy_version": self.policy.version if self.policy else None,
                "tiers": sorted(self.generators), "replica": serve.get_replica_context().replica_id.unique_id,
                "ready": all(replicas.values()), "replicas": replicas}

    @app.get("/v1/policy")
    async def get_policy(self, request: Request) -> dict:
        """The routing policy in force, and the last rejected update if any (admin keys)."""
        require_admin(caller_of(request), "/v1/policy")
        return {"policy": self.policy.model_dump() if self.policy else None, "loaded_at": self.policy_loaded_at,
                "rejected": self.policy_rejected}

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        """OpenAI-style model list: every route and tier a request may name in `model`, with hosted list prices."""
        names = sorted(self.policy.routes) + sorted(self.generators) + sorted(self.policy.model_aliases)
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "prism",
                                            **model_price(n, self.tier_specs, self.policy)} for n in names]}

    @app.get("/v1/load")
    async def get_load(self) -> dict:
        """Admission's view of each tier (replicas, slots, in use, waiting, service time) and this replica's
        requests in flight."""
        return {"inflight": self.inflight, "tiers": self.admission.snapshot()}

    @app.get("/v1/tiers")
    async def tiers(self) -> dict:
        """Each tier's model, version, kind and counters (batches, backlog, OOM splits, failed checks)."""
        infos = await asyncio.gather(*(h.info.remote() for h in self.generators.values()), return_exceptions=True)
        return {tier: (info if isinstance(info, dict) else {"error": type(info).__name__})
                for tier, info in zip(self.generators, infos, strict=True)}

    @app.get("/v1/canary")
    async def canary(self, request: Request) -> dict:
        """Every canary split: configured and effective weight, the window's outcomes, and rollback events (admin
        keys)."""
        require_admin(caller_of(request), "/v1/canary")
        routes = {name: {"tier": m.canary.tier, "weight": m.canary.weight, "effective_weight": m.weight,
                         "sticky": m.canary.sticky, "rollback": m.canary.rollback.model_dump() if m.canary.rollback
                         else None, "window": m.window(), "rolled_back": m.rolled_back}
                  for name, m in self.canaries.monitors.items()}
        return {"routes": routes, "events": self.canaries.events}

    @app.get("/v1/stats")
    async def stats(self, request: Request,
                    minutes: float = Query(15, gt=0, le=43_200, description="Window in minutes.")) -> dict:
        """Per intent, route and model over the last N minutes: count, p50/p95, failure rate, fallbacks, cost. An
        admin key sees every tenant; any other caller its own tenant's renders."""
        caller, store = caller_of(request), self._store()
        tenant = None if caller.admin else caller.tenant
        since = time.time() - minutes * 60
        rows = await asyncio.to_thread(store.rows_since, since, tenant)
        out = {"window_minutes": minutes, "since": since, "tenant": tenant,
               "total": (summarize(rows, group_by=()) or [{}])[0],
               **{f"by_{key}": summarize(rows, group_by=(key,)) for key in ("intent", "route", "model")},
               "cost_by_user_tier": await asyncio.to_thread(store.cost_by_user_tier, since, tenant)}
        if caller.admin:  # this replica's charges across tenants
            out["spend_by_user_tier"] = self.ledger.totals()
        return out

    def _store(self):
        if self.store is None:
            raise NotSupported("render records are disabled in this deployment (app args records.enabled)",
                               param="records")
        return self.store

"""The render records API (a mixin of deployments.ingress.Ingress): browse, read, fetch images, replay."""

# No `from __future__ import annotations`: FastAPI must see real types on the methods Serve wraps.

import asyncio
import time

from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response

from deployments.ops_api import app
from graph.auth import Caller, apply_caller, can_see, check_link
from graph.errors import InvalidRequest, NotFound
from graph.http import caller_of, request_id_of
from graph.schemas import GenerationRequest, GenerationResponse, ReplayRequest
from graph.trace import Trace


def public(rec: dict) -> dict:
    """A record as the API shows it (without the stored response body)."""
    return {k: v for k, v in rec.items() if k != "prism"}


def replay_request(rec: dict, body: ReplayRequest, routes: set[str],
                   model_of_tier: dict[str, str]) -> GenerationRequest:
    """The recorded request with its seed and intent pinned, sent to the named model or route."""
    if body.route is not None:
        if body.route not in routes:
            raise InvalidRequest(f"`route` must be one of {sorted(routes)} but is {body.route!r}", param="route")
        target = body.route
    else:
        by_name = {name: tier for tier, name in model_of_tier.items()}
        target = body.model if body.model in model_of_tier else by_name.get(body.model)
        if target is None:
            raise InvalidRequest(f"`model` must be a tier {sorted(model_of_tier)} or a model name "
                                 f"{sorted(by_name)} but is {body.model!r}", param="model")
    params = {**rec.get("request", {}), "prompt": rec["prompt"], "model": target}
    params["seed"] = rec.get("seed") if rec.get("seed") is not None else params.get("seed")
    if rec.get("intent"):
        params["intent"] = rec["intent"]
        text = rec.get("text_to_render")
        params["text"] = text if text and len(text) <= 200 else params.get("text")
    return GenerationRequest.model_validate(params)


class RecordRoutes:
    """Routes over the render store; `self` is the Ingress."""

    @app.get("/v1/renders")
    async def list_renders(
        self, intent: str | None = None, route: str | None = None, model: str | None = None,
        tier: str | None = None, user_tier: str | None = None, failed: bool | None = None,
        since: float | None = Query(None, ge=0, description="Unix seconds, inclusive."),
        until: float | None = Query(None, ge=0, description="Unix seconds, exclusive."),
        replay_of: str | None = None, limit: int = Query(50, ge=1, le=500),
        cursor: str | None = Query(None, max_length=64, description="next_cursor of the previous page."),
        request: Request = None,
    ) -> dict:
        """Render records, newest first, filtered and paged (pass `next_cursor` back as `cursor`): the caller's
        tenant's, or every tenant's for an admin key."""
        caller = caller_of(request)
        try:
            page, nxt = await asyncio.to_thread(
                self._store().list, intent=intent, route=route, model=model, tier=tier, user_tier=user_tier,
                failed=failed, since=since, until=until, replay_of=replay_of, limit=limit, cursor=cursor,
                tenant=None if caller.admin else caller.tenant)
        except ValueError as e:  # a cursor not made by this API
            raise InvalidRequest(f"`cursor` must be a `next_cursor` from a previous page ({e})",
                                 param="cursor") from None
        base = str(request.base_url).rstrip("/")
        return {"object": "list", "data": [{**public(r), "image_urls": self._image_urls(base, r)} for r in page],
                "next_cursor": nxt}

    @app.get("/v1/renders/{rid}")
    async def get_render(self, rid: str, request: Request) -> dict:
        """One render record: request, intent, route, model + version, seed, fallbacks, OCR, timings, cost."""
        caller = caller_of(request)
        rec = await self._record_of(rid, caller)
        replays, _ = await asyncio.to_thread(self._store().list, replay_of=rid, limit=100,
                                             tenant=None if caller.admin else caller.tenant)
        base = str(request.base_url).rstrip("/")
        return {**public(rec), "replays": [r["id"] for r in replays], "image_urls": self._image_urls(base, rec)}

    @app.get("/v1/renders/{rid}/image.png")
    async def get_render_image(self, rid: str, request: Request, index: int = Query(0, ge=0, le=3),
                               expires: int | None = Query(None, ge=0, description="From a signed link."),
                               sig: str | None = Query(None, max_length=64, description="From a signed link.")
                               ) -> Response:
        """The recorded PNG (image `index` of an n>1 render): with a key that may see the render, or through a
        signed link (response_format "url", a record's image_urls) until it expires."""
        caller = caller_of(request)
        if sig is not None or expires is not None or (caller.anonymous and self.auth_mode == "required"):
            check_link(self.links.secret or b"", rid, index, expires, sig)  # 401/403 before any lookup
            cache = f"private, max-age={max(0, int(expires - time.time()))}"
        else:
            await self._record_of(rid, caller)  # another tenant's render is 404, as one that never was
            cache = "private, max-age=3600" if self.auth_mode != "off" else "public, max-age=31536000, immutable"
        png = await asyncio.to_thread(self._store().image, rid, index)
        if png is None:
            raise NotFound(f"render {rid!r} has no image {index} (never recorded, failed, or past retention)",
                           param="index")
        return Response(content=png, media_type="image/png", headers={"Cache-Control": cache})

    @app.post("/v1/renders/{rid}/replay", response_model=GenerationResponse)
    async def replay(self, rid: str, body: ReplayRequest, request: Request) -> JSONResponse:
        """Re-run a recorded render's prompt, seed and params on another model or route; the records link."""
        caller = caller_of(request)
        rec = await self._record_of(rid, caller)
        req = replay_request(rec, body, set(self.policy.routes), self.model_of_tier)
        apply_caller(req, caller, from_body=False)  # the replaying caller's tier (the record's, for a gateway key)
        trace = Trace(rid=request_id_of(request), req=req, base_url=str(request.base_url).rstrip("/"),
                      replay_of=rec["id"], caller=caller)
        return await self._serve(trace)

    async def _record_of(self, rid: str, caller: Caller) -> dict:
        rec = await asyncio.to_thread(self._store().get, rid)
        if rec is None or not can_see(caller, rec.get("tenant")):
            raise NotFound(f"no render record {rid!r} (never recorded, or past retention)", param="id")
        return rec

    def _image_urls(self, base: str, rec: dict) -> list[str]:
        """Links to a record's images that work without a key until they expire (an <img> tag sends none)."""
        return [self.links.url(base, rec["id"], i) for i in range(len(rec.get("image_hashes") or []))]

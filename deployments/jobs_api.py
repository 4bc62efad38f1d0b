"""Async jobs (a mixin of deployments.ingress.Ingress): `Prefer: respond-async` answers 202 with a job id at once;
the render runs here in the background, its progress (stages and denoising steps) goes to the job's record, to
Server-Sent Events listeners and, if asked, to a signed webhook. Jobs live in the render store (graph/jobs.py):
a job whose replica stopped is adopted by another and run again.

Ordering follows the issue: the door (bad input, no capacity, the key's limits) answers the POST itself, so a
saturated system refuses with 503 + Retry-After instead of accepting a job that would wait forever.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the methods Serve wraps.

import asyncio
import logging
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.ops_api import app
from graph.auth import Caller, can_see
from graph.errors import Conflict, InvalidRequest, NotFound, NotSupported, PrismError
from graph.http import caller_of
from graph.jobs import TERMINAL, JobStore, Webhooks, job_view, progress_of, sse, store_progress
from graph.schemas import GenerationRequest
from graph.trace import Trace

log = logging.getLogger("prism.jobs")

PREFER_DOC = ("`respond-async`: answer 202 Accepted at once with a job (Location: /v1/jobs/{id}) instead of holding "
              "the connection for the render (RFC 7240).")
ASYNC_RESPONSES = {202: {"description": "Prefer: respond-async: the job, queued (poll its Location, or stream "
                                        "/v1/jobs/{id}/events)"}}
BEAT_S, STALE_S = 1.0, 6.0  # replicas beat for their jobs every second; one silent for 6 s has its jobs adopted
STORE_EVERY_S = 0.25  # progress reaches the store (other replicas' listeners) at most this often, and on stage changes


class JobRoutes:
    """Routes and the background runner of async jobs; `self` is the Ingress."""

    def _init_jobs(self, webhooks: dict) -> None:
        self.jobs = JobStore(self.store.dir) if self.store is not None else None
        self.job_tasks: dict[str, asyncio.Task] = {}  # jobs this replica runs
        self.job_listeners: dict[str, set[asyncio.Queue]] = {}
        self.job_stored_at: dict[str, tuple[float, str]] = {}  # last progress write: (when, stage)
        self.job_progress_hooks: set[str] = set()  # jobs whose webhook asked for progress events
        self.webhooks = Webhooks(self.jobs, webhooks,
                                 lambda outcome: self.metrics.webhooks.inc(tags={"outcome": outcome}))
        self.job_loop: asyncio.Task | None = None

    async def check_health(self) -> None:
        """Serve's periodic health check: also what starts a fresh replica's job loop (adopting orphaned jobs)
        before any request reaches it."""
        self._start_job_loop()

    # ---- the routes ------------------------------------------------------------------------------------------

    @app.get("/v1/jobs/{jid}")
    async def get_job(self, jid: str, request: Request) -> dict:
        """An async job: status, progress while running, `result` (the synchronous answer) or `error` once ended."""
        self._start_job_loop()
        return await self._job_view(await self._job_of(jid, caller_of(request)))

    @app.post("/v1/jobs/{jid}/cancel")
    async def cancel_job(self, jid: str, request: Request) -> dict:
        """Cancel: a queued job never runs; a running one stops at its next step and frees its slot."""
        job = await self._job_of(jid, caller_of(request))
        if job["status"] not in TERMINAL:
            task = self.job_tasks.get(jid)
            if task is not None:
                task.cancel()
                await asyncio.wait({task}, timeout=10)
            else:  # another replica runs it: it sees the request on its next beat
                await asyncio.to_thread(self.jobs.request_cancel, jid)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and (await self._job(jid))["status"] not in TERMINAL:
                    await asyncio.sleep(0.1)
        return await self._job_view(await self._job(jid))

    @app.get("/v1/jobs/{jid}/events")
    async def job_events(self, jid: str, request: Request) -> StreamingResponse:
        """Server-Sent Events: the current state first, then a `progress` event per stage and denoising step, and a
        final `succeeded`, `failed` or `canceled` event with the job."""
        job = await self._job_of(jid, caller_of(request))
        return StreamingResponse(self._job_stream(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- accepting a job -------------------------------------------------------------------------------------

    async def _submit(self, trace: Trace) -> JSONResponse:
        """Check what the synchronous path checks at its door, then answer 202 and render in the background."""
        if self.jobs is None:
            raise NotSupported("async jobs live in the render store: enable records (app args records.enabled)",
                               param="Prefer")
        await self._check_webhook(trace.req)
        existing = await self._job(trace.rid)
        if existing is not None:  # the same X-Request-ID again: the same job, not a second one
            if not can_see(trace.caller, existing.get("tenant")):
                raise Conflict(f"X-Request-ID {trace.rid!r} was already used for a different request; send a new id",
                               param="X-Request-ID")
            return self._accepted(await self._job_view(existing))
        door, counted = await self._door(trace)
        body = {"request": trace.req.model_dump(mode="json"), "base_url": trace.base_url,
                "ignored": trace.ignored, "caller": {"tenant": trace.caller.tenant, "key_id": trace.caller.key_id,
                                                     "user_tier": trace.req.user_tier},
                "progress": {"stage": "queued"}, "deliveries": []}
        if not await asyncio.to_thread(self.jobs.create, trace.rid, trace.caller.tenant, self.me, body):
            door.close()
            if counted:
                await self.access.finish(trace.caller, trace.rid)
            raise Conflict(f"X-Request-ID {trace.rid!r} was already used; send a new id", param="X-Request-ID")
        self.metrics.jobs.inc(tags={"status": "queued"})
        self._launch(trace, door, counted)
        return self._accepted(await self._job_view(await self._job(trace.rid)))

    def _accepted(self, view: dict) -> JSONResponse:
        return JSONResponse(view, status_code=202, headers={"Location": f"/v1/jobs/{view['id']}"})

    async def _check_webhook(self, req: GenerationRequest) -> None:
        if req.webhook is None:
            return
        if (problem := self.webhooks.secret_problem()) is not None:
            raise NotSupported(problem, param="webhook")
        if (refusal := await self.webhooks.refusal(req.webhook)) is not None:
            raise InvalidRequest(f"`webhook` {refusal}", param="webhook")

    def _launch(self, trace: Trace, door, counted: bool) -> None:
        self._start_job_loop()
        trace.on_event = lambda event: self._progress(trace.rid, event)
        task = asyncio.ensure_future(self._run_job(trace, door, counted))
        self.job_tasks[trace.rid] = task
        if trace.req.webhook and "progress" in trace.req.webhook_events:
            self.job_progress_hooks.add(trace.rid)

        def done(_) -> None:
            self.job_tasks.pop(trace.rid, None)
            self.job_progress_hooks.discard(trace.rid)
            self.job_stored_at.pop(trace.rid, None)
        task.add_done_callback(done)

    # ---- running it ------------------------------------------------------------------------------------------

    async def _run_job(self, trace: Trace, door, counted: bool) -> None:
        jid, fields = trace.rid, {}
        try:
            await self._complete(trace, door, counted, wait_commit=True)
            status = "succeeded"
        except PrismError as e:
            status, fields = "failed", {"error": e.body(jid)["error"]}
        except asyncio.CancelledError:
            status = "canceled"
        except Exception as e:  # a bug: the job ends failed with the request id, as a synchronous 500 would
            log.error("async job %s failed", jid, exc_info=e)
            status, fields = "failed", {"error": PrismError(f"internal error ({type(e).__name__})").body(jid)["error"]}
        await asyncio.shield(self._end_job(jid, status, fields))

    async def _end_job(self, jid: str, status: str, fields: dict) -> None:
        await asyncio.to_thread(self.jobs.update, jid, status, ended=time.time(), **fields)
        self.metrics.jobs.inc(tags={"status": status})
        view = await self._job_view(await self._job(jid))
        for queue in self.job_listeners.get(jid, ()):
            queue.put_nowait((status, view))
        job = await self._job(jid)
        if job.get("request", {}).get("webhook"):
            asyncio.ensure_future(self.webhooks.deliver(jid, "completed", {"type": f"image.generation.{status}",
                                                                           "data": view}))

    def _progress(self, jid: str, event: dict) -> None:
        """A stage or step of a running job: to this replica's listeners at once, to the store (other replicas'
        listeners, a late GET) on stage changes and at most every STORE_EVERY_S, to a progress webhook."""
        if event.get("stage") == "generate" and "queued_ms" in event:
            asyncio.ensure_future(asyncio.to_thread(self.jobs.update, jid, "running"))
            self.metrics.job_queued.observe(event["queued_ms"])
        progress = progress_of(event)
        for queue in self.job_listeners.get(jid, ()):  # listeners get the preview too; the store keeps no pixels
            queue.put_nowait(("progress", {**progress, **({"preview": event["preview"]} if "preview" in event
                                                            else {})}))
        now = time.monotonic()
        if store_progress(progress, self.job_stored_at.get(jid, (0.0, "")), now, STORE_EVERY_S):
            self.job_stored_at[jid] = (now, progress["stage"])
            asyncio.ensure_future(asyncio.to_thread(self.jobs.update, jid, None, progress=progress))
        if jid in self.job_progress_hooks:
            asyncio.ensure_future(self.webhooks.deliver(jid, "progress", {"type": "image.generation.progress",
                                                                          "data": {"id": jid, "progress": progress}}))

    async def _job_stream(self, job: dict):
        """The events of one job: from this replica's runner when it runs here, else from the store."""
        jid, queue = job["id"], asyncio.Queue()
        self.job_listeners.setdefault(jid, set()).add(queue)
        try:
            view = await self._job_view(job)
            yield sse("progress", {"id": jid, "status": view["status"], "progress": view.get("progress")})
            if view["status"] in TERMINAL:
                yield sse(view["status"], view)
                return
            last = None
            while True:
                if jid in self.job_tasks:  # runs here: its events arrive as they happen
                    try:
                        async with asyncio.timeout(15):
                            kind, data = await queue.get()
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                else:  # another replica runs it (or it just ended): follow the store
                    await asyncio.sleep(STORE_EVERY_S)
                    current = await self._job(jid)
                    if current["status"] in TERMINAL:
                        kind, data = current["status"], await self._job_view(current)
                    elif current.get("progress") != last:
                        last = current.get("progress")
                        kind, data = "progress", last
                    else:
                        continue
                if kind in TERMINAL:
                    yield sse(kind, data)
                    return
                yield sse("progress", {"id": jid, "status": "running", "progress": data})
        finally:
            listeners = self.job_listeners.get(jid, set())
            listeners.discard(queue)
            if not listeners:
                self.job_listeners.pop(jid, None)

    # ---- what a caller sees ----------------------------------------------------------------------------------

    async def _job(self, jid: str) -> dict | None:
        """The job's row, read off the event loop (the store's lock may be held by a writer thread)."""
        return await asyncio.to_thread(self.jobs.get, jid)

    async def _job_of(self, jid: str, caller: Caller) -> dict:
        job = await self._job(jid) if self.jobs is not None else None
        if job is None or not can_see(caller, job.get("tenant")):
            raise NotFound(f"no job {jid!r}", param="id")
        return job

    async def _job_view(self, job: dict) -> dict:
        """The job as the API shows it: on success `result` is exactly the synchronous answer."""
        view = job_view(job)
        if job["status"] == "succeeded":
            req = GenerationRequest.model_validate(job.get("request") or {})
            view["result"] = await self.outcomes.stored_answer(Trace(rid=job["id"], req=req,
                                                                     base_url=job.get("base_url", "")))
        return view

    # ---- staying alive ---------------------------------------------------------------------------------------

    def _start_job_loop(self) -> None:
        if self.jobs is not None and (self.job_loop is None or self.job_loop.done()):
            self.job_loop = asyncio.ensure_future(self._job_loop())

    async def _job_loop(self) -> None:
        """Beat for this replica's jobs, cancel those whose cancel reached another replica, and adopt the jobs of a
        replica that went silent (killed, replaced): they run again here, or end `failed` saying why."""
        beats = 0
        while True:
            beats += 1
            try:
                if beats % 600 == 1 and self.store.spec.max_age_days:  # every 10 minutes: the records' retention
                    await asyncio.to_thread(self.jobs.prune, time.time() - self.store.spec.max_age_days * 86_400)
                for jid in await asyncio.to_thread(self.jobs.beat, self.me):
                    task = self.job_tasks.get(jid)
                    if task is not None:
                        task.cancel()
                for job in await asyncio.to_thread(self.jobs.adopt, self.me, STALE_S):
                    if job["id"] not in self.job_tasks:
                        await self._resume(job)
            except Exception as e:  # the loop must outlive a busy database
                log.warning("job loop: %r", e)
            await asyncio.sleep(BEAT_S)

    async def _resume(self, job: dict) -> None:
        jid = job["id"]
        req = GenerationRequest.model_validate(job["request"])
        who = job.get("caller") or {}
        # The tier it was accepted with (already resolved from its key): kept as a gateway's would be.
        caller = Caller(tenant=who.get("tenant") or "anonymous", user_tier=who.get("user_tier", "free"),
                        trusted_tier=True)
        trace = Trace(rid=jid, req=req, base_url=job.get("base_url", ""), caller=caller)
        trace.notes.append("resumed after the ingress replica that accepted this job stopped")
        if await self.outcomes.stored_answer(trace) is not None:  # it finished; only its status was lost
            await self._end_job(jid, "succeeded", {})
            return
        try:
            door, counted = await self._door(trace)
        except PrismError as e:
            await self._end_job(jid, "failed", {"error": {**e.body(jid)["error"], "message": "the replica running "
                                                          f"this job stopped, and it could not restart: {e.message}"}})
            return
        self._launch(trace, door, counted)

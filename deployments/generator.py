"""Generator deployment: one per tier. Renders and finishes a job where its pixels are, in one call.

1. A job waits in the replica's backlog; when the engine is free it takes what is queued, up to max_batch_size
   images, with no timer (graph/backlog.py). Hosted APIs skip the backlog: their calls only wait on the network.
2. The batch runs in a worker thread (the event loop stays free): the model, the output checks, then per job post
   to its size, its text composited and OCR-checked, PNG bytes (engines/render.py). The answer is the PNGs.
3. The replica reports its load for admission at the door (deployments/reports.py), and a hosted tier whose provider
   says its model is gone (`model_retired`) stays unavailable here: /v1/tiers shows why, prism_model_unavailable too.
"""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import ray
from ray import serve

from deployments.reports import LoadReporter
from engines.checks import check_image
from engines.finish import Finisher
from engines.generators import REMOTE_KINDS, ModelSpec, build_engine
from engines.health import HealthGate, ReplicaUnhealthy
from engines.post import PostSpec
from engines.render import Failure, Renderer
from graph.backlog import Backlog
from graph.cost import price_card
from graph.schemas import GenerateJob, GenerateResult, TypographySpec

log = logging.getLogger("prism.generator")


class RenderCancelled(Exception):
    """Raised at a denoising step once every job of the batch was cancelled: the model stops, the slot frees."""


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class Generator:
    def __init__(self, spec: dict, finish: dict | None = None, tier: str = ""):
        """Validate the spec, load the model (local or built-in weights only), the upscaler and the OCR."""
        self.spec = ModelSpec.model_validate(spec)  # refuses a hosted model its provider has shut down
        self.engine = build_engine(self.spec)
        self.lifecycle_warning = _lifecycle_warning(self.spec)
        if self.lifecycle_warning:
            log.warning("%s: %s", self.spec.name, self.lifecycle_warning)
        finish = finish or {}
        finisher = Finisher(PostSpec.model_validate(finish.get("post") or {}),
                            TypographySpec.model_validate(finish.get("typography") or {}))
        self.stats = {"running": 0, "batches": 0, "oom_splits": 0, "failed_checks": 0, "cancelled": 0,
                      "health_probes": 0, "health_failures": 0}
        # The GPU share this replica holds (its ray_actor_options num_gpus): the cost of a GPU second.
        gpu_fraction = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
        self.renderer = Renderer(self.engine, self.spec, finisher, self.stats, self._noted, gpu_fraction)
        self.health = HealthGate(threshold=self.spec.health_failures_to_replace)
        self.remote = self.spec.kind in REMOTE_KINDS
        self.backlog = Backlog(self._run_batch, self.spec.max_batch_size)
        # Renders held, by the ingress replica that sent them; EWMA seconds of one job here (queue excluded).
        self.inflight, self.by_caller, self.service_s = 0, Counter(), None
        self.metrics, self.unavailable_gauge = _metrics(), _unavailable_gauge()
        # Async jobs: who listens to a request's progress here, and the requests whose caller cancelled them.
        self.watchers: dict[str, Callable[[dict], None]] = {}
        self.cancelled: set[str] = set()
        ctx = serve.get_replica_context()
        self.reporter = LoadReporter(ctx.app_name, tier or ctx.deployment.removeprefix("Generator_"),
                                     ctx.replica_id.unique_id,
                                     lambda: (self.inflight, self.service_s, dict(self.by_caller)))

    async def generate(self, job: GenerateJob) -> GenerateResult:
        """Render and finish one job (batched with what else is queued); failures come back in `failure`."""
        self.inflight += 1
        self.by_caller[job.caller] += 1
        self.stats["running"] += 1
        t0 = time.perf_counter()
        try:
            if self.remote:  # a hosted call only waits on the network: no batch, calls run side by side
                result = (await self._run_batch([job]))[0]
            else:
                key = (job.steps or self.spec.steps, self.spec.guidance if job.guidance is None else job.guidance)
                result = await self.backlog.submit(job, size=job.n, key=key)
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1  # the client went away; Serve cancelled this request
            if len(self.cancelled) > 10_000:  # ids of jobs cancelled before their batch ran: never looked up again
                self.cancelled.clear()
            self.cancelled.add(job.request_id)  # a batch of only cancelled jobs stops at its next step
            raise
        finally:
            self.inflight -= 1
            self.by_caller[job.caller] -= 1
            if self.by_caller[job.caller] <= 0:
                del self.by_caller[job.caller]
            self.stats["running"] -= 1
        elapsed = time.perf_counter() - t0
        result.timings_ms["queue"] = round(max(0.0, elapsed * 1000 - sum(result.timings_ms.values())), 2)
        if result.failure is None:
            work = (elapsed * 1000 - result.timings_ms["queue"]) / 1000
            self.service_s = work if self.service_s is None else 0.8 * self.service_s + 0.2 * work
            self.health.ok()  # the model just rendered: as good as a passing probe
        return result

    async def generate_stream(self, job: GenerateJob):
        """`generate`, streamed (an async job's call): each denoising step and finishing stage as an event dict as
        it happens, then the GenerateResult. Cancelled by the caller, the render stops at its next step."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.watchers[job.request_id] = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        render = asyncio.ensure_future(self.generate(job))
        try:
            while not render.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, render}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield render.result()
        finally:
            self.watchers.pop(job.request_id, None)
            render.cancel()

    def _events_of(self, jobs: list[GenerateJob]) -> Callable[[int | None, dict], None] | None:
        """What the renderer calls with progress: each watched job hears its batch's steps and its own stages; once
        every job of the batch is cancelled, the next step raises and the model stops."""
        ids = [job.request_id for job in jobs]
        if not any(rid in self.watchers for rid in ids):
            return None

        def on_event(index: int | None, event: dict) -> None:
            if "step" in event and all(rid in self.cancelled for rid in ids):
                raise RenderCancelled(f"every job of this batch was cancelled ({len(ids)})")
            for i, rid in enumerate(ids):
                watcher = self.watchers.get(rid)
                if watcher is not None and (index is None or index == i):
                    watcher(event)
        return on_event

    async def _run_batch(self, jobs: list[GenerateJob]) -> list[GenerateResult]:
        self.stats["batches"] += 1
        self.metrics.observe(len(jobs), tags={"model": self.spec.name})
        steps = jobs[0].steps or self.spec.steps
        guidance = self.spec.guidance if jobs[0].guidance is None else jobs[0].guidance
        delay = self.engine.delay_s(sum(job.n for job in jobs))
        if delay:  # a simulated model's latency: on the loop, so a cancelled request frees the replica at once
            await asyncio.sleep(delay)
        if not self.remote:
            try:
                return await asyncio.to_thread(self.renderer.render, jobs, steps, guidance, self._events_of(jobs))
            finally:
                self.cancelled.difference_update(job.request_id for job in jobs)
        items = self.renderer.items(jobs)
        t0 = time.perf_counter()
        try:
            rendered = await self.engine.arender([it.prompt for it in items], [it.seed for it in items])
        except Exception as e:
            rendered = [e] * len(items)
        model_s = time.perf_counter() - t0
        raw, billed = [getattr(r, "image", r) for r in rendered], [getattr(r, "usd", None) for r in rendered]

        def finish():
            outputs = self.renderer.check(raw, [it.prompt for it in items])
            return self.renderer.finish(jobs, items, outputs, steps, guidance, model_s, billed)
        return await asyncio.to_thread(finish)

    async def check_health(self) -> None:
        """Serve's health check (every health_check_period_s): a real 1-step render of the model, bounded by
        health_probe_timeout_s, skipped while a recent render succeeded. Raises (Serve replaces the replica)
        only after `health_failures_to_replace` consecutive failures: one slow moment does not flap it."""
        if self.health.fresh():
            return
        self.stats["health_probes"] += 1
        try:
            async with asyncio.timeout(self.spec.health_probe_timeout_s):
                out = await asyncio.to_thread(self._probe)
            check_image(out, (self.spec.native_size, self.spec.native_size), allow_flat=True)
            self.health.ok()
        except ReplicaUnhealthy:
            raise
        except Exception as e:  # a wedged (timeout), broken or NaN-producing model
            self.stats["health_failures"] += 1
            self.health.failed(f"{type(e).__name__}: {e}")

    def _noted(self, failure: Failure) -> None:
        """A failure that makes the tier unavailable (its model is gone) is logged by the engine and shown here."""
        if failure.reason == "model_retired":
            self.unavailable_gauge.set(1, tags={"model": self.spec.name, "reason": failure.reason})

    def _probe(self):
        probe = getattr(self.engine, "probe", None)
        return probe() if probe else self.engine.generate(["health probe"], [0], 1, 1.0)[0]

    def info(self) -> dict:
        """What this tier serves: name, version, native size, defaults, counters, the (logical) GPUs it holds."""
        return {"model": self.engine.name, "model_version": self.engine.version, "kind": self.spec.kind,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": getattr(self.engine, "device", "cpu"),
                "native_size": self.spec.native_size, "steps": self.spec.steps, "guidance": self.spec.guidance,
                "stats": dict(self.stats), "replica": serve.get_replica_context().replica_id.unique_id,
                "node_id": ray.get_runtime_context().get_node_id(), "inflight": self.inflight,
                "backlog": {"waiting": len(self.backlog), "batches": self.backlog.batches,
                            "mean_batch_size": round(self.backlog.mean_batch_size, 3)},
                "health": {"consecutive_failures": self.health.failures, "last_error": self.health.last_error},
                **_availability(self.engine, self.lifecycle_warning, self.spec)}

    def __del__(self):
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.stop()


def _availability(engine, warning: str | None, spec: ModelSpec) -> dict:
    """What /v1/tiers shows of a tier's model: available or why not, its lifecycle warning, its dated price."""
    unavailable = getattr(engine, "unavailable", None)
    return {"available": unavailable is None,
            "unavailable_reason": None if unavailable is None else f"model_retired: {unavailable}",
            "lifecycle_warning": warning, "price": price_card(spec.cost.model_dump(mode="json"))}


def _lifecycle_warning(spec: ModelSpec) -> str | None:
    if spec.kind not in REMOTE_KINDS:
        return None
    from engines.remote import lifecycle_warning

    return lifecycle_warning(spec)


def _unavailable_gauge():
    """1 while a tier's model is unavailable on a replica (its provider said it is gone); created in the replica."""
    from ray.serve.metrics import Gauge

    return Gauge("prism_model_unavailable", description="1 while the provider says this tier's model is gone.",
                 tag_keys=("model", "reason"))


def _metrics():
    from ray.serve.metrics import Histogram

    return Histogram("prism_batch_size", description="Jobs per model batch taken from the backlog.",
                     boundaries=[1, 2, 4, 8, 16, 32], tag_keys=("model",))

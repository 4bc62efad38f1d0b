"""Generator deployment: one per tier, same class, configured by a typed ModelSpec.

Requests that arrive together share one pipeline call through @serve.batch: a job for n images contributes
n prompts; jobs with different step/guidance settings run as separate groups. Every image is checked
(engines/checks.py) before it leaves the replica; a failed check or an exception comes back as a
GenerateResult with `failure` set, so the ingress can walk the route's fallback chain. Out of memory on a
batch splits the batch in halves and retries the parts before giving up (seed 003).

A hosted tier whose provider says its model is gone (`model_retired`) stays unavailable on this replica: /v1/tiers
shows why (info()), the gauge prism_model_unavailable says so, and every render fails fast to the fallbacks.
"""

import asyncio
import logging
import time

import ray
from ray import serve

from engines.checks import OutputCheckFailed, check_image
from engines.generators import ModelSpec, build_engine, is_oom
from engines.health import HealthGate, ReplicaUnhealthy
from graph.cost import price_card
from graph.schemas import GenerateJob, GenerateResult

log = logging.getLogger("prism.generator")


class _Failure:
    __slots__ = ("reason", "detail", "retry_after_s")

    def __init__(self, reason: str, detail: str, retry_after_s: float | None = None):
        self.reason, self.detail, self.retry_after_s = reason, detail, retry_after_s

    @classmethod
    def of(cls, e: BaseException, reason: str) -> "_Failure":
        """An exception as a failure. Its own `reason` wins when it is a reason code (engines/remote.py's errors;
        not e.g. UnicodeDecodeError's prose), and a hosted API's 429 brings the wait it asked for."""
        own = getattr(e, "reason", None)
        if isinstance(own, str) and own.isidentifier() and own.islower():
            reason = own
        return cls(reason, f"{type(e).__name__}: {e}", getattr(e, "retry_after_s", None))


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class Generator:
    def __init__(self, spec: dict):
        """Validate the spec and load the model (local or built-in weights only)."""
        self.spec = ModelSpec.model_validate(spec)  # refuses a hosted model its provider has shut down
        self.engine = build_engine(self.spec)
        self.lifecycle_warning = _lifecycle_warning(self.spec)
        if self.lifecycle_warning:
            log.warning("%s: %s", self.spec.name, self.lifecycle_warning)
        self.unavailable_gauge = _unavailable_gauge()
        self.size = (self.spec.native_size, self.spec.native_size)
        self.stats = {"running": 0, "batches": 0, "oom_splits": 0, "failed_checks": 0, "cancelled": 0,
                      "health_probes": 0, "health_failures": 0}
        self.health = HealthGate(threshold=self.spec.health_failures_to_replace)
        # The GPU share this replica holds (its ray_actor_options num_gpus): the cost of a GPU second.
        self.gpu_fraction = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
        self.remote = hasattr(self.engine, "agenerate")
        # @serve.batch's limits are per tier: applied from the spec, not hard-coded.
        self._batched.set_max_batch_size(self.spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    async def generate(self, job: GenerateJob) -> GenerateResult:
        """Render one job (batched with concurrent ones); failures come back in `failure`, never raised.

        Hosted APIs skip @serve.batch: it runs one batch at a time per replica, and a hosted call only waits on the
        network, so jobs run concurrently (a job's n images still share one provider call where it allows).
        """
        self.stats["running"] += 1
        try:
            if self.remote:
                return (await self._run_jobs([job]))[0]
            return await self._batched(job)
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1  # the client went away; Serve cancelled this request
            raise
        finally:
            self.stats["running"] -= 1

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[GenerateJob]) -> list[GenerateResult]:
        return await self._run_jobs(jobs)

    async def _run_jobs(self, jobs: list[GenerateJob]) -> list[GenerateResult]:
        self.stats["batches"] += 1
        groups: dict[tuple[int, float], list[int]] = {}
        for i, job in enumerate(jobs):
            key = (job.steps or self.spec.steps, self.spec.guidance if job.guidance is None else job.guidance)
            groups.setdefault(key, []).append(i)
        results: list[GenerateResult | None] = [None] * len(jobs)
        for (steps, guidance), idx in groups.items():
            items = [(i, jobs[i].prompt, jobs[i].seed + k) for i in idx for k in range(jobs[i].n)]
            t0 = time.perf_counter()
            billed: list = []  # hosted tiers: per item, what the provider said it cost (None: not said)
            outputs = await self._render_splitting(items, steps, guidance, billed)
            per_image_s = (time.perf_counter() - t0) / len(items)  # the batch's compute, shared by image count
            for i in idx:
                mine = [o for (j, _, _), o in zip(items, outputs, strict=True) if j == i]
                usd = [b for (j, _, _), b in zip(items, billed, strict=False) if j == i]
                results[i] = self._result(mine, steps, guidance, per_image_s * len(mine), len(items), usd)
        return results

    def _result(self, outputs: list, steps: int, guidance: float, compute_s: float, batch: int,
                billed: list | None = None) -> GenerateResult:
        failure = next((o for o in outputs if isinstance(o, _Failure)), None)
        extra = {"batch_size": batch, "note": getattr(self.engine, "note", None), "gpu_fraction": self.gpu_fraction}
        if failure and failure.retry_after_s is not None:
            extra["retry_after_s"] = failure.retry_after_s
        reported = [usd for usd in billed or [] if usd is not None]
        if reported and not failure:  # the ingress charges these images what the provider said, the rest list price
            extra["usd_reported"], extra["images_reported"] = round(sum(reported), 8), len(reported)
        return GenerateResult(
            images=[] if failure else outputs, model=self.engine.name, model_version=self.engine.version,
            steps=steps, guidance=guidance, compute_s=compute_s, failure=failure.reason if failure else None,
            detail=failure.detail if failure else "",
            extra=extra)

    async def _render_splitting(self, items: list[tuple], steps: int, guidance: float,
                                billed: list | None = None) -> list:
        """Render items in one call; on OOM split in halves and retry each part; check every output. A hosted
        tier's per-item cost, as its provider reported it, is appended to `billed`."""
        prompts, seeds = [p for _, p, _ in items], [s for _, _, s in items]
        try:
            delay = self.engine.delay_s(len(prompts))
            if delay:
                await asyncio.sleep(delay)
            if hasattr(self.engine, "arender"):  # hosted APIs: awaited on the replica's loop, no thread held
                rendered = await self.engine.arender(prompts, seeds)
                raw = [getattr(r, "image", r) for r in rendered]
                (billed if billed is not None else []).extend(getattr(r, "usd", None) for r in rendered)
            else:
                raw = await asyncio.to_thread(self.engine.generate, prompts, seeds, steps, guidance)
        except Exception as e:
            if is_oom(e) and len(items) > 1:
                self.stats["oom_splits"] += 1
                half = len(items) // 2
                return (await self._render_splitting(items[:half], steps, guidance)
                        + await self._render_splitting(items[half:], steps, guidance))
            reason = "oom" if is_oom(e) else ("nan" if isinstance(e, FloatingPointError) else "error")
            return [self._noted(_Failure.of(e, reason))] * len(items)  # the exception's own `reason` wins
        flat_ok = getattr(self.engine, "flat_ok", None)
        flat = flat_ok(prompts) if flat_ok else [False] * len(raw)
        self.health.ok()  # the model just rendered: as good as a passing probe
        return [self._check(o, f) for o, f in zip(raw, flat, strict=True)]

    def _check(self, output, flat_ok: bool = False):
        if isinstance(output, Exception):  # a hosted call that failed for this prompt only (engines/remote.py)
            return self._noted(_Failure.of(output, "error"))
        try:
            return check_image(output, self.size, allow_flat=flat_ok)
        except OutputCheckFailed as e:
            self.stats["failed_checks"] += 1
            return _Failure(e.reason, e.detail)

    async def check_health(self) -> None:
        """Serve's health check (every health_check_period_s): a real 1-step render of the model, bounded by
        health_probe_timeout_s, skipped while a recent render succeeded. Raises (Serve replaces the replica)
        only after `health_failures_to_replace` consecutive failures: one slow moment does not flap it."""
        if self.health.fresh():
            return
        self.stats["health_probes"] += 1
        try:
            out = await asyncio.wait_for(asyncio.to_thread(self._probe), self.spec.health_probe_timeout_s)
            check_image(out, self.size, allow_flat=True)
            self.health.ok()
        except ReplicaUnhealthy:
            raise
        except Exception as e:  # a wedged (timeout), broken or NaN-producing model
            self.stats["health_failures"] += 1
            self.health.failed(f"{type(e).__name__}: {e}")

    def _noted(self, failure: _Failure) -> _Failure:
        """A failure that makes the tier unavailable (its model is gone) is logged by the engine and shown here."""
        gauge = getattr(self, "unavailable_gauge", None)
        if failure.reason == "model_retired" and gauge is not None:
            gauge.set(1, tags={"model": self.spec.name, "reason": failure.reason})
        return failure

    def _probe(self):
        probe = getattr(self.engine, "probe", None)
        return probe() if probe else self.engine.generate(["health probe"], [0], 1, 1.0)[0]

    def info(self) -> dict:
        """What this tier serves: name, version, native size, defaults, counters, the (logical) GPUs it holds."""
        return {"model": self.engine.name, "model_version": self.engine.version, "kind": self.spec.kind,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": getattr(self.engine, "device", "cpu"),
                "native_size": self.spec.native_size, "steps": self.spec.steps, "guidance": self.spec.guidance,
                "stats": dict(self.stats), "replica": serve.get_replica_context().replica_id.unique_id,
                "node_id": ray.get_runtime_context().get_node_id(),
                "health": {"consecutive_failures": self.health.failures, "last_error": self.health.last_error},
                **_availability(self.engine, getattr(self, "lifecycle_warning", None), self.spec)}


def _availability(engine, warning: str | None, spec: ModelSpec) -> dict:
    """What /v1/tiers shows of a tier's model: available or why not, its lifecycle warning, its dated price."""
    unavailable = getattr(engine, "unavailable", None)
    return {"available": unavailable is None,
            "unavailable_reason": None if unavailable is None else f"model_retired: {unavailable}",
            "lifecycle_warning": warning, "price": price_card(spec.cost.model_dump(mode="json"))}


def _lifecycle_warning(spec: ModelSpec) -> str | None:
    from engines.generators import REMOTE_KINDS

    if spec.kind not in REMOTE_KINDS:
        return None
    from engines.remote import lifecycle_warning

    return lifecycle_warning(spec)


def _unavailable_gauge():
    """1 while a tier's model is unavailable on a replica (its provider said it is gone); created in the replica."""
    from ray.serve.metrics import Gauge

    return Gauge("prism_model_unavailable", description="1 while the provider says this tier's model is gone.",
                 tag_keys=("model", "reason"))

"""A tier's render work for a batch of jobs, without Serve: the model, the output checks, then each job finished
where its pixels are (post to its size, its text composited and OCR-checked, PNG bytes).

Every image is checked (engines/checks.py) before it is finished; a failed check, an exception or OOM comes back as
a GenerateResult with `failure` set (the ingress walks the route's fallback chain). Out of memory on a batch splits
the batch in halves and retries the parts before giving up (seed 003). Called from a worker thread for local models
(`render`), or after a hosted API's answer (`finish_remote`); it never touches an event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from engines.checks import OutputCheckFailed, check_image
from engines.finish import Finisher
from engines.generators import ModelSpec, is_oom
from graph.schemas import GenerateJob, GenerateResult


def _step_events(jobs: list[GenerateJob], items: list, on_event) -> Callable:
    """A denoising step's event for the batch, with a small PNG preview of its first image for each job that asked
    (`previews`): made only then, from the step's samples."""
    wanted = [i for i, job in enumerate(jobs) if job.previews]

    def on_step(i: int, n: int, preview: Callable | None = None) -> None:
        event = {"stage": "generate", "step": i + 1, "steps": n}
        if not wanted or preview is None:
            return on_event(None, event)
        images = preview()
        for j in range(len(jobs)):
            first = next((k for k, it in enumerate(items) if it.job == j), None)
            if j in wanted and first is not None and len(images) == len(items):  # not after an OOM split
                on_event(j, {**event, "preview": png_data_url(images[first])})
            else:
                on_event(j, event)
    return on_step


def png_data_url(image) -> str:
    """A float [0, 1] HxWx3 image as a `data:image/png;base64,...` URL (a preview is 32x32: about a kilobyte)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Failure:
    """Why one image has no render: a reason code and its detail (and a hosted API's Retry-After)."""

    reason: str
    detail: str
    retry_after_s: float | None = None

    @classmethod
    def of(cls, e: BaseException, reason: str) -> Failure:
        """An exception as a failure. Its own `reason` wins when it is a reason code (engines/remote.py's errors;
        not e.g. UnicodeDecodeError's prose), and a hosted API's 429 brings the wait it asked for."""
        own = getattr(e, "reason", None)
        if isinstance(own, str) and own.isidentifier() and own.islower():
            reason = own
        return cls(reason, f"{type(e).__name__}: {e}", getattr(e, "retry_after_s", None))


@dataclass
class Item:
    """One image of one job in a batch."""

    job: int
    prompt: str
    seed: int
    embedding: list[float] | None


class Renderer:
    """Renders and finishes batches for one tier; `stats` counts what happened (the replica reports it)."""

    def __init__(self, engine, spec: ModelSpec, finisher: Finisher, stats: dict,
                 on_failure: Callable[[Failure], None] | None = None, gpu_fraction: float = 0.0):
        self.engine, self.spec, self.finisher, self.stats = engine, spec, finisher, stats
        self.size = (spec.native_size, spec.native_size)
        self.on_failure = on_failure or (lambda f: None)
        self.gpu_fraction = gpu_fraction

    @staticmethod
    def items(jobs: list[GenerateJob]) -> list[Item]:
        return [Item(i, job.prompt, job.seed + k, job.embedding) for i, job in enumerate(jobs) for k in range(job.n)]

    def render(self, jobs: list[GenerateJob], steps: int, guidance: float,
               on_event: Callable[[int | None, dict], None] | None = None) -> list[GenerateResult]:
        """The model on every image of the batch, then each job finished (runs in a worker thread). `on_event(job,
        event)` hears each denoising step (job None: the whole batch) and each job's finishing stages; it may raise
        to stop the model at the next step (every job of the batch was cancelled)."""
        items = self.items(jobs)
        t0 = time.perf_counter()
        on_step = None if on_event is None else _step_events(jobs, items, on_event)
        outputs = self._render_splitting(items, steps, guidance, on_step)
        return self.finish(jobs, items, outputs, steps, guidance, time.perf_counter() - t0, on_event=on_event)

    def finish(self, jobs: list[GenerateJob], items: list[Item], outputs: list, steps: int, guidance: float,
               model_s: float, billed: list | None = None, on_event=None) -> list[GenerateResult]:
        """Each job's images (checked renders or failures) finished into its answer."""
        results = []
        for i, job in enumerate(jobs):
            if on_event is not None:
                on_event(i, {"stage": "typography" if job.text else "post"})
            mine = [o for it, o in zip(items, outputs, strict=True) if it.job == i]
            usd = [b for it, b in zip(items, billed or [None] * len(items), strict=True) if it.job == i]
            # The batch's model time, shared by image count: what this job's tier charges it for.
            results.append(self._result(job, mine, steps, guidance, model_s * len(mine) / len(items), len(jobs),
                                        usd))
        return results

    def _result(self, job: GenerateJob, outputs: list, steps: int, guidance: float, compute_s: float, batch: int,
                billed: list) -> GenerateResult:
        result = GenerateResult(pngs=[], model=self.engine.name, model_version=self.engine.version, steps=steps,
                                guidance=guidance, compute_s=compute_s, batch_size=batch,
                                timings_ms={"model": round(compute_s * 1000, 2)},
                                extra={"note": getattr(self.engine, "note", None), "gpu_fraction": self.gpu_fraction})
        failure = next((o for o in outputs if isinstance(o, Failure)), None)
        if failure is not None:
            result.failure, result.detail = failure.reason, failure.detail
            if failure.retry_after_s is not None:
                result.extra["retry_after_s"] = failure.retry_after_s
            return result
        reported = [usd for usd in billed if usd is not None]
        if reported:  # the ingress charges these images what the provider said, the rest list price
            result.extra["usd_reported"], result.extra["images_reported"] = round(sum(reported), 8), len(reported)
        width, height = job.width or self.size[0], job.height or self.size[1]
        done = self.finisher.finish(outputs, width, height, job.text, job.prompt)
        result.pngs, result.ocr, result.post = done.pngs, done.ocr, {"backend": done.backend, "scale": done.scale}
        result.timings_ms.update(done.timings_ms)
        if done.failure:
            result.failure, result.detail = done.failure, done.detail
        return result

    def _render_splitting(self, items: list[Item], steps: int, guidance: float, on_step=None) -> list:
        """Render items in one call; on OOM split in halves and retry each part; check every output."""
        prompts, seeds = [it.prompt for it in items], [it.seed for it in items]
        embeddings = [it.embedding for it in items]
        embeddings = embeddings if all(e is not None for e in embeddings) else None
        try:
            raw = self._generate(prompts, seeds, steps, guidance, embeddings, on_step)
        except Exception as e:
            if is_oom(e) and len(items) > 1:
                self.stats["oom_splits"] += 1
                half = len(items) // 2
                return (self._render_splitting(items[:half], steps, guidance, on_step)
                        + self._render_splitting(items[half:], steps, guidance, on_step))
            reason = "oom" if is_oom(e) else ("nan" if isinstance(e, FloatingPointError) else "error")
            return [self._failed(Failure.of(e, reason))] * len(items)  # the exception's own `reason` wins
        return self.check(raw, prompts, embeddings)

    def _generate(self, prompts, seeds, steps, guidance, embeddings, on_step=None):
        kw = {"on_step": on_step} if on_step is not None and getattr(self.engine, "reports_steps", False) else {}
        if embeddings is not None and getattr(self.engine, "takes_embeddings", False):
            return self.engine.generate(prompts, seeds, steps, guidance, embeddings=embeddings, **kw)
        return self.engine.generate(prompts, seeds, steps, guidance, **kw)

    def check(self, raw: list, prompts: list[str], embeddings=None) -> list:
        """Each output checked (NaN, blank, size, decodable) into a uint8 image, or its Failure."""
        flat_ok = getattr(self.engine, "flat_ok", None)
        if flat_ok is None:
            flat = [False] * len(raw)
        else:
            flat = flat_ok(prompts, embeddings) if getattr(self.engine, "takes_embeddings", False) else flat_ok(prompts)
        return [self._check(o, f) for o, f in zip(raw, flat, strict=True)]

    def _check(self, output, flat_ok: bool = False):
        if isinstance(output, Exception):  # a hosted call that failed for this prompt only (engines/remote.py)
            return self._failed(Failure.of(output, "error"))
        try:
            return check_image(output, self.size, allow_flat=flat_ok)
        except OutputCheckFailed as e:
            self.stats["failed_checks"] += 1
            return Failure(e.reason, e.detail)

    def _failed(self, failure: Failure) -> Failure:
        self.on_failure(failure)
        return failure

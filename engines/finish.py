"""Finishing a render where its pixels already are: post (denoise, upscale to the requested size, colour), the exact
text (composited, read back by OCR, the safe layout after a miss), and the PNG bytes. It runs in the generator
replica, in the thread that ran the model, so no image travels to the ingress only to be sent on to another stage.
Plain Python: no Ray.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from engines.faults import FaultInjectingMisreadOcr
from engines.ocr import build_ocr, check_text
from engines.post import PostSpec, Upscaler
from engines.typography import TextDoesNotFit, choose_layout, compose
from graph.images import png_bytes
from graph.schemas import TypographySpec


@dataclass
class Finished:
    """One job's images, ready to answer: PNG bytes at the requested size, or why there are none."""

    pngs: list[bytes] = field(default_factory=list)
    backend: str = "none"  # the upscaler that ran (realesrgan, classical, none)
    scale: int = 1
    ocr: dict | None = None
    failure: str | None = None  # text_does_not_fit (the client's), ocr_miss
    detail: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)


class Finisher:
    """Post + typography + encode for a replica. The OCR loads in the background as the replica starts
    (`typography.preload`), or on the first text: most renders carry none, and a replica's start stays short."""

    def __init__(self, post: PostSpec | None = None, typography: TypographySpec | None = None):
        self.post = Upscaler(post or PostSpec())
        self.typography = typography or TypographySpec()
        self._ocr, self._ocr_lock = None, threading.Lock()
        if self.typography.preload:
            threading.Thread(target=lambda: self.ocr, name="ocr-preload", daemon=True).start()

    @property
    def ocr(self):
        with self._ocr_lock:
            if self._ocr is None:
                self._ocr = build_ocr(self.typography.ocr, gpu=self.typography.gpu)
            return self._ocr

    def finish(self, images: list[np.ndarray], width: int, height: int, text: str | None, prompt: str) -> Finished:
        """Bring checked uint8 renders to width x height, composite and verify `text` when given, encode."""
        out, timings = Finished(), {}
        t = time.perf_counter()
        posted = [self.post.process(im, width, height) for im in images]
        timings["post"] = _ms(t)
        images = [p.image for p in posted]
        if posted:
            out.backend, out.scale = posted[0].backend, posted[0].scale
        if text:
            t = time.perf_counter()
            images, out.ocr, out.failure, out.detail = self._typeset(images, text, prompt)
            timings["typography"] = _ms(t)
        if out.failure is None:
            t = time.perf_counter()
            out.pngs = [png_bytes(im) for im in images]
            timings["encode"] = _ms(t)
        out.timings_ms = timings
        return out

    def _typeset(self, images: list[np.ndarray], text: str, prompt: str):
        """(images with text, OCR info, failure, detail): each image's first layout, the safe one after a miss."""
        marker = self.typography.fault_misread_marker_path  # tests only: an injected OCR miss
        ocr = FaultInjectingMisreadOcr() if marker and os.path.exists(marker) else self.ocr
        composed_all, checks, tried = [], [], 0
        for img in images:
            for safe in (False, True):
                tried += 1
                try:
                    composed = compose(img, text, choose_layout(prompt, safe=safe))
                except TextDoesNotFit as e:
                    return images, None, "text_does_not_fit", str(e)
                check = check_text(ocr, composed, text, self.typography.max_cer)
                if check.passed:
                    break
            composed_all.append(composed)
            checks.append(check)
        worst = max(checks, key=lambda c: (not c.passed, c.cer))
        info = {"backend": worst.backend, "read": worst.read, "cer": round(worst.cer, 4), "passed": worst.passed,
                "expected": text, "layouts_tried": tried}
        if not worst.passed:
            return composed_all, info, "ocr_miss", (f"after {tried} layouts {worst.backend} read {worst.read!r} for "
                                                    f"{text!r} (character error rate {worst.cer:.2f})")
        return composed_all, info, None, ""


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)

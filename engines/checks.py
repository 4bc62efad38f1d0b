"""Output checks run on every render of every tier: cheap, typed, each failure with a reason code.

Reasons: `nan` (NaN/Inf in latents or pixels), `blank` (all black / single colour / near-constant),
`undecodable` (bytes that are not an image), `wrong_size` (not the size the model was asked for).
Measured cost per image is in benchmarks/RESULTS.md (`benchmarks/check_cost.py`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

REASONS = ("nan", "blank", "undecodable", "wrong_size")


class OutputCheckFailed(Exception):
    """A render failed a check; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CheckLimits:
    # A near-constant image: luminance std below this (0-255 scale) on a 64x64 thumbnail.
    min_std: float = 2.0
    # Or fewer distinct (quantised) colours than this on the thumbnail. 2, not more: a flat two-colour icon is
    # a legitimate render; one colour never is.
    min_colors: int = 2


def to_array(output) -> np.ndarray:
    """Bytes or array -> float32 HxWx3 in [0, 1] (uint8 scaled); raises OutputCheckFailed('undecodable')."""
    if isinstance(output, bytes | bytearray | memoryview):
        try:
            img = Image.open(io.BytesIO(bytes(output)))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise OutputCheckFailed("undecodable", f"{len(output)} bytes are not an image ({e})") from None
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.asarray(output)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise OutputCheckFailed("undecodable", f"array of shape {arr.shape} is not an HxWx3 image")
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


def check_image(output, size: tuple[int, int] | None, limits: CheckLimits = CheckLimits(),
                allow_flat: bool = False) -> np.ndarray:
    """Validate one render and return it as uint8 HxWx3; raises OutputCheckFailed with a reason.

    allow_flat: the prompt asked for a plain one-colour image (the engine says so), so near-constant is right;
    NaN, size and decode checks still apply."""
    arr = to_array(output)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise OutputCheckFailed("nan", f"{bad} of {arr.size} pixel values are NaN/Inf")
    if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
        raise OutputCheckFailed("wrong_size", f"got {arr.shape[1]}x{arr.shape[0]}, expected {size[0]}x{size[1]}")
    img = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if not allow_flat:
        _check_not_blank(img, limits)
    return img


def _check_not_blank(img: np.ndarray, limits: CheckLimits) -> None:
    h, w = img.shape[:2]
    step_y, step_x = max(1, h // 64), max(1, w // 64)
    thumb = img[::step_y, ::step_x]
    lum = thumb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    std = float(lum.std())
    if std < limits.min_std:
        kind = "all black" if lum.mean() < 8 else "near-constant"
        raise OutputCheckFailed("blank", f"{kind} image (luminance std {std:.2f} < {limits.min_std})")
    q = (thumb >> 4).astype(np.int32)
    colors = len(np.unique((q[..., 0] << 8) | (q[..., 1] << 4) | q[..., 2]))
    if colors < limits.min_colors:
        raise OutputCheckFailed("blank", f"only {colors} distinct colours")

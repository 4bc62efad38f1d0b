"""The Typography deployment's logic without Ray: compose, OCR-check, retry once with the safe layout."""

import numpy as np
import pytest

from deployments.typography import Typography
from engines.faults import FaultInjectingMisreadOcr
from engines.ocr import RapidOcrBackend
from graph.schemas import TypographySpec

STAGE = Typography.func_or_class  # the plain class behind the Serve deployment


def _stage(ocr) -> object:
    stage = object.__new__(STAGE)
    stage.spec, stage.ocr = TypographySpec(max_cer=0.0), ocr
    return stage


def _noise(size=256, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def rapid():
    return RapidOcrBackend()


def test_readable_text_passes_first_layout(rapid):
    out = _stage(rapid)._render_all([_noise()], "GRAND OPENING", 'a poster that says "GRAND OPENING"')
    assert out["passed"] and out["layouts_tried"] == 1
    assert out["ocr"]["cer"] == 0.0 and out["ocr"]["backend"] == rapid.name
    assert out["images"][0].shape == (256, 256, 3)


def test_a_miss_retries_the_safe_layout_then_fails_clearly():
    ocr = FaultInjectingMisreadOcr()
    out = _stage(ocr)._render_all([_noise()], "Fresh Bread", "a bakery sign")
    assert out["passed"] is False and out["layouts_tried"] == 2 and ocr.calls == 2
    assert out["ocr"]["read"] == "FAULT INJECTED MISREAD" and out["ocr"]["cer"] > 0


def test_text_that_cannot_fit_is_reported():
    out = _stage(FaultInjectingMisreadOcr())._render_all([_noise(64)], "word " * 200, "a sign")
    assert out["error"] == "text_does_not_fit"

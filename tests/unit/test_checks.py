"""Output checks: each bad render fails with its reason; good renders (even flat icons) pass."""

import io

import numpy as np
import pytest
from PIL import Image

from engines.checks import OutputCheckFailed, check_image
from engines.faults import FaultInjectingEngine, InjectedOutOfMemory
from engines.generators import ModelSpec, is_oom


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


RNG = np.random.default_rng(0)
NOISE = RNG.random((64, 64, 3), dtype=np.float32)
with_nan = NOISE.copy()
with_nan[10, 10, 0] = np.nan
with_inf = NOISE.copy()
with_inf[0, 0, 2] = np.inf
grey = np.full((64, 64, 3), 0.5, np.float32)
grey_noise = np.clip(grey + RNG.normal(0, 0.002, grey.shape), 0, 1).astype(np.float32)
icon = np.zeros((64, 64, 3), np.uint8)
icon[16:48, 16:48] = (230, 40, 40)  # flat two-colour icon: legitimate

BAD = [
    pytest.param(with_nan, "nan", id="nan"),
    pytest.param(with_inf, "nan", id="inf"),
    pytest.param(np.zeros((64, 64, 3), np.float32), "blank", id="all_black"),
    pytest.param(grey, "blank", id="single_colour"),
    pytest.param(grey_noise, "blank", id="near_constant"),
    pytest.param(b"\x89PNG\r\n\x1a\n not really", "undecodable", id="garbage_bytes"),
    pytest.param(np.zeros((64,), np.float32), "undecodable", id="wrong_rank"),
    pytest.param(NOISE[:32], "wrong_size", id="wrong_size"),
]


@pytest.mark.parametrize("output,reason", BAD)
def test_bad_renders_fail_with_reason(output, reason):
    with pytest.raises(OutputCheckFailed) as e:
        check_image(output, (64, 64))
    assert e.value.reason == reason


GOOD = [
    pytest.param(NOISE, id="float_noise"),
    pytest.param((NOISE * 255).astype(np.uint8), id="uint8"),
    pytest.param(icon, id="flat_icon"),
    pytest.param(_png((NOISE * 255).astype(np.uint8)), id="png_bytes"),
]


@pytest.mark.parametrize("output", GOOD)
def test_good_renders_pass_as_uint8(output):
    img = check_image(output, (64, 64))
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)


def _fault(**kw):
    return FaultInjectingEngine(ModelSpec(kind="fault_injecting", name="fault-injecting", native_size=64, **kw))


FAULTS = [
    pytest.param("nan", "nan", id="nan"),
    pytest.param("garbage", "undecodable", id="garbage"),
    pytest.param("blank", "blank", id="blank"),
    pytest.param("wrong_size", "wrong_size", id="wrong_size"),
]


@pytest.mark.parametrize("fault,reason", FAULTS)
def test_fault_injector_outputs_fail_the_checks(fault, reason):
    out = _fault(fault=fault).generate(["a"], [1], 2, 3.0)
    with pytest.raises(OutputCheckFailed) as e:
        check_image(out[0], (64, 64))
    assert e.value.reason == reason


def test_fault_injector_oom_only_above_batch():
    eng = _fault(fault="oom", fault_oom_above_batch=1)
    with pytest.raises(InjectedOutOfMemory) as e:
        eng.generate(["a", "b"], [1, 2], 2, 3.0)
    assert is_oom(e.value)
    assert check_image(eng.generate(["a"], [1], 2, 3.0)[0], (64, 64)).shape == (64, 64, 3)


def test_fault_injector_nan_only_at_high_guidance():
    eng = _fault(fault="nan_above_guidance", fault_guidance_threshold=2.0)
    with pytest.raises(OutputCheckFailed):
        check_image(eng.generate(["a"], [1], 2, 3.0)[0], (64, 64))
    check_image(eng.generate(["a"], [1], 2, 1.5)[0], (64, 64))


@pytest.mark.parametrize("exc,expected", [
    pytest.param(MemoryError(), True, id="memoryerror"),
    pytest.param(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), True, id="cuda_message"),
    pytest.param(RuntimeError("shape mismatch"), False, id="other"),
])
def test_is_oom(exc, expected):
    assert is_oom(exc) is expected


def test_allow_flat_skips_only_the_blank_check():
    flat = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(OutputCheckFailed, match="blank"):
        check_image(flat, (64, 64))
    assert check_image(flat, (64, 64), allow_flat=True).shape == (64, 64, 3)
    with pytest.raises(OutputCheckFailed, match="nan"):
        check_image(np.full((64, 64, 3), np.nan, np.float32), (64, 64), allow_flat=True)

"""A tier's render work without Serve (engines/render.py + engines/finish.py): checked renders finished where the
pixels are (post to the requested size, text composited and OCR-checked, PNG bytes), failures as reasons, OOM
splitting, and the built-in models conditioning on the ingress's embedding (MiniLM once a prompt)."""

import io

import numpy as np
import pytest
from PIL import Image

from engines.finish import Finisher
from engines.generators import ModelSpec, build_engine
from engines.post import PostSpec
from engines.render import Renderer
from graph.schemas import GenerateJob, TypographySpec

FINISHER = None


def _finisher() -> Finisher:
    global FINISHER
    if FINISHER is None:  # rapidocr loads once for the module
        FINISHER = Finisher(PostSpec(backend="classical"), TypographySpec())
    return FINISHER


def _renderer(fault: str = "none", **kw) -> tuple[Renderer, dict]:
    spec = ModelSpec(kind="fault_injecting", name=f"fault-injecting-{fault}", fault=fault, native_size=64, **kw)
    stats = {"oom_splits": 0, "failed_checks": 0}
    return Renderer(build_engine(spec), spec, _finisher(), stats), stats


def _size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_a_job_comes_back_as_pngs_at_its_requested_size():
    r, _ = _renderer()
    (res,) = r.render([GenerateJob(prompt="a red star", seed=1, n=2, width=256, height=128)], 4, 3.0)
    assert res.failure is None and [_size(p) for p in res.pngs] == [(256, 128)] * 2
    assert res.post["backend"] == "classical" and set(res.timings_ms) >= {"model", "post", "encode"}


def test_each_job_of_a_batch_gets_its_own_images_and_size():
    r, _ = _renderer()
    a, b = r.render([GenerateJob(prompt="a", seed=1, width=64, height=64),
                     GenerateJob(prompt="b", seed=2, n=2, width=128, height=128)], 4, 3.0)
    assert [_size(p) for p in a.pngs] == [(64, 64)] and [_size(p) for p in b.pngs] == [(128, 128)] * 2
    assert a.batch_size == b.batch_size == 2


def test_text_is_composited_and_read_back():
    r, _ = _renderer()
    (res,) = r.render([GenerateJob(prompt='a sign that says "OPEN"', seed=1, width=256, height=256, text="OPEN")],
                      4, 3.0)
    assert res.failure is None and res.ocr["passed"] and res.ocr["read"].upper() == "OPEN"


def test_text_that_does_not_fit_is_the_clients_failure():
    r, _ = _renderer()
    (res,) = r.render([GenerateJob(prompt="a sign", seed=1, width=64, height=64, text="word " * 40)], 4, 3.0)
    assert res.failure == "text_does_not_fit" and res.pngs == []


FAILURES = [
    pytest.param("nan", "nan", id="nan_pixels"),
    pytest.param("blank", "blank", id="blank"),
    pytest.param("garbage", "undecodable", id="garbage_bytes"),
    pytest.param("raise", "error", id="exception"),
    pytest.param("oom", "oom", id="oom"),
]


@pytest.mark.parametrize("fault,reason", FAILURES)
def test_a_failed_render_is_a_reason_not_an_image(fault, reason):
    r, _ = _renderer(fault)
    (res,) = r.render([GenerateJob(prompt="p", seed=1, width=64, height=64)], 4, 3.0)
    assert res.failure == reason and res.pngs == [] and res.detail


def test_oom_on_a_batch_splits_it_before_failing():
    r, stats = _renderer("oom", fault_oom_above_batch=1)
    (res,) = r.render([GenerateJob(prompt="p", seed=1, n=4, width=64, height=64)], 4, 3.0)
    assert res.failure is None and len(res.pngs) == 4 and stats["oom_splits"] == 3


def test_a_builtin_model_conditions_on_the_given_embedding_without_loading_minilm():
    spec = ModelSpec(kind="builtin", name="b", config="small", native_size=32, steps=2)
    engine = build_engine(spec)
    from engines.builtin import TextEncoder

    emb = TextEncoder()(["a red star on a blue background"])
    r = Renderer(engine, spec, _finisher(), {"oom_splits": 0, "failed_checks": 0})
    job = GenerateJob(prompt="a red star on a blue background", seed=3, width=32, height=32,
                      embedding=emb[0].tolist())
    (given,) = r.render([job], 2, 3.0)
    assert engine.model._encoder is None  # MiniLM never ran in the replica: the ingress's embedding served
    (computed,) = r.render([GenerateJob(prompt=job.prompt, seed=3, width=32, height=32)], 2, 3.0)
    pixels = [np.asarray(Image.open(io.BytesIO(res.pngs[0]))) for res in (given, computed)]
    assert np.abs(pixels[0].astype(int) - pixels[1].astype(int)).max() <= 1  # the same conditioning either way

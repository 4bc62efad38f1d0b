"""MiniLM on ONNX Runtime: the same embeddings as torch, a bad export never cached, torch as the fallback."""

import numpy as np
import pytest

from engines import minilm_onnx
from engines.intent import Embedder

PROMPTS = ["a flat vector icon of a red fox", "x",
           "a photorealistic portrait of an old fisherman at dawn, golden light, 85mm lens, shallow depth of field"]


@pytest.fixture(scope="module")
def torch_embedder():
    return Embedder(runtime="torch")


def test_onnx_embeddings_equal_torch_ones_in_a_padded_batch_and_alone(torch_embedder, tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE_DIR", str(tmp_path))
    onnx = Embedder(runtime="onnx")
    assert onnx.runtime == "onnx" and onnx.model is None  # the torch model is not kept beside the session
    assert list(tmp_path.glob("minilm-*.onnx")), "the checked export is cached"
    batch = onnx(PROMPTS)
    alone = np.concatenate([onnx([p]) for p in PROMPTS])
    assert np.abs(batch - torch_embedder(PROMPTS)).max() < 1e-5
    assert np.abs(alone - batch).max() < 1e-5  # padding never leaks into a prompt's embedding
    again = Embedder(runtime="onnx")  # from the cache: no second export
    assert np.abs(again(PROMPTS) - batch).max() == 0


def test_an_export_that_disagrees_with_torch_is_not_cached_and_torch_serves(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PRISM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(minilm_onnx, "MAX_ABS_DIFF", -1.0)  # injected: every export "disagrees"
    e = Embedder()
    assert e.runtime == "torch" and e.model is not None
    assert not list(tmp_path.iterdir()), "neither the rejected export nor its temp file is left"
    assert "MiniLM on torch, not ONNX Runtime" in caplog.text and "differs from torch" in caplog.text
    with pytest.raises(RuntimeError, match="differs from torch"):
        Embedder(runtime="onnx")  # asked for ONNX explicitly: the failure is not hidden


def test_an_unknown_runtime_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PRISM_MINILM_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="PRISM_MINILM_RUNTIME must be auto, onnx or torch"):
        Embedder()

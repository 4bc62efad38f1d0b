"""MiniLM on ONNX Runtime: the torch model exported once into a local cache, checked, then served from there.

Why: on the ingress's CPU, torch eager spends most of a short prompt's ~11 ms in Python per layer; ONNX Runtime runs
the same fp32 graph in ~3 ms (benchmarks/RESULTS.md). The export (~4 s, needs the `onnx` package) happens the first
time a given set of weights and library versions is seen; a file is only cached after its embeddings matched
torch's on probe prompts of different lengths (padding included), so a bad export can never reach a request.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PROBES = ["a red fox", "a photorealistic portrait of an old fisherman at dawn, golden light, 85mm lens",
          "poster that says \"GRAND OPENING\""]
MAX_ABS_DIFF = 1e-4  # fp32 vs fp32: measured ~1e-7; anything near 1e-2 would move intents


def cache_dir() -> Path:
    return Path(os.environ.get("PRISM_CACHE_DIR") or Path.home() / ".cache" / "prism")


def cache_key(path: str) -> str:
    """Weights and the libraries that export them: a change in any makes a new file."""
    import torch
    import transformers

    h = hashlib.sha256(f"{torch.__version__}|{transformers.__version__}|".encode())
    for name in ("config.json", "model.safetensors"):
        with open(Path(path) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def threads() -> int:
    # A 384-wide, 6-layer encoder on a short prompt gains little past 2 threads; more would contend with renders.
    return int(os.environ.get("PRISM_MINILM_THREADS") or min(2, os.cpu_count() or 1))


def open_session(file: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads(), 1
    # Idle ORT threads spin by default; on a shared CPU that spin is taken from the renders and the door.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])


def session(path: str, load_torch: Callable[[str], object]):
    """An ONNX Runtime session for the MiniLM at `path`: from the cache, else exported, checked and cached."""
    file = cache_dir() / f"minilm-{cache_key(path)}.onnx"
    if not file.exists():  # a model the exporter traced is not used again: tracing may leave it changed
        export(path, load_torch(path), file)
    return open_session(file)


def export(path: str, model, file: Path) -> None:
    """Export, compare with torch on the probes, then move into place (atomic: a concurrent exporter's file or
    ours, both checked)."""
    import torch
    from transformers import AutoTokenizer

    class LastHidden(torch.nn.Module):  # positional inputs for the exporter; keywords for transformers
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(PROBES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = model(**enc).last_hidden_state.numpy()
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=file.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's notes on transformers' Python branches
            warnings.simplefilter("ignore")
            torch.onnx.export(LastHidden(model), tuple(enc[k] for k in INPUTS), tmp, input_names=list(INPUTS),
                              output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                              dynamic_axes={k: {0: "batch", 1: "tokens"} for k in (*INPUTS, "last_hidden_state")})
        got = open_session(Path(tmp)).run(None, {k: enc[k].numpy().astype(np.int64) for k in INPUTS})[0]
        mask = enc["attention_mask"].numpy()[..., None] > 0
        diff = float(np.abs(np.where(mask, got - want, 0)).max())  # padded positions are never pooled
        if diff > MAX_ABS_DIFF:
            raise RuntimeError(f"exported MiniLM differs from torch by {diff:.2e} (allowed {MAX_ABS_DIFF:g})")
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


if __name__ == "__main__":  # `make install` warms the cache, so a first `serve run` does not pay the export
    from engines.generators import minilm_path
    from engines.intent import Embedder

    print(f"MiniLM runtime: {Embedder(runtime=os.environ.get('PRISM_MINILM_RUNTIME', 'auto')).runtime}, "
          f"cache {cache_dir() / f'minilm-{cache_key(minilm_path())}.onnx'}")

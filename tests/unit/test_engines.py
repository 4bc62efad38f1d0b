"""Generator engines: built-in pipelines, the diffusers loader on a local checkpoint, simulated latency."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from engines.generators import DiffusersEngine, ModelSpec, SimulatedEngine

ASSETS = Path(__file__).parent.parent / "assets"


@pytest.fixture(scope="module")
def sd_checkpoint(tmp_path_factory):
    """A Stable Diffusion pipeline from a small config with random weights, saved to disk like a real one."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, BertModel

    from engines.generators import minilm_path

    cfg = json.loads((ASSETS / "sd_tiny.json").read_text())
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]), unet=UNet2DConditionModel(**cfg["unet"]),
        text_encoder=BertModel.from_pretrained(minilm_path(), add_pooling_layer=False),
        tokenizer=AutoTokenizer.from_pretrained(minilm_path(), model_max_length=cfg["max_tokens"]),
        scheduler=DPMSolverMultistepScheduler(**cfg["scheduler"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    path = tmp_path_factory.mktemp("sd") / "checkpoint"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(sd_checkpoint):
    return DiffusersEngine(ModelSpec(kind="diffusers", name="t", model_id=str(sd_checkpoint), native_size=64, steps=2))


def test_diffusers_renders_native_size_deterministically(tiny):
    a = tiny.generate(["a red star"], [7], 2, 2.0)
    b = tiny.generate(["a red star"], [7], 2, 2.0)
    c = tiny.generate(["a red star"], [8], 2, 2.0)
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.float32  # checked and converted by the Generator
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_diffusers_kind_loads_a_local_checkpoint(sd_checkpoint):
    """The production loader (AutoPipelineForText2Image, local only) on a checkpoint saved to disk."""
    spec = ModelSpec(kind="diffusers", name="local", model_id=str(sd_checkpoint), native_size=64, steps=2,
                     scheduler="EulerDiscreteScheduler")
    engine = DiffusersEngine(spec)
    assert type(engine.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert engine.version.startswith("local-")
    assert engine.generate(["x"], [1], 2, 2.0)[0].shape == (64, 64, 3)


def test_nan_in_latents_aborts_at_that_step(tiny, monkeypatch):
    """Seed 000's incident: NaN at a denoising step stops the render there instead of returning black."""
    from engines.generators import NonFiniteLatents

    calls = []
    real_step = tiny.pipe.scheduler.step

    def nan_step(*args, **kwargs):
        calls.append(1)
        out = real_step(*args, **kwargs)
        if len(calls) == 2:
            (out[0] if isinstance(out, tuple) else out.prev_sample)[:] = float("nan")
        return out

    monkeypatch.setattr(tiny.pipe.scheduler, "step", nan_step)
    with pytest.raises(NonFiniteLatents, match="step 1"):
        tiny.generate(["x"], [1], 4, 2.0)
    assert len(calls) == 2


def test_diffusers_kind_refuses_to_download():
    spec = ModelSpec(kind="diffusers", name="hub", model_id="stabilityai/not-on-this-node")
    with pytest.raises(FileNotFoundError, match="pre-populate the cache"):
        DiffusersEngine(spec)


def test_simulated_latency_matches_profile():
    eng = SimulatedEngine(ModelSpec(kind="simulated", name="sd35", latency_ms_p50=900, latency_ms_p95=2000,
                                    native_size=64), rng_seed=0)
    draws = sorted(eng.delay_s(1) for _ in range(4000))
    assert statistics.median(draws) == pytest.approx(0.9, rel=0.05)
    assert draws[int(0.95 * len(draws))] == pytest.approx(2.0, rel=0.08)
    img = eng.generate(["a"], [1], 1, 1.0)[0]
    assert img.shape == (64, 64, 3) and img.std() > 20


SPEC_ERRORS = [
    pytest.param({"kind": "builtin", "name": "x"}, "needs `config`", id="builtin_no_config"),
    pytest.param({"kind": "builtin", "name": "x", "config": "huge"}, "not found", id="builtin_unknown"),
    pytest.param({"kind": "diffusers", "name": "x"}, "model_id", id="diffusers_no_id"),
    pytest.param({"kind": "simulated", "name": "x", "latency_ms_p50": 10, "latency_ms_p95": 5}, "p95", id="sim"),
    pytest.param({"kind": "diffusers", "name": "x", "model_id": "a", "scheduler": "Foo"}, "scheduler", id="sched"),
]


@pytest.mark.parametrize("raw,fragment", SPEC_ERRORS)
def test_model_spec_errors(raw, fragment):
    with pytest.raises(ValidationError, match=fragment):
        ModelSpec.model_validate(raw)

"""Built-in model training (training/builtin.py): a stopped run resumes where it was, to the same weights."""

import numpy as np
import pytest

from engines import shapes
from training import builtin as B

TINY = dict(channels=[8, 16], layers=1, attention=False, train_steps=6, steps=2, guidance=3.0, batch=4,
            cond="labels", coords=True, fg_weight=2.0, patch=2, cond_dims=64)


@pytest.fixture(scope="module")
def pool():
    items = [B._scene((0, i, 32)) for i in range(12)]
    return {"images": np.stack([im for _, im, _ in items]), "masks": np.stack([m for _, _, m in items]),
            "labels": B.labels(B.pool_scenes(12, 0))}


def _weights(ema):
    return {k: v.detach().clone() for k, v in ema.state_dict().items()}


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_weights(pool, tmp_path):
    import torch

    torch.set_num_threads(1)
    straight, *_ = B.train(B.TierRecipe(**TINY), pool, log_every=0, run_dir=tmp_path / "straight")

    def stop(run, cond):  # the process is killed during step 3 (after step 2's checkpoint)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        B.train(B.TierRecipe(**TINY), pool, log_every=0, run_dir=tmp_path / "stopped", probe=stop, probe_every=3,
                ckpt_every_s=0)
    resumed, *_ = B.train(B.TierRecipe(**TINY), pool, log_every=0, run_dir=tmp_path / "stopped")
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_recipe_is_refused(pool, tmp_path):
    B.train(B.TierRecipe(**TINY), pool, log_every=0, run_dir=tmp_path)
    with pytest.raises(SystemExit, match="another recipe"):
        B.train(B.TierRecipe(**{**TINY, "lr": 5e-4}), pool, log_every=0, run_dir=tmp_path)


def test_one_hot_labels_follow_the_parser_layout():
    s = shapes.Scene("solid", ("blue",), shape="star", color="red", size="small", position="top left")
    v = B.one_hot(B.labels([s]))[0]
    assert v.sum() == len(shapes.ATTRIBUTES)
    off = 0
    for g, names in shapes.ATTRIBUTES.items():
        assert names[int(np.argmax(v[off:off + len(names)]))] == shapes.ATTRIBUTES[g][shapes.attributes(s)[g]]
        off += len(names)

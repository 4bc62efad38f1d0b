"""Built-in models: adherence vs latency per model, steps and sampler, and a sample grid. One command:

    python -m benchmarks.builtin_frontier   # writes benchmarks/builtin_frontier.{png,json}, builtin_samples.png

Adherence is `engines.shapes.check` on held-out caption combinations (solid backgrounds); latency is the median
of 5 batch-1 renders of "a red star on a blue background" on this machine, every point measured in this run.
The serving tiers (serve_config.yaml) are marked: fast = small@8 steps, standard = small@16, premium = small@30.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from engines.builtin import MODELS_DIR, BuiltinModel, TextEncoder, model_names
from training.builtin import evaluate

OUT = Path(__file__).parent
TIERS = {"fast": ("small", 8, "dpm++", 3.0), "standard": ("small", 16, "dpm++", 3.0),
         "premium": ("small", 30, "dpm++", 4.0), "typography": ("small", 12, "dpm++", 3.0)}
GRID = sorted({*TIERS.values(), ("small", 4, "dpm++", 3.0), ("medium", 8, "dpm++", 3.0),
               ("medium", 30, "dpm++", 3.0), ("small", 16, "euler", 3.0), ("small", 16, "ddim", 3.0),
               ("small", 30, "euler", 3.0)})
SAMPLE_PROMPTS = ["a red star on a blue background", "a large yellow circle on a purple background",
                  "a small white triangle in the top left on a black background", "a green ring on a pink background",
                  "an icon of an orange square on teal", "a teal to purple gradient background",
                  "a blue and white striped background", "a golden retriever on a beach"]


def measure(n: int) -> list[dict]:
    enc = TextEncoder()
    models = {name: BuiltinModel(MODELS_DIR / name, encoder=enc) for name in model_names()}
    rows = []
    for name, steps, sampler, guidance in GRID:
        m = evaluate(models[name], n=n, steps=steps, guidance=guidance, sampler=sampler)
        tiers = [t for t, v in TIERS.items() if v == (name, steps, sampler, guidance)]
        rows.append({"model": name, "tier": ",".join(tiers), **m})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
    markers = {"dpm++": "o", "euler": "s", "ddim": "^"}
    colors = {"small": "tab:orange", "medium": "tab:blue"}
    for ax, key in zip(axes, ("bg", "color", "shape"), strict=True):
        for r in rows:
            ax.scatter(r["latency_ms_p50_batch1"], 100 * r[key], marker=markers[r["sampler"]], c=colors[r["model"]],
                       s=60 if r["tier"] else 30, edgecolors="k" if r["tier"] else "none")
            label = f"{r['steps']}" + (f" [{r['tier']}]" if r["tier"] else "")
            ax.annotate(label, (r["latency_ms_p50_batch1"], 100 * r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_title(f"{key} adherence (held-out captions)")
        ax.set_xscale("log")
        ax.set_xlabel("latency, batch 1, CPU (ms, log)")
        ax.set_ylabel("% correct")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=markers[s], ls="", c="grey", label=s) for s in markers] + [
        plt.Line2D([], [], marker="o", ls="", c=c, label=f"model {m}") for m, c in colors.items()]
    axes[0].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle("Prism built-in models: adherence vs latency (labels: steps [tier])")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sample_grid(path: Path, cell: int = 128) -> None:
    from PIL import Image, ImageDraw, ImageFont

    enc = TextEncoder()
    font = ImageFont.truetype("DejaVuSans.ttf", 10) if _has_font() else ImageFont.load_default()
    rows = [(t, *TIERS[t]) for t in ("fast", "premium")]
    pad = 34
    sheet = Image.new("RGB", (cell * len(SAMPLE_PROMPTS), (cell + pad) * len(rows) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (tier, name, steps, sampler, guidance) in enumerate(rows):
        m = BuiltinModel(MODELS_DIR / name, encoder=enc)
        imgs = m.generate(SAMPLE_PROMPTS, list(range(len(SAMPLE_PROMPTS))), steps, guidance, sampler)
        for i, (im, prompt) in enumerate(zip(imgs, SAMPLE_PROMPTS, strict=True)):
            tile = Image.fromarray((im * 255 + 0.5).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
            y = j * (cell + pad)
            sheet.paste(tile, (i * cell, y))
            words, lines = prompt.split(), [""]
            for w in words:
                lines[-1:] = [lines[-1] + " " + w] if len(lines[-1] + w) < 24 else [lines[-1], w]
            draw.text((i * cell + 2, y + cell + 1), "\n".join(s.strip() for s in lines[:2]), fill="black", font=font)
        draw.text((2, j * (cell + pad) + 2), f"{tier}: {name}@{steps}", fill="white", font=font)
    sheet.save(path)


def _has_font() -> bool:
    from PIL import ImageFont

    try:
        ImageFont.truetype("DejaVuSans.ttf", 10)
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="held-out scenes per point")
    args = ap.parse_args()
    rows = measure(args.n)
    (OUT / "builtin_frontier.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, OUT / "builtin_frontier.png")
    sample_grid(OUT / "builtin_samples.png")
    by = {r["tier"]: r for r in rows if r["tier"]}
    fast, premium = by.get("fast"), by.get("premium")
    print("\n| model | sampler | steps | guidance | tier | bg | colour | shape | size | position | p50 ms (batch 1) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['tier']} | " + " | ".join(
            f"{100 * r[k]:.0f}%" for k in ("bg", "color", "shape", "size", "position"))
              + f" | {r['latency_ms_p50_batch1']:.0f} |")
    if fast and premium:
        ratio = premium["latency_ms_p50_batch1"] / fast["latency_ms_p50_batch1"]
        print(f"\npremium/fast latency at batch 1: {ratio:.2f}x"
              f" (measured side by side, n={args.n} held-out scenes per point)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

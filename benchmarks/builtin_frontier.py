"""Built-in models: adherence vs latency per model, steps and sampler, and a sample grid. One command:

    python -m benchmarks.builtin_frontier   # writes benchmarks/builtin_frontier.{png,json}, builtin_samples.png

Adherence is `engines.shapes.check` on held-out caption combinations (solid backgrounds), each point scored twice:
on the training phrasings (engines/shapes.py `caption`) and on the held-out phrasings (engines/phrasings_heldout.py,
never used in training). Latency is the median of 5 batch-1 renders of "a red star on a blue background" on this
machine, every point measured in this run. The serving tiers are read from serve_config.yaml and marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from engines.builtin import MODELS_DIR, BuiltinModel, TextEncoder, model_names
from training.builtin import evaluate

OUT = Path(__file__).parent
ROOT = OUT.parent
PHRASINGS = ("training", "held-out")
KEYS = ("bg", "color", "shape", "size", "position")
SAMPLE_PROMPTS = ["a red star on a blue background", "a large yellow star on a purple background",
                  "a small white triangle in the top left on a black background", "a green ring on a pink background",
                  "teal backdrop with a small orange ring", "a large pink star centered on white",
                  "orange triangle, black background", "an icon of a blue square on yellow",
                  "a teal to purple gradient background", "a golden retriever on a beach"]


def serving_tiers(path: Path = ROOT / "serve_config.yaml") -> dict[str, tuple[str, int, str, float]]:
    """tier -> (model, steps, sampler, guidance) for the built-in tiers of the embedded default profile."""
    app = yaml.safe_load(path.read_text())["applications"][0]["args"]
    out = {}
    for tier, spec in app["tiers"].items():
        if spec.get("kind") == "builtin":
            meta = json.loads((MODELS_DIR / spec["config"] / "prism.json").read_text())
            out[tier] = (spec["config"], int(spec["steps"]), spec.get("sampler") or meta["sampler"],
                         float(spec["guidance"]))
    return out


def grid(tiers: dict) -> list[tuple[str, int, str, float]]:
    """The serving points plus neighbours: fewer and more steps, the other samplers."""
    points = set(tiers.values())
    for name, steps, sampler, guidance in list(points):
        points |= {(name, max(2, steps // 2), sampler, guidance), (name, steps, "euler", guidance)}
    return sorted(p for p in points if p[0] in model_names())


def measure(n: int, points: list, tiers: dict) -> list[dict]:
    enc = TextEncoder()
    models = {name: BuiltinModel(MODELS_DIR / name, encoder=enc) for name in {p[0] for p in points}}
    rows = []
    for name, steps, sampler, guidance in points:
        m = {ph: evaluate(models[name], n=n, steps=steps, guidance=guidance, sampler=sampler, phrasing=ph,
                          latency=ph == "training") for ph in PHRASINGS}
        tier = ",".join(t for t, v in tiers.items() if v == (name, steps, sampler, guidance))
        rows.append({"model": name, "steps": steps, "sampler": sampler, "guidance": guidance, "tier": tier, "n": n,
                     "latency_ms_p50_batch1": m["training"]["latency_ms_p50_batch1"],
                     **{ph: {k: m[ph][k] for k in KEYS} for ph in PHRASINGS}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6), sharex=True)
    markers = {"dpm++": "o", "euler": "s", "ddim": "^"}
    palette = ["tab:orange", "tab:blue", "tab:green", "tab:red"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(sorted({r["model"] for r in rows}))}
    for ax, key in zip(axes, ("shape", "color", "position", "bg"), strict=True):
        for r in rows:
            x = r["latency_ms_p50_batch1"]
            for ph, fill in (("training", colors[r["model"]]), ("held-out", "none")):
                ax.scatter(x, 100 * r[ph][key], marker=markers[r["sampler"]], facecolors=fill,
                           edgecolors=colors[r["model"]] if fill == "none" else ("k" if r["tier"] else "none"),
                           s=60 if r["tier"] else 30)
            label = f"{r['steps']}" + (f" [{r['tier']}]" if r["tier"] else "")
            ax.annotate(label, (x, 100 * r["training"][key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{key} (held-out combinations)")
        ax.set_xscale("log")
        ax.set_xlabel("latency, batch 1, CPU (ms, log)")
        ax.set_ylabel("% correct")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=markers[s], ls="", c="grey", label=s) for s in markers] + [
        plt.Line2D([], [], marker="o", ls="", c=c, label=f"model {m}") for m, c in colors.items()] + [
        plt.Line2D([], [], marker="o", ls="", mfc="none", mec="grey", label="held-out phrasings")]
    axes[0].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle("Prism built-in models: adherence vs latency (filled: training phrasings, hollow: held-out "
                 "phrasings; labels: steps [tier])")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def sample_grid(path: Path, tiers: dict, cell: int = 112) -> None:
    from PIL import Image, ImageDraw, ImageFont

    enc = TextEncoder()
    font = ImageFont.truetype("DejaVuSans.ttf", 10) if _has_font() else ImageFont.load_default()
    rows = [(t, *tiers[t]) for t in ("fast", "premium") if t in tiers]
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
                lines[-1:] = [lines[-1] + " " + w] if len(lines[-1] + w) < 21 else [lines[-1], w]
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


def table(rows: list[dict]) -> str:
    head = ("| model | sampler | steps | guidance | tier | phrasings | bg | colour | shape | size | position "
            "| p50 ms (batch 1) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        for ph in PHRASINGS:
            cells = " | ".join(f"{100 * r[ph][k]:.1f}%" for k in KEYS)
            lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['tier']} | {ph} | "
                         f"{cells} | {r['latency_ms_p50_batch1']:.0f} |")
    return head + "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="held-out scenes per point and phrasing set")
    ap.add_argument("--tiers-only", action="store_true", help="measure only the serving points")
    args = ap.parse_args()
    tiers = serving_tiers()
    points = sorted(set(tiers.values())) if args.tiers_only else grid(tiers)
    rows = measure(args.n, points, tiers)
    (OUT / "builtin_frontier.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, OUT / "builtin_frontier.png")
    sample_grid(OUT / "builtin_samples.png", tiers)
    print("\n" + table(rows))
    by = {t: r for r in rows for t in r["tier"].split(",") if t}
    if "fast" in by and "premium" in by:
        ratio = by["premium"]["latency_ms_p50_batch1"] / by["fast"]["latency_ms_p50_batch1"]
        print(f"\npremium/fast latency at batch 1: {ratio:.2f}x (measured side by side, n={args.n} per point)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

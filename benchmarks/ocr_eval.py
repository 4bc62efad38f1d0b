"""OCR backends and the typography loop on a seeded set of composed images.

    .venv/bin/python benchmarks/ocr_eval.py [--n 240] [--backends rapidocr easyocr] [--seed 0]

Set: short phrases x fonts x placements x backgrounds (noise like an untrained model's, gradient, solid) x
256/512 px, each rendered by `compose(bg, phrase, choose_layout(prompt))` with a prompt whose words pick the
font and placement. Per backend: exact-match rate (cer == 0), mean CER and median read latency on that set,
then the typography loop the server runs: on a miss, re-compose with `choose_layout(prompt, safe=True)` and
read again.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import dataclass

import cv2
import numpy as np

from engines.ocr import OcrBackend, build_ocr, cer
from engines.typography import choose_layout, compose

PHRASES = [
    "GRAND OPENING", "Summer Sale 50% Off", "Fresh Bread", "Hello World", "Open 24 Hours",
    "Buy 1 Get 1 Free!", "Rock & Roll", "Joe's Diner", "Est. 1984", "Live Music Tonight",
    "Coffee & Donuts", "CLOSED", "Save 30% Today", "New Arrivals", "Best Seller",
    "Happy Birthday, Anna!", "Now Hiring", "Free Wi-Fi", "Limited Edition", "Sold Out",
    "Pizza Night", "Welcome Home", "Spring Collection 2026", "Fast & Furious", "Game Over",
    "Level Up!", "Dream Big", "Stay Hydrated", "Farm to Table", "Mom's Kitchen",
    "Black Friday Deals", "Only $9.99", "Grand Prize: $500", "No Parking", "Exit Only",
    "Tickets On Sale", "Vote Tuesday", "Think Different", "Ice Cold Beer", "Book Club",
    "Yoga Studio", "Hot Dogs 2 for $5", "Season 3 Finale", "Coming Soon", "Under Construction",
    "Open Mic Night", "Fresh Fish Daily", "Tea Time", "100% Organic", "Pet-Friendly Hotel",
    "Start Here", "Thank You!", "Ready, Set, Go!", "Midnight Run", "The Last Summer",
    "Bike Repair - Walk-Ins Welcome", "Call 555-0199", "Kids Eat Free", "Sunset Boulevard", "DO NOT DISTURB",
]
# font word, placement word: the prompt's words pick the layout (engines.typography.choose_layout).
FONT_WORDS = {"sans": "", "serif": "vintage ", "mono": "terminal-style "}
PLACEMENT_WORDS = {"title": "poster", "center": "storefront sign", "badge": "sticker", "bottom": "caption"}
BACKGROUNDS = ("noise", "gradient", "solid")
SIZES = (256, 512)


@dataclass(frozen=True)
class Case:
    phrase: str
    prompt: str
    background: str
    size: int
    seed: int


def background(kind: str, size: int, seed: int) -> np.ndarray:
    """Seeded HxWx3 uint8 background: smoothed noise (untrained diffusion output), gradient or solid colour."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (0, 0), 1.0)
    if kind == "gradient":
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0.0, 1.0, size)[:, None, None]
        grad = c0 * (1 - t) + c1 * t
        return np.ascontiguousarray(np.broadcast_to(grad if rng.random() < 0.5 else grad.transpose(1, 0, 2),
                                                    (size, size, 3))).astype(np.uint8)
    return np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)


def make_cases(n: int, seed: int) -> list[Case]:
    """n cases: phrases in turn, each paired with the next of the shuffled font x placement x bg x size grid."""
    grid = list(itertools.product(FONT_WORDS.values(), PLACEMENT_WORDS.values(), BACKGROUNDS, SIZES))
    np.random.default_rng(seed).shuffle(grid)
    cases = []
    for i in range(n):
        font_word, placement_word, bg, size = grid[i % len(grid)]
        phrase = PHRASES[i % len(PHRASES)]
        cases.append(Case(phrase, f'a {font_word}{placement_word} that says "{phrase}"', bg, size, seed * 10_000 + i))
    return cases


def render(case: Case, safe: bool = False) -> np.ndarray:
    """The composed image for a case (first layout, or the safe retry layout)."""
    return compose(background(case.background, case.size, case.seed), case.phrase, choose_layout(case.prompt, safe))


def evaluate(backend: OcrBackend, cases: list[Case], images: list[np.ndarray]) -> None:
    """Print first-pass figures and the typography loop's exact-match rate for one backend."""
    backend.read(images[0])  # warm-up
    cers, lat, misses = [], [], []
    for case, img in zip(cases, images, strict=True):
        t = time.perf_counter()
        read = backend.read(img)
        lat.append((time.perf_counter() - t) * 1000)
        cers.append(cer(case.phrase, read))
        if cers[-1] > 0:
            misses.append((case, read))
    n = len(cases)
    exact = sum(c == 0 for c in cers)
    print(f"{backend.name}: n={n} exact_match={exact / n:.3f} mean_cer={statistics.fmean(cers):.4f} "
          f"median_latency_ms={statistics.median(lat):.0f}")
    for kind in BACKGROUNDS:
        sub = [c for case, c in zip(cases, cers, strict=True) if case.background == kind]
        print(f"{backend.name}:   {kind:8s} n={len(sub)} exact_match={sum(c == 0 for c in sub) / len(sub):.3f}")
    for size in SIZES:
        sub = [ms for case, ms in zip(cases, lat, strict=True) if case.size == size]
        print(f"{backend.name}:   {size}px median_latency_ms={statistics.median(sub):.0f}")
    fixed = 0
    for case, read in misses:
        retry = backend.read(render(case, safe=True))
        ok = cer(case.phrase, retry) == 0
        fixed += ok
        print(f"{backend.name}:   miss {case.phrase!r} [{case.prompt.split(' that')[0]}, {case.background}, "
              f"{case.size}px] read {read!r}; safe retry read {retry!r} -> {'exact' if ok else 'MISS'}")
    print(f"{backend.name}: typography loop exact_match={(exact + fixed) / n:.3f} "
          f"(first pass {exact}/{n}, retries {len(misses)}, fixed by retry {fixed})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", nargs="+", default=["rapidocr", "easyocr"], choices=["rapidocr", "easyocr"])
    args = ap.parse_args()
    cases = make_cases(args.n, args.seed)
    t = time.perf_counter()
    images = [render(c) for c in cases]
    per_image = (time.perf_counter() - t) * 1000 / len(cases)
    print(f"set: n={len(cases)} images, {len(PHRASES)} phrases x {len(FONT_WORDS)} fonts x "
          f"{len(PLACEMENT_WORDS)} placements x {len(BACKGROUNDS)} backgrounds x {len(SIZES)} sizes "
          f"(cycled, seed {args.seed}); compose mean {per_image:.1f} ms/image")
    for name in args.backends:
        t = time.perf_counter()
        backend = build_ocr(name)
        print(f"{name}: load {time.perf_counter() - t:.1f} s")
        evaluate(backend, cases, images)


if __name__ == "__main__":
    main()

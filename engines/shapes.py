"""The built-in models' world: a procedural captioned dataset of shapes on backgrounds, and its checker.

No diffusion weights can be downloaded on a fresh machine, so Prism trains its own small models on a domain
it can draw and grade itself (README, "Built-in models"). This module is that domain, in numpy only:

- `sample_scene(rng)` draws a scene (background kind and colours, shape, colour, size, position) and
  `caption(scene, rng)` phrases it several ways; `render(scene)` draws it anti-aliased at any size.
- `check(image, scene)` grades an image against the scene it was asked for: background colour(s), shape
  colour, shape identity, size and position. It is independent of the models (geometry and colour
  distances, no learned part), and scores 100% on `render` output (tested).
- `held_out(scene)` marks (shape, colour, background) combinations never shown in training, so adherence
  is measured on caption combinations the model has not seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 145, 30),
    "yellow": (245, 225, 50),
    "green": (40, 170, 60),
    "teal": (20, 150, 150),
    "blue": (40, 80, 225),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = {"small": 0.17, "medium": 0.24, "large": 0.32}  # outer radius as a fraction of the side
POSITIONS = {"center": (0.5, 0.5), "top left": (0.28, 0.28), "top right": (0.72, 0.28),
             "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72)}
BACKGROUNDS = ("solid", "gradient", "stripes")
GRADIENT_DIRECTIONS = ("horizontal", "vertical")
STRIPE_PERIOD = 0.25  # one light+dark pair per quarter of the side

_NAMES = list(COLORS)
_RGB = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Scene:
    background: str  # solid | gradient | stripes
    bg_colors: tuple[str, ...]  # one for solid, two (start, end / first, second) otherwise
    direction: str = "horizontal"  # gradient: horizontal = left to right; stripes: orientation of the bands
    shape: str | None = None  # None: a background-only scene
    color: str | None = None
    size: str = "medium"
    position: str = "center"

    def center(self) -> tuple[float, float]:
        """Shape centre in [0, 1] coordinates (x, y), moved inward so the shape stays inside the frame."""
        r = SIZES[self.size]
        x, y = POSITIONS[self.position]
        lo, hi = r + 0.04, 1 - r - 0.04
        return float(np.clip(x, lo, hi)), float(np.clip(y, lo, hi))


# ---------------------------------------------------------------- sampling and captions

def sample_scene(rng: np.random.Generator, p_background_only: float = 0.1) -> Scene:
    kind = str(rng.choice(BACKGROUNDS, p=[0.6, 0.25, 0.15]))
    n_bg = 1 if kind == "solid" else 2
    names = [str(c) for c in rng.choice(_NAMES, size=n_bg + 1, replace=False)]
    bg, fg = tuple(names[:n_bg]), names[n_bg]
    direction = str(rng.choice(GRADIENT_DIRECTIONS))
    if rng.random() < p_background_only:
        return Scene(kind, bg, direction)
    size = str(rng.choice(list(SIZES), p=[0.25, 0.5, 0.25]))
    position = str(rng.choice(list(POSITIONS), p=[0.6, 0.1, 0.1, 0.1, 0.1]))
    return Scene(kind, bg, direction, str(rng.choice(SHAPES)), fg, size, position)


def _bg_phrase(s: Scene, rng: np.random.Generator) -> str:
    if s.background == "solid":
        return s.bg_colors[0]
    a, b = s.bg_colors
    if s.background == "gradient":
        d = {"horizontal": "left-to-right", "vertical": "top-to-bottom"}[s.direction]
        return str(rng.choice([f"{a} to {b} gradient", f"{a} to {b} {d} gradient"]))
    return str(rng.choice([f"{a} and {b} striped", f"{s.direction} {a} and {b} striped"]))


_SHAPE_TEMPLATES = (
    "a {size}{color} {shape}{pos} on a {bg} background",
    "{bg} backdrop with a {size}{color} {shape}{pos}",
    "{size}{color} {shape}{pos}, {bg} background",
    "an icon of a {size}{color} {shape}{pos} on {bg}",
    "a {bg} background with a {size}{color} {shape}{pos}",
)
_BG_TEMPLATES = ("a {bg} background", "{bg} wallpaper", "a plain {bg} backdrop", "{bg} background")


def caption(s: Scene, rng: np.random.Generator | None = None) -> str:
    """One phrasing of the scene (the first template when rng is None)."""
    pick = (lambda t: t[0]) if rng is None else (lambda t: str(rng.choice(t)))
    rng = rng or np.random.default_rng(0)
    bg = _bg_phrase(s, rng)
    if s.shape is None:
        return pick(_BG_TEMPLATES).format(bg=bg)
    size = "" if s.size == "medium" else f"{s.size} "
    pos = "" if s.position == "center" else f" in the {s.position}"
    return pick(_SHAPE_TEMPLATES).format(size=size, color=s.color, shape=s.shape, pos=pos, bg=bg)


# More ways to say the same scene, for fitting the caption parser (never the adherence sets' phrasings: those are
# the templates above, and engines/phrasings_heldout.py, written apart and kept out of training).
_VARIED_SIZES = {"small": ("small ", "little "), "medium": ("", "", "medium "), "large": ("large ", "huge ")}
_VARIED_POS = {"center": ("", "", " in the center", " in the centre", " at the center")} | {
    p: (f" in the {p}", f" in the {p} corner", f" {p}", f" at the {p}") for p in POSITIONS if p != "center"}
_VARIED_SOLID = ("{c} background", "{c} backdrop", "{c} wallpaper", "plain {c} background", "solid {c} background")
_VARIED_TEMPLATES = (
    "a {size}{color} {shape}{pos} on a {bg}",
    "{size}{color} {shape}{pos} on {bg}",
    "{bg}, {size}{color} {shape}{pos}",
    "a {bg} with a {size}{color} {shape}{pos}",
    "an image of a {size}{color} {shape}{pos}, {bg}",
    "a {size}{color} {shape} logo{pos} on a {bg}",
    "{shape}: {size}{color}{pos}, {bg}",
    "a {size}{shape} painted {color}{pos} on a {bg}",
    "one {size}{color} {shape}{pos} and a {bg}",
    "{size}{color} {shape}{pos} with a {bg}",
)


def _varied_bg(s: Scene, rng: np.random.Generator) -> str:
    if s.background == "solid":
        return str(rng.choice(_VARIED_SOLID)).format(c=s.bg_colors[0])
    a, b = s.bg_colors
    if s.background == "gradient":
        d = {"horizontal": "left-to-right", "vertical": "top-to-bottom"}[s.direction]
        return str(rng.choice([f"{a} to {b} gradient", f"{d} {a} to {b} gradient", f"{a}-to-{b} gradient background"]))
    return str(rng.choice([f"{a} and {b} striped background", f"{s.direction} {a} and {b} stripes",
                           f"{a} and {b} stripes"]))


def varied_caption(s: Scene, rng: np.random.Generator) -> str:
    """A phrasing from a wider grammar than `caption` (synonyms, word orders): the caption parser's training text."""
    if rng.random() < 0.3:
        return caption(s, rng)
    bg = _varied_bg(s, rng)
    if s.shape is None:
        return str(rng.choice(["{bg}", "a {bg}", "just a {bg}", "an empty {bg}"])).format(bg=bg)
    text = str(rng.choice(_VARIED_TEMPLATES)).format(
        size=str(rng.choice(_VARIED_SIZES[s.size])), color=s.color, shape=s.shape,
        pos=str(rng.choice(_VARIED_POS[s.position])), bg=bg)
    return " ".join(text.split()).replace(" ,", ",")


def held_out(s: Scene) -> bool:
    """About 12% of (shape, colour, first background colour) triples never appear in training."""
    if s.shape is None:
        return False
    key = f"{s.shape}|{s.color}|{s.bg_colors[0]}".encode()
    return hashlib.sha256(key).digest()[0] < 31


def sample_training_scene(rng: np.random.Generator) -> Scene:
    while True:
        s = sample_scene(rng)
        if not held_out(s):
            return s


def sample_eval_scenes(n: int, seed: int = 1234, background: str = "solid") -> list[Scene]:
    """Held-out scenes, on one background kind (solid by default: the adherence goals' set)."""
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < n:
        s = sample_scene(rng, p_background_only=0.0)
        if held_out(s) and s.background == background:
            out.append(s)
    return out


# ---------------------------------------------------------------- rendering

def _grid(size: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size * ss, dtype=np.float32) + 0.5) / (size * ss)
    return np.meshgrid(c, c)  # x, y


def _polygon(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon for every grid point."""
    inside = np.zeros(x.shape, dtype=bool)
    for i in range(len(vx)):
        x0, y0, x1, y1 = vx[i - 1], vy[i - 1], vx[i], vy[i]
        crosses = (y0 > y) != (y1 > y)
        xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (x < xi)
    return inside


def shape_mask(shape: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "triangle":
        a = np.deg2rad([-90.0, 30.0, 150.0])
        return _polygon(x, y, cx + r * np.cos(a), cy + 0.15 * r + r * np.sin(a))
    if shape == "star":
        a = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return _polygon(x, y, cx + rad * np.cos(a), cy + rad * np.sin(a))
    raise ValueError(f"unknown shape {shape!r}")


def _background(s: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c = [np.array(COLORS[n], dtype=np.float32) for n in s.bg_colors]
    if s.background == "solid":
        return np.broadcast_to(c[0], x.shape + (3,)).copy()
    t = x if s.direction == "horizontal" else y
    if s.background == "gradient":
        return c[0] * (1 - t[..., None]) + c[1] * t[..., None]
    band = np.floor(t / (STRIPE_PERIOD / 2)).astype(int) % 2
    return np.where(band[..., None] == 0, c[0], c[1])


def render(s: Scene, size: int = 32, ss: int = 4, jitter: np.random.Generator | None = None) -> np.ndarray:
    """HxWx3 uint8, anti-aliased by `ss`x supersampling. `jitter` moves/scales/tints slightly (training)."""
    x, y = _grid(size, ss)
    img = _background(s, x, y)
    if s.shape is not None:
        cx, cy = s.center()
        r = SIZES[s.size]
        color = np.array(COLORS[s.color], dtype=np.float32)
        if jitter is not None:
            cx, cy = cx + jitter.uniform(-0.03, 0.03), cy + jitter.uniform(-0.03, 0.03)
            r *= jitter.uniform(0.92, 1.08)
            color = np.clip(color + jitter.normal(0, 6, 3), 0, 255)
        m = shape_mask(s.shape, cx, cy, r, x, y)
        img = np.where(m[..., None], color, img)
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- checking

def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)))]


def _strip_colors(img: np.ndarray, s: Scene, w: int) -> tuple[str, str]:
    """Median colour of the first and last `w` columns (horizontal) or rows (vertical)."""
    a = img if s.direction == "vertical" else img.transpose(1, 0, 2)
    return nearest_color(np.median(a[:w].reshape(-1, 3), 0)), nearest_color(np.median(a[-w:].reshape(-1, 3), 0))


def _bg_model(img: np.ndarray, s: Scene) -> tuple[np.ndarray, tuple[str, ...]]:
    """What the background should look like at each pixel, from the image itself, and the colours read."""
    n = img.shape[0]
    f = img.astype(np.float32)
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    if s.background == "solid":
        c = np.median(border, 0)
        return np.broadcast_to(c, f.shape), (nearest_color(c),)
    x, y = _grid(n, 1)
    t = x if s.direction == "horizontal" else y
    if s.background == "gradient":
        a = f if s.direction == "vertical" else f.transpose(1, 0, 2)
        c0, c1 = np.median(a[:1].reshape(-1, 3), 0), np.median(a[-1:].reshape(-1, 3), 0)
        model = c0 * (1 - t[..., None]) + c1 * t[..., None]
        return model, _strip_colors(img, s, 1)
    # stripes: the two commonest palette colours on the border, each pixel nearest to its band's colour
    labels = [nearest_color(p) for p in border]
    top = sorted(set(labels), key=labels.count, reverse=True)[:2]
    band = np.floor(t / (STRIPE_PERIOD / 2)).astype(int) % 2
    first = nearest_color(np.median(f[band == 0], 0))
    second = top[1] if len(top) > 1 and top[0] == first else top[0]
    c = [np.array(COLORS[first], np.float32), np.array(COLORS[second], np.float32)]
    return np.where(band[..., None] == 0, c[0], c[1]), (first, second)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


_UNIT_AREA: dict[str, float] = {}


def _unit_area(shape: str) -> float:
    """Area of the shape at radius 1 (numerically, once)."""
    if shape not in _UNIT_AREA:
        x, y = _grid(400, 1)
        _UNIT_AREA[shape] = float(shape_mask(shape, 0.5, 0.5, 0.4, x, y).mean() / 0.16)
    return _UNIT_AREA[shape]


def classify_shape(mask: np.ndarray) -> tuple[str, float, tuple[float, float]]:
    """Best-matching shape by IoU with an area-matched template at the mask's centroid; (shape, r, centre)."""
    n = mask.shape[0]
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / n, (ys.mean() + 0.5) / n
    area = mask.mean()
    x, y = _grid(n, 4)
    best = ("circle", -1.0, 0.0)
    for shape in SHAPES:
        r0 = float(np.sqrt(area / _unit_area(shape)))
        # the triangle's centroid sits below its circumcentre by design (0.15 r shift)
        for k in (0.9, 1.0, 1.1):
            r = r0 * k
            t = shape_mask(shape, cx, cy - (0.15 * r if shape == "triangle" else 0.0), r, x, y)
            t = t.reshape(n, 4, n, 4).mean(axis=(1, 3)) >= 0.5
            iou = (t & mask).sum() / max((t | mask).sum(), 1)
            if iou > best[1]:
                best = (shape, float(iou), r)
    return best[0], best[2], (float(cx), float(cy))


def check(img: np.ndarray, s: Scene, fg_threshold: float = 70.0) -> dict:
    """Grade an image (HxWx3 uint8, any square size) against its scene. Keys ending in `_ok` are booleans."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(np.asarray(img, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    model, bg_read = _bg_model(img, s)
    out: dict = {"bg_read": bg_read, "bg_ok": tuple(bg_read) == tuple(s.bg_colors)}
    if s.shape is None:
        return out
    dist = np.sqrt(((img.astype(np.float32) - model) ** 2).sum(-1))
    mask = _largest_component(dist > fg_threshold)
    if mask.sum() < 4:
        return out | {"color_read": None, "shape_read": None, "color_ok": False, "shape_ok": False,
                      "size_ok": False, "position_ok": False}
    from scipy import ndimage

    core = ndimage.binary_erosion(mask) if ndimage.binary_erosion(mask).sum() >= 3 else mask
    color = nearest_color(np.median(img[core].astype(np.float32), 0))
    shape, r, (cx, cy) = classify_shape(mask)
    size = min(SIZES, key=lambda k: abs(SIZES[k] - r))
    ex, ey = s.center()
    return out | {
        "color_read": color, "shape_read": shape, "size_read": size, "center_read": (round(cx, 3), round(cy, 3)),
        "color_ok": color == s.color, "shape_ok": shape == s.shape, "size_ok": size == s.size,
        "position_ok": abs(cx - ex) < 0.1 and abs(cy - ey) < 0.1,
    }


def score(results: list[dict]) -> dict[str, float]:
    """Share of `_ok` keys that are true, per key, over a list of `check` results."""
    keys = sorted({k for r in results for k in r if k.endswith("_ok")})
    return {k[:-3]: float(np.mean([bool(r.get(k)) for r in results if k in r])) for k in keys}


# ---------------------------------------------------------------- attributes (the caption parser's targets)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background": BACKGROUNDS,
    "bg1": tuple(COLORS),
    "bg2": (*COLORS, "none"),
    "direction": GRADIENT_DIRECTIONS,
    "shape": (*SHAPES, "none"),
    "color": (*COLORS, "none"),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}


def attributes(s: Scene) -> dict[str, int]:
    """The scene as one label index per attribute group (`none` where a scene has no such part)."""
    lab = {"background": s.background, "bg1": s.bg_colors[0],
           "bg2": s.bg_colors[1] if len(s.bg_colors) > 1 else "none", "direction": s.direction,
           "shape": s.shape or "none", "color": s.color or "none", "size": s.size, "position": s.position}
    return {k: ATTRIBUTES[k].index(v) for k, v in lab.items()}

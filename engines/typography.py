"""Exact text composited onto a render by a small layout engine (Pillow + DejaVu fonts).

Diffusion models misspell; the typography tier therefore draws the requested text itself, exactly, over the
generated background. `choose_layout` picks placement and font from the prompt's words; `compose` fits the
text to the layout's box (largest size, greedy word wrap, centred lines) and keeps it legible on any
background: text colour from the luminance under the box, a semi-opaque plate when the background is busy,
an outline when asked. `choose_layout(prompt, safe=True)` is the retry layout after an OCR miss.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_PACKAGE = "fonts-dejavu-core"
FONTS: dict[str, str] = {
    name: str(FONT_DIR / f"{name}.ttf")
    for name in ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSansMono-Bold")
}

Placement = Literal["title", "center", "badge", "bottom"]
Plate = Literal["auto", "always", "never"]
Rect = tuple[int, int, int, int]

MIN_SIZE = 12  # px: smallest font drawn; below it OCR (and people) stop reading reliably
MAX_LINES = 4  # preferred line limit: shrink the font before wrapping further
FEWER_LINES = 0.8  # keep fewer lines while their font is at least this fraction of the largest that fits
LINE_GAP = 0.15  # of the font size, between lines
MARGIN = 0.05  # of the image side, between a title/bottom box and the image edge
BUSY_EDGE = 6.0  # mean |luminance gradient| per pixel above which a background counts as busy
BUSY_SPREAD = 110.0  # p95 - p5 luminance above which no single text colour contrasts everywhere
PLATE_PAD_X, PLATE_PAD_Y = 0.4, 0.25  # of the font size, between the text block and the plate's edge
PLATE_ALPHA = 220  # of 255: the background shows through a little, the text stays on an even ground
DARK_TEXT, LIGHT_TEXT = (20, 20, 20), (255, 255, 255)
# No ligatures: "ff" drawn as one glyph reads back as "0ff" to OCR. Needs libraqm (Pillow's wheels bundle it).
FONT_FEATURES = ["-liga", "-clig"] if features.check("raqm") else None


class TextDoesNotFit(ValueError):
    """The text cannot be drawn whole in the layout's box at MIN_SIZE or more."""


class FontMissing(FileNotFoundError):
    """A DejaVu font file is not installed."""


@dataclass(frozen=True)
class LayoutSpec:
    placement: Placement
    font: str
    box_w: float  # fraction of the image width the text block may occupy
    box_h: float  # fraction of the image height
    plate: Plate = "auto"
    outline: bool = False

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENT_BOX:
            raise ValueError(f"`placement` must be one of {sorted(PLACEMENT_BOX)}, got {self.placement!r}")
        if self.font not in FONTS:
            raise ValueError(f"`font` must be one of {sorted(FONTS)}, got {self.font!r}")
        if not (0 < self.box_w <= 1 and 0 < self.box_h <= 1):
            raise ValueError(f"`box_w` and `box_h` must be in (0, 1], got {self.box_w} and {self.box_h}")
        if self.plate not in ("auto", "always", "never"):
            raise ValueError(f"`plate` must be 'auto', 'always' or 'never', got {self.plate!r}")


# placement -> (box_w, box_h) as fractions of the image; "title" stays inside the top third.
PLACEMENT_BOX: dict[str, tuple[float, float]] = {
    "title": (0.9, 0.28),
    "center": (0.86, 0.4),
    "badge": (0.62, 0.34),
    "bottom": (0.9, 0.24),
}
SAFE_LAYOUT = LayoutSpec("center", "DejaVuSans-Bold", 0.92, 0.6, plate="always", outline=True)

_PLACEMENT_WORDS: dict[str, tuple[str, ...]] = {
    "title": ("poster", "flyer", "cover", "title", "headline", "book", "movie"),
    "center": ("banner", "header", "sign", "billboard", "storefront"),
    "badge": ("badge", "sticker", "logo", "icon", "button", "stamp"),
    "bottom": ("label", "caption", "subtitle", "footer", "thumbnail"),
}
_FONT_WORDS: dict[str, tuple[str, ...]] = {
    "DejaVuSerif-Bold": ("serif", "elegant", "vintage", "classic"),
    "DejaVuSansMono-Bold": ("mono", "monospace", "monospaced", "code", "terminal", "pixel"),
}
# Text the image should carry is quoted; its words must not steer the layout ("a sign that says 'Logo'").
_QUOTED = re.compile(r"\"[^\"]*\"|\u201c[^\u201d]*\u201d")
_SANS_SERIF = re.compile(r"\bsans[- ]?serif\b")


def _first_keyword(prompt: str, table: dict[str, tuple[str, ...]]) -> str | None:
    """Key of `table` whose word occurs earliest in the prompt (plurals count), or None."""
    best: tuple[int, str] | None = None
    for key, words in table.items():
        m = re.search(r"\b(?:" + "|".join(words) + r")s?\b", prompt)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), key)
    return best[1] if best else None


def choose_layout(prompt: str, safe: bool = False) -> LayoutSpec:
    """Layout from the prompt's words; `safe` is the retry layout after an OCR miss."""
    if safe:
        return SAFE_LAYOUT
    words = _QUOTED.sub(" ", prompt.casefold())
    placement = _first_keyword(words, _PLACEMENT_WORDS) or "center"
    font = _first_keyword(_SANS_SERIF.sub(" ", words), _FONT_WORDS) or "DejaVuSans-Bold"
    box_w, box_h = PLACEMENT_BOX[placement]
    return LayoutSpec(placement, font, box_w, box_h, plate="always" if placement == "badge" else "auto")


def font_path(name: str) -> str:
    """Path of a FONTS entry; FontMissing names the Debian package when the file is absent."""
    if name not in FONTS:
        raise ValueError(f"unknown font {name!r}; known: {sorted(FONTS)}")
    path = FONTS[name]
    if not Path(path).is_file():
        raise FontMissing(f"font {name} not found at {path}: install the Debian package {FONT_PACKAGE}")
    return path


@lru_cache(maxsize=512)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """Loaded font at a pixel size (cached: the size search asks for the same ones again)."""
    return ImageFont.truetype(font_path(name), size)


def box_rect(layout: LayoutSpec, w: int, h: int) -> Rect:
    """Pixel box (x0, y0, x1, y1) the text block may occupy: title at the top, bottom at the foot, else centred."""
    bw, bh = round(layout.box_w * w), round(layout.box_h * h)
    x0 = (w - bw) // 2
    if layout.placement == "title":
        y0 = round(MARGIN * h)
    elif layout.placement == "bottom":
        y0 = h - round(MARGIN * h) - bh
    else:
        y0 = (h - bh) // 2
    return x0, y0, x0 + bw, y0 + bh


def _break_word(word: str, fits: Callable[[str], bool]) -> list[str] | None:
    """Split one over-wide word into the fewest pieces that each fit, greedily; None if a character doesn't."""
    pieces, cur = [], ""
    for ch in word:
        if fits(cur + ch):
            cur += ch
        elif cur and fits(ch):
            pieces.append(cur)
            cur = ch
        else:
            return None
    return pieces + [cur]


def wrap(text: str, fits: Callable[[str], bool], break_words: bool) -> list[str] | None:
    """Greedy word wrap of each paragraph; an over-wide word is split only if `break_words`, else None."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        cur = ""
        for word in paragraph.split():
            if fits(f"{cur} {word}" if cur else word):
                cur = f"{cur} {word}" if cur else word
                continue
            if cur:
                lines.append(cur)
            pieces = [word] if fits(word) else (_break_word(word, fits) if break_words else None)
            if pieces is None:
                return None
            lines += pieces[:-1]
            cur = pieces[-1]
        if cur:
            lines.append(cur)
    return lines


@dataclass(frozen=True)
class Fit:
    size: int
    stroke: int
    lines: list[str]
    line_h: int
    gap: int

    @property
    def height(self) -> int:
        return len(self.lines) * self.line_h + (len(self.lines) - 1) * self.gap


def _try_size(text: str, font: str, size: int, box: tuple[int, int], style: tuple[bool, bool],
              mode: tuple[bool, int | None]) -> Fit | None:
    """The wrapped block at one size if it fits the box (less the plate's padding), else None."""
    outline, plate = style
    f = _font(font, size)
    stroke = max(1, round(size * 0.06)) if outline else 0
    width = box[0] - (2 * round(PLATE_PAD_X * size) if plate else 0)
    height = box[1] - (2 * round(PLATE_PAD_Y * size) if plate else 0)
    lines = wrap(text, lambda s: f.getlength(s, features=FONT_FEATURES) + 2 * stroke <= width, break_words=mode[0])
    if not lines or (mode[1] is not None and len(lines) > mode[1]):
        return None
    ascent, descent = f.getmetrics()
    fit = Fit(size, stroke, lines, ascent + descent + 2 * stroke, round(LINE_GAP * size))
    return fit if fit.height <= height else None


def _largest(text: str, font: str, box: tuple[int, int], style: tuple[bool, bool],
             mode: tuple[bool, int | None]) -> Fit | None:
    """Largest size in [MIN_SIZE, box height] that fits: fitting is monotone in size, so binary search."""
    lo, hi, best = MIN_SIZE, max(MIN_SIZE, box[1]), None
    while lo <= hi:
        mid = (lo + hi) // 2
        fit = _try_size(text, font, mid, box, style, mode)
        if fit is not None:
            best, lo = fit, mid + 1
        else:
            hi = mid - 1
    return best


def fit_text(text: str, font: str, box: tuple[int, int], outline: bool, plate: bool) -> Fit | None:
    """Largest size that fits, preferring fewer lines, then more than MAX_LINES, then broken words."""
    style = (outline, plate)
    fits = [f for k in range(1, MAX_LINES + 1) if (f := _largest(text, font, box, style, (False, k)))]
    if fits:
        # One more line must buy more than 1/FEWER_LINES in size: short phrases stay on one line.
        top = max(f.size for f in fits)
        return next(f for f in fits if f.size >= FEWER_LINES * top)
    for mode in ((False, None), (True, None)):
        if (fit := _largest(text, font, box, style, mode)) is not None:
            return fit
    return None


def luminance(img: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of an RGB array, float32 0-255."""
    return img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_busy(lum: np.ndarray) -> bool:
    """Busy background: dense edges (noise, texture) or too wide a luminance range for one text colour."""
    if lum.size < 4:
        return False
    edges = float(np.abs(np.diff(lum, axis=0)).mean() + np.abs(np.diff(lum, axis=1)).mean()) / 2
    lo, hi = np.percentile(lum, [5, 95])
    return edges > BUSY_EDGE or float(hi - lo) > BUSY_SPREAD


def _block_rect(fit: Fit, f: ImageFont.FreeTypeFont, box: Rect) -> Rect:
    """Tight rectangle of the centred text block inside the box."""
    width = max(round(f.getlength(line, features=FONT_FEATURES)) for line in fit.lines) + 2 * fit.stroke
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    return cx - width // 2, cy - fit.height // 2, cx - width // 2 + width, cy - fit.height // 2 + fit.height


def _draw_plate(canvas: Image.Image, block: Rect, fit: Fit, colour: tuple[int, int, int], pill: bool) -> Image.Image:
    """Semi-opaque rounded rectangle behind the block (a pill for badges)."""
    px, py = round(PLATE_PAD_X * fit.size), round(PLATE_PAD_Y * fit.size)
    rect = (block[0] - px, block[1] - py, block[2] + px, block[3] + py)
    radius = min((rect[3] - rect[1]) // 2, round(0.7 * fit.size)) if pill else round(0.3 * fit.size)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).rounded_rectangle(rect, radius=radius, fill=(*colour, PLATE_ALPHA))
    return Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")


def compose(img: np.ndarray, text: str, layout: LayoutSpec) -> np.ndarray:
    """A new HxWx3 uint8 image with `text` drawn whole in the layout's box, legible on any background."""
    # 1. Check inputs
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"`img` must be an HxWx3 uint8 array, got shape {img.shape} dtype {img.dtype}")
    if not text.strip():
        raise ValueError("`text` is empty")
    h, w = img.shape[:2]
    # 2. Colours and plate from the background under the box
    box = box_rect(layout, w, h)
    lum = luminance(img[box[1]:box[3], box[0]:box[2]])
    fill = DARK_TEXT if float(lum.mean()) > 128 else LIGHT_TEXT
    contrast = LIGHT_TEXT if fill == DARK_TEXT else (0, 0, 0)
    badge = layout.placement == "badge"
    plate = layout.plate == "always" or (layout.plate == "auto" and (badge or is_busy(lum)))
    # 3. Fit: largest size whose wrapped block (and plate) fits the box
    fit = fit_text(text, layout.font, (box[2] - box[0], box[3] - box[1]), layout.outline, plate)
    if fit is None:
        raise TextDoesNotFit(f"text of {len(text)} characters does not fit a {w}x{h} image "
                             f"(layout {layout.placement!r}, minimum size {MIN_SIZE} px)")
    # 4. Plate, then the lines, centred
    f = _font(layout.font, fit.size)
    block = _block_rect(fit, f, box)
    canvas = Image.fromarray(img)
    if plate:
        canvas = _draw_plate(canvas, block, fit, contrast, pill=badge)
    draw = ImageDraw.Draw(canvas)
    cx = (block[0] + block[2]) / 2
    for i, line in enumerate(fit.lines):
        y = block[1] + fit.stroke + i * (fit.line_h + fit.gap)
        draw.text((cx, y), line, font=f, fill=fill, anchor="ma", stroke_width=fit.stroke, stroke_fill=contrast,
                  features=FONT_FEATURES)
    return np.asarray(canvas, dtype=np.uint8).copy()

"""Reads the built-in models' attributes from a prompt by its words, where the words make them unambiguous.

The learned caption parser (an MLP on the MiniLM sentence embedding, training/builtin.py) knows the phrasings it
was fitted on and guesses beyond them; these rules know the domain's closed vocabulary and read any word order:
a colour word belongs to the shape word nearest to it, the other colours are the background's, in order. What the
rules cannot settle (no shape word, a colour the vocabulary lacks, two shape words) they leave out, and the
learned parser's probabilities stand for that attribute.
"""

from __future__ import annotations

import re

from engines.shapes import COLORS, SHAPES

_WORD = re.compile(r"[a-z]+")
_SHAPE_WORDS = {s: s for s in SHAPES} | {"circles": "circle", "squares": "square", "triangles": "triangle",
                                         "stars": "star", "rings": "ring", "disc": "circle", "disk": "circle",
                                         "dot": "circle", "donut": "ring", "doughnut": "ring", "annulus": "ring"}
_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large",
               "huge": "large", "medium": "medium"}
_GRADIENT_WORDS = {"gradient", "fading", "fade", "fades", "blend", "blending"}
_STRIPE_WORDS = {"stripes", "striped", "stripe", "bands", "banded"}
_SIDES = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom", "left": "left", "right": "right"}
_CENTER_WORDS = {"center", "centre", "centered", "centred", "middle"}
# colours people name that the models do not know: with one of these the words settle nothing
_OTHER_COLORS = {"gray", "grey", "gold", "golden", "navy", "violet", "magenta", "cyan", "brown", "beige", "silver",
                 "maroon", "lime", "crimson", "turquoise", "indigo", "cream", "olive", "aqua", "lavender"}


def read(text: str) -> dict[str, str]:
    """Attribute group -> label (engines.shapes.ATTRIBUTES), for the groups the words settle."""
    words = _WORD.findall(text.lower())
    shapes_at = [(i, _SHAPE_WORDS[w]) for i, w in enumerate(words) if w in _SHAPE_WORDS]
    colors_at = [(i, w) for i, w in enumerate(words) if w in COLORS]
    out: dict[str, str] = {}
    if len({s for _, s in shapes_at}) > 1 or _OTHER_COLORS & set(words):
        return out  # two shapes, or a colour the vocabulary lacks: the learned parser decides
    kind = ("gradient" if _GRADIENT_WORDS & set(words) else "stripes" if _STRIPE_WORDS & set(words) else "solid")
    n_bg = 1 if kind == "solid" else 2
    if shapes_at and len(colors_at) == n_bg + 1:
        shape_i = shapes_at[0][0]
        fg = min(colors_at, key=lambda c: (abs(c[0] - shape_i), c[0] > shape_i))
        bg = [c for _, c in (x for x in colors_at if x != fg)]
        out |= {"shape": shapes_at[0][1], "color": fg[1], "background": kind, "bg1": bg[0],
                "bg2": bg[1] if n_bg == 2 else "none"}
        out |= _layout(words)
    elif not shapes_at and len(colors_at) == n_bg:
        out |= {"shape": "none", "color": "none", "background": kind, "bg1": colors_at[0][1],
                "bg2": colors_at[1][1] if n_bg == 2 else "none", "size": "medium", "position": "center"}
    return out


def _layout(words: list[str]) -> dict[str, str]:
    """Size and position where their words are present. Without them the learned parser decides: a size word
    the rules lack ("massive") would otherwise be read as the default, medium."""
    out = {}
    size = next((_SIZE_WORDS[w] for w in words if w in _SIZE_WORDS), None)
    if size:
        out["size"] = size
    sides = [_SIDES[w] for w in words if w in _SIDES]
    vertical = next((s for s in sides if s in ("top", "bottom")), None)
    horizontal = next((s for s in sides if s in ("left", "right")), None)
    if vertical and horizontal:
        out["position"] = f"{vertical} {horizontal}"
    elif _CENTER_WORDS & set(words) and not sides:
        out["position"] = "center"
    return out

"""A second set of caption phrasings, never used in training: adherence is measured on these too.

The training captions (engines/shapes.py `caption`) come from templates the caption parser has seen. People
write otherwise: "a large pink star centered on white", "a small star in red on a blue background", "on a grey
backdrop, a yellow ring". These templates are written apart from the training ones, with some words that the
training captions never use ("big", "upper", "canvas", "field", "sits", "centered"). Training data never
contains them (a unit test checks), so they measure what a user writing outside the templates gets.
"""

from __future__ import annotations

import numpy as np

from engines.shapes import Scene

# position -> ways to say it that the training captions do not use
_POSITIONS = {
    "center": ("centered", "in the middle"),
    "top left": ("in the upper left corner", "at the top-left"),
    "top right": ("in the upper right corner", "at the top-right"),
    "bottom left": ("in the lower left corner", "at the bottom-left"),
    "bottom right": ("in the lower right corner", "at the bottom-right"),
}
_SIZES = {"small": ("tiny", "small"), "medium": ("", "medium-sized"), "large": ("big", "large")}

_TEMPLATES = (
    "a {size}{color} {shape} {pos} on {bg}",
    "{pos_cap}, a {size}{color} {shape} over a {bg} field",
    "a {size}{shape} in {color} {pos} on a {bg} background",
    "{bg} canvas, {size}{color} {shape} {pos}",
    "on a {bg} backdrop, one {size}{color} {shape} sits {pos}",
    "draw a {size}{color} {shape} {pos} against {bg}",
    "{size}{color} {shape} icon {pos}; background: {bg}",
    "picture of a {size}{color}-colored {shape} {pos} with a {bg} background behind it",
)


def _bg_words(s: Scene, rng: np.random.Generator) -> str:
    if s.background == "solid":
        return s.bg_colors[0]
    a, b = s.bg_colors
    if s.background == "gradient":
        return str(rng.choice([f"a gradient from {a} to {b}", f"{a} fading into {b}"]))
    return str(rng.choice([f"stripes of {a} and {b}", f"{a}/{b} stripes"]))


def caption(s: Scene, rng: np.random.Generator) -> str:
    """One held-out phrasing of a scene with a shape (the adherence sets have a shape in every scene)."""
    if s.shape is None:
        raise ValueError(f"held-out phrasings describe scenes with a shape, got {s}")
    size = str(rng.choice(_SIZES[s.size]))
    pos = str(rng.choice(_POSITIONS[s.position]))
    template = str(rng.choice(_TEMPLATES))
    text = template.format(size=f"{size} " if size else "", color=s.color, shape=s.shape, pos=pos,
                           pos_cap=pos[:1].upper() + pos[1:], bg=_bg_words(s, rng))
    return " ".join(text.split())


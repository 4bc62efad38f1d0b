"""The built-in models' dataset generator and its adherence checker (engines/shapes.py)."""

import numpy as np
import pytest

from engines import shapes
from engines.shapes import Scene


@pytest.mark.parametrize("size", [32, 64])
def test_checker_scores_ground_truth_at_about_100_percent(size):
    rng = np.random.default_rng(size)
    scenes = [shapes.sample_scene(rng) for _ in range(300)]
    scores = shapes.score([shapes.check(shapes.render(s, size), s) for s in scenes])
    assert set(scores) == {"bg", "color", "shape", "size", "position"}
    assert min(scores.values()) >= 0.98, scores


def test_checker_scores_jittered_training_renders():
    rng = np.random.default_rng(1)
    scenes = [shapes.sample_scene(rng) for _ in range(200)]
    scores = shapes.score([shapes.check(shapes.render(s, 32, jitter=rng), s) for s in scenes])
    assert min(scores.values()) >= 0.97, scores


def test_checker_reads_each_shape_and_colour_and_rejects_the_wrong_ones():
    for shape in shapes.SHAPES:
        for color in ("red", "teal", "white"):
            s = Scene("solid", ("black",) if color != "black" else ("yellow",), shape=shape, color=color,
                      size="large")
            r = shapes.check(shapes.render(s, 32), s)
            assert r["shape_read"] == shape and r["color_read"] == color, r
            wrong = Scene(s.background, s.bg_colors, shape="ring" if shape != "ring" else "star", color="blue",
                          size="large")
            w = shapes.check(shapes.render(s, 32), wrong)
            assert not w["shape_ok"] and not w["color_ok"]


def test_checker_fails_noise_and_blank_images():
    s = Scene("solid", ("blue",), shape="star", color="red")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blank = np.full((32, 32, 3), shapes.COLORS["blue"], np.uint8)
    assert not shapes.check(blank, s)["shape_ok"] and shapes.check(blank, s)["bg_ok"]
    r = shapes.check(noise, s)
    assert not (r["bg_ok"] and r["color_ok"] and r["shape_ok"])


def test_gradients_and_stripes_are_read_in_order():
    g = Scene("gradient", ("teal", "purple"), direction="vertical")
    assert shapes.check(shapes.render(g, 32), g)["bg_read"] == ("teal", "purple")
    flipped = Scene("gradient", ("purple", "teal"), direction="vertical")
    assert not shapes.check(shapes.render(g, 32), flipped)["bg_ok"]
    st = Scene("stripes", ("white", "red"), direction="horizontal", shape="circle", color="blue")
    assert shapes.check(shapes.render(st, 32), st)["bg_ok"]


def test_captions_name_what_is_drawn_in_several_phrasings():
    rng = np.random.default_rng(3)
    s = Scene("solid", ("blue",), shape="star", color="red", size="small", position="top left")
    phrasings = {shapes.caption(s, rng) for _ in range(40)}
    assert len(phrasings) >= 4
    for c in phrasings:
        assert all(w in c for w in ("red", "star", "blue", "small", "top left")), c
    bg_only = Scene("gradient", ("teal", "purple"))
    assert "teal to purple" in shapes.caption(bg_only) and "background" in shapes.caption(bg_only)


def test_dataset_covers_the_domain_and_holds_out_combinations():
    rng = np.random.default_rng(0)
    train = [shapes.sample_training_scene(rng) for _ in range(3000)]
    assert not any(shapes.held_out(s) for s in train)
    assert {s.shape for s in train} == {*shapes.SHAPES, None}
    assert {s.color for s in train} - {None} == set(shapes.COLORS)
    assert {s.background for s in train} == set(shapes.BACKGROUNDS)
    assert {s.size for s in train} == set(shapes.SIZES) and {s.position for s in train} == set(shapes.POSITIONS)
    held = shapes.sample_eval_scenes(100)
    assert all(shapes.held_out(s) and s.background == "solid" for s in held)
    assert {s.shape for s in held} == set(shapes.SHAPES)  # every shape appears in the held-out set


def test_render_is_deterministic_and_antialiased():
    s = Scene("solid", ("black",), shape="circle", color="white", size="large")
    a, b = shapes.render(s, 32), shapes.render(s, 32)
    assert np.array_equal(a, b) and a.shape == (32, 32, 3) and a.dtype == np.uint8
    grey = (a[..., 0] > 30) & (a[..., 0] < 230)
    assert grey.sum() > 10  # edge pixels are blended


def test_attributes_index_the_parser_groups():
    s = Scene("gradient", ("teal", "purple"), direction="vertical")
    a = shapes.attributes(s)
    assert shapes.ATTRIBUTES["shape"][a["shape"]] == "none" and shapes.ATTRIBUTES["bg2"][a["bg2"]] == "purple"


def test_held_out_phrasings_never_occur_in_training_captions():
    from engines import phrasings_heldout

    rng = np.random.default_rng(5)
    scenes = [shapes.sample_scene(rng, p_background_only=0.0) for _ in range(400)]
    training = {f(s, rng) for s in scenes for f in (shapes.caption, shapes.varied_caption) for _ in range(20)}
    held = {phrasings_heldout.caption(s, rng) for s in scenes for _ in range(5)}
    assert len(held) > 1000 and not training & held, sorted(training & held)[:5]
    # and no training caption uses the words kept for the held-out set
    words = {w for c in training for w in c.replace(",", " ").split()}
    assert not words & {"big", "tiny", "upper", "lower", "canvas", "field", "sits", "centered", "middle"}


def test_held_out_phrasings_name_the_scene_in_other_words():
    from engines import phrasings_heldout

    rng = np.random.default_rng(8)
    s = Scene("solid", ("white",), shape="star", color="pink", size="large", position="top right")
    texts = {phrasings_heldout.caption(s, rng) for _ in range(60)}
    assert len(texts) >= 10 and all("pink" in t and "star" in t and "white" in t for t in texts), texts


CAPTION_READS = [
    pytest.param("teal backdrop with a small orange ring",
                 {"shape": "ring", "color": "orange", "bg1": "teal", "size": "small"}, id="backdrop_first"),
    pytest.param("a large pink star centered on white",
                 {"shape": "star", "color": "pink", "bg1": "white", "size": "large", "position": "center"},
                 id="centered_on"),
    pytest.param("orange circle, black background", {"shape": "circle", "color": "orange", "bg1": "black"},
                 id="comma_list"),
    pytest.param("a small star in red on a blue background", {"shape": "star", "color": "red", "bg1": "blue"},
                 id="colour_after_shape"),
    pytest.param("blue and white striped background with a red square in the upper left",
                 {"background": "stripes", "bg1": "blue", "bg2": "white", "color": "red", "position": "top left"},
                 id="stripes_and_corner"),
    pytest.param("a teal to purple gradient background",
                 {"background": "gradient", "bg1": "teal", "bg2": "purple", "shape": "none"}, id="background_only"),
]


@pytest.mark.parametrize(("text", "expected"), CAPTION_READS)
def test_caption_rules_read_word_orders_the_templates_lack(text, expected):
    from engines import caption_rules

    assert expected.items() <= caption_rules.read(text).items()


@pytest.mark.parametrize("text", ["a golden retriever on a beach", "a red star and a blue circle on white",
                                  "a grey star on a red background"])
def test_caption_rules_leave_what_the_words_do_not_settle_to_the_learned_parser(text):
    from engines import caption_rules

    assert caption_rules.read(text) == {}


def test_caption_rules_leave_size_and_position_they_have_no_word_for_to_the_learned_parser():
    from engines import caption_rules

    read = caption_rules.read("a massive red star near the top on blue")
    assert read["shape"] == "star" and "size" not in read and "position" not in read

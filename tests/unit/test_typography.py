"""Typography layout engine: layout choice from the prompt, word wrap, and exact text composited legibly."""

import numpy as np
import pytest

from engines import typography
from engines.typography import (
    FONTS,
    SAFE_LAYOUT,
    FontMissing,
    LayoutSpec,
    TextDoesNotFit,
    choose_layout,
    compose,
    fit_text,
    font_path,
    is_busy,
    luminance,
    wrap,
)


def _noise(size=256, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _solid(value, size=256):
    return np.full((size, size, 3), value, dtype=np.uint8)


PROMPT_FOR = {"title": "a poster", "center": "a sign", "badge": "a sticker", "bottom": "a caption"}


def _gradient(size=256):
    return np.linspace(0, 255, size)[:, None, None].repeat(size, 1).repeat(3, 2).astype(np.uint8)


CHOOSE_LAYOUT_CASES = [
    pytest.param("a poster that says \"GRAND OPENING\"", "title", "DejaVuSans-Bold", id="poster_title"),
    pytest.param("movie headline in an elegant style", "title", "DejaVuSerif-Bold", id="movie_serif"),
    pytest.param("storefront banner reading Fresh Bread", "center", "DejaVuSans-Bold", id="banner_center"),
    pytest.param("a round sticker for a coffee shop", "badge", "DejaVuSans-Bold", id="sticker_badge"),
    pytest.param("pixel art logo saying LEVEL UP", "badge", "DejaVuSansMono-Bold", id="pixel_logo_mono"),
    pytest.param("a vintage label on a jar", "bottom", "DejaVuSerif-Bold", id="vintage_label"),
    pytest.param("video thumbnail with caption", "bottom", "DejaVuSans-Bold", id="thumbnail_bottom"),
    pytest.param("terminal screen showing a header", "center", "DejaVuSansMono-Bold", id="terminal_header"),
    pytest.param("a sunset over the sea", "center", "DejaVuSans-Bold", id="default"),
    pytest.param("a sans-serif poster", "title", "DejaVuSans-Bold", id="sans_serif_is_sans"),
    pytest.param("a sign that says \"Logo Sticker\"", "center", "DejaVuSans-Bold", id="quoted_words_ignored"),
    pytest.param("a caption under a poster", "bottom", "DejaVuSans-Bold", id="earliest_word_wins"),
    pytest.param("two BADGES", "badge", "DejaVuSans-Bold", id="plural_and_case"),
]


@pytest.mark.parametrize("prompt,placement,font", CHOOSE_LAYOUT_CASES)
def test_choose_layout(prompt, placement, font):
    layout = choose_layout(prompt)
    assert (layout.placement, layout.font) == (placement, font)
    assert layout.plate == ("always" if placement == "badge" else "auto") and not layout.outline


def test_safe_layout_is_larger_centred_plated_outlined():
    safe = choose_layout("a vintage poster", safe=True)
    assert safe == SAFE_LAYOUT
    assert (safe.placement, safe.font, safe.plate, safe.outline) == ("center", "DejaVuSans-Bold", "always", True)
    for placement in ("title", "center", "badge", "bottom"):
        normal = choose_layout(PROMPT_FOR[placement])
        assert normal.placement == placement
        assert safe.box_w * safe.box_h > normal.box_w * normal.box_h


@pytest.mark.parametrize("kwargs", [
    pytest.param({"box_w": 0.0}, id="zero_width"),
    pytest.param({"box_h": 1.5}, id="taller_than_image"),
    pytest.param({"font": "ComicSans"}, id="unknown_font"),
    pytest.param({"placement": "corner"}, id="unknown_placement"),
    pytest.param({"plate": "sometimes"}, id="unknown_plate"),
])
def test_layout_spec_rejects_bad_values(kwargs):
    args = {"placement": "center", "font": "DejaVuSans-Bold", "box_w": 0.8, "box_h": 0.4} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LayoutSpec(**args)


def test_fonts_are_installed():
    for name in FONTS:
        assert font_path(name).endswith(f"{name}.ttf")


def test_missing_font_names_the_debian_package(monkeypatch):
    monkeypatch.setitem(FONTS, "DejaVuSans-Bold", "/nonexistent/DejaVuSans-Bold.ttf")
    typography._font.cache_clear()
    try:
        with pytest.raises(FontMissing, match="fonts-dejavu-core"):
            compose(_solid(0), "Hello", choose_layout("a banner"))
    finally:
        typography._font.cache_clear()


def _fits10(s):
    return len(s) <= 10


WRAP_CASES = [
    pytest.param("Hello", False, ["Hello"], id="one_word"),
    pytest.param("Fresh Bread Daily", False, ["Fresh", "Bread", "Daily"], id="greedy"),
    pytest.param("a b c d e f g h", False, ["a b c d e", "f g h"], id="packs_lines"),
    pytest.param("Supercalifragilistic", False, None, id="wide_word_refused"),
    pytest.param("Supercalifragilistic", True, ["Supercalif", "ragilistic"], id="wide_word_broken"),
    pytest.param("Hi Supercalifragilistic!", True, ["Hi", "Supercalif", "ragilistic", "!"], id="break_keeps_order"),
    pytest.param("One\nTwo", False, ["One", "Two"], id="newline_kept"),
]


@pytest.mark.parametrize("text,break_words,lines", WRAP_CASES)
def test_wrap(text, break_words, lines):
    assert wrap(text, _fits10, break_words) == lines


def test_ligatures_are_off():
    font = typography._font("DejaVuSans-Bold", 40)
    assert typography.FONT_FEATURES is not None  # Pillow's wheels bundle libraqm
    # "ff" as one glyph reads back as "0ff"; drawn as two glyphs it is wider.
    assert font.getlength("Off", features=typography.FONT_FEATURES) > font.getlength("Off")


def test_fit_prefers_one_line_and_shrinks_rather_than_break():
    fit = fit_text("Hello World", "DejaVuSans-Bold", (440, 200), outline=False, plate=False)
    assert fit.lines == ["Hello World"] and fit.size >= 40
    long = fit_text("Supercalifragilisticexpialidocious", "DejaVuSans-Bold", (400, 100), outline=False, plate=False)
    assert long.lines == ["Supercalifragilisticexpialidocious"]  # shrunk, not broken


BUSY_CASES = [
    pytest.param(_noise(), True, id="noise"),
    pytest.param(_gradient(), True, id="full_range_gradient"),
    pytest.param(_solid(90), False, id="solid"),
    pytest.param(np.clip(_gradient() // 4 + 100, 0, 255).astype(np.uint8), False, id="gentle_gradient"),
]


@pytest.mark.parametrize("img,busy", BUSY_CASES)
def test_is_busy(img, busy):
    assert is_busy(luminance(img)) is busy


@pytest.mark.parametrize("img", [
    pytest.param(_noise(), id="noise"),
    pytest.param(_gradient(512), id="gradient_512"),
    pytest.param(_solid(255, 128), id="white_128"),
])
@pytest.mark.parametrize("placement", ["title", "center", "badge", "bottom"])
def test_compose_returns_new_image_with_text(img, placement):
    before = img.copy()
    out = compose(img, "Open 24 Hours", choose_layout(PROMPT_FOR[placement]))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(img, before)  # input untouched
    assert out is not img and not np.shares_memory(out, img)
    changed = np.any(out != img, axis=2)
    assert changed.mean() > 0.01  # the text (and plate) really landed
    rows = np.nonzero(changed.any(axis=1))[0]
    third = img.shape[0] / 3
    if placement == "title":
        assert rows.max() < third
    if placement == "bottom":
        assert rows.min() > 2 * third


@pytest.mark.parametrize("value,dark_text", [
    pytest.param(255, True, id="white_bg_dark_text"),
    pytest.param(0, False, id="black_bg_light_text"),
])
def test_text_colour_contrasts_with_background(value, dark_text):
    out = compose(_solid(value), "Hello World", choose_layout("a banner"))
    lum = luminance(out)
    changed = lum[np.abs(lum - value) > 1]
    assert changed.size > 0
    assert bool(changed.mean() < 128) == dark_text


def test_busy_background_gets_a_plate_unless_never():
    img = _noise()
    box = typography.box_rect(choose_layout("a banner"), 256, 256)
    region = (slice(box[1], box[3]), slice(box[0], box[2]))
    auto = compose(img, "Hello World", choose_layout("a banner"))
    never = compose(img, "Hello World", LayoutSpec("center", "DejaVuSans-Bold", 0.86, 0.4, plate="never"))
    # A plate covers the background around the glyphs too: far more pixels change under the box.
    changed_auto = np.mean(np.any(auto[region] != img[region], axis=2))
    changed_never = np.mean(np.any(never[region] != img[region], axis=2))
    assert changed_auto > changed_never + 0.2


def test_outline_draws_contrasting_stroke():
    img = _solid(0)
    plain = compose(img, "Hello", LayoutSpec("center", "DejaVuSans-Bold", 0.8, 0.4, plate="never"))
    outlined = compose(img, "Hello", LayoutSpec("center", "DejaVuSans-Bold", 0.8, 0.4, plate="never", outline=True))
    assert not np.array_equal(plain, outlined)


def test_absurd_text_does_not_fit():
    with pytest.raises(TextDoesNotFit, match=r"2000 characters .* 64x64"):
        compose(_solid(0, 64), "word " * 400, choose_layout("a poster"))


@pytest.mark.parametrize("img,text,match", [
    pytest.param(np.zeros((64, 64), np.uint8), "Hi", "HxWx3", id="grey"),
    pytest.param(np.zeros((64, 64, 3), np.float32), "Hi", "uint8", id="float"),
    pytest.param(_solid(0, 64), "   ", "empty", id="blank_text"),
])
def test_compose_rejects_bad_input(img, text, match):
    with pytest.raises(ValueError, match=match):
        compose(img, text, choose_layout("a sign"))

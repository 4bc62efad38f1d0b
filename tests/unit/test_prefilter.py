import pytest

from graph.prefilter import PrefilterConfig, PromptRejected, check_prompt

CFG = PrefilterConfig(blocklist=["forbidden thing", "badword"])

REJECT = [
    pytest.param("   \n\t ", "empty", id="whitespace_only"),
    pytest.param("a cat\x00 on a mat", "control character", id="nul"),
    pytest.param("a cat \x1b[31m red", "control character", id="escape"),
    pytest.param("a" * 41, "repeats 41 times", id="char_run"),
    pytest.param("cat " * 20 + "on a mat", "the word 'cat'", id="word_share"),
    pytest.param("a red star on blue. " * 30, "absurdly repetitive", id="compressible"),
    pytest.param("draw a BadWord here", "blocked term 'badword'", id="blocklist"),
    pytest.param("a forbidden   thing", None, id="blocked_phrase_needs_exact_words"),
]


@pytest.mark.parametrize("prompt,fragment", REJECT)
def test_rejects_with_reason(prompt, fragment):
    if fragment is None:
        check_prompt(prompt, CFG)
        return
    with pytest.raises(PromptRejected, match=fragment) as e:
        check_prompt(prompt, CFG)
    assert e.value.status_code == 422 and e.value.param == "prompt"


@pytest.mark.parametrize("prompt", [
    pytest.param('a poster that says "GRAND OPENING"', id="typography"),
    pytest.param("hero image for our saas landing page,\ncinematic, 35mm, f/1.8", id="newline"),
    pytest.param("badwords are fine as a longer word", id="substring_not_blocked"),
    pytest.param("a long prompt " + " ".join(f"word{i}" for i in range(200)), id="long_but_varied"),
    pytest.param("🚀 rocket emoji icon, 日本語 text", id="unicode"),
])
def test_accepts_sane_prompts(prompt):
    check_prompt(prompt, CFG)


def test_text_the_typography_stage_cannot_render_is_refused_naming_the_characters():
    from graph.errors import InvalidRequest
    from graph.prefilter import check_text_chars

    check_text_chars("GRAND OPENING: 50% OFF! (café, naïve) “Q&A” — 24/7")
    with pytest.raises(InvalidRequest) as info:
        check_text_chars("¦\U0008cc07®x_y", "text")
    msg = info.value.message
    assert info.value.status_code == 422 and info.value.param == "text"
    assert "'_'" in msg and "'®'" in msg and "'¦'" in msg and "U+8CC07" in msg and "supported: letters A-Z" in msg


def test_every_supported_character_is_drawn_and_read_back_in_words():
    """The supported set is what rapidocr reads back from the layout engine's output (the set's reason to exist)."""
    import numpy as np

    from engines.ocr import build_ocr, check_text
    from engines.typography import choose_layout, compose
    from graph.prefilter import TEXT_CHARSET

    words = ["THE QUICK BROWN FOX", "JUMPS OVER LAZY DOG", "the quick brown fox", "jumps over lazy dog",
             "0123456789", "SALE! 50% OFF, TODAY: (A&B) [C/D] #1 $5 +2 =3 @me 'hi' \"yo\" a-b x*y? ok; no.",
             "café résumé naïve über ÀÉÎÕÜ ñ ç ø å"]
    covered = set("".join(words)) | set("‘’“”–—")  # curly quotes and dashes compare as their ASCII forms
    assert {c for c in TEXT_CHARSET if c.isascii()} <= covered
    ocr, bg = build_ocr("rapidocr"), np.full((512, 512, 3), 200, np.uint8)
    misses = [(w, c.read) for w in words if not (c := check_text(ocr, compose(bg, w, choose_layout("a poster")), w,
                                                                   0.05)).passed]
    assert not misses, misses

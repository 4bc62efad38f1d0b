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

"""Prompt sanity prefilter (seed 001): reject prompts no model should spend time on, with the reason.

Pure function over plain data; the settings are the ingress's user_config `prefilter:` block (live-tunable).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

from graph.errors import InvalidRequest


class PrefilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocklist: list[str] = Field(default_factory=list, description="Whole words or phrases, case-insensitive.")
    max_char_run: int = Field(default=40, ge=5, description="Longest run of one repeated character.")
    max_token_share: float = Field(default=0.7, gt=0, le=1,
                                   description="Largest share of the prompt one word may take (prompts of 12+ words).")
    min_compression_ratio: float = Field(default=0.08, ge=0, le=1,
                                         description="zlib size / raw size below this on 200+ chars = repetition.")


class PromptRejected(InvalidRequest):
    code = "prompt_rejected"


_ALLOWED_CONTROL = {"\n", "\t", "\r"}


def check_prompt(prompt: str, cfg: PrefilterConfig) -> None:
    """Raise PromptRejected (422, param `prompt`) naming why; return None for a sane prompt."""
    for problem in (_empty, _control, _repetition, _blocked):
        reason = problem(prompt, cfg)
        if reason:
            raise PromptRejected(f"`prompt` rejected: {reason}", param="prompt")


def _empty(prompt: str, cfg: PrefilterConfig) -> str | None:
    if not prompt.strip():
        return "it is empty after stripping whitespace"
    return None


def _control(prompt: str, cfg: PrefilterConfig) -> str | None:
    bad = [c for c in prompt if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs") and c not in _ALLOWED_CONTROL]
    if bad:
        return f"it contains {len(bad)} control character(s) (first: U+{ord(bad[0]):04X})"
    return None


def _repetition(prompt: str, cfg: PrefilterConfig) -> str | None:
    run = max((len(m.group(0)) for m in re.finditer(r"(.)\1*", prompt)), default=0)
    if run > cfg.max_char_run:
        return f"one character repeats {run} times in a row (limit {cfg.max_char_run})"
    words = re.findall(r"\w+", prompt.lower())
    if len(words) >= 12:
        word, count = Counter(words).most_common(1)[0]
        if count / len(words) > cfg.max_token_share:
            return f"the word {word!r} is {count} of {len(words)} words (limit {cfg.max_token_share:.0%})"
    raw = prompt.encode()
    if len(raw) >= 200:
        ratio = len(zlib.compress(raw, 9)) / len(raw)
        if ratio < cfg.min_compression_ratio:
            return f"it is absurdly repetitive (compresses to {ratio:.1%}, limit {cfg.min_compression_ratio:.0%})"
    return None


def _blocked(prompt: str, cfg: PrefilterConfig) -> str | None:
    low = prompt.lower()
    for term in cfg.blocklist:
        if re.search(rf"(?<!\w){re.escape(term.lower())}(?!\w)", low):
            return f"it contains the blocked term {term!r}"
    return None


# Characters the typography stage can draw (DejaVu) and its OCR reads back in words (measured with rapidocr's
# PP-OCR model: tests/unit/test_prefilter.py renders and reads them). Left out: _ < > ~ ^ | { } \ ` and symbols
# such as € £ ¥ © ®, which OCR misreads or drops, so a render carrying them would fail its check after two
# layouts; curly quotes and dashes are in (the OCR comparison maps them to ASCII).
TEXT_PUNCTUATION = " .,:;!?'\"&%#$+=@/()[]-*‘’“”–—"
TEXT_LETTERS = "".join(chr(c) for c in range(0xC0, 0x100) if chr(c) not in "×÷")
TEXT_CHARSET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" + TEXT_PUNCTUATION
                         + TEXT_LETTERS)
TEXT_CHARSET_DESCRIPTION = (f"letters A-Z a-z (with Latin-1 accents such as é ü ñ), digits 0-9, space and "
                            f"{TEXT_PUNCTUATION.strip()}")


def check_text_chars(text: str, param: str = "text") -> None:
    """422 naming the characters of `text` the typography stage cannot draw and read back, and the supported set:
    refused at the door instead of costing two renders and a 502."""
    bad = sorted({ch for ch in text if ch not in TEXT_CHARSET})
    if bad:
        shown = ", ".join(repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}" for ch in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise InvalidRequest(f"`{param}` has characters the typography stage cannot render legibly: {shown}{more}; "
                             f"supported: {TEXT_CHARSET_DESCRIPTION}", param=param)


def check_request(req, max_size: tuple[int, int], records: bool, cfg: PrefilterConfig) -> None:
    """What the schema cannot know, at the door: this profile's size limit, options this deployment lacks, prompt
    sanity, text the typography stage can draw and read back (a GenerationRequest; 4xx naming the field)."""
    from engines.intent import extract_text
    from graph.errors import NotSupported

    width, height = req.width_height
    if width > max_size[0] or height > max_size[1]:
        raise InvalidRequest(f"`size` must be at most {max_size[0]}x{max_size[1]} in this profile but is {req.size}",
                             param="size")
    if req.response_format == "url" and not records:
        raise NotSupported("`response_format` 'url' needs render records, which this deployment disables "
                           "(app args records.enabled); use 'b64_json'", param="response_format")
    check_prompt(req.prompt, cfg)
    text = req.text or extract_text(req.prompt)
    if text:
        check_text_chars(text, "text" if req.text else "prompt")

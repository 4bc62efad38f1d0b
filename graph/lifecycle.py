"""Hosted model lifecycle: which provider model ids are shut down (or announced for shut-down), since when, and what
the provider names as the successor.

A profile that names a shut-down model is refused where it is validated (`python -m graph.config`, the app build at
`serve deploy`, each Generator replica's start); a model announced for retirement starts with a warning that says the
date. The catalogue only speaks for the provider's own API: a tier pointed at another server (`base_url`) names
models that server defines.

Every entry cites the page its date and successor come from, as checked on 2026-12-03. Keep it current: a model
missing here still fails at run time, but then as `model_retired` on the first render (engines/remote.py) rather than
at deploy.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

CHECKED = dt.date(2026, 12, 3)
OPENAI_DEPRECATIONS = "https://developers.openai.com/api/docs/deprecations"
GEMINI_DEPRECATIONS = "https://ai.google.dev/gemini-api/docs/deprecations"


@dataclass(frozen=True)
class Retirement:
    """One provider model id (or every id starting with `model` when `prefix`), its shut-down date and successor."""

    kind: Literal["openai", "ideogram", "google"]
    model: str
    shutdown: dt.date
    successor: str
    source: str
    prefix: bool = False

    def matches(self, kind: str, model: str) -> bool:
        return kind == self.kind and (model.startswith(self.model) if self.prefix else model == self.model)


D = dt.date
# First match wins: specific ids before the prefixes that would also match them.
CATALOGUE: tuple[Retirement, ...] = (
    # OpenAI: DALL·E 2 and 3 shut down 2026-05-12 (deprecations page; OpenAI's notice e-mail quoted in
    # AndraxDev/speak-gpt#158). The dall-e-3 model page recommends GPT-Image-2.5 Sunburst
    # (https://developers.openai.com/api/docs/models/dall-e-3); dall-e-2's page was not read: same successor.
    Retirement("openai", "dall-e-3", D(2026, 5, 12), "gpt-image-2.5-sunburst",
               "https://developers.openai.com/api/docs/models/dall-e-3"),
    Retirement("openai", "dall-e-2", D(2026, 5, 12), "gpt-image-2.5-sunburst", OPENAI_DEPRECATIONS),
    # gpt-image-1: shut down 2026-10-23, replacement gpt-image-2 (OpenAI's table as quoted in diillson/chatcli#1364;
    # that row of the page itself was not in the stored copy read here).
    Retirement("openai", "gpt-image-1", D(2026, 10, 23), "gpt-image-2", OPENAI_DEPRECATIONS),
    # 2026-06-02 notice: shut down 2026-12-01, "gpt-image-2.6-sunburst or gpt-image-2.6-flare" (deprecations table).
    Retirement("openai", "gpt-image-1-mini", D(2026, 12, 1), "gpt-image-2.6-flare", OPENAI_DEPRECATIONS),
    Retirement("openai", "gpt-image-1.5", D(2026, 12, 1), "gpt-image-2.6-sunburst", OPENAI_DEPRECATIONS, prefix=True),
    Retirement("openai", "chatgpt-image-latest", D(2026, 12, 1), "gpt-image-2.6-sunburst", OPENAI_DEPRECATIONS),
    # Google, Gemini API. Imagen 4: shut down 2026-08-17 (deprecations table, as quoted by Google-API users, e.g.
    # azmym/gemini-mcp v0.2.1); Ultra's successor per Google's Imagen migration guide as cited in issue #19.
    Retirement("google", "imagen-4.0-ultra-generate", D(2026, 8, 17), "gemini-3-pro-image", GEMINI_DEPRECATIONS,
               prefix=True),
    Retirement("google", "imagen-4.0", D(2026, 8, 17), "gemini-3.1-flash-image", GEMINI_DEPRECATIONS, prefix=True),
    # "All Imagen models will shut down on June 24, 2026" (Google's banner on firebase.google.com/docs/ai-logic).
    Retirement("google", "imagen-", D(2026, 6, 24), "gemini-3.1-flash-image",
               "https://firebase.google.com/docs/ai-logic/prompt-design", prefix=True),
    # Nano Banana (the first): shut down 2026-10-02 (deprecations table); its successor line is Nano Banana 2.
    Retirement("google", "gemini-2.5-flash-image-preview", D(2026, 1, 15), "gemini-3.1-flash-image",
               GEMINI_DEPRECATIONS),
    Retirement("google", "gemini-2.5-flash-image", D(2026, 10, 2), "gemini-3.1-flash-image", GEMINI_DEPRECATIONS),
    # Preview image models shut down 2026-06-25 in favour of their GA ids (deprecations table).
    Retirement("google", "gemini-3.1-flash-image-preview", D(2026, 6, 25), "gemini-3.1-flash-image",
               GEMINI_DEPRECATIONS),
    Retirement("google", "gemini-3-pro-image-preview", D(2026, 6, 25), "gemini-3-pro-image", GEMINI_DEPRECATIONS),
    # "Gemini 2.0 Flash and Flash-Lite models were shut down on June 1, 2026" (firebase.google.com/docs/ai-logic).
    Retirement("google", "gemini-2.0-flash", D(2026, 6, 1), "gemini-3.1-flash-image",
               "https://firebase.google.com/docs/ai-logic/prompt-design", prefix=True),
)


@dataclass(frozen=True)
class Verdict:
    """What the catalogue says of one model today: `active` (not listed), `announced` or `retired`."""

    status: Literal["active", "announced", "retired"]
    entry: Retirement | None = None

    def message(self, model: str) -> str:
        if self.entry is None:
            return ""
        e = self.entry
        if self.status == "retired":
            return (f"{e.kind} model {model!r} was shut down on {e.shutdown.isoformat()}; use {e.successor!r} "
                    f"instead (source: {e.source})")
        return (f"{e.kind} model {model!r} is announced for retirement on {e.shutdown.isoformat()}; move to "
                f"{e.successor!r} before then (source: {e.source})")


def lifecycle(kind: str, model: str, today: dt.date, catalogue: tuple[Retirement, ...] | None = None) -> Verdict:
    """The model's status on `today`. Example: ("openai", "dall-e-3", 2026-12-03) -> retired since 2026-05-12."""
    entry = next((e for e in (CATALOGUE if catalogue is None else catalogue) if e.matches(kind, model)), None)
    if entry is None:
        return Verdict("active")
    return Verdict("retired" if entry.shutdown <= today else "announced", entry)


def today() -> dt.date:
    """Today in UTC: the providers' shut-down dates are calendar dates."""
    return dt.datetime.now(dt.UTC).date()

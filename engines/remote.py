"""Hosted image APIs as generator engines: OpenAI's Images API with the GPT Image models (or any OpenAI-compatible
server, another Prism included), Ideogram's v2 generate API, and Google's Gemini API image models (`:generateContent`).

A remote engine spends no local compute: `agenerate` is awaited on the replica's event loop (deployments/
generator.py), sends one provider call per run of identical prompts (n images where the provider takes n, else
one call per image, all concurrently), decodes the PNG/JPEG/WebP it answers (base64 or a URL to download) and crops
it to the tier's native square. Failures are typed, each with the `reason` the Generator reports to the ingress:
rate_limited (429: no retry; every call fails fast until Retry-After has passed), deadline (no answer within
timeout_s), error (5xx and connection errors after retries; 4xx refusals), undecodable (a body or image that
cannot be read), model_retired (the provider says the model does not exist or was shut down: the tier stays
unavailable, failing fast without the network, until the replica is replaced).

Where an answer reports its token usage (OpenAI's `usage`, Gemini's `usageMetadata`) and the tier's price sheet has
token rates, each image carries what the provider says it cost (`arender`); the ingress charges the list price for
the rest (graph/cost.py).

The key is read from the environment variable the spec names, when the engine starts, and is sent only in the
provider's auth header: never to image download URLs, and never in a log line, message or repr (error bodies
that echo it are redacted).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import io
import logging
import os
import random
import re
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image
from pydantic import SecretStr

from engines.generators import placeholder_image
from graph.cost import TokenUsage, usage_cost
from graph.lifecycle import lifecycle, today

if TYPE_CHECKING:
    from engines.generators import ModelSpec

log = logging.getLogger("prism.remote")

DEFAULT_BASE_URLS = {"openai": "https://api.openai.com", "ideogram": "https://api.ideogram.ai",
                     "google": "https://generativelanguage.googleapis.com"}
DEFAULT_RETRY_AFTER_S = 5.0  # a 429 without a usable Retry-After still blocks the tier this long
MAX_RETRY_AFTER_S = 3600.0
MAX_BACKOFF_S = 8.0
MAX_CONNECTIONS = 64
SEED_MODULUS = 2**31  # Ideogram and Gemini take a non-negative int32 seed; Prism's go up to 2**32 - 1
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- Errors: the Generator reports `reason`; the ingress falls back on it. ----------------------------------------

class RemoteError(Exception):
    """A hosted API call failed; `reason` is the Generator's failure reason for the ingress's fallback chain."""

    reason = "error"


class RemoteRateLimited(RemoteError):
    """429: the provider asks us to wait `retry_after_s`; calls before then fail fast without the network."""

    reason = "rate_limited"

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RemoteTimeout(RemoteError):
    """No complete answer within the spec's timeout_s."""

    reason = "deadline"


class RemoteServerError(RemoteError):
    """5xx or no connection, still failing after max_retries retries."""

    reason = "error"


class RemoteBadResponse(RemoteError):
    """A 2xx answer Prism cannot use: not JSON, fields missing, bad base64, bytes that are not an image."""

    reason = "undecodable"


class RemoteRejected(RemoteError):
    """A 4xx other than 429 (content policy, bad key, bad parameter), or images withheld by a safety filter."""

    reason = "error"


class RemoteModelRetired(RemoteError):
    """The provider says the model does not exist (any more): the tier is unavailable until a redeploy; not a
    capacity reason, so a chain that fails only on it answers 502, not 503."""

    reason = "model_retired"


class MissingApiKey(RuntimeError):
    """The environment variable the spec names is unset or empty: the replica cannot start."""


class _Retryable(Exception):
    """Internal: a 5xx or connection failure that the next attempt may cure."""


# -- What each provider documents, as data (validation and request building both read it). -----------------------

@dataclass(frozen=True)
class ModelFacts:
    """One model family as its provider documents it: square sizes (native_size -> the provider's size value,
    None where the square is the default and nothing is sent), images per call, accepted option values."""

    sizes: dict[int, str | None]
    max_n: int
    qualities: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()  # openai output_format
    magic: tuple[str, ...] = ()  # ideogram magic_prompt
    seed: bool = False  # a seed the provider documents and accepts
    documented: bool = True  # False: a model the default provider does not list, served by your own base_url


# OpenAI GPT Image models, by id prefix (gpt-image-2, -2.5-flare/-sunburst, -2.6-flare/-sunburst). Images API
# (POST /v1/images/generations): n 1-10; quality low|medium|high|auto; output_format png|jpeg|webp; always base64, no
# response_format, no style, no seed; 1024x1024 is a standard size of every GPT Image model. Source: openai-python's
# ImageGenerateParams (openai/openai-python src/openai/types/image_generate_params.py, 2026-08-21) and
# https://developers.openai.com/api/docs/guides/image-generation, checked 2026-12-03. Third-party gateways list
# `xhigh`/`max` qualities for 2.5+; OpenAI's own reference read here does not, so they are not accepted.
OPENAI_MODELS: tuple[tuple[str, ModelFacts], ...] = (
    ("gpt-image-2", ModelFacts({1024: "1024x1024"}, max_n=10, qualities=("low", "medium", "high", "auto"),
                               formats=("png", "jpeg", "webp"))),
)
# Ideogram API v2 (POST /v2/image/generate/{model}, multipart; https://developer.ideogram.ai/api-reference/images/
# generate/ideogram-4-5, checked 2026-12-03): size presets 1024x1024 and 2048x2048, quality low|medium|high
# (very_low needs source images), magic_prompt auto|on|off, seed 0-2147483647. The page gives no num_images range;
# 8 is the range Ideogram documents for its other v2 generate endpoints (p-image-ideogram) and for v3.
IDEOGRAM_MODELS: dict[str, ModelFacts] = {
    "ideogram-4-5": ModelFacts({1024: "1024x1024", 2048: "2048x2048"}, max_n=8, qualities=("low", "medium", "high"),
                               magic=("auto", "on", "off"), seed=True),
}
# Gemini API image models (POST /v1beta/models/{model}:generateContent; https://ai.google.dev/gemini-api/docs/
# image-generation, checked 2026-12-03), by id prefix, first match wins. One image per call; 1:1 at imageSize "1K" is
# 1024x1024, "2K" 2048x2048. Nano Banana 2 Lite renders 1K only (nothing is sent for it).
GOOGLE_MODELS: tuple[tuple[str, ModelFacts], ...] = (
    ("gemini-3.1-flash-lite-image", ModelFacts({1024: None}, max_n=1, seed=True)),
    ("gemini-3.1-flash-image", ModelFacts({1024: "1K", 2048: "2K"}, max_n=1, seed=True)),
    ("gemini-3-pro-image", ModelFacts({1024: "1K", 2048: "2K"}, max_n=1, seed=True)),
)


def _compatible_facts(kind: str, native_size: int) -> ModelFacts:
    """A model the default provider does not list, on another server: any size, one image per call."""
    if kind == "google":
        return ModelFacts({native_size: None}, max_n=1, seed=True, documented=False)
    return ModelFacts({native_size: f"{native_size}x{native_size}"}, max_n=1, documented=False)


def model_facts(kind: str, model: str, native_size: int, custom_base: bool) -> ModelFacts:
    """The documented facts for a provider model; raises ValueError listing the known ones when there are none."""
    if kind == "ideogram":
        known, facts = list(IDEOGRAM_MODELS), IDEOGRAM_MODELS.get(model)
    else:
        table = OPENAI_MODELS if kind == "openai" else GOOGLE_MODELS
        known = [f"{prefix}*" for prefix, _ in table]
        facts = next((f for prefix, f in table if model.startswith(prefix)), None)
    if facts is not None:
        return facts
    if custom_base and kind != "ideogram":
        return _compatible_facts(kind, native_size)
    raise ValueError(f"{kind} `provider_model` {model!r} is not one Prism knows for {DEFAULT_BASE_URLS[kind]}: use one "
                     f"of {known}" + ("" if kind == "ideogram" else " (any name works with your own `base_url`)"))


OPTIONS = ("quality", "output_format", "magic_prompt")


def allowed_options(kind: str, facts: ModelFacts) -> dict[str, tuple[str, ...] | None]:
    """The options a model takes -> their documented values (None: free text, or a server of yours decides)."""
    if kind == "ideogram":
        return {"quality": facts.qualities, "magic_prompt": facts.magic}
    if kind == "google":
        return {}
    if not facts.documented:
        return {"quality": None}
    return {"quality": facts.qualities, "output_format": facts.formats}


def _check_options(spec: ModelSpec, facts: ModelFacts) -> None:
    """Each option only where its provider documents it, and then with a documented value."""
    allowed = allowed_options(spec.kind, facts)
    for name in OPTIONS:
        value = getattr(spec, name)
        if value is None:
            continue
        if name not in allowed:
            raise ValueError(f"`{name}` is not an option of {spec.kind} {spec.provider_model} (its options: "
                             f"{sorted(allowed) or 'none'})")
        if allowed[name] is not None and value not in allowed[name]:
            raise ValueError(f"`{name}` must be one of {list(allowed[name])} for {spec.provider_model} but is "
                             f"{value!r}")


def _check_price(spec: ModelSpec) -> None:
    """A tier on the provider's own API says what it costs, where that price was read and when."""
    cost = spec.cost
    if cost.usd_per_image <= 0 or cost.checked is None or cost.source is None:
        raise ValueError(f"a {spec.kind} tier on {DEFAULT_BASE_URLS[spec.kind]} needs `cost.usd_per_image` (its list "
                         f"price per image), `cost.checked` (the date it was checked) and `cost.source` (the page)")


def check_remote_spec(spec: ModelSpec) -> None:
    """Validate a hosted tier's spec against what its provider documents; raises ValueError naming the field.
    Reads no environment: a profile validates on any machine, keys or not."""
    if not spec.api_key_env:
        raise ValueError(f"kind {spec.kind} needs `api_key_env`: the NAME of the environment variable with its key")
    if not _ENV_NAME.match(spec.api_key_env):
        raise ValueError("`api_key_env` must be an environment variable name (letters, digits, underscores; e.g. "
                         "OPENAI_API_KEY), not the key itself")
    if not spec.provider_model:
        raise ValueError(f"kind {spec.kind} needs `provider_model` (e.g. {_example_model(spec.kind)})")
    if spec.base_url is not None and urlsplit(spec.base_url).scheme not in ("http", "https"):
        raise ValueError(f"`base_url` must be an http(s) URL but is {spec.base_url!r}")
    custom = is_custom_base(spec)
    if not custom:
        verdict = lifecycle(spec.kind, spec.provider_model, today())
        if verdict.status == "retired":
            raise ValueError(verdict.message(spec.provider_model))
    facts = model_facts(spec.kind, spec.provider_model, spec.native_size, custom)
    if spec.native_size not in facts.sizes:
        raise ValueError(f"`native_size` {spec.native_size} is not a square size {spec.provider_model} documents: "
                         f"allowed {sorted(facts.sizes)}")
    _check_options(spec, facts)
    if spec.send_seed and spec.kind == "openai" and not custom:
        raise ValueError("`send_seed` with OpenAI's Images API: it takes no seed; leave it unset, or point `base_url` "
                         "at a server that accepts one (another Prism does)")
    if not custom:
        _check_price(spec)


def lifecycle_warning(spec: ModelSpec) -> str | None:
    """The warning a tier starts with when its model is announced for retirement (None otherwise)."""
    if spec.kind not in DEFAULT_BASE_URLS or not spec.provider_model or is_custom_base(spec):
        return None
    verdict = lifecycle(spec.kind, spec.provider_model, today())
    return verdict.message(spec.provider_model) if verdict.status == "announced" else None


def is_custom_base(spec: ModelSpec) -> bool:
    """Does the tier call a server other than the provider's own (a gateway, another Prism, a stand-in)?"""
    return spec.base_url is not None and _origin(spec.base_url) != _origin(DEFAULT_BASE_URLS[spec.kind])


def _example_model(kind: str) -> str:
    return {"openai": "gpt-image-2.6-sunburst", "ideogram": "ideogram-4-5", "google": "gemini-3.1-flash-image"}[kind]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def engine_version(kind: str, model: str, base_url: str) -> str:
    """`openai:dall-e-3`, with the host when it is not the provider's own (`openai:standard@prism.internal:8000`)."""
    if _origin(base_url) == _origin(DEFAULT_BASE_URLS[kind]):
        return f"{kind}:{model}"
    parts = urlsplit(base_url)  # host and port only: a user:password@ in the URL must not reach responses
    return f"{kind}:{model}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")


# -- Pure helpers. -------------------------------------------------------------------------------------------------

def plan_calls(prompts: list[str], seeds: list[int], per_call: int) -> list[tuple[list[int], str, int]]:
    """Group a batch into provider calls: consecutive identical prompts (one job's n images) share a call of up to
    per_call images; each call carries its first item's seed. Example: [a, a, a, b] with per_call 2 ->
    [([0, 1], a), ([2], a), ([3], b)]."""
    calls: list[tuple[list[int], str, int]] = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        if calls and calls[-1][1] == prompt and len(calls[-1][0]) < per_call:
            calls[-1][0].append(i)
        else:
            calls.append(([i], prompt, int(seed)))
    return calls


def parse_retry_after(value: str | None, now: float | None = None) -> float:
    """Retry-After as seconds (delta-seconds or an HTTP date); DEFAULT_RETRY_AFTER_S when absent or unreadable."""
    if not value:
        return DEFAULT_RETRY_AFTER_S
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 size x size x 3: centre-cropped to a square, resized when not already size."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RemoteBadResponse(f"{len(data)} bytes are not an image ({type(e).__name__})") from None
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _b64(text: Any) -> bytes:
    if not isinstance(text, str) or not text:
        raise RemoteBadResponse("the image field is empty or not a string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteBadResponse("the image field is not valid base64") from None


def _dig(body: Any, *path: str | int) -> Any:
    """body[path...] or None, through dicts and lists, without KeyError/IndexError/TypeError."""
    for step in path:
        if isinstance(step, int):
            body = body[step] if isinstance(body, list) and -len(body) <= step < len(body) else None
        else:
            body = body.get(step) if isinstance(body, dict) else None
    return body


# A 400 whose message says the model is gone (OpenAI: "The model `dall-e-3` has been deprecated", code
# model_not_found; Google: status NOT_FOUND "models/x is not found for API version v1beta").
_GONE_CODES = ("model_not_found", "NOT_FOUND")
_GONE_WORDS = re.compile(r"\bmodel\b.*\b(deprecated|shut ?down|retired|discontinued|no longer (available|supported)|"
                         r"does not exist|is not found)\b", re.IGNORECASE | re.DOTALL)


def model_gone(status: int, body: Any) -> bool:
    """Does a provider's 4xx say the model itself is gone? A 404/410 on the one generate call a tier makes always does
    (the model is in its path or body); a 400 when its error code, status or message says so."""
    if status in (404, 410):
        return True
    if status != 400:
        return False
    if _dig(body, "error", "code") in _GONE_CODES or _dig(body, "error", "status") in _GONE_CODES:
        return True
    message = _dig(body, "error", "message") or _dig(body, "detail") or _dig(body, "error")
    return isinstance(message, str) and bool(_GONE_WORDS.search(message))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def openai_usage(body: dict) -> TokenUsage | None:
    """OpenAI's `usage` (GPT Image models): input split into text/image tokens, output into image/text tokens where
    the details are given (all output counts as image tokens otherwise). None when absent or malformed."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    inputs, outputs = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    if inputs is None or outputs is None:
        return None
    text_in, image_in = (_count(_dig(usage, "input_tokens_details", k)) for k in ("text_tokens", "image_tokens"))
    image_out, text_out = (_count(_dig(usage, "output_tokens_details", k)) for k in ("image_tokens", "text_tokens"))
    if text_in is None or image_in is None:
        text_in, image_in = inputs, 0
    if image_out is None:
        image_out, text_out = outputs, 0
    return TokenUsage(text_input=text_in, image_input=image_in, text_output=text_out or 0, image_output=image_out)


def gemini_usage(body: dict) -> TokenUsage | None:
    """Gemini's `usageMetadata`: prompt tokens by modality, candidate tokens split IMAGE vs the rest, thinking tokens
    billed as text output. None when absent or malformed."""
    meta = body.get("usageMetadata")
    if not isinstance(meta, dict) or _count(meta.get("candidatesTokenCount")) is None:
        return None

    def by_modality(details: Any, modality: str) -> int:
        return sum(_count(_dig(d, "tokenCount")) or 0 for d in details or [] if _dig(d, "modality") == modality)

    prompt = _count(meta.get("promptTokenCount")) or 0
    image_in = by_modality(meta.get("promptTokensDetails"), "IMAGE")
    image_out = by_modality(meta.get("candidatesTokensDetails"), "IMAGE")
    text_out = meta["candidatesTokenCount"] - image_out + (_count(meta.get("thoughtsTokenCount")) or 0)
    return TokenUsage(text_input=max(prompt - image_in, 0), image_input=image_in, text_output=max(text_out, 0),
                      image_output=image_out)


@dataclass
class _Call:
    """One provider request: the path under base_url and its JSON body or multipart fields."""

    path: str
    json: dict | None = None
    form: dict[str, str] | None = None


@dataclass
class _Image:
    """One image of an answer: inline base64, else a URL to download (without the key). Unchecked values as read."""

    b64: Any = None
    url: Any = None


# -- The engine. ---------------------------------------------------------------------------------------------------

@dataclass
class Rendered:
    """One image and what the provider said it cost (None: the answer reported no usage, or the tier has no token
    rates; the ingress then charges the list price)."""

    image: np.ndarray
    usd: float | None = None


@dataclass(repr=False)
class _Pool:
    """The engine's pooled HTTP client, bound to the event loop it was made on (asyncio.run makes new loops)."""

    client: httpx.AsyncClient | None = None
    loop: asyncio.AbstractEventLoop | None = None


class RemoteEngine:
    """A hosted image API behind the Engine interface: key, pooled client, retries, rate-limit block, decoding.
    Subclasses say how to ask (`request`, `auth_headers`) and how to read the answer (`images`, `usage`)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.name
        self.native_size = spec.native_size
        self.base_url = (spec.base_url or DEFAULT_BASE_URLS[spec.kind]).rstrip("/")
        self.facts = model_facts(spec.kind, spec.provider_model, spec.native_size, is_custom_base(spec))
        self.per_call = max(1, min(self.facts.max_n, spec.max_batch_size))
        self.send_seed = self.facts.seed if spec.send_seed is None else spec.send_seed
        self.version = engine_version(spec.kind, spec.provider_model, self.base_url)
        self.prices = spec.cost.tokens
        self._key = SecretStr(_read_key(spec.api_key_env))
        self._pool = _Pool()
        self.blocked_until = 0.0  # time.monotonic() before which calls fail fast (the last 429's Retry-After)
        self.unavailable: str | None = None  # why the provider no longer serves this model; sticky for the replica

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, key=${self.spec.api_key_env})"

    # Engine interface

    def delay_s(self, batch: int) -> float:
        return 0.0

    def probe(self) -> np.ndarray:
        """Health probe without a provider call. Serve probes every few seconds: a real render each time would be
        billed per image, and a provider outage is not something a new replica fixes (the ingress falls back on
        the renders' failure reasons instead). The replica's own process is what this vouches for."""
        return placeholder_image("health probe", 0, self.native_size)

    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[np.ndarray]:
        """For scripts (no running loop): agenerate on a fresh loop; raises the first failed call's error."""

        async def once() -> list:
            try:
                return await self.agenerate(prompts, seeds, steps, guidance)
            finally:
                await self.aclose()

        out = asyncio.run(once())
        failed = next((o for o in out if isinstance(o, RemoteError)), None)
        if failed is not None:
            raise failed
        return out

    async def agenerate(self, prompts: list[str], seeds: list[int], steps: int,
                        guidance: float) -> list[np.ndarray | RemoteError]:
        """One uint8 native-size image per prompt (`arender` without the costs)."""
        return [r.image if isinstance(r, Rendered) else r for r in await self.arender(prompts, seeds)]

    async def arender(self, prompts: list[str], seeds: list[int]) -> list[Rendered | RemoteError]:
        """One image (and what the provider said it cost) per prompt. A slot whose call failed holds its RemoteError,
        so one refused prompt does not fail the batch's other jobs; when every call failed the first error is raised."""
        self._raise_if_blocked()
        calls = plan_calls(prompts, seeds, self.per_call)
        results = await asyncio.gather(*(self._render(p, s, len(idx)) for idx, p, s in calls), return_exceptions=True)
        out: list[Rendered | RemoteError | None] = [None] * len(prompts)
        for (idx, _, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, RemoteError):
                raise result
            for k, i in enumerate(idx):
                if isinstance(result, RemoteError):
                    out[i] = result
                else:
                    images, usd = result
                    out[i] = Rendered(images[k], None if usd is None else round(usd / len(idx), 8))
        if all(isinstance(o, RemoteError) for o in out):
            raise out[0]
        return out

    async def aclose(self) -> None:
        if self._pool.client is not None:
            await self._pool.client.aclose()
            self._pool = _Pool()

    # Provider hooks

    def auth_headers(self, key: str) -> dict[str, str]:
        raise NotImplementedError

    def request(self, prompt: str, seed: int, n: int) -> _Call:
        raise NotImplementedError

    def images(self, body: dict, n: int) -> list[_Image]:
        raise NotImplementedError

    def usage(self, body: dict) -> TokenUsage | None:
        """The call's token usage as the answer reports it (None: not reported)."""
        return None

    def retry_after_hint(self, response: httpx.Response) -> str | None:
        """The 429's wait as the provider states it (the Retry-After header unless the provider says otherwise)."""
        return response.headers.get("retry-after")

    # Machinery

    async def _render(self, prompt: str, seed: int, n: int) -> tuple[list[np.ndarray], float | None]:
        """One provider call with retries (exponential backoff + jitter) on 5xx and connection errors."""
        attempts = self.spec.max_retries + 1
        for attempt in range(attempts):
            try:
                return await self._attempt(prompt, seed, n)
            except _Retryable as e:
                if attempt + 1 == attempts:
                    raise RemoteServerError(self._redact(f"{self.version}: {e} (after {attempts} attempts)")) from None
                wait = min(self.spec.retry_backoff_s * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.5, 1.5)
                log.warning("%s: %s; retry %d of %d in %.2fs", self.version, self._redact(str(e)), attempt + 1,
                            self.spec.max_retries, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _attempt(self, prompt: str, seed: int, n: int) -> tuple[list[np.ndarray], float | None]:
        """Send, check the status, read the images (downloading URLs) and the usage, all within timeout_s."""
        self._raise_if_blocked()
        call = self.request(prompt, seed, n)
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                response = await self._send(call)
                self._raise_for_status(response)
                body = await asyncio.to_thread(self._json, response)  # a multi-MB body: off the replica's loop
                found = self.images(body, n)
                if len(found) != n:
                    raise RemoteBadResponse(f"{self.version}: asked for {n} images, the answer has {len(found)}")
                images = list(await asyncio.gather(*(self._decode(img) for img in found)))
        except (TimeoutError, httpx.TimeoutException):
            raise RemoteTimeout(f"{self.version}: no answer within timeout_s={self.spec.timeout_s:g}") from None
        except httpx.RequestError as e:  # refused, reset, DNS, TLS: the next attempt may reach it
            raise _Retryable(f"connection failed ({type(e).__name__})") from None
        usage = self.usage(body) if self.prices is not None else None
        return images, None if usage is None else usage_cost(usage, self.prices)

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._pool.client is None or self._pool.loop is not loop:
            limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS // 4)
            client = httpx.AsyncClient(timeout=self.spec.timeout_s, limits=limits, verify=_tls())
            self._pool = _Pool(client, loop)
        return self._pool.client

    async def _send(self, call: _Call) -> httpx.Response:
        """The provider request; the key travels in its auth header only (headers are per request, not the pool's,
        so image downloads never carry it)."""
        headers = self.auth_headers(self._key.get_secret_value())
        files = {k: (None, v) for k, v in call.form.items()} if call.form is not None else None
        return await self._client().post(self.base_url + call.path, json=call.json, files=files, headers=headers)

    def _raise_for_status(self, response: httpx.Response) -> None:
        code = response.status_code
        if code == 429:
            wait = parse_retry_after(self.retry_after_hint(response))
            self.blocked_until = time.monotonic() + wait
            raise RemoteRateLimited(self._redact(f"{self.version} is rate limited (HTTP 429, retry after {wait:g}s): "
                                                 f"{_error_text(response)}"), retry_after_s=wait)
        if code >= 500:
            raise _Retryable(self._redact(f"HTTP {code}: {_error_text(response)}"))
        if code >= 400 and model_gone(code, _json_or_none(response)):
            self.unavailable = self._redact(f"HTTP {code}: {_error_text(response)}")
            log.error("%s: the provider no longer serves this model (%s); the tier is unavailable until a redeploy, "
                      "its fallbacks serve", self.version, self.unavailable)
            raise RemoteModelRetired(f"{self.version}: the provider no longer serves this model ({self.unavailable})")
        if code >= 400:
            raise RemoteRejected(self._redact(f"{self.version} refused the request (HTTP {code}): "
                                              f"{_error_text(response)}"))

    def _json(self, response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            raise RemoteBadResponse(f"{self.version} answered HTTP {response.status_code} with a body that is not "
                                    f"JSON") from None
        if not isinstance(body, dict):
            raise RemoteBadResponse(f"{self.version} answered JSON that is not an object")
        return body

    async def _decode(self, img: _Image) -> np.ndarray:
        if img.b64 is not None or not isinstance(img.url, str) or not img.url:
            return await asyncio.to_thread(lambda: decode_image(_b64(img.b64), self.native_size))  # PIL, off the loop
        try:
            response = await self._client().get(img.url, follow_redirects=True)  # a signed URL: no key sent
        except httpx.TimeoutException:
            raise
        except (httpx.RequestError, httpx.InvalidURL) as e:
            # Not retried: the provider has rendered (and billed) the image; a new call would bill it again.
            raise RemoteBadResponse(f"{self.version}: its image URL failed ({type(e).__name__})") from None
        if response.status_code != 200:
            raise RemoteBadResponse(f"{self.version}: its image URL answered HTTP {response.status_code}")
        return await asyncio.to_thread(decode_image, response.content, self.native_size)

    def _raise_if_blocked(self) -> None:
        if self.unavailable is not None:
            raise RemoteModelRetired(f"{self.version} is unavailable ({self.unavailable}); not calling it")
        left = self.blocked_until - time.monotonic()
        if left > 0:
            raise RemoteRateLimited(f"{self.version} is rate limited for another {left:.1f}s (the provider's "
                                    f"Retry-After); not calling it", retry_after_s=left)

    def _redact(self, text: str) -> str:
        key = self._key.get_secret_value()
        return text.replace(key, "[redacted]") if key else text


@functools.cache
def _tls() -> ssl.SSLContext:
    """One certificate store per process: loading it costs ~50 ms, which a client per event loop would pay again."""
    return httpx.create_ssl_context()


def _read_key(env: str) -> str:
    value = os.environ.get(env, "").strip()
    if not value:
        raise MissingApiKey(f"environment variable {env} (the spec's `api_key_env`) is not set or empty: set it in "
                            f"the environment of the Ray nodes that run this tier")
    return value


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_text(response: httpx.Response, limit: int = 300) -> str:
    """The provider's error message (error.message / detail / message / error), else the start of the body."""
    body = _json_or_none(response)
    if body is None:
        return response.text[:limit] or "(empty body)"
    message = (_dig(body, "error", "message") or _dig(body, "detail") or _dig(body, "message")
               or (_dig(body, "error") if isinstance(_dig(body, "error"), str) else None))
    return str(message if message else body)[:limit]


# -- Providers. ----------------------------------------------------------------------------------------------------

class OpenAIEngine(RemoteEngine):
    """POST {base}/v1/images/generations, Bearer key; GPT Image: JSON {model, prompt, n, size, quality, output_format}
    -> data[].b64_json + usage (tokens). No seed: OpenAI has none. Another OpenAI-compatible server (e.g. another
    Prism) gets response_format b64_json, and the seed with send_seed."""

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def request(self, prompt: str, seed: int, n: int) -> _Call:
        spec = self.spec
        body: dict[str, Any] = {"model": spec.provider_model, "prompt": prompt, "n": n,
                                "size": self.facts.sizes[self.native_size]}
        if spec.quality is not None:
            body["quality"] = spec.quality
        if self.facts.documented:  # GPT Image answers base64 always and takes no response_format
            body["output_format"] = spec.output_format or "png"
        else:
            body["response_format"] = "b64_json"
        if self.send_seed:
            body["seed"] = seed
        # base_url is the server's root; a root given OpenAI-SDK style, ending in /v1, works too.
        return _Call(path=("" if self.base_url.endswith("/v1") else "/v1") + "/images/generations", json=body)

    def images(self, body: dict, n: int) -> list[_Image]:
        data = body.get("data")
        if not isinstance(data, list):
            raise RemoteBadResponse(f"{self.version}: the answer has no `data` list")
        return [_Image(b64=_dig(d, "b64_json"), url=_dig(d, "url")) for d in data]

    def usage(self, body: dict) -> TokenUsage | None:
        return openai_usage(body)


class IdeogramEngine(RemoteEngine):
    """POST {base}/v2/image/generate/{model}, Api-Key header, multipart form {prompt, size, num_images, quality,
    magic_prompt, seed} -> {generation_id, seed, data: [{url, resolution, is_image_safe, seed, prompt}]}; each image
    is a link to download (it expires)."""

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Api-Key": key}

    def request(self, prompt: str, seed: int, n: int) -> _Call:
        spec = self.spec
        form = {"prompt": prompt, "size": self.facts.sizes[self.native_size], "num_images": str(n)}
        options = {"seed": str(seed % SEED_MODULUS) if self.send_seed else None, "quality": spec.quality,
                   "magic_prompt": spec.magic_prompt}
        form.update({k: v for k, v in options.items() if v is not None})
        return _Call(path=f"/v2/image/generate/{spec.provider_model}", form=form)

    def images(self, body: dict, n: int) -> list[_Image]:
        data = body.get("data")
        if not isinstance(data, list):
            raise RemoteBadResponse(f"{self.version}: the answer has no `data` list")
        if any(_dig(d, "is_image_safe") is False for d in data):
            raise RemoteRejected(f"{self.version} refused: the provider marked an image unsafe and withheld it")
        urls = [_dig(d, "url") for d in data]
        if not all(isinstance(u, str) and u for u in urls):
            raise RemoteBadResponse(f"{self.version}: an image in the answer has no `url`")
        return [_Image(url=u) for u in urls]


class GoogleEngine(RemoteEngine):
    """Gemini API, x-goog-api-key header: POST {base}/v1beta/models/{model}:generateContent {contents,
    generationConfig: {responseModalities: [IMAGE], imageConfig: {aspectRatio, imageSize}, seed}} ->
    candidates[0].content.parts[].inlineData.data + usageMetadata."""

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-goog-api-key": key}

    def request(self, prompt: str, seed: int, n: int) -> _Call:
        image_size = self.facts.sizes[self.native_size]
        image_config = {"aspectRatio": "1:1", **({"imageSize": image_size} if image_size else {})}
        config: dict[str, Any] = {"responseModalities": ["IMAGE"], "imageConfig": image_config}
        if self.send_seed:
            config["seed"] = seed % SEED_MODULUS
        return _Call(path=f"/v1beta/models/{self.spec.provider_model}:generateContent",
                     json={"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": config})

    def images(self, body: dict, n: int) -> list[_Image]:
        blocked = _dig(body, "promptFeedback", "blockReason")
        if blocked:
            raise RemoteRejected(f"{self.version} refused the prompt ({blocked})")
        candidate = _dig(body, "candidates", 0)
        if not isinstance(candidate, dict):
            raise RemoteBadResponse(f"{self.version}: the answer has no candidates")
        parts = _dig(candidate, "content", "parts") or []
        found = [_Image(b64=_dig(p, "inlineData", "data")) for p in parts if _dig(p, "inlineData") is not None]
        finish = candidate.get("finishReason")
        if not found and finish not in (None, "STOP"):
            raise RemoteRejected(f"{self.version} refused: finished with {finish} and no image")
        return found[:1]

    def usage(self, body: dict) -> TokenUsage | None:
        return gemini_usage(body)

    def retry_after_hint(self, response: httpx.Response) -> str | None:
        """Google states the wait in the error body (google.rpc.RetryInfo retryDelay, e.g. "27s") more often than
        in a Retry-After header; either is honoured."""
        header = response.headers.get("retry-after")
        if header:
            return header
        details = _dig(_json_or_none(response), "error", "details") or []
        delays = [_dig(d, "retryDelay") for d in details if str(_dig(d, "@type") or "").endswith("RetryInfo")]
        delay = next((d for d in delays if isinstance(d, str) and d.endswith("s")), None)
        return delay[:-1] if delay else None


ENGINES: dict[str, type[RemoteEngine]] = {"openai": OpenAIEngine, "ideogram": IdeogramEngine, "google": GoogleEngine}


def build_remote_engine(spec: ModelSpec) -> RemoteEngine:
    """The engine for a hosted kind; raises MissingApiKey when its key variable is unset."""
    return ENGINES[spec.kind](spec)

"""Stand-ins for the hosted image APIs as they stand on 2026-12-03: OpenAI's Images API with the GPT Image models,
Ideogram's v2 generate API (Ideogram 4.5), and the Gemini API's image models (`:generateContent`). For tests only:
they run on 127.0.0.1 and never reach a provider.

Each checks a request strictly, the way its provider documents it (auth header, path, every field name and allowed
value) and answers a wrong one the way the provider does (400/401/404/422 in the provider's error shape), so a
malformed request fails the test that sent it; a right one gets real images of the size and format asked (a seeded
colour gradient) and, where the provider reports it, the token usage. A model the provider has shut down (per
graph/lifecycle.py) or does not know gets the provider's "model not found" answer. Every request is kept, downloads
included, in `app.state.standin.requests`, for assertions.

Faults by a token in the prompt:
  [standin:429]             429 (Retry-After header; Google: RetryInfo.retryDelay in the body, as Google sends it)
  [standin:500]             500 on every call            [standin:500-once]  500 on the prompt's first call only
  [standin:slow]            no answer until the client gives up (or `slow_s`)
  [standin:malformed-json]  200 with a body that is not JSON
  [standin:missing-data]    200 JSON without the images' field
  [standin:bad-b64]         200 with an image field that is not base64 (Ideogram: the image link answers 404)
  [standin:bad-image]       200 with valid base64 (Ideogram: a link) of bytes that are not an image
  [standin:refused]         the provider's content-policy answer (OpenAI 400, Ideogram 422, Google: prompt blocked)
  [standin:unsafe]          Ideogram only: 200 with is_image_safe false and no link
  [standin:echo-key]        401 whose message repeats the key it was sent (tests that clients redact it)
  [standin:retired]         the provider's answer for a model it no longer serves, whatever model was asked
  [standin:no-usage]        OpenAI, Google: 200 without the token usage
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from engines.generators import placeholder_image
from graph.lifecycle import lifecycle, today

FAULT = re.compile(r"\[standin:([a-z0-9-]+)\]")
NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n this is not an image"


@dataclass
class Received:
    """One request a stand-in received: what the tests assert on."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict  # the JSON body, or the multipart form's fields (strings)

    @property
    def prompt(self) -> str:
        if "prompt" in self.body:
            return str(self.body["prompt"])
        contents = self.body.get("contents")
        parts = (contents[0].get("parts") if isinstance(contents, list) and contents else None) or [{}]
        return str(parts[0].get("text", ""))


@dataclass
class Standin:
    """A stand-in's state: the key it accepts, what it received, the images it serves by link."""

    key: str
    retry_after_s: int = 7
    slow_s: float = 30.0
    requests: list[Received] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)  # API calls per prompt (500-once)
    files: dict[str, bytes] = field(default_factory=dict)

    def calls_for(self, text: str) -> list[Received]:
        """The API calls (not downloads) whose prompt contains text."""
        return [r for r in self.requests if r.method == "POST" and text in r.prompt]

    def downloads(self) -> list[Received]:
        return [r for r in self.requests if r.method == "GET"]

    def reset(self) -> None:
        self.requests.clear()
        self.calls.clear()
        self.files.clear()


@functools.lru_cache(maxsize=64)
def png(prompt: str, seed: int, width: int, height: int, fmt: str = "PNG") -> bytes:
    """A real image of the size and format asked (PNG, JPEG, WEBP): the placeholder gradient for (prompt, seed),
    drawn small and scaled up (a 1024-pixel render costs milliseconds, not the tenths of a second a full-size
    gradient takes to encode)."""
    img = Image.fromarray(placeholder_image(prompt, seed, 64)).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return buf.getvalue()


def retired(kind: str, model: str) -> bool:
    """Has the provider shut this model down (graph/lifecycle.py's catalogue, today)?"""
    return lifecycle(kind, model, today()).status == "retired"


def fault_of(prompt: str) -> str | None:
    m = FAULT.search(prompt or "")
    return m.group(1) if m else None


async def _record(st: Standin, request: Request, body: dict) -> Received:
    received = Received(request.method, request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
    st.requests.append(received)
    return received


async def _hang(request: Request, seconds: float) -> None:
    """Hold the request until the client disconnects (it timed out) or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not await request.is_disconnected():
        await asyncio.sleep(0.05)


def _serve_file(st: Standin, request: Request, data: bytes, route: str) -> str:
    name = uuid.uuid4().hex
    st.files[name] = data
    return f"{str(request.base_url).rstrip('/')}/{route}/{name}.png?exp={int(time.time()) + 3600}&sig=standin"


async def _json_body(request: Request) -> dict | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _add_download_route(app: FastAPI, st: Standin, route: str) -> None:
    @app.get(f"/{route}/{{name}}.png")
    async def download(name: str, request: Request) -> Response:
        await _record(st, request, {})
        data = st.files.get(name)
        if data is None:
            return Response("link expired", status_code=404)
        return Response(data, media_type="image/png")


def _standin_app(key: str, download_route: str | None = None) -> tuple[FastAPI, Standin]:
    """A stand-in's app and state (on app.state.standin), with its image-link route when its provider has one."""
    app, st = FastAPI(), Standin(key=key)
    app.state.standin = st
    if download_route:
        _add_download_route(app, st, download_route)
    return app, st


async def _accept_call(st: Standin, request: Request, prompt: str, error,
                       rate_limited=None) -> tuple[str | None, Response | None]:
    """An authorised, well-formed call: count it, then (fault, the fault's answer or None to answer normally)."""
    fault = fault_of(prompt)
    st.calls[prompt] += 1
    if fault == "429" and rate_limited is not None:
        return fault, rate_limited(st)
    return fault, await _common_fault(st, request, fault, prompt, error)


async def _common_fault(st: Standin, request: Request, fault: str | None, prompt: str, error) -> Response | None:
    """The faults every stand-in answers alike, in its provider's error shape: error(status, message) -> body."""
    if fault == "429":
        return JSONResponse(error(429, "Rate limit reached for requests"), 429,
                            headers={"Retry-After": str(st.retry_after_s)})
    if fault == "500" or (fault == "500-once" and st.calls[prompt] == 1):
        return JSONResponse(error(500, "The server had an error while processing your request."), 500)
    if fault == "slow":
        await _hang(request, st.slow_s)
        return JSONResponse(error(504, "deadline exceeded"), 504)
    if fault == "malformed-json":
        return Response("<html><body>502 upstream hiccup</body></html>", 200, media_type="application/json")
    if fault == "echo-key":
        return JSONResponse(error(401, f"Incorrect API key provided: {st.key}. You can find your key in your "
                                       f"account settings."), 401)
    return None


# -- OpenAI Images API, GPT Image models --------------------------------------------------------------------------
# openai-python src/openai/types/image_generate_params.py and images_response.py; developers.openai.com image guide.

OPENAI_FIELDS = {"model", "prompt", "n", "size", "quality", "response_format", "style", "user", "background",
                 "moderation", "output_format", "output_compression", "stream", "partial_images"}
GPT_IMAGE_MODELS = {"gpt-image-2", "gpt-image-2-2026-04-21", "gpt-image-2.5-flare", "gpt-image-2.5-sunburst",
                    "gpt-image-2.6-flare", "gpt-image-2.6-sunburst"}
GPT_IMAGE_CHOICES = {"size": ("1024x1024", "1536x1024", "1024x1536", "auto"),
                     "quality": ("low", "medium", "high", "auto"), "output_format": ("png", "jpeg", "webp"),
                     "background": ("transparent", "opaque", "auto"), "moderation": ("low", "auto")}
# Output image tokens at 1024x1024 (gpt-image-2's figures in OpenAI's image generation guide: $0.006/$0.053/$0.211
# at $30 per 1M tokens); `auto` renders as high.
GPT_IMAGE_TOKENS = {"low": 196, "medium": 1756, "high": 7024}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _openai_error(status: int, message: str, code: str | None = None) -> dict:
    kind = {429: "requests", 500: "server_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _openai_gone(model: str) -> JSONResponse:
    return JSONResponse(_openai_error(404, f"The model `{model}` has been deprecated. Learn more: "
                                           f"https://developers.openai.com/api/docs/deprecations", "model_not_found"),
                        404)


def _openai_problems(body: dict) -> Iterator[str]:
    """What OpenAI would answer 400 to for a GPT Image model, first problem first."""
    unknown = sorted(set(body) - OPENAI_FIELDS)
    if unknown:
        yield f"Unrecognized request argument supplied: {', '.join(unknown)}"
    for name in ("response_format", "style"):
        if name in body:
            yield f"Unknown parameter: '{name}'. It is not supported for {body['model']}."
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        yield "You must provide a prompt."
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        yield f"Invalid 'n': must be an integer between 1 and 10, got {n!r}."
    for name, allowed in GPT_IMAGE_CHOICES.items():
        if name in body and body[name] not in allowed:
            yield f"Invalid value for '{name}': {body[name]!r}. Supported values are: {list(allowed)}."
    if "output_compression" in body and body.get("output_format", "png") == "png":
        yield "output_compression is only supported for the jpeg and webp output formats."


def _openai_item(body: dict, fault: str | None, k: int) -> dict:
    size = body.get("size", "1024x1024")
    w, h = (1024, 1024) if size == "auto" else map(int, size.split("x"))
    fmt = PIL_FORMATS[body.get("output_format", "png")]
    data = NOT_AN_IMAGE if fault == "bad-image" else png(body["prompt"], k, w, h, fmt)
    return {"b64_json": "this is %% not base64" if fault == "bad-b64" else base64.b64encode(data).decode()}


def _openai_answer(body: dict, fault: str | None) -> dict:
    n, quality = body.get("n", 1), body.get("quality", "auto")
    resolved = "high" if quality == "auto" else quality
    answer = {"created": int(time.time()), "background": "opaque", "output_format": body.get("output_format", "png"),
              "quality": resolved, "size": body.get("size", "1024x1024"),
              "data": [_openai_item(body, fault, k) for k in range(n)]}
    if fault == "missing-data":
        del answer["data"]
    text = len(body["prompt"].split())
    image = GPT_IMAGE_TOKENS[resolved] * n
    if fault != "no-usage":
        answer["usage"] = {"input_tokens": text, "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
                           "output_tokens": image, "output_tokens_details": {"image_tokens": image, "text_tokens": 0},
                           "total_tokens": text + image}
    return answer


def openai_standin(key: str) -> FastAPI:
    """POST /v1/images/generations as OpenAI documents it for the GPT Image models (Bearer auth, JSON body, base64
    images and token usage in the answer)."""
    app, st = _standin_app(key)

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        body = await _json_body(request) or {}
        await _record(st, request, body)
        if request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse(_openai_error(401, "Incorrect API key provided.", "invalid_api_key"), 401)
        model = body.get("model", "dall-e-2")  # OpenAI's default when none is named
        if fault_of(str(body.get("prompt", ""))) == "retired" or retired("openai", model):
            return _openai_gone(model)
        if model not in GPT_IMAGE_MODELS:
            return JSONResponse(_openai_error(404, f"The model `{model}` does not exist or you do not have access "
                                                   f"to it.", "model_not_found"), 404)
        problem = next(_openai_problems(body), None)
        if problem:
            return JSONResponse(_openai_error(400, problem), 400)
        fault, answer = await _accept_call(st, request, body["prompt"], _openai_error)
        if answer is not None:
            return answer
        if fault == "refused":
            return JSONResponse(_openai_error(400, "Your request was rejected by the safety system.",
                                              "moderation_blocked"), 400)
        return JSONResponse(_openai_answer(body, fault))

    return app


# -- Ideogram API v2: POST /v2/image/generate/ideogram-4-5 ---------------------------------------------------------
# developer.ideogram.ai/api-reference/images/generate/ideogram-4-5

IDEOGRAM_MODELS = {"ideogram-4-5"}
IDEOGRAM_FIELDS = {"prompt", "magic_prompt", "images", "mask", "size", "quality", "seed", "num_images",
                   "enable_copyright_detection", "async", "webhook_url"}
IDEOGRAM_SIZES = ("1024x1024", "2048x2048", "1440x2880", "2880x1440", "1152x864", "864x1152")  # part of the presets
IDEOGRAM_CHOICES = {"magic_prompt": ("auto", "on", "off"), "quality": ("low", "medium", "high"),
                    "size": (*IDEOGRAM_SIZES, "auto")}


def _ideogram_error(status: int, message: str) -> dict:
    return {"error": message}


def _form(request: Request, raw: bytes) -> dict[str, str] | None:
    """multipart/form-data fields (stdlib parser: the stand-in needs no python-multipart); None if not multipart."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return None
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True).decode()
            for part in msg.iter_parts()}


def _int_in(value: str | None, low: int, high: int) -> bool:
    return value is None or (value.isdigit() and low <= int(value) <= high)


def _ideogram_problems(form: dict[str, str]) -> Iterator[str]:
    """What Ideogram would answer 400 to, first problem first."""
    unknown = sorted(set(form) - IDEOGRAM_FIELDS)
    if unknown:
        yield f"unknown fields {unknown}"
    if not form.get("prompt") or len(form["prompt"]) > 10000:
        yield "prompt is required (1-10000 characters)"
    if not _int_in(form.get("seed"), 0, 2147483647):
        yield f"seed must be an integer in [0, 2147483647], got {form.get('seed')!r}"
    if not _int_in(form.get("num_images"), 1, 8):
        yield f"num_images must be an integer in [1, 8], got {form.get('num_images')!r}"
    if form.get("quality") == "very_low":
        yield "quality very_low requires source images"
    if form.get("size") == "source":
        yield "size 'source' requires source images"
    if form.get("async", "false") != "false":
        yield "this stand-in answers synchronously only"
    for name, allowed in IDEOGRAM_CHOICES.items():
        if name in form and form[name] not in allowed:
            yield f"{name} must be one of {list(allowed)}, got {form[name]!r}"


def _ideogram_item(st: Standin, request: Request, form: dict, fault: str | None, k: int) -> dict:
    seed = int(form.get("seed", 1234)) + k
    w, h = map(int, form.get("size", "1024x1024").replace("auto", "2048x2048").split("x"))
    data = NOT_AN_IMAGE if fault == "bad-image" else png(form["prompt"], seed, w, h)
    url = _serve_file(st, request, data, "ephemeral")
    if fault == "bad-b64":
        url = f"{str(request.base_url).rstrip('/')}/ephemeral/expired.png"
    return {"prompt": form["prompt"], "resolution": f"{w}x{h}", "is_image_safe": fault != "unsafe", "seed": seed,
            "url": "" if fault == "unsafe" else url}


def _ideogram_rate_limited(st: Standin) -> JSONResponse:
    return JSONResponse({"error": "Too many requests in flight.", "reject_reason": "inflight_limit",
                         "max_inflight_requests": 10}, 429, headers={"Retry-After": str(st.retry_after_s)})


def ideogram_standin(key: str) -> FastAPI:
    """POST /v2/image/generate/{model} as Ideogram documents it (Api-Key header, multipart form, image links)."""
    app, st = _standin_app(key, "ephemeral")

    @app.post("/v2/image/generate/{model}")
    async def generate(model: str, request: Request) -> Response:
        form = _form(request, await request.body())
        await _record(st, request, form or {})
        if request.headers.get("api-key") != key:
            return JSONResponse(_ideogram_error(401, "Unauthorized: invalid Api-Key"), 401)
        if model not in IDEOGRAM_MODELS or fault_of((form or {}).get("prompt", "")) == "retired":
            return JSONResponse({"detail": "Not Found"}, 404)
        if form is None:
            return JSONResponse(_ideogram_error(400, "the request body must be multipart/form-data"), 400)
        problem = next(_ideogram_problems(form), None)
        if problem:
            return JSONResponse(_ideogram_error(400, problem), 400)
        fault, answer = await _accept_call(st, request, form["prompt"], _ideogram_error,
                                           rate_limited=_ideogram_rate_limited)
        if answer is not None:
            return answer
        if fault == "refused":
            return JSONResponse(_ideogram_error(422, "The prompt did not pass safety checks."), 422)
        seed = int(form.get("seed", 1234))
        body = {"generation_id": uuid.uuid4().hex, "seed": seed}
        if fault != "missing-data":
            body["data"] = [_ideogram_item(st, request, form, fault, k) for k in range(int(form.get("num_images", 1)))]
        return JSONResponse(body)

    return app


# -- Google Gemini API: image models through :generateContent -------------------------------------------------------
# ai.google.dev/gemini-api/docs/image-generation

GEMINI_IMAGE_MODELS = {"gemini-3.1-flash-image": ("1K", "2K", "4K"), "gemini-3-pro-image": ("1K", "2K", "4K"),
                       "gemini-3.1-flash-lite-image": ("1K",)}
GEMINI_FIELDS = {"contents", "generationConfig", "safetySettings", "systemInstruction", "tools", "toolConfig",
                 "cachedContent"}
GENERATION_FIELDS = {"responseModalities", "imageConfig", "seed", "temperature", "topP", "topK", "candidateCount",
                     "maxOutputTokens", "stopSequences", "thinkingConfig", "responseMimeType"}
GEMINI_ASPECTS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGE_SIZES = {"1K": 1024, "2K": 2048, "4K": 4096}
# Image output tokens per image (Google's image-generation page): 1K 1120 on every model; 2K 1120 on Pro, 1680 on
# 3.1 Flash; 4K 2000 on Pro, 2520 on 3.1 Flash.
GEMINI_IMAGE_TOKENS = {("gemini-3-pro-image", "2K"): 1120, ("gemini-3-pro-image", "4K"): 2000,
                       ("gemini-3.1-flash-image", "2K"): 1680, ("gemini-3.1-flash-image", "4K"): 2520}


def _google_error(status: int, message: str, details: list | None = None) -> dict:
    names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
             500: "INTERNAL", 504: "DEADLINE_EXCEEDED"}
    error = {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}
    return {"error": {**error, "details": details}} if details else {"error": error}


def _unknown_name(body: dict, allowed: set[str], where: str) -> str | None:
    extra = sorted(set(body) - allowed)
    return f'Invalid JSON payload received. Unknown name "{extra[0]}" at \'{where}\': Cannot find field.' if extra \
        else None


def _gemini_problems(model: str, body: dict) -> Iterator[str]:
    config = body.get("generationConfig") or {}
    image_config = config.get("imageConfig") or {}
    unknown = (_unknown_name(body, GEMINI_FIELDS, "request"),
               _unknown_name(config, GENERATION_FIELDS, "generation_config"),
               _unknown_name(image_config, {"aspectRatio", "imageSize"}, "image_config"))
    yield from (problem for problem in unknown if problem)
    contents = body.get("contents")
    parts = contents[0].get("parts") if isinstance(contents, list) and contents else None
    if not parts or not isinstance(parts[0].get("text"), str):
        yield "contents must hold a user turn with a text part"
    modalities = config.get("responseModalities", ["TEXT", "IMAGE"])
    if not set(modalities) <= {"TEXT", "IMAGE"}:
        yield f"responseModalities {modalities!r}: the values are TEXT and IMAGE"
    if config.get("candidateCount", 1) != 1:
        yield f"Multiple candidates is not enabled for models/{model}"
    if image_config.get("aspectRatio", "1:1") not in GEMINI_ASPECTS:
        yield f"imageConfig.aspectRatio must be one of {list(GEMINI_ASPECTS)}"
    if image_config.get("imageSize", "1K") not in GEMINI_IMAGE_MODELS[model]:
        yield f"imageConfig.imageSize {image_config['imageSize']!r} is not supported by {model}"
    if "seed" in config and (not isinstance(config["seed"], int) or not 0 <= config["seed"] < 2**31):
        yield "generationConfig.seed must be an int32"


def _b64_image(prompt: str, seed: int, side: int, fault: str | None) -> str:
    if fault == "bad-b64":
        return "this is %% not base64"
    return base64.b64encode(NOT_AN_IMAGE if fault == "bad-image" else png(prompt, seed, side, side)).decode()


def _gemini_answer(model: str, body: dict, fault: str | None) -> dict:
    prompt, config = body["contents"][0]["parts"][0]["text"], body.get("generationConfig") or {}
    if fault == "refused":
        return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "modelVersion": model}
    size = (config.get("imageConfig") or {}).get("imageSize", "1K")
    parts: list[dict] = [{"text": "Here is the image you asked for."}]
    if fault != "missing-data":
        data = _b64_image(prompt, int(config.get("seed", 0)), IMAGE_SIZES[size], fault)
        parts.append({"inlineData": {"mimeType": "image/png", "data": data}})
    answer = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
              "modelVersion": model}
    if fault != "no-usage":
        text, image = len(prompt.split()), GEMINI_IMAGE_TOKENS.get((model, size), 1120)
        answer["usageMetadata"] = {
            "promptTokenCount": text, "candidatesTokenCount": image + 10, "totalTokenCount": text + image + 10,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": text}],
            "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": image},
                                        {"modality": "TEXT", "tokenCount": 10}]}
    return answer


def _google_rate_limit(st: Standin) -> JSONResponse:
    retry = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{st.retry_after_s}s"}]
    return JSONResponse(_google_error(429, "Resource has been exhausted (e.g. check quota).", retry), 429)


def google_standin(key: str) -> FastAPI:
    """POST /v1beta/models/{model}:generateContent as the Gemini API documents it for its image models
    (x-goog-api-key header, JSON body, the image inline as base64, usageMetadata)."""
    app, st = _standin_app(key)

    @app.post("/v1beta/models/{target}")
    async def call(target: str, request: Request) -> Response:
        body = await _json_body(request) or {}
        await _record(st, request, body)
        if request.headers.get("x-goog-api-key") != key:
            return JSONResponse(_google_error(400, "API key not valid. Please pass a valid API key."), 400)
        model, _, method = target.partition(":")
        prompt = Received("POST", "", {}, body).prompt
        if method != "generateContent" or model not in GEMINI_IMAGE_MODELS or fault_of(prompt) == "retired":
            return JSONResponse(_google_error(404, f"models/{model} is not found for API version v1beta, or is not "
                                                   f"supported for {method}. Call ListModels to see the list of "
                                                   f"available models and their supported methods."), 404)
        problem = next(_gemini_problems(model, body), None)
        if problem:
            return JSONResponse(_google_error(400, problem), 400)
        fault, answer = await _accept_call(st, request, prompt, _google_error, rate_limited=_google_rate_limit)
        if answer is not None:
            return answer
        return JSONResponse(_gemini_answer(model, body, fault))

    return app


# -- Running one -----------------------------------------------------------------------------------------------------

@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run a stand-in with uvicorn on a free 127.0.0.1 port in a background thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"standin-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # a condition polled, as ray's wait_for_condition does
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"stand-in on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()

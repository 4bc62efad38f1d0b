"""Stand-ins for the hosted image APIs: OpenAI Images, Ideogram 3.0, Google's Gemini API (Imagen `:predict`, Gemini
`:generateContent`). For tests only: they run on 127.0.0.1 and never reach a provider.

Each checks a request the way its provider documents it (auth header, path, fields and allowed values) and answers
a wrong one the way the provider does (400/401/404/422 with the provider's error shape); a right one gets real PNGs
of the size asked (a seeded colour gradient). Every request is kept, downloads included, in
`app.state.standin.requests`, for assertions.

Faults by a token in the prompt:
  [standin:429]             429 (Retry-After header; Google: RetryInfo.retryDelay in the body, as Google sends it)
  [standin:500]             500 on every call            [standin:500-once]  500 on the prompt's first call only
  [standin:slow]            no answer until the client gives up (or `slow_s`)
  [standin:malformed-json]  200 with a body that is not JSON
  [standin:missing-data]    200 JSON without the images' field
  [standin:bad-b64]         200 with an image field that is not base64 (Ideogram: the image link answers 404)
  [standin:bad-image]       200 with valid base64 (Ideogram: a link) of bytes that are not an image
  [standin:refused]         the provider's content-policy answer (OpenAI 400, Ideogram 422, Google: images withheld)
  [standin:unsafe]          Ideogram only: 200 with is_image_safe false and no link
  [standin:echo-key]        401 whose message repeats the key it was sent (tests that clients redact it)
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
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from engines.generators import placeholder_image

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
        instances = self.body.get("instances") or [{}]
        if instances[0].get("prompt") is not None:
            return instances[0]["prompt"]
        parts = (self.body.get("contents") or [{}])[0].get("parts") or [{}]
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
def png(prompt: str, seed: int, width: int, height: int) -> bytes:
    """A real PNG of the size asked: the placeholder gradient for (prompt, seed), drawn small and scaled up (a
    1024-pixel render costs milliseconds, not the tenths of a second a full-size gradient takes to encode)."""
    img = Image.fromarray(placeholder_image(prompt, seed, 64)).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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


# -- OpenAI Images API -----------------------------------------------------------------------------------------------

OPENAI_FIELDS = {"model", "prompt", "n", "size", "quality", "style", "response_format", "user", "background",
                 "moderation", "output_format", "output_compression"}
OPENAI_MODELS = {
    "dall-e-2": {"sizes": ("256x256", "512x512", "1024x1024"), "max_n": 10, "qualities": ("standard",), "styles": (),
                 "formats": ("url", "b64_json")},
    "dall-e-3": {"sizes": ("1024x1024", "1792x1024", "1024x1792"), "max_n": 1, "qualities": ("standard", "hd"),
                 "styles": ("vivid", "natural"), "formats": ("url", "b64_json")},
    "gpt-image-1": {"sizes": ("1024x1024", "1536x1024", "1024x1536", "auto"), "max_n": 10,
                    "qualities": ("low", "medium", "high", "auto"), "styles": (), "formats": ()},
}


def _openai_error(status: int, message: str, code: str | None = None) -> dict:
    kind = {429: "requests", 500: "server_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _openai_problems(body: dict) -> Iterator[str]:
    """What OpenAI would answer 400 to, first problem first."""
    unknown = sorted(set(body) - OPENAI_FIELDS)
    if unknown:
        yield f"Unrecognized request argument supplied: {', '.join(unknown)}"
    model = body.get("model", "dall-e-2")
    facts = OPENAI_MODELS.get(model)
    if facts is None:
        yield f"The model `{model}` does not exist or you do not have access to it."
        return
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        yield "You must provide a prompt."
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= facts["max_n"]:
        yield f"Invalid 'n': {model} supports n between 1 and {facts['max_n']}, got {n!r}."
    for name, allowed in (("size", facts["sizes"]), ("quality", facts["qualities"]), ("style", facts["styles"]),
                          ("response_format", facts["formats"])):
        if name in body and body[name] not in allowed:
            yield f"Invalid value for '{name}': {body[name]!r}. Supported values for {model}: {list(allowed)}."


def _openai_item(st: Standin, request: Request, body: dict, fault: str | None, k: int) -> dict:
    model, size = body.get("model", "dall-e-2"), body.get("size", "1024x1024")
    w, h = (1024, 1024) if size == "auto" else map(int, size.split("x"))
    data = NOT_AN_IMAGE if fault == "bad-image" else png(body["prompt"], k, w, h)
    as_url = model != "gpt-image-1" and body.get("response_format", "url") == "url"
    item = {"url": _serve_file(st, request, data, "files")} if as_url else {"b64_json": base64.b64encode(data).decode()}
    if fault == "bad-b64":
        item = {"b64_json": "this is %% not base64"}
    if model == "dall-e-3":
        item["revised_prompt"] = body["prompt"]
    return item


def openai_standin(key: str) -> FastAPI:
    """POST /v1/images/generations as OpenAI documents it (Bearer auth, JSON body)."""
    app, st = _standin_app(key, "files")

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        body = await _json_body(request) or {}
        await _record(st, request, body)
        if request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse(_openai_error(401, "Incorrect API key provided.", "invalid_api_key"), 401)
        problem = next(_openai_problems(body), None)
        if problem:
            return JSONResponse(_openai_error(400, problem), 400)
        fault, answer = await _accept_call(st, request, body["prompt"], _openai_error)
        if answer is not None:
            return answer
        if fault == "refused":
            return JSONResponse(_openai_error(400, "Your request was rejected as a result of our safety system.",
                                              "content_policy_violation"), 400)
        if fault == "missing-data":
            return JSONResponse({"created": int(time.time())})
        return JSONResponse({"created": int(time.time()),
                             "data": [_openai_item(st, request, body, fault, k) for k in range(body.get("n", 1))]})

    return app


# -- Ideogram 3.0 ----------------------------------------------------------------------------------------------------

IDEOGRAM_RESOLUTIONS = ("1024x1024", "1152x864", "864x1152", "1280x768", "768x1280", "1344x768", "768x1344",
                        "1536x640", "640x1536", "1152x896", "896x1152")  # part of the documented list
IDEOGRAM_CHOICES = {"rendering_speed": ("TURBO", "DEFAULT", "QUALITY"), "magic_prompt": ("AUTO", "ON", "OFF"),
                    "style_type": ("AUTO", "GENERAL", "REALISTIC", "DESIGN", "FICTION"),
                    "resolution": IDEOGRAM_RESOLUTIONS,
                    "aspect_ratio": ("1x1", "1x3", "3x1", "1x2", "2x1", "9x16", "16x9", "10x16", "16x10", "2x3",
                                     "3x2", "3x4", "4x3", "4x5", "5x4")}
IDEOGRAM_FIELDS = {"prompt", "seed", "num_images", "negative_prompt", "color_palette", "style_codes",
                   *IDEOGRAM_CHOICES}


def _ideogram_error(status: int, message: str) -> dict:
    return {"detail": message}


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
    """What Ideogram would answer 422 to, first problem first."""
    unknown = sorted(set(form) - IDEOGRAM_FIELDS)
    if unknown:
        yield f"unknown fields {unknown}"
    if not form.get("prompt"):
        yield "field required: prompt"
    if not _int_in(form.get("seed"), 0, 2147483647):
        yield f"seed must be an integer in [0, 2147483647], got {form.get('seed')!r}"
    if not _int_in(form.get("num_images"), 1, 8):
        yield f"num_images must be an integer in [1, 8], got {form.get('num_images')!r}"
    if "resolution" in form and "aspect_ratio" in form:
        yield "resolution cannot be used in conjunction with aspect_ratio"
    for name, allowed in IDEOGRAM_CHOICES.items():
        if name in form and form[name] not in allowed:
            yield f"{name} must be one of {list(allowed)}, got {form[name]!r}"


def _ideogram_item(st: Standin, request: Request, form: dict, fault: str | None, k: int) -> dict:
    seed = int(form.get("seed", 1234)) + k
    w, h = map(int, form.get("resolution", "1024x1024").split("x"))
    data = NOT_AN_IMAGE if fault == "bad-image" else png(form["prompt"], seed, w, h)
    url = _serve_file(st, request, data, "ephemeral")
    if fault == "bad-b64":
        url = f"{str(request.base_url).rstrip('/')}/ephemeral/expired.png"
    item = {"prompt": form["prompt"], "resolution": f"{w}x{h}", "is_image_safe": fault != "unsafe", "seed": seed,
            "style_type": form.get("style_type", "GENERAL"), "url": url}
    if fault == "unsafe":
        item["url"] = None
    return item


def ideogram_standin(key: str) -> FastAPI:
    """POST /v1/ideogram-v3/generate as Ideogram documents it (Api-Key header, multipart form, image links)."""
    app, st = _standin_app(key, "ephemeral")

    @app.post("/v1/ideogram-v3/generate")
    async def generate(request: Request) -> Response:
        form = _form(request, await request.body())
        await _record(st, request, form or {})
        if request.headers.get("api-key") != key:
            return JSONResponse(_ideogram_error(401, "Unauthorized: invalid Api-Key"), 401)
        if form is None:
            return JSONResponse(_ideogram_error(422, "the request body must be multipart/form-data"), 422)
        problem = next(_ideogram_problems(form), None)
        if problem:
            return JSONResponse(_ideogram_error(422, problem), 422)
        fault, answer = await _accept_call(st, request, form["prompt"], _ideogram_error)
        if answer is not None:
            return answer
        if fault == "refused":
            return JSONResponse(_ideogram_error(422, "Prompt failed the safety check."), 422)
        created = datetime.now(UTC).isoformat()
        if fault == "missing-data":
            return JSONResponse({"created": created})
        n = int(form.get("num_images", "1"))
        return JSONResponse({"created": created, "data": [_ideogram_item(st, request, form, fault, k)
                                                          for k in range(n)]})

    return app


# -- Google Gemini API: Imagen :predict, Gemini :generateContent -----------------------------------------------------

IMAGEN_PARAMETERS = {"sampleCount", "aspectRatio", "personGeneration", "imageSize", "includeRaiReason",
                     "outputOptions", "guidanceScale", "safetySetting", "includeSafetyAttributes", "language"}
IMAGEN_ASPECTS = ("1:1", "3:4", "4:3", "9:16", "16:9")
GEMINI_ASPECTS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGE_SIZES = {"1K": 1024, "2K": 2048, "4K": 4096}


def _google_error(status: int, message: str, details: list | None = None) -> dict:
    names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
             500: "INTERNAL", 504: "DEADLINE_EXCEEDED"}
    error = {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}
    return {"error": {**error, "details": details}} if details else {"error": error}


def _imagen_problems(model: str, body: dict) -> Iterator[str]:
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        yield f'Invalid JSON payload received. Unknown name "{unknown[0]}"'
    instances = body.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0].get("prompt"), str):
        yield "instances must hold exactly one {prompt: string}"
    params = body.get("parameters") or {}
    if "seed" in params:
        yield "seed parameter is not supported in Gemini API."
    extra = sorted(set(params) - IMAGEN_PARAMETERS - {"seed"})
    if extra:
        yield f'Invalid JSON payload received. Unknown name "{extra[0]}" at \'parameters\''
    if not _int_in(str(params.get("sampleCount", 4)), 1, 4):
        yield f"sampleCount must be between 1 and 4, got {params.get('sampleCount')!r}"
    if params.get("aspectRatio", "1:1") not in IMAGEN_ASPECTS:
        yield f"aspectRatio must be one of {list(IMAGEN_ASPECTS)}"
    if "imageSize" in params and ("fast" in model or params["imageSize"] not in ("1K", "2K")):
        yield f"imageSize {params['imageSize']!r} is not supported by {model}"
    if params.get("personGeneration", "allow_adult") not in ("dont_allow", "allow_adult", "allow_all"):
        yield f"personGeneration {params['personGeneration']!r} is not supported"


def _gemini_problems(model: str, body: dict) -> Iterator[str]:
    contents = body.get("contents")
    parts = contents[0].get("parts") if isinstance(contents, list) and contents else None
    if not parts or not isinstance(parts[0].get("text"), str):
        yield "contents must hold a user turn with a text part"
    config = body.get("generationConfig") or {}
    modalities = config.get("responseModalities", ["TEXT", "IMAGE"])
    if not set(modalities) <= {"TEXT", "IMAGE"}:
        yield f"responseModalities {modalities!r}: the values are TEXT and IMAGE"
    image_config = config.get("imageConfig") or {}
    if image_config.get("aspectRatio", "1:1") not in GEMINI_ASPECTS:
        yield f"imageConfig.aspectRatio must be one of {list(GEMINI_ASPECTS)}"
    if "imageSize" in image_config and (not model.startswith("gemini-3") or image_config["imageSize"] not in
                                        IMAGE_SIZES):
        yield f"imageConfig.imageSize {image_config['imageSize']!r} is not supported by {model}"
    if "seed" in config and not isinstance(config["seed"], int):
        yield "generationConfig.seed must be an integer"


def _b64_image(prompt: str, seed: int, side: int, fault: str | None) -> str:
    if fault == "bad-b64":
        return "this is %% not base64"
    return base64.b64encode(NOT_AN_IMAGE if fault == "bad-image" else png(prompt, seed, side, side)).decode()


def _imagen_answer(model: str, body: dict, fault: str | None) -> dict:
    params, prompt = body.get("parameters") or {}, body["instances"][0]["prompt"]
    if fault == "refused":  # filtered images: a reason when asked for one, else nothing at all
        reason = "Your current safety filter threshold filtered out the generated images."
        return {"predictions": [{"raiFilteredReason": reason}]} if params.get("includeRaiReason") else {}
    if fault == "missing-data":
        return {"predictions": [{"mimeType": "image/png"}]}
    side = IMAGE_SIZES[params.get("imageSize", "1K")]
    return {"predictions": [{"mimeType": "image/png", "bytesBase64Encoded": _b64_image(prompt, k, side, fault)}
                            for k in range(int(params.get("sampleCount", 4)))]}


def _gemini_answer(model: str, body: dict, fault: str | None) -> dict:
    prompt, config = body["contents"][0]["parts"][0]["text"], body.get("generationConfig") or {}
    if fault == "refused":
        return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "modelVersion": model}
    parts: list[dict] = [{"text": "Here is the image you asked for."}]
    if fault != "missing-data":
        side = IMAGE_SIZES[(config.get("imageConfig") or {}).get("imageSize", "1K")]
        data = _b64_image(prompt, int(config.get("seed", 0)), side, fault)
        parts.append({"inlineData": {"mimeType": "image/png", "data": data}})
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "modelVersion": model}


def _google_rate_limit(st: Standin) -> JSONResponse:
    retry = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{st.retry_after_s}s"}]
    return JSONResponse(_google_error(429, "Resource has been exhausted (e.g. check quota).", retry), 429)


def google_standin(key: str) -> FastAPI:
    """POST /v1beta/models/{model}:predict (imagen-*) and :generateContent (gemini-*) as the Gemini API documents
    them (x-goog-api-key header, JSON bodies, base64 images inline)."""
    app, st = _standin_app(key)

    @app.post("/v1beta/models/{target}")
    async def call(target: str, request: Request) -> Response:
        body = await _json_body(request) or {}
        await _record(st, request, body)
        if request.headers.get("x-goog-api-key") != key:
            return JSONResponse(_google_error(400, "API key not valid. Please pass a valid API key."), 400)
        model, _, method = target.partition(":")
        if (method, model.split("-")[0]) not in (("predict", "imagen"), ("generateContent", "gemini")):
            return JSONResponse(_google_error(404, f"models/{model} is not found for API version v1beta, or is not "
                                                   f"supported for {method}."), 404)
        problems = _imagen_problems if method == "predict" else _gemini_problems
        problem = next(problems(model, body), None)
        if problem:
            return JSONResponse(_google_error(400, problem), 400)
        prompt = Received("POST", "", {}, body).prompt
        fault, answer = await _accept_call(st, request, prompt, _google_error, rate_limited=_google_rate_limit)
        if answer is not None:
            return answer
        return JSONResponse((_imagen_answer if method == "predict" else _gemini_answer)(model, body, fault))

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

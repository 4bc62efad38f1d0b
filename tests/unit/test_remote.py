"""Hosted generator kinds (openai GPT Image, ideogram 4.5, google Gemini image models) against local stand-ins of each
provider's current API: request shapes, decoding, token-priced cost, the failure mapping (429, 5xx, timeouts, bad
answers, refusals, a retired model), and a key that never leaks."""

import asyncio
import logging
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pytest
from pydantic import ValidationError

from engines.generators import ModelSpec, build_engine
from engines.health import HealthGate
from engines.remote import (
    DEFAULT_RETRY_AFTER_S,
    MissingApiKey,
    RemoteBadResponse,
    RemoteEngine,
    RemoteError,
    RemoteModelRetired,
    RemoteRateLimited,
    RemoteRejected,
    RemoteServerError,
    RemoteTimeout,
    Rendered,
    decode_image,
    engine_version,
    gemini_usage,
    model_gone,
    openai_usage,
    parse_retry_after,
    plan_calls,
)
from graph.cost import TokenPrices, TokenUsage, usage_cost
from graph.schemas import GenerateJob
from tests.standins.providers import Standin, google_standin, ideogram_standin, openai_standin, png, serving

KEY = "sk-standin-Q7vX2pLr9T4mZk81Wd3N"  # distinctive, so a leak anywhere is found by substring
ENV = "PRISM_TEST_REMOTE_KEY"
OPENAI_TOKENS = {"text_input": 5.0, "image_input": 8.0, "image_output": 30.0}

TIERS = {
    "gpt-image": dict(kind="openai", provider_model="gpt-image-2.6-sunburst", native_size=1024, quality="high",
                      cost={"usd_per_image": 0.211, "tokens": OPENAI_TOKENS}),
    "ideogram-4-5": dict(kind="ideogram", provider_model="ideogram-4-5", native_size=1024, quality="medium",
                         magic_prompt="off"),
    "nano-banana-2": dict(kind="google", provider_model="gemini-3.1-flash-image", native_size=1024),
    "nano-banana-2-lite": dict(kind="google", provider_model="gemini-3.1-flash-lite-image", native_size=1024),
    "nano-banana-pro": dict(kind="google", provider_model="gemini-3-pro-image", native_size=1024),
}
ONE_PER_KIND = ["gpt-image", "ideogram-4-5", "nano-banana-2"]


@dataclass
class Standins:
    urls: dict[str, str]
    states: dict[str, Standin]


@pytest.fixture(scope="module")
def standins():
    apps = {"openai": openai_standin(KEY), "ideogram": ideogram_standin(KEY), "google": google_standin(KEY)}
    with ExitStack() as stack:
        urls = {kind: stack.enter_context(serving(app)) for kind, app in apps.items()}
        yield Standins(urls, {kind: app.state.standin for kind, app in apps.items()})


@pytest.fixture(autouse=True)
def _key_and_fresh_standins(request, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    if "standins" in request.fixturenames:
        for st in request.getfixturevalue("standins").states.values():
            st.reset()


def make(standins: Standins, tier: str, **over) -> RemoteEngine:
    spec = dict(TIERS[tier], name=tier, api_key_env=ENV, timeout_s=5.0, max_retries=2, retry_backoff_s=0.01)
    spec["base_url"] = standins.urls[spec["kind"]]
    return build_engine(ModelSpec(**(spec | over)))


def _loop(engine: RemoteEngine, coro_fn):
    """Run a coroutine and close the engine's client on one event loop."""

    async def once():
        try:
            return await coro_fn()
        finally:
            await engine.aclose()

    return asyncio.run(once())


def run(engine: RemoteEngine, prompts: list[str], seeds: list[int] | None = None) -> list:
    return _loop(engine, lambda: engine.agenerate(prompts, seeds or list(range(len(prompts))), 4, 3.0))


def render(engine: RemoteEngine, prompts: list[str], seeds: list[int] | None = None) -> list:
    return _loop(engine, lambda: engine.arender(prompts, seeds or list(range(len(prompts)))))


def state(standins: Standins, tier: str) -> Standin:
    return standins.states[TIERS[tier]["kind"]]


# -- Success and request shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tier", list(TIERS))
def test_every_kind_renders_native_size_images(standins, tier):
    out = run(make(standins, tier), ["a lighthouse at dusk", "a lighthouse at dusk", "a red kite"], [1, 2, 3])
    assert [o.shape for o in out] == [(1024, 1024, 3)] * 3 and all(o.dtype == np.uint8 for o in out)
    assert out[0].std() > 5  # a real picture came back, not a blank


def test_gpt_image_packs_a_job_into_one_call_with_quality_and_output_format(standins):
    run(make(standins, "gpt-image"), ["a red fox", "a red fox"], [5, 6])
    (call,) = state(standins, "gpt-image").calls_for("a red fox")
    assert call.path == "/v1/images/generations" and call.headers["authorization"] == f"Bearer {KEY}"
    # No response_format, style or seed: GPT Image answers base64 always and takes none of them.
    assert call.body == {"model": "gpt-image-2.6-sunburst", "prompt": "a red fox", "n": 2, "size": "1024x1024",
                         "quality": "high", "output_format": "png"}


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_gpt_image_other_output_formats_decode(standins, fmt):
    (img,) = run(make(standins, "gpt-image", output_format=fmt), [f"a {fmt} teapot"])
    assert img.shape == (1024, 1024, 3)
    assert state(standins, "gpt-image").calls_for(f"a {fmt} teapot")[0].body["output_format"] == fmt


def test_gpt_image_charges_what_the_usage_says(standins):
    out = render(make(standins, "gpt-image"), ["a glass bird", "a glass bird"])
    # The stand-in reports 3 prompt tokens and 2 x 7024 image tokens (high, 1024x1024); each image carries half.
    whole = usage_cost(TokenUsage(text_input=3, image_output=2 * 7024), TokenPrices(**OPENAI_TOKENS))
    assert [r.usd for r in out] == [pytest.approx(whole / 2)] * 2


def test_an_answer_without_usage_leaves_the_list_price_to_the_ingress(standins):
    (r,) = render(make(standins, "gpt-image"), ["a quiet lake [standin:no-usage]"])
    assert isinstance(r, Rendered) and r.usd is None


def test_gemini_usage_is_charged_only_where_the_tier_has_token_rates(standins):
    (unpriced,) = render(make(standins, "nano-banana-2"), ["a paper lantern"])
    assert unpriced.usd is None  # list price: the tier states no token rates
    rates = {"usd_per_image": 0.0672, "tokens": {"text_input": 0.5, "image_output": 60.0, "text_output": 3.0}}
    (priced,) = render(make(standins, "nano-banana-2", cost=rates), ["a paper lantern"])
    # 3 prompt tokens, 1120 image tokens (1K) and 10 text tokens, as the stand-in reports them.
    assert priced.usd == pytest.approx((3 * 0.5 + 1120 * 60.0 + 10 * 3.0) / 1e6)


def test_openai_compatible_server_with_a_v1_root_and_a_seed():
    """Another OpenAI-compatible server (e.g. another Prism): base_url given SDK-style with /v1, seed sent, and the
    response_format it needs asked for."""
    spec = ModelSpec(kind="openai", name="up", provider_model="standard", base_url="http://prism.internal:8000/v1",
                     api_key_env=ENV, native_size=512, quality="hd", send_seed=True)
    engine = build_engine(spec)
    assert engine.version == "openai:standard@prism.internal:8000"
    call = engine.request("a bridge", 11, 1)
    assert call.path == "/images/generations"
    assert call.json == {"model": "standard", "prompt": "a bridge", "n": 1, "size": "512x512", "quality": "hd",
                         "response_format": "b64_json", "seed": 11}


def test_ideogram_request_is_a_v2_multipart_form_and_downloads_carry_no_key(standins):
    run(make(standins, "ideogram-4-5"), ["a neon sign", "a neon sign"], [2**32 - 1, 0])
    st = state(standins, "ideogram-4-5")
    (call,) = st.calls_for("a neon sign")
    assert call.path == "/v2/image/generate/ideogram-4-5" and call.headers["api-key"] == KEY
    assert call.headers["content-type"].startswith("multipart/form-data")
    assert call.body == {"prompt": "a neon sign", "size": "1024x1024", "num_images": "2",
                         "seed": str((2**32 - 1) % 2**31), "quality": "medium", "magic_prompt": "off"}
    downloads = st.downloads()
    assert len(downloads) == 2 and all(d.path.startswith("/ephemeral/") for d in downloads)
    assert not any(KEY in v for d in downloads for v in d.headers.values())


def test_gemini_request_asks_for_one_square_image_with_the_seed(standins):
    run(make(standins, "nano-banana-2"), ["a paper crane"], [7])
    (call,) = state(standins, "nano-banana-2").calls_for("a paper crane")
    assert call.path == "/v1beta/models/gemini-3.1-flash-image:generateContent"
    assert call.headers["x-goog-api-key"] == KEY and "authorization" not in call.headers
    assert call.body == {"contents": [{"role": "user", "parts": [{"text": "a paper crane"}]}],
                         "generationConfig": {"responseModalities": ["IMAGE"],
                                              "imageConfig": {"aspectRatio": "1:1", "imageSize": "1K"}, "seed": 7}}


REQUEST_SIZES = [
    pytest.param("gemini-3-pro-image", 2048, {"aspectRatio": "1:1", "imageSize": "2K"}, id="pro_2k"),
    pytest.param("gemini-3.1-flash-image", 2048, {"aspectRatio": "1:1", "imageSize": "2K"}, id="flash_2k"),
    pytest.param("gemini-3.1-flash-lite-image", 1024, {"aspectRatio": "1:1"}, id="lite_sends_no_size"),
]


@pytest.mark.parametrize(("model", "size", "image_config"), REQUEST_SIZES)
def test_gemini_image_size_by_model(model, size, image_config):
    spec = ModelSpec(kind="google", name="g", provider_model=model, api_key_env=ENV, native_size=size,
                     base_url="http://gemini.test")
    assert build_engine(spec).request("a harbour", 3, 1).json["generationConfig"]["imageConfig"] == image_config


GOOD = {"openai": {"model": "gpt-image-2", "prompt": "p", "n": 1, "size": "1024x1024", "quality": "low"},
        "ideogram": {"prompt": "p", "size": "1024x1024", "num_images": "1", "quality": "low"},
        "google": {"contents": [{"role": "user", "parts": [{"text": "p"}]}],
                   "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "1:1"}}}}
STRICT_CASES = [
    pytest.param("openai", "/v1/images/generations", {"style": "vivid"}, 400, id="openai_style"),
    pytest.param("openai", "/v1/images/generations", {"response_format": "b64_json"}, 400, id="openai_response_format"),
    pytest.param("openai", "/v1/images/generations", {"seed": 3}, 400, id="openai_seed"),
    pytest.param("openai", "/v1/images/generations", {"quality": "hd"}, 400, id="openai_quality"),
    pytest.param("openai", "/v1/images/generations", {"model": "dall-e-3"}, 404, id="openai_retired_model"),
    pytest.param("ideogram", "/v2/image/generate/ideogram-4-5", {"style_type": "DESIGN"}, 400, id="ideogram_v3_field"),
    pytest.param("ideogram", "/v2/image/generate/ideogram-4-5", {"magic_prompt": "OFF"}, 400, id="ideogram_magic"),
    pytest.param("ideogram", "/v1/ideogram-v3/generate", {}, 404, id="ideogram_v1_path"),
    pytest.param("google", "/v1beta/models/gemini-3.1-flash-image:generateContent",
                 {"generationConfig": {"sampleCount": 1}}, 400, id="google_imagen_parameter"),
    pytest.param("google", "/v1beta/models/gemini-3.1-flash-lite-image:generateContent",
                 {"generationConfig": {"imageConfig": {"imageSize": "2K"}}}, 400, id="google_lite_2k"),
    pytest.param("google", "/v1beta/models/imagen-4.0-fast-generate-001:predict", {}, 404, id="google_imagen"),
]


@pytest.mark.parametrize(("kind", "path", "change", "status"), STRICT_CASES)
def test_standins_refuse_a_malformed_request(standins, kind, path, change, status):
    """The stand-ins are strict: a request a provider would refuse fails the test that sent it."""
    import httpx

    body = GOOD[kind] | change
    headers = {"openai": {"Authorization": f"Bearer {KEY}"}, "ideogram": {"Api-Key": KEY},
               "google": {"x-goog-api-key": KEY}}[kind]
    form = {k: (None, str(v)) for k, v in body.items()} if kind == "ideogram" else None
    sent = httpx.post(standins.urls[kind] + path, headers=headers, files=form, json=None if form else body)
    assert sent.status_code == status, sent.text
    good = {k: (None, str(v)) for k, v in GOOD[kind].items()} if kind == "ideogram" else None
    path_ok = {"ideogram": "/v2/image/generate/ideogram-4-5",
               "google": "/v1beta/models/gemini-3.1-flash-image:generateContent"}.get(kind, path)
    control = httpx.post(standins.urls[kind] + path_ok, headers=headers, files=good, json=None if good else GOOD[kind])
    assert control.status_code == 200, control.text  # the same request without the change is accepted


def test_version_names_the_host_only_when_not_the_providers():
    assert engine_version("openai", "gpt-image-2", "https://api.openai.com") == "openai:gpt-image-2"
    other = engine_version("openai", "standard", "http://prism.internal:8000/v1")
    assert other == "openai:standard@prism.internal:8000"
    assert engine_version("openai", "x", "https://user:pw@gw.example/v1") == "openai:x@gw.example"  # no credentials


# -- Failures ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tier", ONE_PER_KIND)
def test_429_raises_rate_limited_and_blocks_until_retry_after(standins, tier):
    engine, st = make(standins, tier), state(standins, tier)
    with pytest.raises(RemoteRateLimited) as info:
        run(engine, ["a busy day [standin:429]"])
    assert info.value.reason == "rate_limited" and info.value.retry_after_s == st.retry_after_s
    assert len(st.calls_for("a busy day")) == 1  # a 429 is not retried
    sent = len(st.requests)
    t0 = time.monotonic()
    with pytest.raises(RemoteRateLimited) as again:
        run(engine, ["a quiet day"])
    assert len(st.requests) == sent and time.monotonic() - t0 < 0.5  # failed fast, no request reached it
    assert 0 < again.value.retry_after_s <= st.retry_after_s


@pytest.mark.parametrize("tier", ONE_PER_KIND)
def test_500_is_retried_max_retries_times_then_server_error(standins, tier):
    with pytest.raises(RemoteServerError) as info:
        run(make(standins, tier, max_retries=2), ["a broken day [standin:500]"])
    assert info.value.reason == "error" and "after 3 attempts" in str(info.value)
    assert len(state(standins, tier).calls_for("a broken day")) == 3


@pytest.mark.parametrize("tier", ONE_PER_KIND)
def test_500_once_recovers_on_the_retry(standins, tier):
    (img,) = run(make(standins, tier), ["a lucky day [standin:500-once]"])
    assert img.shape == (1024, 1024, 3) and len(state(standins, tier).calls_for("a lucky day")) == 2


@pytest.mark.parametrize("tier", ONE_PER_KIND)
def test_a_hang_times_out_within_timeout_s(standins, tier):
    t0 = time.monotonic()
    with pytest.raises(RemoteTimeout) as info:
        run(make(standins, tier, timeout_s=0.4, max_retries=2), ["a long day [standin:slow]"])
    assert info.value.reason == "deadline" and time.monotonic() - t0 < 1.5  # timeouts are not retried
    assert len(state(standins, tier).calls_for("a long day")) == 1


MALFORMED = ["malformed-json", "missing-data", "bad-b64", "bad-image"]


@pytest.mark.parametrize("fault", MALFORMED)
@pytest.mark.parametrize("tier", ONE_PER_KIND)
def test_malformed_answers_are_undecodable(standins, tier, fault):
    with pytest.raises(RemoteBadResponse) as info:
        run(make(standins, tier), [f"an odd day [standin:{fault}]"])
    assert info.value.reason == "undecodable"
    assert len(state(standins, tier).calls_for("an odd day")) == 1  # a bad answer is not retried (and re-billed)


@pytest.mark.parametrize("tier", ONE_PER_KIND)
def test_a_refusal_is_rejected_without_retry(standins, tier):
    with pytest.raises(RemoteRejected) as info:
        run(make(standins, tier), ["a forbidden thing [standin:refused]"])
    assert info.value.reason == "error" and "refused" in str(info.value)
    assert len(state(standins, tier).calls_for("a forbidden thing")) == 1


def test_ideogram_image_marked_unsafe_is_rejected(standins):
    with pytest.raises(RemoteRejected, match="unsafe"):
        run(make(standins, "ideogram-4-5"), ["a grey area [standin:unsafe]"])


def test_one_refused_prompt_does_not_fail_the_rest_of_the_batch(standins):
    ok, refused = run(make(standins, "nano-banana-2"), ["a calm sea", "a forbidden thing [standin:refused]"])
    assert ok.shape == (1024, 1024, 3) and isinstance(refused, RemoteRejected)


@pytest.mark.parametrize("tier", list(TIERS))
def test_a_retired_model_makes_the_tier_unavailable_without_calling_again(standins, tier):
    engine, st = make(standins, tier), state(standins, tier)
    with pytest.raises(RemoteModelRetired) as info:
        run(engine, ["a last picture [standin:retired]"])
    assert info.value.reason == "model_retired" and "no longer serves" in str(info.value)
    assert len(st.calls_for("a last picture")) == 1 and engine.unavailable is not None  # not retried
    sent = len(st.requests)
    with pytest.raises(RemoteModelRetired, match="unavailable"):
        run(engine, ["any later picture"])
    assert len(st.requests) == sent  # the tier fails fast: its fallbacks serve


def test_a_model_the_provider_does_not_serve_is_retired_at_run_time(standins):
    """A catalogue that missed a shut-down model: the provider's answer still takes the tier out (not 'error')."""
    engine = make(standins, "nano-banana-2", provider_model="gemini-2.5-flash-image")  # shut down 2026-10-02
    with pytest.raises(RemoteModelRetired):
        run(engine, ["a banana"])
    assert "NOT_FOUND" in engine.unavailable or "not found" in engine.unavailable


GONE_CASES = [
    pytest.param(404, {"error": {"message": "The model `dall-e-3` has been deprecated.", "code": "model_not_found"}},
                 True, id="openai_404"),
    pytest.param(400, {"error": {"message": "x", "type": "invalid_request_error", "code": "model_not_found"}}, True,
                 id="openai_400_code"),
    pytest.param(400, {"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}}, True,
                 id="google_status"),
    pytest.param(400, {"error": {"message": "The model `gpt-image-1` has been shut down."}}, True,
                 id="message_says_shut_down"),
    pytest.param(410, None, True, id="gone"),
    pytest.param(404, {"detail": "Not Found"}, True, id="ideogram_path"),
    pytest.param(400, {"error": {"message": "Your request was rejected by the safety system.",
                                 "code": "moderation_blocked"}}, False, id="moderation"),
    pytest.param(400, {"error": {"message": "API key not valid. Please pass a valid API key."}}, False,
                 id="bad_key"),
    pytest.param(400, {"error": "quality must be one of ['low', 'medium', 'high']"}, False, id="bad_option"),
    pytest.param(401, {"error": {"message": "The model does not exist"}}, False, id="unauthorized_is_not_gone"),
    pytest.param(422, {"error": "The prompt did not pass safety checks."}, False, id="ideogram_safety"),
]


@pytest.mark.parametrize(("status", "body", "gone"), GONE_CASES)
def test_model_gone_reads_each_providers_answer(status, body, gone):
    assert model_gone(status, body) is gone


def test_connection_refused_is_retried_then_server_error(caplog):
    spec = ModelSpec(kind="google", name="gone", provider_model="gemini-3.1-flash-image", native_size=1024,
                     api_key_env=ENV, base_url=f"http://127.0.0.1:{_closed_port()}", max_retries=2,
                     retry_backoff_s=0.01)
    with pytest.raises(RemoteServerError, match="connection failed.*after 3 attempts"):
        run(build_engine(spec), ["anything"])
    assert len([r for r in caplog.records if r.name == "prism.remote" and "retry" in r.getMessage()]) == 2


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Usage as each provider reports it ------------------------------------------------------------------------------

USAGE_CASES = [
    pytest.param(openai_usage, {"usage": {"input_tokens": 12, "output_tokens": 7030, "total_tokens": 7042,
                                          "input_tokens_details": {"text_tokens": 10, "image_tokens": 2},
                                          "output_tokens_details": {"image_tokens": 7024, "text_tokens": 6}}},
                 TokenUsage(text_input=10, image_input=2, text_output=6, image_output=7024), id="openai_details"),
    pytest.param(openai_usage, {"usage": {"input_tokens": 12, "output_tokens": 7024, "total_tokens": 7036}},
                 TokenUsage(text_input=12, image_output=7024), id="openai_totals_only"),
    pytest.param(openai_usage, {"usage": {"input_tokens": "12", "output_tokens": 7024}}, None,
                 id="openai_malformed"),
    pytest.param(openai_usage, {}, None, id="openai_absent"),
    pytest.param(gemini_usage, {"usageMetadata": {
        "promptTokenCount": 9, "candidatesTokenCount": 1130, "thoughtsTokenCount": 40,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1120},
                                    {"modality": "TEXT", "tokenCount": 10}]}},
        TokenUsage(text_input=9, text_output=50, image_output=1120), id="gemini"),
    pytest.param(gemini_usage, {"usageMetadata": {"promptTokenCount": 9}}, None, id="gemini_no_candidates"),
]


@pytest.mark.parametrize(("parse", "body", "usage"), USAGE_CASES)
def test_usage_as_reported(parse, body, usage):
    assert parse(body) == usage


# -- Keys ----------------------------------------------------------------------------------------------------------

LEAK_FAULTS = ["429", "500", "slow", "malformed-json", "bad-b64", "bad-image", "refused", "echo-key", "retired"]


def test_the_key_is_in_no_error_repr_or_log(standins, caplog):
    caplog.set_level(logging.DEBUG)  # root at DEBUG: httpx's and httpcore's loggers included
    errors, engines = [], []
    for tier in ONE_PER_KIND:
        for fault in LEAK_FAULTS:
            engine = make(standins, tier, timeout_s=0.3)
            engines.append(engine)
            with pytest.raises(RemoteError) as info:
                run(engine, [f"leak test [standin:{fault}]"])
            errors.append(info.value)
    echoed = [e for e in errors if "Incorrect API key" in str(e)]
    assert len(echoed) == len(ONE_PER_KIND) and all("[redacted]" in str(e) for e in echoed)
    for e in errors:
        texts = [str(e), repr(e), *map(str, e.args), "".join(traceback.format_exception(e))]
        assert not any(KEY in t for t in texts), e
    assert not any(KEY in repr(engine) or KEY in str(engine) or KEY in str(engine.unavailable) for engine in engines)
    assert any(r.name.startswith(("httpx", "httpcore")) for r in caplog.records)  # their DEBUG lines were captured
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in (record.exc_text or ""), record.name


def test_a_missing_key_variable_fails_init_naming_it(monkeypatch):
    spec = ModelSpec(kind="ideogram", name="t", provider_model="ideogram-4-5", native_size=1024, api_key_env=ENV,
                     base_url="http://ideogram.test")
    monkeypatch.delenv(ENV)
    with pytest.raises(MissingApiKey, match=ENV):
        build_engine(spec)
    monkeypatch.setenv(ENV, "  ")
    with pytest.raises(MissingApiKey, match=ENV):
        build_engine(spec)


# -- Spec validation -----------------------------------------------------------------------------------------------

PRICED = {"usd_per_image": 0.05, "checked": "2026-12-03", "source": "https://example.test/pricing"}

BAD_SPECS = [
    pytest.param(dict(kind="openai", provider_model="dall-e-3"),
                 r"shut down on 2026-05-12; use 'gpt-image-2.5-sunburst'", id="retired_dalle3"),
    pytest.param(dict(kind="google", provider_model="imagen-4.0-fast-generate-001"),
                 r"shut down on 2026-08-17; use 'gemini-3.1-flash-image'", id="retired_imagen4_fast"),
    pytest.param(dict(kind="google", provider_model="gemini-2.5-flash-image"), "shut down on 2026-10-02",
                 id="retired_nano_banana_1"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-2", native_size=512),
                 r"`native_size` 512 is not a square size gpt-image-2 documents: allowed \[1024\]", id="gpt_size"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-2", api_key_env=None), "needs `api_key_env`",
                 id="no_api_key_env"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-2", api_key_env="sk-live-1234"), "not the key itself",
                 id="key_in_place_of_its_name"),
    pytest.param(dict(kind="openai"), "needs `provider_model`", id="no_provider_model"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-9"), r"use one of \['gpt-image-2\*'\]",
                 id="unknown_model"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-2", quality="hd"),
                 r"`quality` must be one of \['low', 'medium', 'high', 'auto'\]", id="gpt_image_quality"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-2", output_format="gif"),
                 r"`output_format` must be one of \['png', 'jpeg', 'webp'\]", id="gpt_image_format"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-2", send_seed=True), "takes no seed",
                 id="openai_seed"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-2", base_url="ftp://files.example"), "http",
                 id="base_url_scheme"),
    pytest.param(dict(kind="ideogram", provider_model="V_3"), r"use one of \['ideogram-4-5'\]",
                 id="ideogram_v1_model_name"),
    pytest.param(dict(kind="ideogram", provider_model="ideogram-4-5", native_size=512),
                 r"allowed \[1024, 2048\]", id="ideogram_size"),
    pytest.param(dict(kind="ideogram", provider_model="ideogram-4-5", quality="very_low"),
                 r"`quality` must be one of \['low', 'medium', 'high'\]", id="ideogram_quality"),
    pytest.param(dict(kind="ideogram", provider_model="ideogram-4-5", magic_prompt="OFF"),
                 r"`magic_prompt` must be one of \['auto', 'on', 'off'\]", id="ideogram_magic_v1_spelling"),
    pytest.param(dict(kind="ideogram", provider_model="ideogram-4-5", output_format="png"),
                 "`output_format` is not an option", id="ideogram_output_format"),
    pytest.param(dict(kind="google", provider_model="gemini-3.1-flash-lite-image", native_size=2048),
                 r"allowed \[1024\]", id="lite_size"),
    pytest.param(dict(kind="google", provider_model="gemini-3.1-flash-image", quality="high"),
                 "`quality` is not an option", id="gemini_quality"),
    pytest.param(dict(kind="google", provider_model="veo-3"), "gemini-3.1-flash-image", id="google_unknown"),
    pytest.param(dict(kind="google", provider_model="gemini-3.1-flash-image", cost={"usd_per_image": 0.0672}),
                 r"needs `cost.usd_per_image` .* `cost.checked` .* `cost.source`", id="undated_price"),
    pytest.param(dict(kind="google", provider_model="gemini-3.1-flash-image",
                      cost=PRICED | {"source": "the pricing page"}), "must be the URL", id="price_source_not_a_url"),
    pytest.param(dict(kind="diffusers", model_id="x", provider_model="gpt-image-2", api_key_env=None),
                 "only apply to the hosted kinds", id="hosted_field_on_diffusers"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_SPECS)
def test_bad_remote_specs_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**({"name": "t", "api_key_env": "OPENAI_API_KEY", "native_size": 1024, "cost": PRICED} | fields))


@pytest.mark.parametrize("tier", list(TIERS))
def test_specs_on_the_providers_own_api_validate_without_the_key(tier, monkeypatch):
    monkeypatch.delenv(ENV)
    ModelSpec(name="t", api_key_env=ENV, **(TIERS[tier] | {"cost": PRICED}))


# -- Pure helpers --------------------------------------------------------------------------------------------------

def test_plan_calls_groups_a_jobs_images_up_to_the_per_call_limit():
    calls = plan_calls(["a", "a", "a", "b", "a"], [10, 11, 12, 20, 30], per_call=2)
    assert calls == [([0, 1], "a", 10), ([2], "a", 12), ([3], "b", 20), ([4], "a", 30)]


@pytest.mark.parametrize(("value", "seconds"), [
    pytest.param("12", 12.0, id="delta_seconds"), pytest.param("0.5", 0.5, id="fraction"),
    pytest.param(None, DEFAULT_RETRY_AFTER_S, id="absent"), pytest.param("soon", DEFAULT_RETRY_AFTER_S, id="garbage"),
    pytest.param("-3", 0.0, id="negative"), pytest.param("Wed, 21 Oct 2015 07:28:30 GMT", 30.0, id="http_date"),
])
def test_parse_retry_after(value, seconds):
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert parse_retry_after(value, now=now) == pytest.approx(seconds)


def test_decode_centre_crops_and_resizes_to_native_square():
    out = decode_image(png("wide", 1, 300, 200), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    with pytest.raises(RemoteBadResponse):
        decode_image(b"GIF89a not really", 64)


# -- The Generator deployment's side, without Ray ------------------------------------------------------------------

class _Gauge:
    def __init__(self):
        self.values = []

    def set(self, value, tags):
        self.values.append((value, tags))

    def observe(self, value, tags):
        self.values.append((value, tags))


def _generator(engine: RemoteEngine):
    """The Generator's logic without Ray: a real renderer and finisher (classical post), fake metric sinks."""
    from deployments.generator import Generator
    from engines.finish import Finisher
    from engines.post import PostSpec
    from engines.render import Renderer
    from graph.backlog import Backlog

    gen = object.__new__(Generator.func_or_class)  # the plain class behind the Serve deployment
    gen.spec, gen.engine, gen.remote = engine.spec, engine, True
    gen.stats = {"oom_splits": 0, "failed_checks": 0, "health_probes": 0, "health_failures": 0, "batches": 0}
    gen.health, gen.lifecycle_warning = HealthGate(max_age_s=0.0), None
    gen.metrics, gen.unavailable_gauge = _Gauge(), _Gauge()
    gen.renderer = Renderer(engine, engine.spec, Finisher(PostSpec(backend="classical")), gen.stats, gen._noted)
    gen.backlog, gen.inflight, gen.service_s = Backlog(gen._run_batch, 4), 0, None
    return gen


def _jobs(prompt: str, n: int = 1) -> list[GenerateJob]:
    return [GenerateJob(prompt=prompt, seed=3, n=n, width=64, height=64)]


def test_generator_maps_remote_failures_per_item(standins):
    engine = make(standins, "nano-banana-2")
    gen = _generator(engine)
    jobs = [*_jobs("a quiet harbour"), *_jobs("a forbidden thing [standin:refused]")]
    ok, failed = _loop(engine, lambda: gen._run_batch(jobs))
    assert ok.failure is None and len(ok.pngs) == 1 and ok.pngs[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert failed.failure == "error" and "RemoteRejected" in failed.detail and failed.pngs == []


def test_generator_reports_rate_limited_with_the_wait(standins):
    engine = make(standins, "gpt-image")
    gen = _generator(engine)
    (result,) = _loop(engine, lambda: gen._run_batch(_jobs("a busy day [standin:429]")))
    assert result.failure == "rate_limited" and result.extra["retry_after_s"] == 7


def test_generator_passes_the_cost_the_provider_reported(standins):
    engine = make(standins, "gpt-image")
    gen = _generator(engine)
    (result,) = _loop(engine, lambda: gen._run_batch(_jobs("a copper kettle", n=2)))
    assert result.failure is None and len(result.pngs) == 2
    whole = usage_cost(TokenUsage(text_input=3, image_output=2 * 7024), TokenPrices(**OPENAI_TOKENS))
    assert result.extra["usd_reported"] == pytest.approx(whole) and result.extra["images_reported"] == 2


def test_generator_without_reported_cost_leaves_the_list_price(standins):
    engine = make(standins, "ideogram-4-5")
    gen = _generator(engine)
    (result,) = _loop(engine, lambda: gen._run_batch(_jobs("a menu board")))
    assert result.failure is None and "usd_reported" not in result.extra


def test_generator_marks_a_retired_model_unavailable_in_info_and_metric(standins):
    engine = make(standins, "nano-banana-pro")
    gen = _generator(engine)
    (result,) = _loop(engine, lambda: gen._run_batch(_jobs("a vase [standin:retired]")))
    assert result.failure == "model_retired" and result.pngs == []
    from deployments.generator import _availability

    shown = _availability(engine, None, engine.spec)
    assert shown["available"] is False and shown["unavailable_reason"].startswith("model_retired: HTTP 404")
    assert gen.unavailable_gauge.values == [(1, {"model": "nano-banana-pro", "reason": "model_retired"})]


def test_model_retired_is_a_reason_to_fall_back_not_a_capacity_reason():
    from graph.errors import GenerationFailed
    from graph.trace import CAPACITY_REASONS, blames_model

    assert "model_retired" not in CAPACITY_REASONS  # a chain failing on it answers 502, not 503 + Retry-After
    assert blames_model(GenerationFailed("every model on route 'x' failed (m: model_retired)"))


def test_health_probe_calls_no_paid_api(standins):
    engine = make(standins, "gpt-image")
    gen = _generator(engine)
    _loop(engine, gen.check_health)
    assert gen.stats["health_probes"] == 1 and gen.stats["health_failures"] == 0
    assert state(standins, "gpt-image").requests == []

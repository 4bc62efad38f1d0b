"""Hosted generator kinds (openai, ideogram, google) against local stand-ins of each provider: request shapes,
decoding, the failure mapping (429, 5xx, timeouts, bad answers, refusals), and a key that never leaks."""

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
    RemoteRateLimited,
    RemoteRejected,
    RemoteServerError,
    RemoteTimeout,
    decode_image,
    engine_version,
    parse_retry_after,
    plan_calls,
)
from tests.standins.providers import Standin, google_standin, ideogram_standin, openai_standin, png, serving

KEY = "sk-standin-Q7vX2pLr9T4mZk81Wd3N"  # distinctive, so a leak anywhere is found by substring
ENV = "PRISM_TEST_REMOTE_KEY"

TIERS = {
    "dall-e-3": dict(kind="openai", provider_model="dall-e-3", native_size=1024, quality="hd", style="natural"),
    "ideogram-v3": dict(kind="ideogram", provider_model="V_3", native_size=1024, rendering_speed="TURBO",
                        style="DESIGN"),
    "imagen-4-fast": dict(kind="google", provider_model="imagen-4.0-fast-generate-001", native_size=1024),
    "gemini-image": dict(kind="google", provider_model="gemini-2.5-flash-image", native_size=1024),
}


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


def run(engine: RemoteEngine, prompts: list[str], seeds: list[int] | None = None) -> list:
    """agenerate and close the engine's client on one event loop."""

    async def once():
        try:
            return await engine.agenerate(prompts, seeds or list(range(len(prompts))), 4, 3.0)
        finally:
            await engine.aclose()

    return asyncio.run(once())


def state(standins: Standins, tier: str) -> Standin:
    return standins.states[TIERS[tier]["kind"]]


# -- Success and request shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tier", list(TIERS))
def test_every_kind_renders_native_size_images(standins, tier):
    out = run(make(standins, tier), ["a lighthouse at dusk", "a lighthouse at dusk", "a red kite"], [1, 2, 3])
    assert [o.shape for o in out] == [(1024, 1024, 3)] * 3 and all(o.dtype == np.uint8 for o in out)
    assert out[0].std() > 5  # a real picture came back, not a blank


def test_dalle3_request_is_one_call_per_image_with_hd_and_bearer_auth(standins):
    run(make(standins, "dall-e-3"), ["a red fox", "a red fox"], [5, 6])
    calls = state(standins, "dall-e-3").calls_for("a red fox")
    assert len(calls) == 2  # dall-e-3 takes n=1 only: one call per image, concurrently
    assert calls[0].path == "/v1/images/generations" and calls[0].headers["authorization"] == f"Bearer {KEY}"
    assert calls[0].body == {"model": "dall-e-3", "prompt": "a red fox", "n": 1, "size": "1024x1024", "quality": "hd",
                             "style": "natural", "response_format": "b64_json"}  # no seed: OpenAI has none


def test_dalle2_packs_a_jobs_images_into_one_call(standins):
    out = run(make(standins, "dall-e-3", provider_model="dall-e-2", native_size=256, quality=None, style=None),
              ["a tabby cat"] * 3 + ["a barn owl"])
    assert [o.shape for o in out] == [(256, 256, 3)] * 4
    st = state(standins, "dall-e-3")
    assert [c.body["n"] for c in st.calls_for("a tabby cat")] == [3] and st.calls_for("a barn owl")[0].body["n"] == 1
    assert st.calls_for("a tabby cat")[0].body["size"] == "256x256"


def test_gpt_image_asks_no_response_format(standins):
    run(make(standins, "dall-e-3", provider_model="gpt-image-1", quality="high", style=None), ["a teapot"])
    body = state(standins, "dall-e-3").calls_for("a teapot")[0].body
    assert body["quality"] == "high" and "response_format" not in body and "style" not in body


def test_openai_compatible_server_with_a_v1_root_and_a_seed(standins):
    """Another OpenAI-compatible server (e.g. another Prism): base_url given SDK-style with /v1, seed sent."""
    url = standins.urls["openai"] + "/v1"
    engine = make(standins, "dall-e-3", provider_model="dall-e-2", native_size=512, quality=None, style=None,
                  base_url=url)
    assert engine.version == f"openai:dall-e-2@{url.split('//')[1].split('/')[0]}"
    assert engine.request("p", 7, 1).path == "/images/generations"
    spec = ModelSpec(kind="openai", name="up", provider_model="standard", base_url="http://prism.internal:8000",
                     api_key_env=ENV, native_size=512, quality="hd", send_seed=True)
    body = build_engine(spec).request("a bridge", 11, 1).json
    assert body == {"model": "standard", "prompt": "a bridge", "n": 1, "size": "512x512", "quality": "hd",
                    "response_format": "b64_json", "seed": 11}


def test_ideogram_request_has_the_seed_and_downloads_carry_no_key(standins):
    run(make(standins, "ideogram-v3"), ["a neon sign", "a neon sign"], [2**32 - 1, 0])
    st = state(standins, "ideogram-v3")
    (call,) = st.calls_for("a neon sign")
    assert call.path == "/v1/ideogram-v3/generate" and call.headers["api-key"] == KEY
    assert call.headers["content-type"].startswith("multipart/form-data")
    assert call.body == {"prompt": "a neon sign", "resolution": "1024x1024", "num_images": "2",
                         "seed": str((2**32 - 1) % 2**31), "rendering_speed": "TURBO", "style_type": "DESIGN"}
    downloads = st.downloads()
    assert len(downloads) == 2 and all(d.path.startswith("/ephemeral/") for d in downloads)
    assert not any(KEY in v for d in downloads for v in d.headers.values())


def test_imagen_request_has_sample_count_and_square_aspect(standins):
    run(make(standins, "imagen-4-fast"), ["a desert road", "a desert road"])
    (call,) = state(standins, "imagen-4-fast").calls_for("a desert road")
    assert call.path == "/v1beta/models/imagen-4.0-fast-generate-001:predict"
    assert call.headers["x-goog-api-key"] == KEY and "authorization" not in call.headers
    assert call.body == {"instances": [{"prompt": "a desert road"}],
                         "parameters": {"sampleCount": 2, "aspectRatio": "1:1", "includeRaiReason": True}}


def test_imagen_standard_at_2048_asks_for_2k():
    spec = ModelSpec(kind="google", name="i", provider_model="imagen-4.0-generate-001", api_key_env=ENV,
                     native_size=2048, person_generation="dont_allow")
    params = build_engine(spec).request("a harbour", 3, 4).json["parameters"]
    assert params == {"sampleCount": 4, "aspectRatio": "1:1", "includeRaiReason": True, "imageSize": "2K",
                      "personGeneration": "dont_allow"}


def test_gemini_request_asks_for_an_image_with_the_seed(standins):
    run(make(standins, "gemini-image"), ["a paper crane"], [7])
    (call,) = state(standins, "gemini-image").calls_for("a paper crane")
    assert call.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert call.body["generationConfig"] == {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "1:1"},
                                             "seed": 7}
    assert call.body["contents"] == [{"role": "user", "parts": [{"text": "a paper crane"}]}]


def test_version_names_the_host_only_when_not_the_providers():
    assert engine_version("openai", "dall-e-3", "https://api.openai.com") == "openai:dall-e-3"
    other = engine_version("openai", "standard", "http://prism.internal:8000/v1")
    assert other == "openai:standard@prism.internal:8000"
    assert engine_version("openai", "x", "https://user:pw@gw.example/v1") == "openai:x@gw.example"  # no credentials


# -- Failures ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tier", list(TIERS))
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


@pytest.mark.parametrize("tier", list(TIERS))
def test_500_is_retried_max_retries_times_then_server_error(standins, tier):
    with pytest.raises(RemoteServerError) as info:
        run(make(standins, tier, max_retries=2), ["a broken day [standin:500]"])
    assert info.value.reason == "error" and "after 3 attempts" in str(info.value)
    assert len(state(standins, tier).calls_for("a broken day")) == 3


@pytest.mark.parametrize("tier", list(TIERS))
def test_500_once_recovers_on_the_retry(standins, tier):
    (img,) = run(make(standins, tier), ["a lucky day [standin:500-once]"])
    assert img.shape == (1024, 1024, 3) and len(state(standins, tier).calls_for("a lucky day")) == 2


@pytest.mark.parametrize("tier", list(TIERS))
def test_a_hang_times_out_within_timeout_s(standins, tier):
    t0 = time.monotonic()
    with pytest.raises(RemoteTimeout) as info:
        run(make(standins, tier, timeout_s=0.4, max_retries=2), ["a long day [standin:slow]"])
    assert info.value.reason == "deadline" and time.monotonic() - t0 < 1.5  # timeouts are not retried
    assert len(state(standins, tier).calls_for("a long day")) == 1


MALFORMED = ["malformed-json", "missing-data", "bad-b64", "bad-image"]


@pytest.mark.parametrize("fault", MALFORMED)
@pytest.mark.parametrize("tier", list(TIERS))
def test_malformed_answers_are_undecodable(standins, tier, fault):
    with pytest.raises(RemoteBadResponse) as info:
        run(make(standins, tier), [f"an odd day [standin:{fault}]"])
    assert info.value.reason == "undecodable"
    assert len(state(standins, tier).calls_for("an odd day")) == 1  # a bad answer is not retried (and re-billed)


@pytest.mark.parametrize("tier", list(TIERS))
def test_a_refusal_is_rejected_without_retry(standins, tier):
    with pytest.raises(RemoteRejected) as info:
        run(make(standins, tier), ["a forbidden thing [standin:refused]"])
    assert info.value.reason == "error" and "refused" in str(info.value)
    assert len(state(standins, tier).calls_for("a forbidden thing")) == 1


def test_ideogram_image_marked_unsafe_is_rejected(standins):
    with pytest.raises(RemoteRejected, match="unsafe"):
        run(make(standins, "ideogram-v3"), ["a grey area [standin:unsafe]"])


def test_one_refused_prompt_does_not_fail_the_rest_of_the_batch(standins):
    ok, refused = run(make(standins, "dall-e-3"), ["a calm sea", "a forbidden thing [standin:refused]"])
    assert ok.shape == (1024, 1024, 3) and isinstance(refused, RemoteRejected)


def test_connection_refused_is_retried_then_server_error(caplog):
    spec = ModelSpec(kind="openai", name="gone", provider_model="dall-e-2", native_size=256, api_key_env=ENV,
                     base_url=f"http://127.0.0.1:{_closed_port()}", max_retries=2, retry_backoff_s=0.01)
    with pytest.raises(RemoteServerError, match="connection failed.*after 3 attempts"):
        run(build_engine(spec), ["anything"])
    assert len([r for r in caplog.records if r.name == "prism.remote" and "retry" in r.getMessage()]) == 2


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Keys ----------------------------------------------------------------------------------------------------------

LEAK_FAULTS = ["429", "500", "slow", "malformed-json", "bad-b64", "bad-image", "refused", "echo-key"]


def test_the_key_is_in_no_error_repr_or_log(standins, caplog):
    caplog.set_level(logging.DEBUG)  # root at DEBUG: httpx's and httpcore's loggers included
    errors, engines = [], []
    for tier in TIERS:
        for fault in LEAK_FAULTS:
            engine = make(standins, tier, timeout_s=0.3)
            engines.append(engine)
            with pytest.raises(RemoteError) as info:
                run(engine, [f"leak test [standin:{fault}]"])
            errors.append(info.value)
    echoed = [e for e in errors if "Incorrect API key" in str(e)]
    assert len(echoed) == len(TIERS) and all("[redacted]" in str(e) for e in echoed)
    for e in errors:
        texts = [str(e), repr(e), *map(str, e.args), "".join(traceback.format_exception(e))]
        assert not any(KEY in t for t in texts), e
    assert not any(KEY in repr(engine) or KEY in str(engine) for engine in engines)
    assert any(r.name.startswith(("httpx", "httpcore")) for r in caplog.records)  # their DEBUG lines were captured
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in (record.exc_text or ""), record.name


def test_a_missing_key_variable_fails_init_naming_it(monkeypatch):
    spec = ModelSpec(kind="ideogram", name="t", provider_model="V_3", native_size=1024, api_key_env=ENV)
    monkeypatch.delenv(ENV)
    with pytest.raises(MissingApiKey, match=ENV):
        build_engine(spec)
    monkeypatch.setenv(ENV, "  ")
    with pytest.raises(MissingApiKey, match=ENV):
        build_engine(spec)


# -- Spec validation -----------------------------------------------------------------------------------------------

BAD_SPECS = [
    pytest.param(dict(kind="openai", provider_model="dall-e-3", native_size=512),
                 r"`native_size` 512 is not a square size dall-e-3 documents: allowed \[1024\]", id="dalle3_size"),
    pytest.param(dict(kind="openai", provider_model="dall-e-2", native_size=768), r"allowed \[256, 512, 1024\]",
                 id="dalle2_size"),
    pytest.param(dict(kind="openai", provider_model="dall-e-3", api_key_env=None), "needs `api_key_env`",
                 id="no_api_key_env"),
    pytest.param(dict(kind="openai", provider_model="dall-e-3", api_key_env="sk-live-1234"), "not the key itself",
                 id="key_in_place_of_its_name"),
    pytest.param(dict(kind="openai"), "needs `provider_model`", id="no_provider_model"),
    pytest.param(dict(kind="openai", provider_model="dall-e-9"), r"use one of .*own `base_url`", id="unknown_model"),
    pytest.param(dict(kind="openai", provider_model="gpt-image-1", quality="hd"),
                 r"`quality` must be one of \['low', 'medium', 'high', 'auto'\]", id="gpt_image_quality"),
    pytest.param(dict(kind="openai", provider_model="dall-e-3", base_url="ftp://files.example"), "http",
                 id="base_url_scheme"),
    pytest.param(dict(kind="ideogram", provider_model="V_3", native_size=2048), r"allowed \[1024\]",
                 id="ideogram_size"),
    pytest.param(dict(kind="ideogram", provider_model="V_3", rendering_speed="FAST"),
                 r"`rendering_speed` must be one of \['TURBO', 'DEFAULT', 'QUALITY'\]", id="ideogram_speed"),
    pytest.param(dict(kind="ideogram", provider_model="V_3", quality="hd"), "`quality` is not an option",
                 id="ideogram_quality"),
    pytest.param(dict(kind="google", provider_model="imagen-4.0-fast-generate-001", native_size=2048),
                 r"allowed \[1024\]", id="imagen_fast_size"),
    pytest.param(dict(kind="google", provider_model="imagen-4.0-fast-generate-001", send_seed=True),
                 "does not take a seed", id="imagen_seed"),
    pytest.param(dict(kind="google", provider_model="gemini-2.5-flash-image", person_generation="allow_all"),
                 "`person_generation` is not an option", id="gemini_person_generation"),
    pytest.param(dict(kind="google", provider_model="veo-3"), "imagen-4.0-fast", id="google_unknown"),
    pytest.param(dict(kind="diffusers", model_id="x", provider_model="dall-e-3", api_key_env=None),
                 "only apply to the hosted kinds", id="hosted_field_on_diffusers"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_SPECS)
def test_bad_remote_specs_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**({"name": "t", "api_key_env": "OPENAI_API_KEY", "native_size": 1024} | fields))


def test_specs_validate_without_the_key(monkeypatch):
    monkeypatch.delenv(ENV)
    for fields in TIERS.values():
        ModelSpec(name="t", api_key_env=ENV, **fields)


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

def _generator(engine: RemoteEngine):
    from deployments.generator import Generator

    gen = object.__new__(Generator.func_or_class)  # the plain class behind the Serve deployment
    gen.spec, gen.engine, gen.size = engine.spec, engine, (engine.native_size, engine.native_size)
    gen.stats = {"oom_splits": 0, "failed_checks": 0, "health_probes": 0, "health_failures": 0}
    gen.health, gen.gpu_fraction = HealthGate(max_age_s=0.0), 0.0
    return gen


def _in_loop(engine: RemoteEngine, coro_fn):
    async def once():
        try:
            return await coro_fn()
        finally:
            await engine.aclose()

    return asyncio.run(once())


def test_generator_maps_remote_failures_per_item(standins):
    engine = make(standins, "imagen-4-fast")
    gen = _generator(engine)
    items = [(0, "a quiet harbour", 1), (1, "a forbidden thing [standin:refused]", 2)]
    ok, failed = _in_loop(engine, lambda: gen._render_splitting(items, 4, 3.0))
    assert ok.shape == (1024, 1024, 3) and failed.reason == "error" and "RemoteRejected" in failed.detail


def test_generator_reports_rate_limited_with_the_wait(standins):
    engine = make(standins, "dall-e-3")
    gen = _generator(engine)
    out = _in_loop(engine, lambda: gen._render_splitting([(0, "a busy day [standin:429]", 1)], 4, 3.0))
    assert [o.reason for o in out] == ["rate_limited"]
    result = gen._result(out, 4, 3.0, 0.1, 1)
    assert result.failure == "rate_limited" and result.extra["retry_after_s"] == 7


def test_health_probe_calls_no_paid_api(standins):
    engine = make(standins, "dall-e-3")
    gen = _generator(engine)
    _in_loop(engine, gen.check_health)
    assert gen.stats["health_probes"] == 1 and gen.stats["health_failures"] == 0
    assert state(standins, "dall-e-3").requests == []

"""The hosted model lifecycle catalogue (graph/lifecycle.py): retired models are refused naming the successor, a model
announced for retirement warns with its date, and the guard reaches every place a spec is validated."""

import datetime as dt

import pytest
from pydantic import ValidationError

from engines.generators import ModelSpec
from graph.lifecycle import CATALOGUE, CHECKED, Retirement, lifecycle

TODAY = dt.date(2026, 12, 3)

STATUS_CASES = [
    pytest.param("openai", "dall-e-3", "retired", "gpt-image-2.5-sunburst", id="dalle3"),
    pytest.param("openai", "dall-e-2", "retired", "gpt-image-2.5-sunburst", id="dalle2"),
    pytest.param("openai", "gpt-image-1", "retired", "gpt-image-2", id="gpt_image_1"),
    pytest.param("openai", "gpt-image-1.5-2025-12-16", "retired", "gpt-image-2.6-sunburst", id="gpt_image_15_snapshot"),
    pytest.param("openai", "gpt-image-1-mini", "retired", "gpt-image-2.6-flare", id="gpt_image_1_mini"),
    pytest.param("google", "imagen-4.0-fast-generate-001", "retired", "gemini-3.1-flash-image", id="imagen4_fast"),
    pytest.param("google", "imagen-4.0-ultra-generate-001", "retired", "gemini-3-pro-image", id="imagen4_ultra"),
    pytest.param("google", "imagen-3.0-generate-002", "retired", "gemini-3.1-flash-image", id="imagen3"),
    pytest.param("google", "gemini-2.5-flash-image", "retired", "gemini-3.1-flash-image", id="nano_banana_1"),
    pytest.param("google", "gemini-3-pro-image-preview", "retired", "gemini-3-pro-image", id="pro_preview"),
    pytest.param("openai", "gpt-image-2.6-sunburst", "active", None, id="gpt_image_26"),
    pytest.param("google", "gemini-3.1-flash-image", "active", None, id="nano_banana_2"),
    pytest.param("google", "gemini-3.1-flash-lite-image", "active", None, id="nano_banana_2_lite"),
    pytest.param("ideogram", "ideogram-4-5", "active", None, id="ideogram_45"),
    pytest.param("google", "dall-e-3", "active", None, id="other_providers_name_is_not_matched"),
]


@pytest.mark.parametrize(("kind", "model", "status", "successor"), STATUS_CASES)
def test_catalogue_status_and_successor(kind, model, status, successor):
    verdict = lifecycle(kind, model, TODAY)
    assert verdict.status == status
    assert (verdict.entry.successor if verdict.entry else None) == successor


def test_retired_message_names_the_date_the_successor_and_the_source():
    message = lifecycle("google", "imagen-4.0-fast-generate-001", TODAY).message("imagen-4.0-fast-generate-001")
    assert "shut down on 2026-08-17" in message and "use 'gemini-3.1-flash-image'" in message
    assert "https://ai.google.dev/gemini-api/docs/deprecations" in message


BOUNDARY = (Retirement("google", "gemini-x-image", dt.date(2027, 3, 1), "gemini-y-image", "https://example.test/d"),)


@pytest.mark.parametrize(("day", "status"), [
    pytest.param(dt.date(2027, 2, 28), "announced", id="day_before"),
    pytest.param(dt.date(2027, 3, 1), "retired", id="shutdown_day"),
])
def test_announced_until_the_shutdown_day(day, status):
    verdict = lifecycle("google", "gemini-x-image", day, BOUNDARY)
    assert verdict.status == status
    if status == "announced":
        assert "announced for retirement on 2027-03-01" in verdict.message("gemini-x-image")


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda e: e.model)
def test_every_entry_cites_a_page_and_points_to_a_living_successor(entry):
    assert entry.source.startswith("https://")
    assert lifecycle(entry.kind, entry.successor, CHECKED).status == "active", entry.successor


def test_the_first_matching_entry_wins():
    # imagen-4.0-ultra must not be caught by the general imagen-4.0 prefix listed after it.
    assert lifecycle("google", "imagen-4.0-ultra-generate-001", TODAY).entry.model == "imagen-4.0-ultra-generate"


PRICED = {"usd_per_image": 0.05, "checked": "2026-12-03", "source": "https://example.test/pricing"}


@pytest.mark.parametrize(("kind", "model", "successor"), [
    pytest.param("openai", "dall-e-3", "gpt-image-2.5-sunburst", id="dalle3"),
    pytest.param("google", "imagen-4.0-fast-generate-001", "gemini-3.1-flash-image", id="imagen4_fast"),
])
def test_a_spec_naming_a_retired_model_is_refused_naming_the_successor(kind, model, successor):
    with pytest.raises(ValidationError, match=f"use '{successor}'"):
        ModelSpec(kind=kind, name="t", provider_model=model, native_size=1024, api_key_env="K", cost=PRICED)


def test_a_retired_name_on_another_server_is_that_servers_business():
    spec = ModelSpec(kind="openai", name="t", provider_model="dall-e-3", native_size=1024, api_key_env="K",
                     base_url="http://gateway.internal:8080")
    assert spec.provider_model == "dall-e-3"


def test_an_announced_model_validates_and_warns_with_its_date(monkeypatch):
    import graph.lifecycle
    from engines.remote import lifecycle_warning

    soon = Retirement("google", "gemini-3.1-flash-image", dt.date(2099, 1, 31), "gemini-9-image", "https://x.test/d")
    monkeypatch.setattr(graph.lifecycle, "CATALOGUE", (soon,))
    spec = ModelSpec(kind="google", name="t", provider_model="gemini-3.1-flash-image", native_size=1024,
                     api_key_env="K", cost=PRICED)
    assert "announced for retirement on 2099-01-31" in lifecycle_warning(spec)
    monkeypatch.setattr(graph.lifecycle, "CATALOGUE", ())
    assert lifecycle_warning(spec) is None

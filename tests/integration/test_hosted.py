"""The hosted kinds end to end through the Serve graph over real HTTP: `openai` against this Prism's own OpenAI Images
API, and each hosted kind (GPT Image, Ideogram 4.5, Gemini image) against its provider's local stand-in, including a
model the provider has shut down (no test reaches the internet)."""

import json
import os

import pytest

from tests.integration.conftest import REMOTE_KEY_ENV, missing_series
from tests.integration.hosted_standins import HOSTED

GEN = "/faults/v1/images/generations"


def _render(http, model: str, prompt: str):
    return http.post(GEN, json={"prompt": prompt, "model": model, "size": "64x64", "seed": 9})


def test_openai_kind_renders_through_another_prism(http):
    r = http.post(GEN, json={"prompt": "a green ring on a white background", "model": "prism_remote",
                             "size": "64x64", "seed": 21})
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert (prism["tier"], prism["model"], prism["fallbacks"]) == ("prism_remote", "prism-over-openai-api", [])
    assert prism["model_version"].startswith("openai:") and "127.0.0.1" in prism["model_version"]
    assert prism["cost_usd"] >= 0.01  # the per-image price of the hosted tier
    # The "provider" (Prism's route `ok`) rendered it and recorded it with the seed the hosted tier sent.
    inner = http.get("/faults/v1/renders", params={"route": "ok", "limit": 50}).json()["data"]
    assert any(rec["prompt"] == "a green ring on a white background" and rec["seed"] == 21 for rec in inner)
    # The key never leaves the replica: not in the answer, not in the record.
    key = os.environ[REMOTE_KEY_ENV]
    outer = http.get(f"/faults/v1/renders/{prism['request_id']}").json()
    assert key not in r.text and key not in json.dumps(outer)


LIVE = [pytest.param(tier, id=tier) for tier in HOSTED if tier != "hosted_retired"]


@pytest.mark.parametrize("tier", LIVE)
def test_every_hosted_kind_renders_through_its_providers_standin(http, standins, tier):
    kind, model, _ = HOSTED[tier]
    prompt = f"a lighthouse for {tier}"
    r = _render(http, tier, prompt)
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert (prism["tier"], prism["fallbacks"]) == (tier, [])
    assert prism["model_version"] == f"{kind}:{model}@127.0.0.1:{standins[kind][0].rsplit(':', 1)[1]}"
    assert len(standins[kind][1].calls_for(prompt)) == 1  # one provider call, accepted by the strict stand-in


def test_gpt_image_render_is_charged_what_its_usage_says(http):
    prompt = "a copper kettle on a stove"
    r = _render(http, "hosted_gpt", prompt)
    assert r.status_code == 200, r.text
    # The stand-in reports 6 prompt tokens at $5/M and 7024 image tokens (high, 1024x1024) at $30/M.
    assert r.json()["prism"]["cost_usd"] == pytest.approx((6 * 5.0 + 7024 * 30.0) / 1e6)


def test_gpt_image_without_usage_is_charged_its_list_price(http):
    r = _render(http, "hosted_gpt", "a quiet lake [standin:no-usage]")
    assert r.status_code == 200, r.text
    assert r.json()["prism"]["cost_usd"] == pytest.approx(0.211)


def test_ideogram_render_is_charged_its_dated_list_price(http):
    r = _render(http, "hosted_ideogram", "a menu board that reads SOUP")
    assert r.status_code == 200, r.text
    assert r.json()["prism"]["cost_usd"] == pytest.approx(0.06)


def test_v1_models_shows_each_hosted_price_with_its_date_and_source(http):
    data = {m["id"]: m for m in http.get("/faults/v1/models").json()["data"]}
    assert data["hosted_ideogram"]["price"] == {"tier": "hosted_ideogram", "usd_per_image": 0.06,
                                               "checked": "2026-12-03",
                                               "source": "https://ideogram.ai/blog/ideogram-api-pricing"}
    assert data["hosted_gpt"]["price"]["tokens"]["image_output"] == 30.0
    assert "price" not in data["ok"]  # a built-in tier is priced by its compute


def test_a_retired_model_makes_its_tier_unavailable_and_the_fallback_serves(http, standins):
    google = standins["google"][1]
    first = _render(http, "hosted_retired", "a banana on a plate")
    assert first.status_code == 200, first.text
    prism = first.json()["prism"]
    assert prism["tier"] == "ok" and [f["reason"] for f in prism["fallbacks"]] == ["model_retired"]
    record = http.get(f"/faults/v1/renders/{prism['request_id']}").json()
    assert record["fallbacks"][0]["reason"] == "model_retired" and "is not found" in record["fallbacks"][0]["detail"]
    tier = http.get("/faults/v1/tiers").json()["hosted_retired"]
    assert tier["available"] is False and tier["unavailable_reason"].startswith("model_retired: HTTP 404")
    # Render after render: the fallback serves at once, the retired model is not called again.
    second = _render(http, "hosted_retired", "another banana")
    assert second.status_code == 200 and second.json()["prism"]["fallbacks"][0]["reason"] == "model_retired"
    # Asked once in the whole session (by this test or whichever test rendered on the tier first), never again.
    assert len([r for r in google.requests if "gemini-2.5-flash-image" in r.path]) == 1


def test_a_retired_model_shows_in_the_metrics(http):
    assert _render(http, "hosted_retired", "a banana for the metrics").status_code == 200
    wanted = [r'ray_prism_model_unavailable\{(?=[^}]*model="hosted-retired")(?=[^}]*reason="model_retired")',
              r'ray_prism_fallbacks_total\{(?=[^}]*reason="model_retired")(?=[^}]*tier="hosted_retired")']
    missing = missing_series(wanted)
    assert not missing, f"series not exported: {missing}"

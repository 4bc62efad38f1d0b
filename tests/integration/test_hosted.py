"""The `openai` hosted kind end to end: a tier whose provider is this Prism's own OpenAI Images API, over real HTTP.
The other kinds run against their providers' stand-ins in tests/unit/test_remote.py (no test reaches the internet)."""

import json

from tests.integration.conftest import REMOTE_KEY_ENV


def test_openai_kind_renders_through_another_prism(http):
    import os

    r = http.post("/faults/v1/images/generations",
                  json={"prompt": "a green ring on a white background", "model": "prism_remote", "size": "64x64",
                        "seed": 21})
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

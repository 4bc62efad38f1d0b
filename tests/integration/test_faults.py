"""Fault injection through the real graph over HTTP: every case ends in a correct fallback or the documented
error, and no image that fails the output checks is ever returned."""

import os
import time

import httpx
import numpy as np
import pytest

from engines.checks import check_image
from graph.images import decode_b64_png
from tests.integration.conftest import OCR_MISREAD_MARKER

PROMPT = "a photo of a lighthouse on a cliff"


def _post(http, route: str, **extra) -> httpx.Response:
    return http.post("/faults/v1/images/generations",
                     json={"prompt": PROMPT, "model": route, "size": "128x128", "seed": 3, **extra})


def _assert_images_pass_checks(body: dict, size=(128, 128)):
    for d in body["data"]:
        check_image(np.asarray(decode_b64_png(d["b64_json"]).convert("RGB")), size)


RECOVERED = [
    pytest.param("nan", ["nan"], id="nan_pixels"),
    pytest.param("garbage", ["undecodable"], id="garbage_bytes"),
    pytest.param("blank", ["blank"], id="black_image"),
    pytest.param("wrong_size", ["wrong_size"], id="wrong_size"),
    pytest.param("raises", ["error"], id="generator_exception"),
    pytest.param("oom", ["oom"], id="oom_every_batch"),
    pytest.param("slow", ["deadline"], id="stage_deadline"),
]


@pytest.mark.parametrize("route,reasons", RECOVERED)
def test_failure_falls_back_to_next_model(http, route, reasons):
    r = _post(http, route)
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert [f["reason"] for f in prism["fallbacks"]] == reasons
    assert prism["fallbacks"][0]["model"].startswith("fault-injecting-")
    assert prism["tier"] == "ok" and prism["model"] == "prism-builtin-small"
    _assert_images_pass_checks(r.json())


def test_oom_on_a_batch_splits_before_falling_back(http):
    r = _post(http, "oom_batch", n=4)
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert prism["fallbacks"] == [] and prism["tier"] == "oom_batch"  # recovered on the same model
    assert len(r.json()["data"]) == 4
    _assert_images_pass_checks(r.json())


def test_typography_style_retry_lowers_guidance_before_switching_model(http):
    r = _post(http, "cfg")
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert [(f["tier"], f["reason"], f["guidance"]) for f in prism["fallbacks"]] == [("cfg", "nan", None)]
    assert prism["tier"] == "cfg" and prism["guidance"] == 1.5  # 3.0 x 0.5, same model


def test_every_model_failing_is_502_naming_request_and_reasons(http):
    r = _post(http, "all_bad")
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["request_id"] == r.headers["x-request-id"]
    assert [d["reason"] for d in err["details"]] == ["nan", "undecodable", "blank"]
    assert "Traceback" not in r.text


def test_retry_budget_stops_the_chain(http):
    r = _post(http, "budget")
    assert r.status_code == 502  # `ok` was third in the chain but the budget is 2 attempts
    assert len(r.json()["error"]["details"]) == 2


def test_request_deadline_is_504_not_a_hang(http):
    t = time.monotonic()
    r = _post(http, "too_slow")
    assert r.status_code == 504 and time.monotonic() - t < 10
    assert "deadline" in r.json()["error"]["message"]


def test_client_disconnect_cancels_downstream(base_url, http):
    def cancelled():
        info = http.get("/faults/v1/tiers").json()
        return info["slow"]["stats"]["cancelled"]

    before = cancelled()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/faults/v1/images/generations", timeout=0.5,
                   json={"prompt": PROMPT, "model": "too_slow", "size": "128x128"})
    deadline = time.monotonic() + 15
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled() >= before + 1  # (>=: another test's deadline may cancel on this tier too)


def test_text_ocr_cannot_read_is_502_naming_what_it_read(http):
    """The typography stage's miss path over HTTP: OCR (fault-injected to misread) fails the first layout and the safe
    layout; the answer is a 502 that names the text and what OCR read, never the unreadable image."""
    open(OCR_MISREAD_MARKER, "w").close()
    try:
        r = http.post("/faults/v1/images/generations",
                      json={"prompt": 'a shop sign that says "OPEN"', "model": "ok", "size": "128x128"})
    finally:
        os.remove(OCR_MISREAD_MARKER)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "generation_failed" and err["param"] == "text", err
    assert "after 2 layouts" in err["message"] and "FAULT INJECTED MISREAD" in err["message"], err
    assert "'OPEN'" in err["message"] and "data" not in r.json()
    rec = http.get(f"/faults/v1/renders/{err['request_id']}").json()
    assert rec["failed"] and rec["status"] == 502 and rec["image_hashes"] == []

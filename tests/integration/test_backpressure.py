"""Backpressure and brownout with a tier held busy deterministically (a fault-injecting sleeper released when
the client disconnects) and the ingress's own load counters polled, never slept on."""

import os
import threading
import time

import httpx
import pytest

from tests.integration.conftest import HELD_LOG

PROMPT = "a photo of a lighthouse on a cliff"


def _hold(base_url: str, route: str, seconds: float) -> threading.Thread:
    """Send a request that occupies `route`'s tier until the client gives up after `seconds`."""
    def run():
        try:
            httpx.post(f"{base_url}/faults/v1/images/generations", timeout=seconds,
                       json={"prompt": PROMPT, "model": route, "size": "128x128"})
        except httpx.HTTPError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_inflight(http, tier: str, n: int, timeout_s: float = 20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http.get("/faults/v1/load").json()["tiers"][tier]["inflight"] >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"tier {tier} never reached {n} in flight")


def _lines(path: str) -> int:
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def _wait_started(path: str, n: int, timeout_s: float = 20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _lines(path) >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"the held replica never started batch {n}")


def test_full_queue_is_503_with_retry_after_fast(base_url, http):
    started = _lines(HELD_LOG)
    holders = [_hold(base_url, "bp", 8)]
    _wait_started(HELD_LOG, started + 1)  # running on the replica: its one slot is taken
    holders.append(_hold(base_url, "bp", 8))
    _wait_inflight(http, "held", 2)  # the second waits in the queue (size 1): it is now full
    t = time.perf_counter()
    r = http.post("/faults/v1/images/generations", json={"prompt": PROMPT, "model": "bp", "size": "128x128"})
    elapsed = time.perf_counter() - t
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "overloaded" and err["details"][0]["reason"] == "overloaded"
    assert err["request_id"] == r.headers["x-request-id"]
    assert elapsed < 2.0  # rejected at once, not after a wait
    for h in holders:
        h.join(timeout=15)


def test_brownout_degrades_instead_of_rejecting(base_url, http):
    holder = _hold(base_url, "brown", 6)
    _wait_inflight(http, "held2", 1)
    r = http.post("/faults/v1/images/generations", json={"prompt": PROMPT, "model": "brown", "size": "128x128"})
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert prism["degraded"] is True and prism["route"] == "ok" and prism["tier"] == "ok"
    holder.join(timeout=15)


def test_unloaded_request_is_not_degraded(http):
    r = http.post("/faults/v1/images/generations", json={"prompt": PROMPT, "model": "ok", "size": "128x128"})
    assert r.status_code == 200 and r.json()["prism"]["degraded"] is False

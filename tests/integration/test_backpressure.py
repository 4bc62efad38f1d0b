"""Admission at the door, brownout and priorities, with a tier held busy deterministically (a fault-injecting sleeper
released when its client disconnects) and admission's own view polled, never slept on."""

import os
import threading
import time

import httpx
import pytest

from graph.config import deployment_block
from tests.integration.conftest import HELD_LOG

PROMPT = "a photo of a lighthouse on a cliff"


def _hold(base_url: str, route: str, seconds: float, **body) -> threading.Thread:
    """Send a request that occupies `route`'s tier until the client gives up after `seconds`."""
    def run():
        try:
            httpx.post(f"{base_url}/faults/v1/images/generations", timeout=seconds,
                       json={"prompt": PROMPT, "model": route, "size": "128x128", **body})
        except httpx.HTTPError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_used(http, tier: str, n: int, timeout_s: float = 20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http.get("/faults/v1/load").json()["tiers"][tier]["used"] >= n:
            return
        time.sleep(0.02)
    pytest.fail(f"tier {tier} never had {n} renders admitted")


def _lines(path: str) -> int:
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def _wait_started(path: str, n: int, timeout_s: float = 20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _lines(path) >= n:
            return
        time.sleep(0.02)
    pytest.fail(f"the held replica never started batch {n}")


def test_a_saturated_tier_is_refused_at_once_without_a_downstream_call(base_url, http):
    before = http.get("/faults/v1/tiers").json()["held"]["stats"]["batches"]  # (not while held: info would queue)
    started = _lines(HELD_LOG)
    holder = _hold(base_url, "bp", 6)
    _wait_started(HELD_LOG, started + 1)  # rendering on the replica: the tier's one slot is taken
    t = time.perf_counter()
    r = http.post("/faults/v1/images/generations", json={"prompt": PROMPT, "model": "bp", "size": "128x128"})
    elapsed = time.perf_counter() - t
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "overloaded" and err["details"][0]["reason"] == "capacity", err
    assert err["details"][0]["user_tier"] == "free" and "'free'" in err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    assert elapsed < 0.5, elapsed  # refused at the door, not after a wait
    # Nothing reached the generator: no batch started, and once the holder is gone the replica counts its one batch.
    assert _lines(HELD_LOG) == started + 1
    holder.join(timeout=15)
    assert http.get("/faults/v1/tiers").json()["held"]["stats"]["batches"] == before + 1


def test_brownout_degrades_instead_of_rejecting(base_url, http):
    holder = _hold(base_url, "brown", 6)
    _wait_used(http, "held2", 1)
    r = http.post("/faults/v1/images/generations", json={"prompt": PROMPT, "model": "brown", "size": "128x128"})
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert prism["degraded"] is True and prism["route"] == "ok" and prism["tier"] == "ok"
    holder.join(timeout=15)


def test_unloaded_request_is_not_degraded(http):
    r = http.post("/faults/v1/images/generations", json={"prompt": PROMPT, "model": "ok", "size": "128x128"})
    assert r.status_code == 200 and r.json()["prism"]["degraded"] is False


@pytest.fixture
def without_budgets(deployer, http):
    """The faults app's policy without its tiny per-tier budgets (they would refuse or downgrade paid users)."""
    config = deployer.config_copy()
    app = next(a for a in config["applications"] if a["name"] == "faults")
    routing = deployment_block(app, "Ingress")["user_config"]["routing"]
    routing["version"], routing["budgets"] = "faults-no-budgets", {}
    deployer.deploy(config)
    try:
        _wait_policy(http, "faults-no-budgets")
        yield
    finally:
        deployer.deploy(deployer.config_copy())
        _wait_policy(http, "faults-1")


def _wait_policy(http, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while http.get("/faults/v1/policy").json()["policy"]["version"] != version:
        assert time.monotonic() < deadline, f"policy {version} never applied"
        time.sleep(0.2)


def test_under_saturation_paid_tiers_are_admitted_ahead_of_free(base_url, http, without_budgets):
    """`prio` has one slot, held by a 2-s render. An enterprise request waits at the door for it (max_wait_ms) and
    gets it when it frees; a free request that arrives meanwhile is refused at once, and says so."""
    import concurrent.futures

    body = {"prompt": PROMPT, "model": "prio", "size": "64x64"}
    first = threading.Thread(target=lambda: httpx.post(f"{base_url}/faults/v1/images/generations", json=body,
                                                       timeout=30), daemon=True)
    first.start()
    _wait_used(http, "prio", 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        paid = pool.submit(httpx.post, f"{base_url}/faults/v1/images/generations",
                           json={**body, "user_tier": "enterprise"}, timeout=30)
        deadline = time.monotonic() + 10
        while http.get("/faults/v1/load").json()["tiers"]["prio"]["waiting"] < 1:
            assert time.monotonic() < deadline, "the enterprise request never waited for the slot"
            time.sleep(0.02)
        t = time.perf_counter()
        free = http.post("/faults/v1/images/generations", json=body)
        free_elapsed = time.perf_counter() - t
        enterprise = paid.result()
    first.join(timeout=30)
    assert free.status_code == 503 and free_elapsed < 0.5, free.text
    assert free.json()["error"]["details"][0]["user_tier"] == "free"
    assert enterprise.status_code == 200, enterprise.text
    admitted = enterprise.json()["prism"]["admitted"]
    assert admitted["tier"] == "prio" and admitted["waited_ms"] > 100, admitted

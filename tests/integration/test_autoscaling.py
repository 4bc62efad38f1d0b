"""Autoscaling under real load: the faults app's `scales` tier (one render at a time per replica, 2 s each; short
upscale/downscale delays in conftest) goes from 1 replica to 2 while requests queue, and back to 1 once they stop."""

import threading
import time

import httpx
import pytest


def _running_replicas(tier: str) -> int:
    from ray import serve

    deployment = serve.status().applications["faults"].deployments[f"Generator_{tier}"]
    return deployment.replica_states.get("RUNNING", 0)


def _wait_replicas(tier: str, n: int, timeout_s: float) -> None:
    from deployments.reports import running_replicas

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _running_replicas(tier) == n:
            # What admission reads (the controller's plain dict, not serve.status()) says the same at each step.
            assert running_replicas("faults")[tier] == n or _running_replicas(tier) != n
            return
        time.sleep(0.2)
    pytest.fail(f"tier {tier} did not reach {n} running replicas in {timeout_s}s (has {_running_replicas(tier)})")


def test_load_scales_a_tier_out_and_back_in(base_url):
    _wait_replicas("scales", 1, 30)  # at rest: min_replicas
    stop = threading.Event()
    codes: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            while not stop.is_set():
                codes.append(c.post("/faults/v1/images/generations",
                                    json={"prompt": "a red star", "model": "scales", "size": "64x64"}).status_code)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _wait_replicas("scales", 2, 30)  # 4 requests on a tier whose replicas take 1 each: scale out to max (2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert codes and all(c == 200 for c in codes), codes
    _wait_replicas("scales", 1, 30)  # idle again: back to min after downscale_delay_s

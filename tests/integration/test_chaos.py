"""Replica death mid-request, health-check replacement, drain on redeploy (issue: chaos under load).

All deterministic: a fault-injecting replica that exits while holding a request (once per marker file), a probe
that fails while a marker file exists, and a redeploy that replaces replicas while renders are in flight.
"""

import concurrent.futures
import os
import time
from collections import Counter

import httpx
import pytest

from tests.integration.conftest import DIE_MARKER, INTENT_HANG_MARKER, SICK_MARKER

pytestmark = pytest.mark.integration


def _tier_info(http, tier: str) -> dict:
    return http.get("/faults/v1/tiers").json()[tier]


def test_replica_death_mid_render_is_retried_once_on_a_live_replica(http):
    if os.path.exists(DIE_MARKER):
        os.remove(DIE_MARKER)
    r = http.post("/faults/v1/images/generations", json={"prompt": "a red star", "model": "dies", "seed": 5},
                  timeout=90)
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    # Served by the same tier after the retry, with the death on record; the render ran once (on the replacement).
    assert prism["tier"] == "dies", prism
    assert [f["reason"] for f in prism["fallbacks"]] == ["replica_died"], prism["fallbacks"]
    assert "generate:dies" in prism["fallbacks"][0]["detail"]
    assert os.path.exists(DIE_MARKER)  # the first replica really died holding the request
    info = _tier_info(http, "dies")
    assert info["stats"]["batches"] == 1, info  # one render: no duplicate on the replacement


def test_failing_health_probes_replace_the_replica(http):
    before = _tier_info(http, "sick")["replica"]
    open(SICK_MARKER, "w").close()
    try:
        deadline, after = time.monotonic() + 60, before
        while time.monotonic() < deadline and after == before:
            time.sleep(1)
            info = _tier_info(http, "sick")
            after = info.get("replica", before)
        assert after != before, "the unhealthy replica was not replaced within 60 s"
    finally:
        os.remove(SICK_MARKER)
    # The replacement serves once admission counts it (Serve's controller reports it RUNNING within a second).
    deadline = time.monotonic() + 15
    while True:
        r = http.post("/faults/v1/images/generations", json={"prompt": "x", "model": "sick"}, timeout=60)
        if (r.status_code == 200 and r.json()["prism"]["tier"] == "sick") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200 and r.json()["prism"]["tier"] == "sick", r.text[:300]


def test_a_wedged_intent_classifier_costs_a_degraded_route_not_the_render(http):
    """The intent classifier hangs (fault-injected): past the app's intent.timeout_s (3 s here) the request is
    routed by the rules that need no intent, marked degraded, and rendered; once it answers again, it is used."""
    open(INTENT_HANG_MARKER, "w").close()
    try:
        t = time.monotonic()
        r = http.post("/faults/v1/images/generations", json={"prompt": "a red star at dusk", "size": "64x64"},
                      timeout=60)
        elapsed = time.monotonic() - t
        routed = http.post("/faults/v1/route", json={"prompt": 'a sign that says "OPEN"'}, timeout=60)
    finally:
        os.remove(INTENT_HANG_MARKER)
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert prism["intent"]["source"] == "unavailable" and prism["intent"]["label"] is None, prism["intent"]
    assert prism["degraded"] and any("intent classifier unavailable" in n for n in prism["notes"]), prism
    # 3 s less 10 ms: the timeout's timer (the event loop's clock) can fire a fraction of a millisecond before the
    # stage's perf_counter says 3 s (seen: 2999.9 ms).
    assert 2.99 <= prism["timings_ms"]["intent"] / 1000 < 10 and elapsed < 30, (elapsed, prism["timings_ms"])
    # Text in quotes is still found without the classifier (the has_text rules keep working).
    assert routed.status_code == 200 and routed.json()["intent"]["text_to_render"] == "OPEN", routed.text
    record = http.get(f"/faults/v1/renders/{prism['request_id']}").json()
    assert record["intent"] is None and record["intent_source"] == "unavailable", record
    deadline = time.monotonic() + 60
    while True:  # the hung batch notices the marker is gone within 0.1 s; the next request is classified again
        again = http.post("/faults/v1/route", json={"prompt": "a red star at dusk"}, timeout=60)
        if again.json()["intent"]["source"] == "classifier" or time.monotonic() > deadline:
            break
    assert again.json()["intent"]["source"] == "classifier", again.text


def test_redeploy_drains_in_flight_renders(deployer, base_url, http):
    """Replicas replaced by a redeploy finish what they hold (graceful shutdown): nothing accepted is lost."""
    def render(i: int) -> int:
        with httpx.Client(base_url=base_url, timeout=120) as c:
            return c.post("/faults/v1/images/generations", json={"prompt": f"p{i}", "model": "slowish"}).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(render, i) for i in range(4)]
        deadline = time.monotonic() + 30
        while _tier_info(http, "slowish")["stats"]["running"] < 4:  # all four are on the replica (one renders)
            assert time.monotonic() < deadline, "the renders never reached the slowish replica"
            time.sleep(0.05)
        config = deployer.config_copy()
        faults = next(a for a in config["applications"] if a["name"] == "faults")
        dep = next(d for d in faults["deployments"] if d["name"] == "Generator_slowish")
        dep["ray_actor_options"] = {"num_cpus": 0.03}  # a new replica version: the old one is drained and stopped
        try:
            deployer.deploy(config)
            codes = [f.result() for f in futures]
        finally:
            deployer.deploy(deployer.config_copy())  # back to the session's config for the tests that follow
    assert codes == [200] * 4, codes


def _kill(match: str, restart: bool = False) -> str:
    import ray

    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if match in a["name"])
    assert names, f"no actor matching {match!r}"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=not restart)
    return names[0]


def _kill_mid_render(http, tier: str, timeout_s: float = 60) -> str:
    """Kill the tier's replica once the replica itself reports a render running: the kill hits in-flight work."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = http.get("/faults/v1/tiers", timeout=10).json()[tier]
        except (httpx.HTTPError, ValueError):
            info = {}
        if info.get("stats", {}).get("running", 0) > 0:  # this replica (by id) holds a render now
            return _kill(f"faults#Generator_{tier}#{info['replica']}")
        time.sleep(0.05)
    pytest.fail(f"no render ever ran on tier {tier} to kill it under")


CHAOS_MIN_SUCCESS = 0.9  # replica deaths are retried on a replacement or the fallback: nearly every request is a 200


def test_short_chaos_burst_loses_nothing(base_url, http):
    """make test's version of `make chaos` (no proxy kill: that one drops the client connections it holds, see
    RESULTS.md): traffic on the faults app while its generator replica is killed twice mid-render and the Serve
    controller once. Every request gets a final answer naming its request id; none admitted ends in a 504 and at
    least 90% of them are 200 (while no replica is up, new ones get an immediate 503 + Retry-After, which the clients
    honour); each replica kill hit a render in flight (its request shows the replica_died retry, on the fallback
    tier)."""
    import threading

    rows, stop, inflight = [], threading.Event(), set()

    def client(i: int) -> None:
        with httpx.Client(base_url=base_url, timeout=90) as c:
            while not stop.is_set():
                rid, started = f"chaos-{i}-{len(rows)}", time.monotonic()
                inflight.add(rid)
                try:
                    r = c.post("/faults/v1/images/generations", headers={"X-Request-ID": rid},
                               json={"prompt": "a red star", "model": "chaos", "size": "64x64"})
                    body = r.json()
                    err = body.get("error", {})
                    prism = body.get("prism", {})
                    rows.append((r.status_code, err.get("request_id") if r.status_code != 200
                                 else prism["request_id"], rid, [f["reason"] for f in prism.get("fallbacks", [])],
                                 started, r.headers.get("retry-after")))
                    if r.status_code in (429, 503) and r.headers.get("retry-after"):
                        time.sleep(min(float(r.headers["retry-after"]), 5))  # a careful client honours it
                except httpx.HTTPError as e:
                    rows.append(("lost", type(e).__name__, rid, [], started, None))
                inflight.discard(rid)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    def answered_after_death(started_after: float, timeout_s: float = 60) -> float:
        """Wait for a 200 of a request sent after `started_after` that outlived a replica kill; when it came."""
        deadline = time.monotonic() + timeout_s
        while not any(r[0] == 200 and "replica_died" in r[3] and r[4] > started_after for r in rows):
            assert time.monotonic() < deadline, f"no render that outlived a replica kill was answered: {rows}"
            time.sleep(0.1)
        return time.monotonic()

    killed = []
    try:
        killed.append(_kill_mid_render(http, "chaos"))
        first_kill, hit = time.monotonic(), set(inflight)
        # The killed renders run again on the replacement (or the fallback); the second kill must hit newer ones.
        answered_after_death(0.0)
        deadline = time.monotonic() + 60
        while hit & inflight:
            assert time.monotonic() < deadline, f"renders hit by the first kill never answered: {hit & inflight}"
            time.sleep(0.1)
        killed.append(_kill("SERVE_CONTROLLER_ACTOR", restart=True))
        killed.append(_kill_mid_render(http, "chaos"))  # the replacement, holding renders sent after the first kill
        answered_after_death(first_kill + 0.5)  # sent after the first kill (and its news) reached the ingress
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    lost = [r for r in rows if r[0] == "lost"]
    assert not lost, lost
    assert all(r[1] == r[2] for r in rows), rows  # every answer names its request
    # 502 a stage's replica died twice, 503 no replica could take it, 504 past the deadline; never a bug's 500.
    assert all(r[0] in (200, 502, 503, 504) for r in rows), rows
    # While the only replica is replaced there is no capacity: new requests are refused at the door with a
    # Retry-After (designed); what was admitted is answered, nearly all with a 200.
    admitted = [r for r in rows if not (r[0] == 503 and r[5])]
    # A death leaves the tier no replica: its renders move to the fallback at once instead of waiting out the
    # replacement's start past their deadline (CI saw 504s here before).
    assert not [r for r in admitted if r[0] == 504], (killed, Counter(r[0] for r in rows), rows)
    ok = sum(1 for r in admitted if r[0] == 200)
    assert ok >= CHAOS_MIN_SUCCESS * len(admitted) and len(admitted) >= 6, (killed, Counter(r[0] for r in rows), rows)
    # Each replica kill hit in-flight renders, rendered again on a live replica (answered_after_death, above).
    assert len(killed) == 3, killed

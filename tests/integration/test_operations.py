"""Operating Prism over real HTTP: render records, url responses, replay on another model, canary split with
automatic and manual rollback, Prometheus metrics from Ray's metrics agent, /v1/stats, cost sums, budgets."""

import hashlib
import time
import uuid

import httpx
import pytest

from graph.config import deployment_block
from tests.integration.conftest import missing_series

PROMPT = "a red star on a blue background"
GEN = "/faults/v1/images/generations"


def _gen(http, rid=None, **body):
    headers = {"X-Request-ID": rid} if rid else {}
    return http.post(GEN, json={"prompt": PROMPT, "size": "64x64", "seed": 11, **body}, headers=headers)


def test_url_response_links_the_recorded_png(http):
    r = _gen(http, response_format="url", n=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prism"]["recorded"] is True and "record" in body["prism"]["timings_ms"]
    urls = [d["url"] for d in body["data"]]
    assert len(urls) == 2 and all("b64_json" not in d for d in body["data"])
    pngs = [httpx.get(u, timeout=30) for u in urls]
    assert all(p.status_code == 200 and p.headers["content-type"] == "image/png" for p in pngs)
    assert pngs[0].content[:8] == b"\x89PNG\r\n\x1a\n" and pngs[0].content != pngs[1].content  # seed, seed + 1
    rec = http.get(f"/faults/v1/renders/{body['prism']['request_id']}").json()
    assert rec["image_hashes"] == [hashlib.sha256(p.content).hexdigest() for p in pngs]
    for key, value in (("prompt", PROMPT), ("seed", 11), ("tier", "ok"), ("model", "prism-builtin-small"),
                       ("failed", False), ("status", 200), ("user_tier", "free")):
        assert rec[key] == value, key
    assert rec["model_version"].startswith("builtin-") and rec["intent"] and rec["route"] == "ok"
    assert rec["cost_usd"] > 0 and rec["timings_ms"]["generate"] > 0 and rec["request"]["n"] == 2


def test_failed_render_is_recorded_with_its_reasons(http):
    rid = f"fail-{uuid.uuid4().hex[:8]}"
    r = _gen(http, rid=rid, model="all_bad")
    assert r.status_code == 502
    rec = http.get(f"/faults/v1/renders/{rid}").json()
    assert rec["failed"] is True and rec["status"] == 502 and rec["error"]["code"] == "generation_failed"
    assert [f["reason"] for f in rec["fallbacks"]] == ["nan", "undecodable", "blank"]
    assert rec["image_hashes"] == []
    assert http.get(f"/faults/v1/renders/{rid}/image.png").status_code == 404
    failed = http.get("/faults/v1/renders", params={"failed": "true", "route": "all_bad"}).json()["data"]
    assert rid in [x["id"] for x in failed] and all(x["failed"] for x in failed)


def test_replay_on_another_model_links_the_records(http):
    rid = f"orig-{uuid.uuid4().hex[:8]}"
    orig = _gen(http, rid=rid, model="nan")  # nan tier fails, ok renders
    assert orig.status_code == 200
    r = http.post(f"/faults/v1/renders/{rid}/replay", json={"model": "prism-builtin-small"})
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert prism["replay_of"] == rid and prism["tier"] == "ok" and prism["fallbacks"] == []
    assert prism["seed"] == 11 and prism["intent"]["source"] == "override"
    # The same prompt, seed and model: the same image as the original's successful render.
    assert r.json()["data"][0]["b64_json"] == orig.json()["data"][0]["b64_json"]
    assert http.get(f"/faults/v1/renders/{rid}").json()["replays"] == [prism["request_id"]]
    assert http.get(f"/faults/v1/renders/{prism['request_id']}").json()["replay_of"] == rid
    bad = http.post(f"/faults/v1/renders/{rid}/replay", json={"model": "no-such-model"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "model"
    both = http.post(f"/faults/v1/renders/{rid}/replay", json={"model": "ok", "route": "ok"})
    assert both.status_code == 422
    assert http.post("/faults/v1/renders/never-rendered/replay", json={"route": "ok"}).status_code == 404


def test_listing_filters_and_pages(http):
    ids = [f"page-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for rid in ids:
        assert _gen(http, rid=rid, model="wrong_size").status_code == 200
    seen, cursor = [], None
    while True:
        params = {"route": "wrong_size", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = http.get("/faults/v1/renders", params=params).json()
        seen += [x["id"] for x in page["data"]]
        assert all(x["route"] == "wrong_size" for x in page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen[:3] == ids[::-1] and len(seen) == len(set(seen))  # newest first, no repeats
    assert http.get("/faults/v1/renders", params={"limit": 0}).status_code == 422
    since = http.get("/faults/v1/renders", params={"since": time.time() + 3600}).json()
    assert since["data"] == []


def test_retried_request_id_is_answered_from_the_record(http):
    rid = f"retry-{uuid.uuid4().hex[:8]}"
    first = _gen(http, rid=rid)
    again = _gen(http, rid=rid)
    assert again.status_code == 200
    assert again.json()["data"] == first.json()["data"]
    assert any("already rendered" in n for n in again.json()["prism"]["notes"])
    clash = _gen(http, rid=rid, seed=12)
    assert clash.status_code == 409 and clash.json()["error"]["param"] == "X-Request-ID"


def _routes(deployer, config):
    app = next(a for a in config["applications"] if a["name"] == "faults")
    return deployment_block(app, "Ingress")["user_config"]["routing"]


@pytest.fixture
def fresh_canary(deployer, http):
    """The canary route with a window of its own: a weight no earlier deploy used starts a new monitor (reconfigure
    keeps a monitor only for the same tier and weight), so a rollback left by an earlier run does not leak in."""
    config = deployer.config_copy()
    routing = _routes(deployer, config)
    routing["version"] = f"faults-canary-{uuid.uuid4().hex[:6]}"
    routing["routes"]["canary"]["canary"]["weight"] = 49
    deployer.deploy(config)
    try:
        _wait_version(http, routing["version"])
        yield
    finally:
        deployer.deploy(deployer.config_copy())  # the base weight (50): a fresh monitor again for later tests
        _wait_version(http, "faults-1")


def test_canary_split_is_sticky_and_rolls_back_on_failures(fresh_canary, http):
    users = [f"u{i}" for i in range(100)]
    sides = {u: http.post("/faults/v1/route", json={"prompt": PROMPT, "model": "canary"},
                          headers={"X-Request-ID": u}).json()["decision"]["canary"] for u in users}
    assert 0.3 < sum(sides.values()) / len(users) < 0.7
    assert all(http.post("/faults/v1/route", json={"prompt": PROMPT, "model": "canary"},
                         headers={"X-Request-ID": u}).json()["decision"]["canary"] == sides[u] for u in users[:20])
    canary_users = [u for u, c in sides.items() if c]
    # The request id decides the side (sticky: request_id), so render with ids known to land on the canary.
    for u in canary_users[:4]:  # the canary (tier nan) fails every render; users still get the stable model
        r = _gen(http, rid=u, model="canary")
        assert r.status_code == 200 and r.json()["prism"]["tier"] == "ok" and r.json()["prism"]["canary"]
        assert [f["reason"] for f in r.json()["prism"]["fallbacks"]] == ["nan"]
    state = http.get("/faults/v1/canary").json()
    route = state["routes"]["canary"]
    assert route["effective_weight"] == 0 and route["rolled_back"]["failures"] >= 4
    assert "failure rate" in state["events"][-1]["reason"] and state["events"][-1]["route"] == "canary"
    assert not any(http.post("/faults/v1/route", json={"prompt": PROMPT, "model": "canary"},
                             headers={"X-Request-ID": u}).json()["decision"]["canary"] for u in canary_users[:10])


def test_manual_rollback_is_one_config_change(deployer, http):
    config = deployer.config_copy()
    routing = _routes(deployer, config)
    routing["version"] = "faults-manual"
    routing["routes"]["ok"]["canary"] = {"tier": "wrong_size", "weight": 100, "rollback": None}
    deployer.deploy(config)
    try:
        _wait_version(http, "faults-manual")
        assert http.post("/faults/v1/route", json={"prompt": PROMPT}).json()["decision"]["tier"] == "wrong_size"
        routing["version"] = "faults-manual-0"
        routing["routes"]["ok"]["canary"]["weight"] = 0
        deployer.deploy(config)
        _wait_version(http, "faults-manual-0")
        assert all(http.post("/faults/v1/route", json={"prompt": PROMPT},
                             headers={"X-Request-ID": f"m{i}"}).json()["decision"]["tier"] == "ok" for i in range(20))
    finally:
        deployer.deploy(deployer.config_copy())
        _wait_version(http, "faults-1")


def _wait_version(http, version, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http.get("/faults/v1/policy").json()["policy"]["version"] == version:
            return
        time.sleep(0.3)
    pytest.fail(f"policy {version} never applied")


def test_budget_downgrades_or_refuses(http):
    """Tiny budgets (conftest): a pro user's first render spends theirs, and later ones are downgraded; an enterprise
    user's is refused. An earlier test may already have spent a tier's budget (budgets are per user tier and the
    session shares them), so the first render of each tier is allowed to be the one already past it."""
    first = _gen(http, user_tier="pro", model="garbage")
    assert first.status_code == 200, first.text
    if not first.json()["prism"]["degraded"]:  # this render spent the budget on the route it asked for
        assert first.json()["prism"]["route"] == "garbage" and first.json()["prism"]["cost_usd"] > 0
    second = _gen(http, user_tier="pro", model="garbage", seed=12)
    prism = second.json()["prism"]
    assert (prism["route"], prism["degraded"], prism["fallbacks"]) == ("ok", True, [])
    assert any("budget" in n for n in prism["notes"])
    spend = _gen(http, user_tier="enterprise")
    assert spend.status_code in (200, 429), spend.text
    refused = _gen(http, user_tier="enterprise", seed=12)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert refused.json()["error"]["code"] == "budget_exceeded"


def test_stats_and_cost_sums(http):
    rids = [f"cost-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    assert _gen(http, model="all_bad").status_code == 502  # this test's own failed render
    costs = [_gen(http, rid=rid, model="ok", seed=20 + i).json()["prism"]["cost_usd"] for i, rid in enumerate(rids)]
    assert all(c > 0 for c in costs)
    recs = [http.get(f"/faults/v1/renders/{rid}").json() for rid in rids]
    assert [r["cost_usd"] for r in recs] == pytest.approx(costs)
    stats = http.get("/faults/v1/stats", params={"minutes": 60}).json()
    by_route = {row["route"]: row for row in stats["by_route"]}
    assert by_route["ok"]["count"] >= 2 and by_route["ok"]["p50_ms"] > 0
    assert by_route["all_bad"]["failure_rate"] == 1.0
    assert stats["total"]["cost_usd"] == pytest.approx(sum(stats["cost_by_user_tier"].values()))
    assert stats["cost_by_user_tier"]["free"] >= sum(costs)
    assert http.get("/faults/v1/stats", params={"minutes": 0}).status_code == 422


def test_metrics_are_scraped_from_the_ray_metrics_agent(http):
    assert _gen(http, model="nan").status_code == 200  # a render with a fallback
    wanted = [r'ray_prism_requests_total\{[^}]*route="nan"[^}]*status="200"',
              r'ray_prism_fallbacks_total\{[^}]*reason="nan"', r"ray_prism_request_latency_ms_bucket\{",
              r'ray_prism_cost_usd_total\{[^}]*user_tier="free"',
              r'ray_prism_stage_latency_ms_bucket\{[^}]*stage="generate"']
    missing = missing_series(wanted)
    assert not missing, f"series not exported: {missing}"


def test_retry_while_in_flight_waits_for_the_one_render(base_url, http):
    """A client whose connection dropped retries with the same X-Request-ID while the first render still runs:
    the retry waits for it and both get the same answer from one render (chaos: a proxy killed mid-request)."""
    import concurrent.futures

    rid = f"inflight-{uuid.uuid4().hex[:8]}"
    body = {"prompt": PROMPT, "size": "64x64", "seed": 5, "model": "slowish"}  # ~4 s on its tier

    def post():
        return httpx.post(f"{base_url}{GEN}", json=body, headers={"X-Request-ID": rid}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post)
        deadline = time.monotonic() + 30
        while http.get("/faults/v1/load").json()["tiers"]["slowish"]["used"] == 0:  # the first is rendering
            assert time.monotonic() < deadline, "the first request never reached its tier"
            time.sleep(0.02)
        second = pool.submit(post)
        a, b = first.result(), second.result()
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["data"] == b.json()["data"]
    assert any("already rendered" in n for n in b.json()["prism"]["notes"])
    records = http.get("/faults/v1/renders", params={"route": "slowish", "limit": 500}).json()["data"]
    assert [r["id"] for r in records].count(rid) == 1


def test_budgets_survive_an_ingress_restart(http):
    """The spend ledger lives in the ingress replica; a replacement seeds it from the render records."""
    import ray

    _gen(http, user_tier="enterprise", seed=40)  # spends the tiny budget (or is refused: an earlier test spent it)
    assert _gen(http, user_tier="enterprise", seed=41).status_code == 429
    before = http.get("/faults/healthz").json()["replica"]
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "faults#Ingress#" in a["name"])
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline, after = time.monotonic() + 120, before
    while after == before and time.monotonic() < deadline:
        time.sleep(1)
        try:
            after = http.get("/faults/healthz", timeout=5).json().get("replica", before)
        except (httpx.HTTPError, ValueError):  # the proxy may still pick the dead replica for a moment
            pass
    assert after != before, "the ingress was not replaced within 120 s"
    refused = _gen(http, user_tier="enterprise", seed=42)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded", refused.text

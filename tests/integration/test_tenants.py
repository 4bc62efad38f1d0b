"""Keys and tenants over real HTTP: the /keyed app requires keys ($PRISM_AUTH in its runtime_env over YAML's
`optional`) and runs two ingress replicas; the main app takes keys optionally, as `make serve` ships. Keys are made
by the real CLI (`python -m graph.keys`) against the store the server uses, while it runs."""

import concurrent.futures
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from graph.auth import sign_link
from graph.keys import KeyStore
from tests.integration.conftest import METRICS_PORT, RECORDS_DIR, make_key

KEYED = "/keyed"
RAY_TMPDIR = os.environ["RAY_TMPDIR"]  # this session's private Ray dir (tests/conftest.py): every replica's logs
BODY = {"prompt": "a red star on a blue background", "size": "64x64"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(tenant: str, *flags: str) -> str:
    return make_key("keyed", "create", "--tenant", tenant, *flags)


def key_id(key: str) -> str:
    return key.split("_")[1]


@pytest.fixture(scope="module")
def admin(deployer) -> dict[str, str]:
    return bearer(new_key("ops", "--tier", "free", "--admin"))


def _gen(http, key: str | None, **extra) -> httpx.Response:
    return http.post(f"{KEYED}/v1/images/generations", json={**BODY, **extra},
                     headers=bearer(key) if key else {}, timeout=120)


def _record(http, path: str, headers: dict | None = None, timeout_s: float = 10) -> dict:
    """An inline answer's record, once committed: the answer does not wait for the group commit (graph/writer.py),
    and on the two-replica app the read may reach the replica that did not write it."""
    deadline = time.monotonic() + timeout_s
    while (r := http.get(path, headers=headers)).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    return r.json()


def _batches(http, key: str) -> int:
    return http.get(f"{KEYED}/v1/tiers", headers=bearer(key)).json()["ok"]["backlog"]["batches"]


def test_without_a_key_a_required_deployment_is_401_and_health_stays_open(http, base_url):
    from openai import AuthenticationError, OpenAI

    health = http.get(f"{KEYED}/healthz")
    assert health.status_code == 200 and health.json()["auth"] == "required"  # $PRISM_AUTH over the args' optional
    for method, path in (("POST", "/v1/images/generations"), ("POST", "/v1/route"), ("GET", "/v1/renders"),
                         ("GET", "/v1/models"), ("GET", "/v1/stats")):
        r = http.request(method, f"{KEYED}{path}", json=BODY if method == "POST" else None)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer") and r.json()["error"]["code"] == "invalid_api_key"
    # The official SDK: its api_key is the Prism key, nothing else changes.
    key = new_key("sdk-user", "--tier", "free")
    resp = OpenAI(base_url=f"{base_url}{KEYED}/v1", api_key=key, max_retries=0).images.generate(
        prompt=BODY["prompt"], size="64x64", response_format="b64_json")
    assert resp.data[0].b64_json and resp.model_extra["prism"]["user_tier"] == "free"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{base_url}{KEYED}/v1", api_key="not-needed", max_retries=0).images.generate(prompt="x")


def test_anonymous_callers_are_free_where_keys_are_optional(http):
    r = http.post("/v1/images/generations", json={**BODY, "user_tier": "enterprise"})
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert prism["user_tier"] == "free" and "user_tier" in prism["ignored_fields"]
    record = _record(http, f"/v1/renders/{prism['request_id']}")  # an anonymous caller sees anonymous renders
    assert record["user_tier"] == "free" and record["tenant"] == "anonymous" and record["key_id"] is None


def test_a_free_key_asserting_enterprise_is_routed_and_budgeted_as_free_and_told_so(http):
    key = new_key("claims-more", "--tier", "free")
    r = _gen(http, key, user_tier="enterprise")
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert prism["user_tier"] == "free" and prism["route"] == "std", prism  # enterprise would be `vip`
    assert "user_tier" in prism["ignored_fields"]
    record = _record(http, f"{KEYED}/v1/renders/{prism['request_id']}", bearer(key))
    assert (record["user_tier"], record["tenant"], record["key_id"]) == ("free", "claims-more", key_id(key))
    stats = http.get(f"{KEYED}/v1/stats", headers=bearer(key)).json()  # its own tenant's spend, by user tier
    assert stats["tenant"] == "claims-more" and set(stats["cost_by_user_tier"]) == {"free"}, stats
    assert stats["cost_by_user_tier"]["free"] == pytest.approx(prism["cost_usd"])


def test_a_gateway_key_may_assert_the_tier(http):
    key = new_key("edge-gateway", "--tier", "free", "--gateway")
    prism = _gen(http, key, user_tier="enterprise").json()["prism"]
    assert (prism["user_tier"], prism["route"]) == ("enterprise", "vip") and prism["ignored_fields"] == []
    assert _gen(http, key).json()["prism"]["user_tier"] == "free"  # nothing said: the key's own tier


def test_a_keys_rate_limit_is_429_with_retry_after_before_any_model_call(http):
    key = new_key("limited", "--tier", "free", "--rpm", "2")
    assert [_gen(http, key, seed=i).status_code for i in range(2)] == [200, 200]
    before = _batches(http, key)
    refused = [_gen(http, key, seed=9) for _ in range(6)]  # on either ingress replica: the store counts for both
    for r in refused:
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "2 renders per minute" in err["message"], err
        assert 1 <= int(r.headers["retry-after"]) <= 60
    assert _batches(http, key) == before  # refused before any model work
    replicas = {http.get(f"{KEYED}/healthz").json()["replica"] for _ in range(30)}
    assert len(replicas) == 2, replicas


def test_a_keys_concurrent_limit_frees_when_its_render_is_answered(http, base_url):
    key = new_key("one-at-a-time", "--tier", "free", "--concurrent", "1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(lambda: httpx.post(f"{base_url}{KEYED}/v1/images/generations",
                                              json={**BODY, "model": "held"}, headers=bearer(key), timeout=60))
        deadline = time.monotonic() + 30
        while http.get(f"{KEYED}/v1/load", headers=bearer(key)).json()["tiers"]["held"]["used"] < 1:
            assert time.monotonic() < deadline and not held.done(), "the held render never started"
            time.sleep(0.05)
        second = _gen(http, key)
        assert second.status_code == 429 and "1 renders at once" in second.json()["error"]["message"], second.text
        assert held.result().status_code == 200
    t = time.monotonic()
    assert _gen(http, key).status_code == 200 and time.monotonic() - t < 30


def test_tenant_a_cannot_read_replay_or_fetch_images_of_tenant_b_while_an_admin_can(http, admin):
    a, b = new_key("tenant-a", "--tier", "free"), new_key("tenant-b", "--tier", "free")
    r = _gen(http, a, response_format="url")
    assert r.status_code == 200, r.text
    rid, url = r.json()["prism"]["request_id"], r.json()["data"][0]["url"]
    plain = f"{KEYED}/v1/renders/{rid}/image.png?index=0"
    for method, path, body in (("GET", f"{KEYED}/v1/renders/{rid}", None), ("GET", plain, None),
                               ("POST", f"{KEYED}/v1/renders/{rid}/replay", {"model": "ok"})):
        other = http.request(method, path, json=body, headers=bearer(b))
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found", (path, other.text)
        assert http.request(method, path, json=body, headers=admin).status_code == 200, path
        assert http.request(method, path, json=body, headers=bearer(a)).status_code == 200, path
    assert rid not in [x["id"] for x in http.get(f"{KEYED}/v1/renders", headers=bearer(b)).json()["data"]]
    assert rid in [x["id"] for x in http.get(f"{KEYED}/v1/renders", headers=bearer(a)).json()["data"]]
    assert rid in [x["id"] for x in http.get(f"{KEYED}/v1/renders", headers=admin).json()["data"]]
    # B reusing A's request id learns nothing and gets nothing of A's.
    clash = http.post(f"{KEYED}/v1/images/generations", json={**BODY, "response_format": "url"},
                      headers={**bearer(b), "X-Request-ID": rid})
    assert clash.status_code == 409 and "tenant-a" not in clash.text, clash.text
    # The signed link works with no key at all (an <img> tag, the SDK's url flow).
    png = httpx.get(url, timeout=30)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_expired_and_tampered_image_links_are_refused(http):
    key = new_key("links", "--tier", "free")
    r = _gen(http, key, response_format="url")
    rid, url = r.json()["prism"]["request_id"], r.json()["data"][0]["url"]
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"

    def fetch(**changes) -> httpx.Response:
        return httpx.get(f"{base}?{urlencode({**query, **changes})}", timeout=30)

    assert fetch().status_code == 200
    assert fetch(sig=query["sig"][:-3] + "abc").status_code == 403
    assert fetch(expires=str(int(query["expires"]) + 86_400)).status_code == 403  # a longer life is a new link
    assert fetch(index="1").status_code == 403
    secret = KeyStore(Path(RECORDS_DIR) / "keyed").url_secret()  # what the server signs with: an expired link
    expired = sign_link(secret, rid, 0, ttl_s=60, now=time.time() - 120)
    r = httpx.get(f"{base}?{expired}", timeout=30)
    assert r.status_code == 403 and "expired" in r.json()["error"]["message"], r.text
    assert httpx.get(f"{base}?index=0", timeout=30).status_code == 401  # no link, no key


def test_a_disabled_or_rotated_key_stops_at_once_on_every_replica(http):
    old = new_key("rotating", "--tier", "free")
    assert _gen(http, old).status_code == 200
    new = make_key("keyed", "rotate", key_id(old))
    codes = [http.get(f"{KEYED}/v1/renders", headers=bearer(old)).status_code for _ in range(20)]
    assert codes == [401] * 20, codes
    assert _gen(http, new).status_code == 200
    assert http.get(f"{KEYED}/v1/renders", headers=bearer(new)).json()["data"], "the rotated key's tenant is the same"
    make_key("keyed", "disable", key_id(new))
    codes = [http.get(f"{KEYED}/v1/renders", headers=bearer(new)).status_code for _ in range(20)]
    assert codes == [401] * 20, codes


def test_the_operator_routes_are_for_admin_keys_and_a_tenant_sees_its_own_stats(http, admin):
    key = new_key("plain", "--tier", "pro")
    for path in ("/v1/policy", "/v1/canary"):
        r = http.get(f"{KEYED}{path}", headers=bearer(key))
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text
        assert http.get(f"{KEYED}{path}", headers=admin).status_code == 200
    own = http.get(f"{KEYED}/v1/stats", headers=bearer(key)).json()
    assert own["tenant"] == "plain" and own["total"].get("count", 0) == 0 and "spend_by_user_tier" not in own
    every = http.get(f"{KEYED}/v1/stats", headers=admin).json()
    assert every["tenant"] is None and every["total"]["count"] > 0


def test_keys_never_appear_in_logs_records_metrics_or_errors(http):
    key = new_key("secretive", "--tier", "free", "--rpm", "1")
    gone = new_key("secretive", "--tier", "free")
    make_key("keyed", "disable", key_id(gone))
    bodies = [_gen(http, key).text, _gen(http, key).text, _gen(http, gone).text,  # 200, 429, 401
              _gen(http, key[:-4] + "abcd").text,  # a tampered key
              http.get("/healthz", headers=bearer(key)).text]
    secrets_ = [key, gone, key[:-4] + "abcd", key.split("_", 2)[2], gone.split("_", 2)[2]]
    time.sleep(2)  # replicas flush their log lines
    metrics = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
    found = []
    for s in secrets_:
        found += [f"error body {i}" for i, b in enumerate(bodies) if s in b]
        found += ["metrics"] if s in metrics else []
        for root in (RAY_TMPDIR, os.path.join(RECORDS_DIR, "keyed")):
            for path in Path(root).rglob("*"):
                if path.is_file() and not path.is_symlink() and s.encode() in _read(path):
                    found.append(str(path))
    assert not found, found


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a socket or a file Ray removed meanwhile
        return b""

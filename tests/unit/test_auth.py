"""Keys and tenants without Ray: the caller of a request, the tier it is served as, what it may see, signed links,
a key's limits, and the key store + CLI against real SQLite in tmp_path."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from graph.auth import (
    ANONYMOUS,
    Authenticator,
    AuthSpec,
    Caller,
    KeyInfo,
    KeyUsage,
    Links,
    apply_caller,
    auth_mode,
    can_see,
    check_link,
    limit_refusal,
    require_admin,
    resolve_caller,
    sign_link,
)
from graph.errors import BudgetExceeded, Forbidden, RateLimited, Unauthorized
from graph.http import caller_of, make_app
from graph.keys import KeyStore, main
from graph.records import SqliteRenderStore
from graph.schemas import GenerationRequest

FREE = KeyInfo(key_id="k1", tenant="acme", user_tier="free")
GATEWAY = KeyInfo(key_id="k2", tenant="edge", user_tier="pro", gateway=True)
ADMIN = KeyInfo(key_id="k3", tenant="ops", user_tier="enterprise", admin=True)
KEYS = {"prism_k1_x": FREE, "prism_k2_x": GATEWAY, "prism_k3_x": ADMIN,
        "prism_k4_x": KeyInfo(key_id="k4", tenant="old", user_tier="pro", disabled=True)}


def lookup(key: str) -> KeyInfo | None:
    return KEYS.get(key)


CALLERS = [
    pytest.param("required", None, Unauthorized, id="required_without_key_is_401"),
    pytest.param("required", "Bearer prism_k1_x", "acme", id="required_with_key"),
    pytest.param("optional", None, ANONYMOUS, id="optional_without_key_is_anonymous"),
    pytest.param("optional", "Bearer prism_zz_unknown", Unauthorized, id="optional_wrong_key_is_401"),
    pytest.param("optional", "Bearer prism_k4_x", Unauthorized, id="disabled_key_is_401"),
    pytest.param("optional", "Basic dXNlcjpwYXNz", Unauthorized, id="another_scheme_is_401"),
    pytest.param("required", "Bearer sk-not-ours", Unauthorized, id="required_foreign_token_is_401"),
    pytest.param("optional", "Bearer not-needed", ANONYMOUS, id="optional_sdk_placeholder_is_anonymous"),
    pytest.param("off", "Bearer anything", ANONYMOUS, id="off_trusts_everyone"),
]


@pytest.mark.parametrize("mode,header,expected", CALLERS)
def test_the_caller_of_a_request(mode, header, expected):
    if expected is Unauthorized:
        with pytest.raises(Unauthorized) as err:
            resolve_caller(mode, header, lookup)
        assert err.value.headers["WWW-Authenticate"].startswith("Bearer")
        assert "prism_" not in err.value.message and "sk-not" not in err.value.message  # the key is never echoed
    else:
        assert resolve_caller(mode, header, lookup).tenant == expected


def test_only_a_gateway_key_or_auth_off_may_say_the_user_tier():
    body = {"prompt": "x", "user_tier": "enterprise"}
    free = GenerationRequest.model_validate(body)
    assert apply_caller(free, resolve_caller("optional", "Bearer prism_k1_x", lookup)) == ["user_tier"]
    assert free.user_tier == "free"
    anonymous = GenerationRequest.model_validate(body)
    assert apply_caller(anonymous, resolve_caller("optional", None, lookup)) == ["user_tier"]
    assert anonymous.user_tier == "free"
    gateway = GenerationRequest.model_validate(body)
    assert apply_caller(gateway, resolve_caller("required", "Bearer prism_k2_x", lookup)) == []
    assert gateway.user_tier == "enterprise"
    unsaid = GenerationRequest.model_validate({"prompt": "x"})  # nothing in the body: nothing ignored
    assert apply_caller(unsaid, resolve_caller("required", "Bearer prism_k3_x", lookup)) == []
    assert unsaid.user_tier == "enterprise"
    trusted = GenerationRequest.model_validate(body)
    assert apply_caller(trusted, resolve_caller("off", None, lookup)) == [] and trusted.user_tier == "enterprise"


def test_a_tenant_sees_its_own_renders_and_an_admin_sees_all():
    acme = resolve_caller("required", "Bearer prism_k1_x", lookup)
    admin = resolve_caller("required", "Bearer prism_k3_x", lookup)
    anonymous = resolve_caller("optional", None, lookup)
    assert can_see(acme, "acme") and not can_see(acme, "edge") and not can_see(acme, None)
    assert can_see(admin, "edge") and can_see(admin, None)
    assert can_see(anonymous, None) and can_see(anonymous, ANONYMOUS) and not can_see(anonymous, "acme")
    with pytest.raises(Forbidden):
        require_admin(acme, "/v1/policy")
    with pytest.raises(Unauthorized):
        require_admin(anonymous, "/v1/policy")
    require_admin(admin, "/v1/policy")


def test_a_signed_link_works_until_it_expires_and_not_once_altered():
    secret, now = b"s" * 32, 1_000_000.0
    query = dict(p.split("=", 1) for p in sign_link(secret, "r1", 0, 60, now=now).split("&"))
    expires, sig = int(query["expires"]), query["sig"]
    check_link(secret, "r1", 0, expires, sig, now=now + 59)
    with pytest.raises(Forbidden, match="expired"):
        check_link(secret, "r1", 0, expires, sig, now=now + 60)
    for rid, index, exp, s in (("r2", 0, expires, sig), ("r1", 1, expires, sig), ("r1", 0, expires + 3600, sig),
                               ("r1", 0, expires, sig[:-2] + "AA")):
        with pytest.raises(Forbidden, match="signature"):
            check_link(secret, rid, index, exp, s, now=now)
    with pytest.raises(Forbidden, match="signature"):
        check_link(b"t" * 32, "r1", 0, expires, sig, now=now)  # another store's secret
    with pytest.raises(Unauthorized):
        check_link(secret, "r1", 0, None, None, now=now)
    assert Links(secret, 60).url("http://h", "r1", 0, now=now) == f"http://h/v1/renders/r1/image.png?index=0&" \
                                                                     f"expires={expires}&sig={sig}"


LIMITS = [
    pytest.param(KeyInfo("k", "t", "free", rpm=3), KeyUsage(3, 970.0, 0, 0.0), "rpm", 30.0, id="rpm"),
    pytest.param(KeyInfo("k", "t", "free", rpm=3), KeyUsage(2, 970.0, 9, 0.0), None, None, id="under_rpm"),
    pytest.param(KeyInfo("k", "t", "free", concurrent=2), KeyUsage(50, 941.0, 2, 0.0), "concurrent", 1.0,
                 id="concurrent"),
    pytest.param(KeyInfo("k", "t", "free", budget_usd=0.5, budget_window_s=600), KeyUsage(0, None, 0, 0.5),
                 "budget", 600.0, id="budget"),
    pytest.param(KeyInfo("k", "t", "free"), KeyUsage(10**6, 0.0, 10**6, 10**6), None, None, id="no_limits"),
]


@pytest.mark.parametrize("info,usage,limit,retry", LIMITS)
def test_a_keys_limits_name_the_limit_and_when_to_come_back(info, usage, limit, retry):
    refusal = limit_refusal(info, usage, now=1000.0)
    assert (refusal and refusal.limit) == limit
    if refusal is not None:
        assert refusal.retry_after_s == pytest.approx(retry)
        err = refusal.error()
        assert isinstance(err, BudgetExceeded if limit == "budget" else RateLimited) and err.status_code == 429
        assert "Retry-After" in err.headers and info.key_id in err.message


def test_prism_auth_overrides_the_profile_and_a_wrong_value_is_named():
    assert auth_mode(AuthSpec(mode="optional"), {}) == "optional"
    assert auth_mode(AuthSpec(mode="optional"), {"PRISM_AUTH": "required"}) == "required"
    with pytest.raises(ValueError, match="PRISM_AUTH must be one of"):
        auth_mode(AuthSpec(), {"PRISM_AUTH": "yes"})


def test_the_http_edge_refuses_before_the_body_is_read_and_leaves_health_open():
    app = make_app()
    app.state.auth = Authenticator("required", lookup)

    @app.post("/v1/images/generations")
    async def generate(req: GenerationRequest, request: Request):
        return {"tenant": caller_of(request).tenant}

    @app.get("/healthz")
    async def health(request: Request):
        return {"tenant": caller_of(request).tenant}

    client = TestClient(app)
    r = client.post("/v1/images/generations", content=b"{not json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.post("/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer prism_k1_x"})
    assert r.json() == {"tenant": "acme"}
    assert client.get("/healthz").json() == {"tenant": ANONYMOUS}
    assert client.get("/healthz", headers={"Authorization": "Bearer prism_stale"}).status_code == 200


# ---- the key store and its CLI ---------------------------------------------------------------------------------

def test_a_key_is_stored_hashed_and_shown_once(tmp_path, capsys):
    assert main(["--dir", str(tmp_path), "create", "--tenant", "acme", "--tier", "pro", "--rpm", "5"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("prism_")
    data = b"".join(p.read_bytes() for p in tmp_path.glob("renders.db*"))
    assert key.encode() not in data and key.split("_", 2)[2].encode() not in data
    assert main(["--dir", str(tmp_path), "list"]) == 0
    listing = capsys.readouterr().out
    assert "tenant=acme" in listing and "rpm=5" in listing and key not in listing
    store = KeyStore(tmp_path)
    info = store.lookup(key)
    assert (info.tenant, info.user_tier, info.rpm, info.disabled) == ("acme", "pro", 5, False)
    assert store.lookup(key + "x") is None


def test_disable_and_rotate_stop_the_old_key_at_once_for_a_store_already_open(tmp_path, capsys):
    server = KeyStore(tmp_path)  # what an ingress replica holds open while the CLI runs beside it
    main(["--dir", str(tmp_path), "create", "--tenant", "acme", "--tier", "free", "--concurrent", "2"])
    first = capsys.readouterr().out.strip().splitlines()[-1]
    key_id = server.lookup(first).key_id
    main(["--dir", str(tmp_path), "rotate", key_id])
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert server.lookup(first).disabled and not server.lookup(second).disabled
    assert server.lookup(second).concurrent == 2 and server.lookup(second).tenant == "acme"
    with pytest.raises(Unauthorized):
        resolve_caller("required", f"Bearer {first}", server.lookup)
    main(["--dir", str(tmp_path), "disable", server.lookup(second).key_id])
    with pytest.raises(Unauthorized):
        resolve_caller("required", f"Bearer {second}", server.lookup)
    assert main(["--dir", str(tmp_path), "disable", "nosuchkey"]) == 1


def test_the_cli_names_a_bad_setting(tmp_path, capsys):
    for args, fragment in ((["--tenant", "anonymous", "--tier", "pro"], "reserved"),
                           (["--tenant", "a b", "--tier", "pro"], "--tenant must be"),
                           (["--tenant", "a", "--tier", "pro", "--concurrent", "0"], "--concurrent must be")):
        with pytest.raises(SystemExit):
            main(["--dir", str(tmp_path), "create", *args])
        assert fragment in capsys.readouterr().err


def test_limits_hold_across_stores_racing_for_the_last_place(tmp_path):
    """Two replicas (two KeyStores on one database) start renders for one key at once: exactly `rpm` start."""
    stores = [KeyStore(tmp_path), KeyStore(tmp_path)]
    _, info = stores[0].create("acme", "free", rpm=5)
    results, barrier = [], threading.Barrier(10)

    def start(i: int) -> None:
        barrier.wait()
        results.append(stores[i % 2].start(info, f"r{i}", hold_s=30))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is None for r in results) == 5
    assert {r.limit for r in results if r is not None} == {"rpm"}


def test_concurrency_frees_on_finish_and_a_dead_replicas_mark_expires(tmp_path):
    store = KeyStore(tmp_path)
    _, info = store.create("acme", "free", concurrent=1)
    assert store.start(info, "r1", hold_s=30, now=1000.0) is None
    assert store.start(info, "r2", hold_s=30, now=1001.0).limit == "concurrent"
    store.finish(info.key_id, "r1")
    assert store.start(info, "r2", hold_s=30, now=1002.0) is None  # r2 never finishes: its replica died
    assert store.start(info, "r3", hold_s=30, now=1031.0).limit == "concurrent"
    assert store.start(info, "r3", hold_s=30, now=1032.5) is None  # r2's mark expired with its deadline


def test_a_key_budget_counts_its_recorded_renders(tmp_path):
    records = SqliteRenderStore(tmp_path)
    keys = KeyStore(tmp_path)
    _, info = keys.create("acme", "free", budget_usd=0.02, budget_window_s=3600)
    assert keys.start(info, "r1", hold_s=30, now=5000.0) is None
    records.put({"id": "r1", "created": 5000.0, "cost_usd": 0.015, "tenant": "acme", "key_id": info.key_id}, [])
    records.put({"id": "o1", "created": 5000.0, "cost_usd": 9.0, "tenant": "acme", "key_id": "other"}, [])
    assert keys.start(info, "r2", hold_s=30, now=5001.0) is None
    records.put({"id": "r2", "created": 5001.0, "cost_usd": 0.015, "tenant": "acme", "key_id": info.key_id}, [])
    assert keys.start(info, "r3", hold_s=30, now=5002.0).limit == "budget"
    assert keys.start(info, "r3", hold_s=30, now=5000.0 + 3600.5) is None  # r1 left the window


def test_records_are_kept_per_tenant_and_an_old_store_gains_the_columns(tmp_path):
    old = sqlite3.connect(tmp_path / "renders.db")  # a store made before tenants: no tenant/key_id columns
    old.executescript("CREATE TABLE renders (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, created REAL "
                      "NOT NULL, failed INTEGER, status INTEGER, user_tier TEXT, intent TEXT, route TEXT, tier TEXT, "
                      "model TEXT, latency_ms REAL, cost_usd REAL, replay_of TEXT, request_hash TEXT, n_fallbacks "
                      "INTEGER, body TEXT NOT NULL);"
                      "INSERT INTO renders (id, created, body) VALUES "
                      """('before', 1.0, '{"id": "before", "created": 1.0}');""")
    old.close()
    store = SqliteRenderStore(tmp_path)
    store.put({"id": "a", "created": 2.0, "tenant": "acme", "cost_usd": 1.0, "user_tier": "pro"}, [])
    store.put({"id": "b", "created": 3.0, "tenant": "edge", "cost_usd": 2.0, "user_tier": "pro"}, [])
    store.put({"id": "c", "created": 4.0, "tenant": ANONYMOUS, "cost_usd": 4.0, "user_tier": "free"}, [])
    ids = lambda tenant: [r["id"] for r in store.list(tenant=tenant)[0]]  # noqa: E731
    assert ids("acme") == ["a"] and ids(ANONYMOUS) == ["c", "before"] and ids(None) == ["c", "b", "a", "before"]
    assert [r["created"] for r in store.rows_since(0, "edge")] == [3.0]
    assert store.cost_by_user_tier(0, "acme") == {"pro": 1.0}


def test_an_anonymous_caller_is_not_an_admin():
    assert not Caller(tenant=ANONYMOUS).admin and Caller(tenant=ANONYMOUS).anonymous

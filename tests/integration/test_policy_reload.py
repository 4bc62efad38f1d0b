"""A changed routing policy applied by redeploy takes effect in place; an invalid one is rejected."""

import time

import pytest

from graph.config import deployment_block, prism_app

ICON = {"prompt": "flat minimal app icon of a rocket"}


def _wait_policy(http, headers, predicate, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = http.get("/v1/policy", headers=headers).json()
        if predicate(body):
            return body
        time.sleep(0.3)
    pytest.fail(f"policy never reached the expected state: {body}")


@pytest.fixture
def restore(deployer, http, admin_headers):
    yield
    deployer.deploy(deployer.config_copy())
    _wait_policy(http, admin_headers, lambda b: b["policy"]["version"] == "cpu-1" and b["rejected"] is None)


def _routing(config):
    return deployment_block(prism_app(config), "Ingress")["user_config"]["routing"]


def test_policy_change_takes_effect_without_restart(deployer, http, admin_headers, restore):
    replica_before = http.get("/healthz").json()["replica"]
    assert http.post("/v1/route", json=ICON).json()["decision"]["route"] == "fast"

    config = deployer.config_copy()
    routing = _routing(config)
    routing["version"] = "cpu-2"
    routing["rules"].insert(0, {"name": "icons-premium", "match": {"intents": ["icon"]}, "route": "premium"})
    deployer.deploy(config)
    _wait_policy(http, admin_headers, lambda b: b["policy"]["version"] == "cpu-2")

    decision = http.post("/v1/route", json=ICON).json()["decision"]
    assert (decision["route"], decision["rule"]) == ("premium", "icons-premium")
    assert http.get("/healthz").json()["replica"] == replica_before  # reconfigured in place


def test_invalid_policy_is_rejected_and_old_one_keeps_serving(deployer, http, admin_headers, restore):
    config = deployer.config_copy()
    routing = _routing(config)
    routing["version"] = "broken"
    routing["rules"].append({"name": "oops", "match": {"intents": ["icon"]}, "route": "no-such-route"})
    deployer.deploy(config)
    body = _wait_policy(http, admin_headers, lambda b: b["rejected"] is not None)
    assert "no-such-route" in body["rejected"]["error"]
    assert body["policy"]["version"] == "cpu-1"
    assert http.post("/v1/route", json=ICON).json()["decision"]["route"] == "fast"

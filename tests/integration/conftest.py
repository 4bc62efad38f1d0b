"""One Ray + Serve instance for the whole integration session, deployed from the real serve_config.yaml.

The app is deployed exactly as `serve run serve_config.yaml` / `serve deploy` do it (a ServeDeploySchema
handed to the Serve controller), so the YAML's args, deployment options and routing user_config are tested.
"""

import base64
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from graph.config import ROOT, load_serve_config
from tests.integration.hosted_standins import hosted_standins, hosted_tiers
from tests.isolation import free_port

# PRISM_TEST_PORT, or 18000 when free, or any free port: never a port a running Prism (8000) holds.
# Kept in the environment: test modules import this file a second time (as tests.integration.conftest), and both
# copies must agree on the ports.
PORT = int(os.environ.setdefault("PRISM_TEST_PORT", str(free_port(18000))))
# The held fake appends a line here each time a batch starts running on its replica.
HELD_LOG = os.path.join(tempfile.gettempdir(), f"prism-held-{os.getpid()}.log")
# The dying fake exits unless this file exists (it writes it first); the sick fake fails probes while it exists.
DIE_MARKER = os.path.join(tempfile.gettempdir(), f"prism-die-{os.getpid()}.marker")
SICK_MARKER = os.path.join(tempfile.gettempdir(), f"prism-sick-{os.getpid()}.marker")
INTENT_HANG_MARKER = os.path.join(tempfile.gettempdir(), f"prism-intent-hang-{os.getpid()}.marker")
# While this file exists the faults app's OCR misreads every text (the typography miss -> 502 path over HTTP).
OCR_MISREAD_MARKER = os.path.join(tempfile.gettempdir(), f"prism-ocr-misread-{os.getpid()}.marker")
APPS = ("prism", "faults", "keyed")
# Ray's per-node metrics agent serves ray.serve.metrics here (Prometheus text), as `ray start
# --metrics-export-port` does on a cluster.
METRICS_PORT = int(os.environ.setdefault("PRISM_TEST_METRICS_PORT", str(free_port(PORT + 999))))
REMOTE_KEY_ENV = "PRISM_TEST_REMOTE_KEY"
# What async jobs sign webhooks with (the replicas inherit it); a test-only secret.
WEBHOOK_SECRET = os.environ.setdefault("PRISM_WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"prism-test-webhook-"
                                                                                             b"secret-32bytes!").decode())
# Each app records its renders under its own folder of this session's temp dir.
# In the environment, like the ports: both imports of this file (see PORT) must name the same folder.
RECORDS_DIR = os.environ.get("PRISM_TEST_RECORDS_DIR") or os.environ.setdefault(
    "PRISM_TEST_RECORDS_DIR", tempfile.mkdtemp(prefix="prism-records-"))
GPU_TIERS = ("ok", "nan", "garbage", "blank")


def missing_series(wanted: list[str], timeout_s: float = 90) -> list[str]:
    """The patterns of `wanted` that Ray's metrics endpoint still lacks after polling it for up to `timeout_s` (Ray
    exports every few seconds, so a series shows up a while after the render that counted it)."""
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        if all(re.search(w, text) for w in wanted):
            break
        time.sleep(2)
    return [w for w in wanted if not re.search(w, text)]


def _fake(fault: str, **kw) -> dict:
    return {"kind": "fault_injecting", "name": f"fault-injecting-{fault}", "fault": fault, "native_size": 64,
            "steps": 2, "guidance": 3.0, "cost": {"usd_per_second": 0.001}, **kw}


# sick: probed every second (2 consecutive failures replace it), stopped at once. slowish: drained for up to 30 s
# when a redeploy replaces it. scales: one render at a time per replica, scaled on it within a second or two.
TIER_OPTIONS = {
    "sick": {"health_check_period_s": 1, "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 1},
    "slowish": {"graceful_shutdown_wait_loop_s": 1, "graceful_shutdown_timeout_s": 30},
    "scales": {"max_ongoing_requests": 1, "graceful_shutdown_timeout_s": 1,
               # Below admission's one slot per replica: a replica holding its one render is past target.
               "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0.5,
                                      "upscale_delay_s": 0.5, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
                                      "look_back_period_s": 1}},
}


def faults_app(base_app: dict, extra_tiers: dict | None = None) -> dict:
    """A second app on /faults: the same graph with fault-injecting generator tiers, each falling back to a
    real built-in model (`ok`). Light: the fakes import no torch. Its typography stage accepts any OCR read
    (max_cer 1.0): OCR strictness is tested on the main app and in unit tests; this app tests the HTTP surface."""
    tiers = {
        # Every route's fallback: takes 4 renders at once (max_concurrency), so concurrent tests are not refused.
        "ok": {"kind": "builtin", "name": "prism-builtin-small", "config": "small", "native_size": 32, "steps": 2,
               "guidance": 2.0, "max_batch_size": 4, "max_concurrency": 4, "cost": {"usd_per_second": 0.001}},
        "nan": _fake("nan"), "garbage": _fake("garbage"), "blank": _fake("blank"), "raises": _fake("raise"),
        "wrong_size": _fake("wrong_size"), "oom": _fake("oom"),
        "oom_batch": _fake("oom", fault_oom_above_batch=1, max_batch_size=8, batch_wait_timeout_s=0.5),
        "slow": _fake("sleep", fault_sleep_s=20.0),
        "cfg": _fake("nan_above_guidance", fault_guidance_threshold=2.0),
        # Held busy for 20 s per call (released when the client goes away): backpressure and brownout.
        "held": _fake("sleep", fault_sleep_s=20.0, max_batch_size=1, fault_log_path=HELD_LOG),
        "held2": _fake("sleep", fault_sleep_s=20.0, max_batch_size=1),
        "dies": _fake("die", fault_marker_path=DIE_MARKER),
        "sick": _fake("unhealthy", fault_marker_path=SICK_MARKER, health_failures_to_replace=2),
        # Renders one at a time but admission lets 4 wait on it (max_concurrency): several in flight on one replica.
        "slowish": _fake("sleep", fault_sleep_s=4.0, max_batch_size=1, max_concurrency=4),
        # Killed mid-render by the chaos burst (its own tier: the other tests' replicas are left alone).
        "chaos": _fake("sleep", fault_sleep_s=1.5, max_batch_size=4, max_concurrency=4),
        # A real built-in model at 150 steps (a few seconds), one render at a time: async jobs' per-step events,
        # cancelling at a step, a job surviving its ingress replica.
        "slowbuiltin": {"kind": "builtin", "name": "prism-builtin-small-slow", "config": "small", "native_size": 32,
                        "steps": 150, "guidance": 2.0, "max_batch_size": 1, "max_concurrency": 1,
                        "cost": {"usd_per_second": 0.001}},
        # Autoscales 1 -> 2 -> 1 under a few seconds of load (short delays below).
        "scales": _fake("sleep", fault_sleep_s=2.0, max_batch_size=1),
        # Priorities: a 2-s render holds the tier's one slot while paid and free requests arrive.
        "prio": _fake("sleep", fault_sleep_s=2.0, max_batch_size=1),
        # A hosted tier whose "provider" is this Prism itself (the OpenAI Images API it serves): the `openai`
        # kind end to end through real HTTP. Its key variable is set below; Prism ignores the bearer token.
        "prism_remote": {"kind": "openai", "name": "prism-over-openai-api", "provider_model": "ok",
                         "base_url": f"http://127.0.0.1:{PORT}/faults", "api_key_env": REMOTE_KEY_ENV,
                         "native_size": 64, "send_seed": True, "timeout_s": 30, "max_batch_size": 4,
                         "cost": {"usd_per_image": 0.01}},
        **(extra_tiers or {}),  # hosted kinds against their providers' stand-ins (hosted_standins.py)
    }
    routes = {name: {"tier": name, "fallbacks": ["ok"], "max_latency_ms": 20000} for name in tiers}
    routes.update({
        # Four 4-s renders one after another on one replica, drained through a redeploy: 16 s of work plus the
        # redeploy, which on a loaded 2-core machine crossed the 20-s default (a 504 in CI); drain is the test's point.
        "slowish": {"tier": "slowish", "fallbacks": ["ok"], "max_latency_ms": 60000},
        "all_bad": {"tier": "nan", "fallbacks": ["garbage", "blank"], "max_latency_ms": 20000},
        "slow": {"tier": "slow", "fallbacks": ["ok"], "max_latency_ms": 20000, "attempt_timeout_ms": 1500},
        "too_slow": {"tier": "slow", "fallbacks": ["ok"], "max_latency_ms": 1500},
        "cfg": {"tier": "cfg", "fallbacks": ["ok"], "max_latency_ms": 20000, "retry_guidance_factor": 0.5},
        "budget": {"tier": "nan", "fallbacks": ["garbage", "ok"], "max_latency_ms": 20000, "max_attempts": 2},
        "bp": {"tier": "held", "fallbacks": [], "max_latency_ms": 30000},
        "prio": {"tier": "prio", "fallbacks": [], "max_latency_ms": 20000},
        # The slow built-in model with nothing to fall back to: while it renders, its one slot is the route's only.
        # 60-s deadlines: a first render on a fresh replica of a loaded 2-core machine took past 20 s (a 504).
        "slowbuiltin_only": {"tier": "slowbuiltin", "fallbacks": [], "max_latency_ms": 60000},
        "slowbuiltin": {"tier": "slowbuiltin", "fallbacks": ["ok"], "max_latency_ms": 60000},
        # Nothing to fall back to: a render whose replica died runs again on the replacement (with a fallback tier
        # it would move there at once, as the chaos burst's renders do: no 504 waiting out the restart).
        "dies": {"tier": "dies", "fallbacks": [], "max_latency_ms": 60000},
        "brown": {"tier": "held2", "fallbacks": [], "max_latency_ms": 30000,
                  "brownout": {"max_inflight": 1, "route": "ok"}},
        # Half the traffic to a canary that always renders NaN: protected by falling back to `ok`, and rolled
        # back automatically once 4 of its renders in the window failed past a 50% failure rate.
        "canary": {"tier": "ok", "fallbacks": [], "max_latency_ms": 20000,
                   "canary": {"tier": "nan", "weight": 50, "sticky": "request_id",
                              "rollback": {"window_s": 600, "min_samples": 4, "max_failure_rate": 0.5}}},
    })
    # Tiny budgets: the first render of a pro or enterprise user spends them.
    budgets = {"pro": {"usd": 1e-9, "route": "ok"}, "enterprise": {"usd": 1e-9, "action": "reject"}}
    small = {"ray_actor_options": {"num_cpus": 0.02}}
    # Logical GPUs (ray.init(num_gpus=2) on this CPU machine): these replicas ask for a quarter GPU each.
    gpu = {"ray_actor_options": {"num_cpus": 0.02, "num_gpus": 0.25}}
    for t in GPU_TIERS:
        tiers[t]["gpu_memory_gb"] = 10
    deployments = [
        {"name": "Ingress", **small, "user_config": {"routing": {"version": "faults-1", "default_route": "ok",
                                                                 "routes": routes, "rules": [],
                                                                 "budgets": budgets}}},
    ] + [{"name": f"Generator_{t}", **(gpu if t in GPU_TIERS else small), "max_ongoing_requests": 16,
          **TIER_OPTIONS.get(t, {})} for t in tiers if t != "held"] + [
        # Serve's own queue behind admission (its safety net): one running, one queued.
        {"name": "Generator_held", **small, "max_ongoing_requests": 1, "max_queued_requests": 1}]
    return {"name": "faults", "route_prefix": "/faults", "import_path": base_app["import_path"],
            # Auth off: these tests drive the HTTP surface as trusted callers (a gateway's view), saying user tiers
            # in the body; keys and tenants are tested on the /keyed app.
            "args": {"profile": "faults", "max_width": 256, "max_height": 256, "tiers": tiers, "auth": {"mode": "off"},
                     "webhooks": {"allow_private": True},  # the tests' receivers listen on loopback
                     "records": {"dir": os.path.join(RECORDS_DIR, "faults")},
                     "intent": {"timeout_s": 3, "fault_marker_path": INTENT_HANG_MARKER},
                     "post": {"backend": "realesrgan"},
                     "typography": {"ocr": "rapidocr", "max_cer": 1.0, "preload": False,
                                    "fault_misread_marker_path": OCR_MISREAD_MARKER}},
            "deployments": deployments}


def keyed_app(base_app: dict) -> dict:
    """A third app on /keyed with API keys required, through $PRISM_AUTH in the app's runtime_env (its YAML-style
    args say optional: the override is what is tested), and two ingress replicas, so a key disabled or rotated, a
    key's limits and the link secret are shown to hold on every replica. A real built-in model renders; `held` (a
    slow fake) holds a render for the concurrency limit. Enterprise users take the `vip` route: which route served a
    request shows which user tier it was served as."""
    ok = {"kind": "builtin", "name": "prism-builtin-small", "config": "small", "native_size": 32, "steps": 2,
          "guidance": 2.0, "max_batch_size": 4, "max_concurrency": 4, "cost": {"usd_per_second": 0.001}}
    tiers = {"ok": ok, "held": _fake("sleep", fault_sleep_s=3.0, max_batch_size=1, max_concurrency=4)}
    routes = {"std": {"tier": "ok", "fallbacks": [], "max_latency_ms": 30000},
              "vip": {"tier": "ok", "steps": 3, "fallbacks": [], "max_latency_ms": 30000},
              "held": {"tier": "held", "fallbacks": [], "max_latency_ms": 30000}}
    rules = [{"name": "enterprise-vip", "match": {"user_tiers": ["enterprise"]}, "route": "vip"}]
    small = {"ray_actor_options": {"num_cpus": 0.02}}
    return {"name": "keyed", "route_prefix": "/keyed", "import_path": base_app["import_path"],
            "runtime_env": {"env_vars": {"PRISM_AUTH": "required"}},
            "args": {"profile": "keyed", "max_width": 128, "max_height": 128, "tiers": tiers,
                     "auth": {"mode": "optional", "url_ttl_s": 600},
                     "records": {"dir": os.path.join(RECORDS_DIR, "keyed")},
                     "post": {"backend": "classical"}, "typography": {"ocr": "rapidocr", "preload": False}},
            "deployments": [{"name": "Ingress", **small, "num_replicas": 2,
                             "user_config": {"routing": {"version": "keyed-1", "default_route": "std",
                                                         "routes": routes, "rules": rules}}}]
            + [{"name": f"Generator_{t}", **small, "max_ongoing_requests": 16} for t in tiers]}


def make_key(app: str, *args: str) -> str:
    """A key made by the real CLI (`python -m graph.keys`) against the app's store while the server runs; returns
    the key it printed as its last line."""
    out = subprocess.run([sys.executable, "-m", "graph.keys", "--dir", os.path.join(RECORDS_DIR, app), *args],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    return out.stdout.strip().splitlines()[-1]


class Deployer:
    """Deploys (and redeploys) a serve config into the running test cluster."""

    def __init__(self, client, base_config: dict):
        self.client = client
        self.base_config = base_config

    def deploy(self, config: dict, timeout_s: float = 300) -> None:
        from ray import serve
        from ray.serve.schema import ServeDeploySchema

        self.client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            apps = serve.status().applications
            states = {name: apps[name].status if name in apps else None for name in APPS}
            if all(s == "RUNNING" for s in states.values()):
                return
            for name, s in states.items():
                if s == "DEPLOY_FAILED":
                    pytest.fail(f"deploy of {name} failed: {apps[name].message}")
            time.sleep(0.5)
        pytest.fail(f"app not RUNNING after {timeout_s}s: {serve.status()}")

    def config_copy(self) -> dict:
        return copy.deepcopy(self.base_config)


@pytest.fixture(scope="session")
def standins():
    """The hosted providers' stand-ins, served for the whole session: {kind: (base_url, Standin)}."""
    os.environ.setdefault(REMOTE_KEY_ENV, "prism-test-key-4f1c")  # the replicas inherit it
    with hosted_standins(os.environ[REMOTE_KEY_ENV]) as served:
        yield served


@pytest.fixture(scope="session")
def deployer(standins):
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api

    config = load_serve_config(ROOT / "serve_config.yaml")
    config["http_options"]["port"] = PORT
    config["applications"][0]["args"]["records"]["dir"] = os.path.join(RECORDS_DIR, "prism")
    config["applications"].append(faults_app(config["applications"][0], hosted_tiers(standins, REMOTE_KEY_ENV)))
    config["applications"].append(keyed_app(config["applications"][0]))
    # 2 logical CPUs for the real profile (as on this machine) + a little for the fault app's light fakes.
    os.environ.setdefault(REMOTE_KEY_ENV, "prism-test-key-4f1c")  # the replicas inherit it
    # address="local": always a new Ray instance of our own, never the user's `ray start` cluster (tests/conftest.py).
    ray.init(address="local", num_cpus=3, num_gpus=2, include_dashboard=False, namespace="serve", log_to_driver=False,
             _metrics_export_port=METRICS_PORT)
    try:
        client = serve_api.serve_start(http_options=config["http_options"], proxy_location=config["proxy_location"])
        d = Deployer(client, config)
        d.deploy(config)
        yield d
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(RECORDS_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def base_url(deployer) -> str:
    return f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="session")
def admin_headers(deployer) -> dict[str, str]:
    """An admin key of the main app (auth optional, as `make serve` ships): the operator routes need one."""
    return {"Authorization": f"Bearer {make_key('prism', 'create', '--tenant', 'ops', '--tier', 'free', '--admin')}"}


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c

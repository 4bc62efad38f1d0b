"""Async jobs over real HTTP on the /faults app (one ingress replica, auth off): `Prefer: respond-async` -> 202 and a
job; polling, Server-Sent Events per denoising step of a real built-in model (`slowbuiltin`: 150 steps, one render
at a time), cancel, signed webhooks to a local receiver, a job outliving its ingress replica, and the door."""

import base64
import concurrent.futures
import http.server
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from graph.jobs import verify_webhook
from tests.integration.conftest import WEBHOOK_SECRET, missing_series
from tests.isolation import free_port

F = "/faults"
ASYNC = {"Prefer": "respond-async"}
BODY = {"prompt": "a red star on a blue background", "size": "64x64"}
# The slow tier's route with no fallback: on the `slowbuiltin` route a render is admitted on its `ok` fallback while
# an earlier test's render still holds the slot, and never steps. Each test waits for the slot first (`_idle`).
ONLY = {"model": "slowbuiltin_only"}


def _submit(http, **body) -> httpx.Response:
    return http.post(f"{F}/v1/images/generations", json={**BODY, **body}, headers=ASYNC)


def _wait(http, jid: str, predicate, timeout_s: float = 120) -> dict:
    deadline, job = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        r = http.get(f"{F}/v1/jobs/{jid}")
        if r.status_code == 200:
            job = r.json()
            if predicate(job):
                return job
        time.sleep(0.1)
    pytest.fail(f"job {jid} never reached the state: {job}")


def _idle(http, timeout_s: float = 120) -> None:
    """Wait until no render holds the slow tier's one slot (a job of an earlier test may still be finishing)."""
    deadline = time.monotonic() + timeout_s
    while (load := http.get(f"{F}/v1/load").json())["tiers"]["slowbuiltin"]["used"] > 0:
        assert time.monotonic() < deadline, f"the slow tier never freed: {load['tiers']['slowbuiltin']}"
        time.sleep(0.1)


def _batches(http, tier: str) -> int:
    return http.get(f"{F}/v1/tiers").json()[tier]["backlog"]["batches"]


def _events(base_url: str, jid: str) -> list[tuple[str, dict]]:
    events, kind = [], None
    with httpx.stream("GET", f"{base_url}{F}/v1/jobs/{jid}/events", timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind in ("succeeded", "failed", "canceled"):
                    break
    return events


def test_a_job_is_202_at_once_and_polls_to_the_synchronous_answer(http):
    body = {"model": "ok", "seed": 11}
    sync = http.post(f"{F}/v1/images/generations", json={**BODY, **body}).json()
    t = time.monotonic()
    r = _submit(http, **body)
    assert r.status_code == 202 and time.monotonic() - t < 5, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["status"] in ("queued", "running")
    assert job["id"] == r.headers["x-request-id"]
    done = _wait(http, job["id"], lambda j: j["status"] == "succeeded")
    result = done["result"]
    assert [d["b64_json"] for d in result["data"]] == [d["b64_json"] for d in sync["data"]]
    assert {k: result["prism"][k] for k in ("route", "tier", "model", "seed", "steps")} == \
           {k: sync["prism"][k] for k in ("route", "tier", "model", "seed", "steps")}
    again = _submit(http, **body).json()  # another id: another job
    assert again["id"] != job["id"]


def test_the_event_stream_has_every_step_of_a_built_in_render_and_the_end(http, base_url):
    _idle(http)
    job = _submit(http, seed=1, previews=True, **ONLY).json()
    events = _events(base_url, job["id"])
    kinds = [k for k, _ in events]
    assert kinds[0] == "progress" and kinds[-1] == "succeeded", (kinds[:5] + kinds[-3:], events[-1])
    steps = [e["progress"]["step"] for k, e in events if k == "progress" and (e.get("progress") or {}).get("step")]
    assert steps == sorted(steps) and steps[-1] == 150 and len(steps) >= 75, steps[:5]
    stages = [e["progress"]["stage"] for k, e in events if k == "progress" and e.get("progress")]
    assert "post" in stages and "record" in stages and stages.index("post") > stages.index("generate")
    assert events[-1][1]["result"]["prism"]["steps"] == 150
    previews = [e["progress"]["preview"] for k, e in events
                if k == "progress" and "preview" in (e.get("progress") or {})]
    assert len(previews) >= 75, len(previews)  # asked for: a small PNG of the step's samples with each step
    assert Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1]))).size == (32, 32)
    late = _events(base_url, job["id"])  # connecting after the end: the state, then the end
    assert [k for k, _ in late] == ["progress", "succeeded"]


def test_cancelling_a_running_job_stops_it_at_a_step_and_frees_its_slot(http):
    _idle(http)
    job = _submit(http, seed=2, **ONLY).json()
    _wait(http, job["id"], lambda j: (j.get("progress") or {}).get("step", 0) >= 2, timeout_s=60)
    cancelled = http.post(f"{F}/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "canceled", cancelled
    _idle(http, timeout_s=5)  # its slot frees at the render's next step, not when its 150 steps would have ended
    t = time.monotonic()
    r = http.post(f"{F}/v1/images/generations", json={**BODY, **ONLY, "seed": 3})
    assert r.status_code == 200, r.text
    prism = r.json()["prism"]
    assert prism["tier"] == "slowbuiltin", prism
    # The slot and the model were free at once: no wait at the door, no queue behind the cancelled render.
    assert prism["admitted"]["waited_ms"] < 1000 and prism["timings_ms"]["queue"] < 1000, prism["timings_ms"]
    assert time.monotonic() - t < 60
    assert http.get(f"{F}/v1/tiers").json()["slowbuiltin"]["stats"]["cancelled"] >= 1


def test_a_cancelled_queued_job_never_runs(http, base_url):
    _idle(http)
    before = _batches(http, "slowbuiltin")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        holder = pool.submit(lambda: httpx.post(f"{base_url}{F}/v1/images/generations",
                                                json={**BODY, **ONLY, "seed": 4}, timeout=120))
        deadline = time.monotonic() + 30
        while http.get(f"{F}/v1/load").json()["tiers"]["slowbuiltin"]["used"] < 1:
            assert time.monotonic() < deadline and not holder.done(), "the holding render never started"
            time.sleep(0.05)
        # Enterprise may wait at the door for the route's one slot (its only tier: no fallback to run on instead).
        queued = _submit(http, model="slowbuiltin_only", seed=5, user_tier="enterprise")
        assert queued.status_code == 202, queued.text
        jid = queued.json()["id"]
        assert http.get(f"{F}/v1/jobs/{jid}").json()["status"] == "queued"
        cancelled = http.post(f"{F}/v1/jobs/{jid}/cancel").json()
        assert cancelled["status"] == "canceled" and cancelled["progress"]["stage"] != "generate", cancelled
        assert holder.result().status_code == 200
    time.sleep(1)
    assert _batches(http, "slowbuiltin") == before + 1  # the holder's batch only
    assert http.get(f"{F}/v1/renders/{jid}").status_code == 404


def test_a_saturated_system_refuses_the_async_post(http, base_url):
    _idle(http)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        holder = pool.submit(lambda: httpx.post(f"{base_url}{F}/v1/images/generations",
                                                json={**BODY, **ONLY, "seed": 6}, timeout=120))
        deadline = time.monotonic() + 30
        while http.get(f"{F}/v1/load").json()["tiers"]["slowbuiltin"]["used"] < 1:
            assert time.monotonic() < deadline and not holder.done(), "the holding render never started"
            time.sleep(0.05)
        refused = http.post(f"{F}/v1/images/generations", json={**BODY, "model": "slowbuiltin_only"},
                            headers={**ASYNC, "X-Request-ID": "refused-async-job"})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
        assert http.get(f"{F}/v1/jobs/refused-async-job").status_code == 404  # no job that waits forever
        assert holder.result().status_code == 200


class _Receiver(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    got: list[tuple[dict, bytes]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).got.append((dict(self.headers), body))
        self.send_response(type(self).answers.pop(0) if type(self).answers else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.answers, _Receiver.got = [500], []  # the first delivery fails: it must be retried
    server = http.server.HTTPServer(("127.0.0.1", free_port(19500)), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", _Receiver
    server.shutdown()


def test_a_webhook_is_signed_and_retried_after_the_receivers_500(http, receiver):
    url, got = receiver
    job = _submit(http, model="ok", seed=7, webhook=url).json()
    _wait(http, job["id"], lambda j: j["status"] == "succeeded")
    deadline = time.monotonic() + 30
    while len(got.got) < 2:
        assert time.monotonic() < deadline, f"deliveries: {len(got.got)}"
        time.sleep(0.1)
    (first_headers, first), (headers, body) = got.got[:2]
    assert first_headers["webhook-id"] == headers["webhook-id"] and first == body  # a retry is the same message
    assert verify_webhook(WEBHOOK_SECRET, headers, body)
    assert not verify_webhook(WEBHOOK_SECRET, headers, body.replace(b"succeeded", b"failed"))
    payload = json.loads(body)
    assert payload["type"] == "image.generation.succeeded" and payload["data"]["id"] == job["id"]
    deliveries = _wait(http, job["id"], lambda j: len(j["webhook"]["deliveries"]) >= 2)["webhook"]["deliveries"]
    assert [(d["status"], d["outcome"]) for d in deliveries[:2]] == [(500, "retried"), (200, "delivered")]
    assert missing_series([r'ray_prism_jobs_total\{[^}]*status="succeeded"',
                           r'ray_prism_webhook_deliveries_total\{[^}]*outcome="retried"',
                           r"ray_prism_job_queued_ms_bucket"]) == []


@pytest.mark.parametrize("target", ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data",
                                    "http://10.0.0.1/hook"])
def test_a_webhook_to_a_private_address_is_refused_where_the_profile_denies_it(http, target):
    key = __import__("tests.integration.conftest", fromlist=["make_key"]).make_key(
        "keyed", "create", "--tenant", "hooks", "--tier", "free")
    r = http.post("/keyed/v1/images/generations", json={**BODY, "webhook": target},
                  headers={**ASYNC, "Authorization": f"Bearer {key}"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "webhook", r.text
    assert "non-public" in r.json()["error"]["message"]


def test_a_job_outlives_its_ingress_replica(http, base_url):
    import ray

    _idle(http)
    job = _submit(http, seed=8, **ONLY).json()
    _wait(http, job["id"], lambda j: j["status"] == "running", timeout_s=60)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "faults#Ingress" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)  # the replica holding the job dies
    done = _wait(http, job["id"], lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout_s=240)
    assert done["status"] == "succeeded", done
    assert any("resumed" in n for n in done["result"]["prism"]["notes"]), done["result"]["prism"]["notes"]
    deadline = time.monotonic() + 120  # the app is whole again for the tests that follow
    while httpx.get(f"{base_url}{F}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)

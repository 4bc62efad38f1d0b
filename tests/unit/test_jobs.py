"""Async jobs without Ray: Standard Webhooks signatures, which webhook targets a profile allows, the retry schedule
and delivery outcomes, what a job shows and when its progress is stored, and the job table (adoption after a replica
stops beating) against real SQLite in tmp_path."""

from __future__ import annotations

import pytest

from graph.jobs import (
    JobStore,
    delivery_outcome,
    job_view,
    retry_delay,
    sign_webhook,
    store_progress,
    verify_webhook,
    webhook_refusal,
)

# The Standard Webhooks reference vector (svix-webhooks, go/webhook_test.go TestWebhookSign; the same vector is in
# the spec's libraries' tests).
VECTOR = {"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
          "timestamp": 1614265330, "body": b'{"test": 2432232314}',
          "signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}


def test_the_signature_matches_the_standard_webhooks_reference_vector():
    assert sign_webhook(VECTOR["secret"], VECTOR["id"], VECTOR["timestamp"], VECTOR["body"]) == VECTOR["signature"]


def test_a_receiver_accepts_only_an_unaltered_recent_delivery():
    headers = {"webhook-id": VECTOR["id"], "webhook-timestamp": str(VECTOR["timestamp"]),
               "webhook-signature": f"v1,bm90IGl0 {VECTOR['signature']}"}  # one of several signatures matches
    now = VECTOR["timestamp"] + 10
    assert verify_webhook(VECTOR["secret"], headers, VECTOR["body"], now=now)
    assert not verify_webhook(VECTOR["secret"], headers, VECTOR["body"] + b" ", now=now)
    assert not verify_webhook(VECTOR["secret"], headers, VECTOR["body"], now=now + 600)  # replayed later
    assert not verify_webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQQ==", headers, VECTOR["body"], now=now)
    assert not verify_webhook(VECTOR["secret"], {"webhook-id": VECTOR["id"]}, VECTOR["body"], now=now)


def _resolve(table: dict[str, list[str]]):
    return lambda host: table[host]


TARGETS = [
    pytest.param("https://hooks.example.com/x", False, (), None, id="public"),
    pytest.param("http://127.0.0.1:9000/hook", False, (), "non-public", id="loopback_denied"),
    pytest.param("http://127.0.0.1:9000/hook", True, (), None, id="loopback_on_a_loopback_profile"),
    pytest.param("http://169.254.169.254/latest/meta-data", False, (), "non-public", id="cloud_metadata"),
    pytest.param("http://10.1.2.3/", False, (), "non-public", id="private"),
    pytest.param("http://internal.example.com/", False, (), "non-public", id="name_resolving_private"),
    pytest.param("http://internal.example.com/", False, ("internal.example.com",), None, id="allow_listed"),
    pytest.param("http://[::1]/", False, (), "non-public", id="ipv6_loopback"),
    pytest.param("ftp://hooks.example.com/", True, (), "http(s)", id="scheme"),
    pytest.param("https://user:pw@hooks.example.com/", True, (), "credentials", id="credentials"),
]


@pytest.mark.parametrize("url,allow_private,allow_hosts,fragment", TARGETS)
def test_which_webhook_targets_a_profile_allows(url, allow_private, allow_hosts, fragment):
    resolve = _resolve({"hooks.example.com": ["93.184.215.14"], "internal.example.com": ["203.0.113.5", "10.0.0.7"]})
    refusal = webhook_refusal(url, allow_private, allow_hosts, resolve)
    assert (refusal is None) if fragment is None else (fragment in refusal), refusal


def test_deliveries_back_off_then_stop():
    delays = [retry_delay(a) for a in range(1, 8)]
    assert delays[:5] == sorted(delays[:5]) and delays[0] <= 1 and delays[5:] == [None, None]


@pytest.mark.parametrize("status,refused,attempt,expected", [
    (204, False, 1, ("delivered", None)), (500, False, 1, ("retried", 1.0)), (None, False, 2, ("retried", 5.0)),
    (500, False, 6, ("failed", None)), (None, True, 1, ("refused", None)), (301, False, 1, ("retried", 1.0))])
def test_a_deliverys_outcome_and_when_to_try_again(status, refused, attempt, expected):
    # A redirect is not followed (SSRF): not delivered, retried like a failure.
    assert delivery_outcome(status, refused, attempt) == expected


def test_progress_reaches_the_store_on_stage_changes_the_last_step_and_at_most_every_interval():
    step = {"stage": "generate", "step": 3, "steps": 150}
    assert store_progress(step, (0.0, ""), now=10.0, every_s=0.25)  # the first of its stage
    assert not store_progress(step, (10.0, "generate"), now=10.1, every_s=0.25)
    assert store_progress(step, (10.0, "generate"), now=10.3, every_s=0.25)
    assert store_progress({**step, "step": 150}, (10.0, "generate"), now=10.01, every_s=0.25)
    assert store_progress({"stage": "post"}, (10.0, "generate"), now=10.01, every_s=0.25)


def test_a_jobs_view_shows_its_webhook_deliveries_and_only_a_failed_jobs_error():
    job = {"id": "j", "status": "failed", "created": 1.0, "updated": 2.0, "progress": {"stage": "generate"},
           "error": {"code": "generation_failed"}, "request": {"webhook": "https://h.example/x"},
           "deliveries": [{"outcome": "delivered"}]}
    view = job_view(job)
    assert view["object"] == "image.generation.job" and view["error"] == {"code": "generation_failed"}
    assert view["webhook"] == {"url": "https://h.example/x", "events": None, "deliveries": [{"outcome": "delivered"}]}
    running = job_view({**job, "status": "running", "request": {}})
    assert "error" not in running and "webhook" not in running and "result" not in running


def test_a_job_of_a_replica_that_stopped_beating_is_adopted_once(tmp_path):
    a, b = JobStore(tmp_path), JobStore(tmp_path)
    assert a.create("j1", "acme", "replica-a", {"request": {"prompt": "x"}}, now=100.0)
    assert not a.create("j1", "acme", "replica-a", {}, now=101.0)  # the same id again: not a second job
    a.update("j1", status="running", now=101.0, progress={"stage": "generate", "step": 1, "steps": 8})
    assert b.adopt("replica-b", stale_s=10, now=105.0) == []  # replica-a beat at 100: not stale yet
    a.beat("replica-a", now=104.0)
    adopted = b.adopt("replica-b", stale_s=10, now=115.0)
    assert [j["id"] for j in adopted] == ["j1"] and adopted[0]["owner"] == "replica-b"
    assert adopted[0]["progress"]["step"] == 1 and adopted[0]["request"] == {"prompt": "x"}
    assert b.adopt("replica-c", stale_s=10, now=116.0) == []  # adopted once


def test_an_ended_job_stays_ended_and_a_cancel_reaches_its_owner(tmp_path):
    store = JobStore(tmp_path)
    store.create("j2", "acme", "replica-a", {}, now=1.0)
    store.request_cancel("j2")
    assert store.beat("replica-a", now=2.0) == ["j2"]
    store.update("j2", status="canceled", now=3.0)
    store.update("j2", status="succeeded", now=4.0)
    assert store.get("j2")["status"] == "canceled" and store.beat("replica-a", now=5.0) == []
    assert store.counts() == {"canceled": 1}
    store.create("j3", "acme", "replica-a", {}, now=6.0)  # still live: kept however old
    assert store.prune(before=10.0) == 1 and store.get("j2") is None and store.get("j3") is not None


@pytest.mark.parametrize("header,expected", [("respond-async", True), ("Respond-Async, wait=10", True),
                                             ("wait=5, respond-async", True), ("return=minimal", False),
                                             (None, False), ("respond-asynchronously", False)])
def test_prefer_respond_async_is_read_as_rfc_7240_writes_it(header, expected):
    from graph.jobs import wants_async

    assert wants_async(header) is expected

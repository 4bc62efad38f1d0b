"""Prism under the seeds' mixed traffic, with a burst. Run by loadtests/run.py; never collected by pytest
(gevent's patching breaks ssl when locust is imported after ray/httpx).

Stats entries: `POST gen:<intent>` is every request (errors are failures); `route <name>` records each 200 by the
route that served it (p50/p95 per route), and `accepted <user tier> <route>` the same by user tier (a paid request
may wait at the door by policy), `served <route>` every 200 less the wait the server says it had at the door
(`prism.admitted.waited_ms`: all user tiers together, the served time the latency goal is about); `503 <user tier>
<intent>` records designed overload answers apart from errors, by user tier (paid ones may wait at the door by
policy before theirs).
"""

import os
import random

from locust import FastHttpUser, LoadTestShape, between, events, task
from prompts import PROMPTS, TIERS, WEIGHTS  # Locust puts the locustfile's folder on sys.path

# loadtests/run.py's gateway key: the bodies' user tiers are honoured as a gateway's (anonymous callers are free).
KEY = {"Authorization": f"Bearer {os.environ['PRISM_LOAD_KEY']}"} if os.environ.get("PRISM_LOAD_KEY") else {}


class PrismUser(FastHttpUser):
    wait_time = between(float(os.environ.get("PRISM_WAIT_MIN", "1")), float(os.environ.get("PRISM_WAIT_MAX", "3")))
    network_timeout = 120.0
    connection_timeout = 10.0

    def _generate(self, intent: str):
        user_tier = random.choices(list(TIERS), weights=list(TIERS.values()))[0]
        body = {"prompt": random.choice(PROMPTS[intent]), "size": random.choice(["256x256", "512x512"]),
                "user_tier": user_tier}
        with self.client.post("/v1/images/generations", json=body, name=f"gen:{intent}", headers=KEY,
                              catch_response=True) as resp:
            elapsed_ms = resp.request_meta["response_time"] if hasattr(resp, "request_meta") else 0
            if resp.status_code == 200:
                prism = resp.json()["prism"]
                route, waited_ms = prism["route"], (prism.get("admitted") or {}).get("waited_ms", 0.0)
                events.request.fire(request_type="route", name=route, response_time=elapsed_ms,
                                    response_length=0, exception=None, context={})
                events.request.fire(request_type="accepted", name=f"{user_tier} {route}", response_time=elapsed_ms,
                                    response_length=0, exception=None, context={})
                events.request.fire(request_type="served", name=route, response_time=max(0.0, elapsed_ms - waited_ms),
                                    response_length=0, exception=None, context={})
                resp.success()
            elif resp.status_code == 503 and resp.headers.get("retry-after"):
                events.request.fire(request_type="503", name=f"{user_tier} {intent}", response_time=elapsed_ms,
                                    response_length=0, exception=None, context={})
                resp.success()  # designed backpressure: counted apart, not an error
            else:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")

    @task(WEIGHTS["background"])
    def background(self):
        self._generate("background")

    @task(WEIGHTS["icon"])
    def icon(self):
        self._generate("icon")

    @task(WEIGHTS["photoreal"])
    def photoreal(self):
        self._generate("photoreal")

    @task(WEIGHTS["typography"])
    def typography(self):
        self._generate("typography")

    @task(WEIGHTS["hero"])
    def hero(self):
        self._generate("hero")


class BurstShape(LoadTestShape):
    """calm -> 10x spike -> calm. PRISM_BASE_USERS users, PRISM_PHASE_S seconds a phase (env)."""

    base = int(os.environ.get("PRISM_BASE_USERS", "3"))
    phase = float(os.environ.get("PRISM_PHASE_S", "40"))

    def tick(self):
        t = self.get_run_time()
        if t < self.phase:
            return self.base, self.base
        if t < 2 * self.phase:
            return self.base * 10, self.base * 10
        if t < 3 * self.phase:
            return self.base, self.base * 10
        return None


if os.environ.get("PRISM_SHAPE", "burst") != "burst":
    del BurstShape  # Locust uses any shape class it finds; without one, -u/-r/-t from the command line apply

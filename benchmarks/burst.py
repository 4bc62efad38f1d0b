"""Admission under bursts, measured from outside: how fast an overloaded Prism says no, and what the requests it
takes on pay for it. One run, one Ray instance, loopback HTTP, the seeds' prompt mix, a lean raw-socket client:

    .venv/bin/python -m benchmarks.burst --profile sim    # serve_config.sim.yaml (H100 latency profiles)
    .venv/bin/python -m benchmarks.burst --profile cpu    # serve_config.yaml (what `make serve` runs)
    .venv/bin/python -m benchmarks.burst --door replica   # to the ingress replica's own port, without the proxy

1. unloaded: the routes' prompts in turn, one request at a time, 60 s and 20 a route: each route's unloaded p95.
2. capacity: a closed loop at high concurrency: the goodput the profile sustains (200s per second).
3. open loop at 10x that capacity (arrivals do not wait for answers, as real clients do not).
4. 300 requests at once, with this lean client and again with httpx (the client's own cost, side by side).
5. a mixed spike at 10x capacity: 10% enterprise, 90% free.
Goals (issue 16, set from what users need, not from this run): a refusal (503/429) at p99 within 50 ms under the
open-loop spike and within 500 ms for 300 at once; admitted requests at most 1.2x their route's unloaded p95
(less the door wait a paid request is given by design; judged on 20 or more samples);
nothing but 200 and designed refusals; at least 95% of enterprise requests admitted while free ones are shed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from benchmarks.serving import pct, start  # noqa: E402
from graph.config import ROOT, load_serve_config  # noqa: E402
from graph.keys import gateway_key  # noqa: E402
from loadtests.run import p95  # noqa: E402

PORT = 18100  # Serve's proxy
# `--door replica`: the ingress replica's own HTTP port (Serve's direct ingress), the proxy left out of the path.
# Serve reads these from the environment of the process that starts Ray (ray/serve/_private/constants.py).
REPLICA_PORT = 18101
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                      "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(REPLICA_PORT),  # the range's end is exclusive
                      "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(REPLICA_PORT + 1)}
TARGET = {"port": PORT}  # where the load generator sends: the proxy, or the ingress replica's own port
# The seeds' mix (loadtests/locustfile.py): mostly cheap work, some everyday images, a few posters and hero shots.
MIX = ([("soft teal to purple gradient background for slides", "fast")] * 6
       + [("flat minimal app icon of a rocket", "fast")] * 5
       + [("a photo of a golden retriever on a beach at sunset, 35mm", "standard")] * 4
       + [('a poster that says "GRAND OPENING"', "typography")] * 3
       + [("hero image for our saas landing page, cinematic", "standard")] * 2)
PROFILES = {"sim": "serve_config.sim.yaml", "cpu": "serve_config.yaml"}
MIN_P95_SAMPLES = 20  # a p95 of fewer samples is their max (loadtests/targets.yaml: min_p95_samples)


@dataclass
class Outcome:
    status: int
    ms: float
    route: str | None = None
    user_tier: str = "free"
    retry_after: bool = False
    body: dict = field(default_factory=dict)


async def send(client: httpx.AsyncClient, prompt: str, user_tier: str = "free", size: str = "256x256") -> Outcome:
    t = time.perf_counter()
    try:
        r = await client.post("/v1/images/generations", json={"prompt": prompt, "size": size, "user_tier": user_tier})
    except httpx.HTTPError as e:
        return Outcome(status=-1, ms=(time.perf_counter() - t) * 1000, body={"error": type(e).__name__})
    ms = (time.perf_counter() - t) * 1000
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    route = body.get("prism", {}).get("route") if r.status_code == 200 else None
    return Outcome(r.status_code, ms, route, user_tier, "retry-after" in r.headers, body)


HEADERS: dict[str, str] = {}  # the load generator's gateway key (its bodies say each request's user tier)


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{TARGET['port']}", timeout=300, headers=HEADERS,
                             limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200))


async def warm() -> None:
    """Each prompt of the mix once, one at a time (first renders load lazily)."""
    for prompt in dict.fromkeys(p for p, _ in MIX):
        await send_raw(prompt)


async def unloaded(min_samples: int, seconds: float) -> dict[str, list[float]]:
    """Each route's unloaded latencies (ms): the routes' prompts in turn, one request at a time, for `seconds` and on
    until each route has `min_samples` (3 rounds of the mix gave the typography route 9 samples, whose "p95" was their
    max, and the ratio swung with it). One at a time, not the routes side by side as loadtests/run.py does on the
    simulated profile: on the CPU profile three renders at once share the 2 cores, and that baseline came out 3x slow
    (accepted requests under the spike at 0.33x of it)."""
    groups: dict[str, list[str]] = {}
    for prompt, route in MIX:
        if prompt not in groups.setdefault(route, []):
            groups[route].append(prompt)
    by_route: dict[str, list[float]] = {}
    answered = dict.fromkeys(groups, 0)  # 200s per route of the mix (the answer's own route is what is kept)
    deadline, i = time.monotonic() + seconds, 0
    while time.monotonic() < deadline or min(answered.values()) < min_samples:
        if i > 10 * min_samples and min(answered.values()) < min_samples:  # a route that never answers: stop, say so
            raise RuntimeError(f"unloaded baseline: after {i} rounds, 200s per route {answered}")
        for route, prompts in groups.items():
            if answered[route] < min_samples or time.monotonic() < deadline:
                o = await send_raw(prompts[i % len(prompts)])
                if o.status == 200:
                    answered[route] += 1
                    by_route.setdefault(o.route, []).append(o.ms)
        i += 1
    return by_route


def served_ms(o: Outcome) -> float:
    """Latency less the door wait the server reports (`prism.admitted.waited_ms`: a paid request waiting for a slot
    by design), as the load test's `served` rows: what admitting others cost this request."""
    return o.ms - ((o.body.get("prism") or {}).get("admitted") or {}).get("waited_ms", 0.0)


async def closed_loop(concurrency: int, seconds: float) -> tuple[float, list[Outcome]]:
    """Goodput (200s per second) of `concurrency` clients that send again as soon as they are answered."""
    out, stop = [], time.monotonic() + seconds

    async def worker(i: int):
        k = i
        while time.monotonic() < stop:
            o = await send_raw(MIX[k % len(MIX)][0])
            out.append(o)
            k += concurrency
            if o.status != 200:
                await asyncio.sleep(0.05)  # a refused client backs off a little instead of spinning
    t = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - t
    return sum(o.status == 200 for o in out) / elapsed, out


async def open_loop(rate: float, seconds: float, enterprise_share: float = 0.0, seed: int = 0) -> list[Outcome]:
    """Arrivals at `rate` per second (Poisson), each sent without waiting for the others."""
    rng = random.Random(seed)
    tasks, t0, at = [], time.monotonic(), 0.0
    while at < seconds:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        prompt = rng.choice(MIX)[0]
        tier = "enterprise" if rng.random() < enterprise_share else "free"
        tasks.append(asyncio.ensure_future(send_raw(prompt, tier)))
        at += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


async def at_once(n: int) -> list[Outcome]:
    async with client() as c:
        return list(await asyncio.gather(*(send(c, MIX[i % len(MIX)][0]) for i in range(n))))


async def send_raw(prompt: str, user_tier: str = "free", size: str = "256x256", port: int | None = None) -> Outcome:
    """One request over a fresh socket with hand-written HTTP/1.1: far less client Python per request than httpx, so
    a flood measures the server, not the client that shares its 2 cores (run 4 shows both clients side by side)."""
    port = port or TARGET["port"]
    body = json.dumps({"prompt": prompt, "size": size, "user_tier": user_tier}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
    request = (f"POST /v1/images/generations HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\nconnection: close\r\n{head}\r\n").encode() + body
    t = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        status_line = await reader.readline()
        headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        rest = await reader.read()
        ms = (time.perf_counter() - t) * 1000
        writer.close()
    except OSError as e:
        return Outcome(status=-1, ms=(time.perf_counter() - t) * 1000, body={"error": type(e).__name__})
    status = int(status_line.split()[1])
    try:
        answer = json.loads(rest) if "content-type: application/json" in headers else {}
    except ValueError:
        answer = {}
    route = answer.get("prism", {}).get("route") if status == 200 else None
    return Outcome(status, ms, route, user_tier, "\nretry-after:" in "\n" + headers, answer)


async def at_once_raw(n: int) -> list[Outcome]:
    return list(await asyncio.gather(*(send_raw(MIX[i % len(MIX)][0]) for i in range(n))))


def summary(name: str, outs: list[Outcome], base_p95: dict[str, float]) -> dict:
    ok = [o for o in outs if o.status == 200]
    refused = [o for o in outs if o.status in (503, 429) and o.retry_after]
    other = [o for o in outs if o not in ok and o not in refused]
    ratios = {}
    for route, base in base_p95.items():
        mine = [served_ms(o) for o in ok if o.route == route]
        if mine:
            ratios[route] = (p95(mine) / base, len(mine))
    row = {"name": name, "sent": len(outs), "ok": len(ok), "refused": len(refused), "other": len(other),
           "refused_p50": pct([o.ms for o in refused], 50) if refused else None,
           "refused_p99": pct([o.ms for o in refused], 99) if refused else None,
           "accepted_p95_ratio": ratios, "other_codes": sorted({o.status for o in other})}
    for tier in ("enterprise", "free"):
        mine = [o for o in outs if o.user_tier == tier]
        if mine and any(o.user_tier == "enterprise" for o in outs):
            row[f"{tier}_admitted"] = sum(o.status == 200 for o in mine) / len(mine)
    return row


def show(row: dict) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.0f}"

    ratios = ", ".join(f"{r} {v:.2f}x (n={n}{'' if n >= MIN_P95_SAMPLES else ', not judged'})"
                       for r, (v, n) in sorted(row["accepted_p95_ratio"].items())) or "-"
    extra = "".join(f"; {k} {row[k]:.0%}" for k in ("enterprise_admitted", "free_admitted") if k in row)
    print(f"| {row['name']} | {row['sent']} | {row['ok']} | {row['refused']} | {row['other']} "
          f"{row['other_codes'] or ''} | {fmt(row['refused_p50'])} / {fmt(row['refused_p99'])} ms | {ratios}{extra} |",
          flush=True)


def run(profile: str, seconds: float, ingress_max_ongoing: int | None = None, at_once_only: bool = False,
        max_total: int | None = None, render_threads: int | None = None, rate: float | None = None,
        door: str = "proxy") -> None:
    if door == "replica":  # before Ray starts: its processes read the switch from the environment
        os.environ.update(DIRECT_INGRESS_ENV)
    cfg = load_serve_config(ROOT / PROFILES[profile])
    cfg["http_options"]["port"] = PORT
    ingress = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Ingress")
    if ingress_max_ongoing is not None:  # what the Serve proxy lets into the ingress before it refuses itself
        ingress["max_ongoing_requests"] = ingress_max_ongoing
    if max_total is not None:  # renders admitted at once across tiers
        ingress["user_config"]["routing"].setdefault("admission", {})["max_total"] = max_total
    for d in cfg["applications"][0]["deployments"]:
        if render_threads is not None and d["name"].startswith("Generator"):  # torch's threads per replica
            env = d.setdefault("ray_actor_options", {}).setdefault("runtime_env", {}).setdefault("env_vars", {})
            env["OMP_NUM_THREADS"] = str(render_threads)
    records = tempfile.mkdtemp(prefix="prism-burst-")
    cfg["applications"][0]["args"].setdefault("records", {})["dir"] = records
    HEADERS["Authorization"] = f"Bearer {gateway_key(records)}"
    start(cfg)
    if door == "replica":
        TARGET["port"] = REPLICA_PORT
        wait_for_port(REPLICA_PORT)
    print(f"door: {door} (port {TARGET['port']})", flush=True)
    asyncio.run(warm())
    if at_once_only:
        print("| run | sent | 200 | refused + Retry-After | other | refusal p50 / p99 | accepted p95 / unloaded p95 |")
        print("|---|---|---|---|---|---|---|")
        show(summary("300 at once", asyncio.run(at_once_raw(300)), {}))
        time.sleep(10)
        show(summary("300 at once, httpx client", asyncio.run(at_once(300)), {}))
        return
    base_p95 = {}
    for route, lat in sorted(asyncio.run(unloaded(MIN_P95_SAMPLES, 60)).items()):
        base_p95[route] = p95(lat)
        print(f"unloaded {route}: p50 {statistics.median(lat):.0f} ms, p95 {base_p95[route]:.0f} ms (n={len(lat)})")
    capacity, _ = asyncio.run(closed_loop(32, seconds))
    print(f"capacity (closed loop, 32 clients, {seconds:g} s): {capacity:.2f} renders/s", flush=True)
    if rate is not None:  # the same offered load as another run, for a side-by-side comparison
        capacity = rate / 10
    print("| run | sent | 200 | refused + Retry-After | other | refusal p50 / p99 | accepted p95 / unloaded p95 |")
    print("|---|---|---|---|---|---|---|")
    show(summary(f"open loop 10x ({10 * capacity:.1f}/s, {seconds:g} s)", asyncio.run(open_loop(10 * capacity,
                                                                                                 seconds)), base_p95))
    show(summary("300 at once", asyncio.run(at_once_raw(300)), base_p95))
    time.sleep(10)  # the admitted few finish: both clients start from the same idle system
    show(summary("300 at once, httpx client", asyncio.run(at_once(300)), base_p95))
    show(summary("mixed 10x, 10% enterprise", asyncio.run(open_loop(10 * capacity, seconds, 0.1, seed=1)),
                 base_p95))


def wait_for_port(port: int, timeout_s: float = 60) -> None:
    """The ingress replica binds its own port after it reports running: wait until it answers."""
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="sim")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--ingress-max-ongoing", type=int, default=None,
                    help="override the profile's Ingress max_ongoing_requests (a side-by-side knob)")
    ap.add_argument("--at-once-only", action="store_true", help="only the 300-at-once runs, both clients")
    ap.add_argument("--max-total", type=int, default=None,
                    help="override the policy's admission.max_total (renders at once across tiers)")
    ap.add_argument("--render-threads", type=int, default=None,
                    help="torch threads per generator replica (OMP_NUM_THREADS; Ray's default: 1 for num_cpus < 1)")
    ap.add_argument("--rate", type=float, default=None,
                    help="the open loops' arrival rate (default: 10x the capacity this run measures)")
    ap.add_argument("--door", choices=("proxy", "replica"), default="proxy",
                    help="send to Serve's proxy (what `make serve` answers on) or to the ingress replica's own port "
                         "(Serve's direct ingress, RAY_SERVE_ENABLE_DIRECT_INGRESS): what the proxy's hop costs")
    args = ap.parse_args(argv)
    run(args.profile, args.seconds, args.ingress_max_ongoing, args.at_once_only, args.max_total, args.render_threads,
        args.rate, args.door)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

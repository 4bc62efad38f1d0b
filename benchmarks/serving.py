"""Serving benchmarks, each printing ratios measured side by side in one run (one Ray instance, loopback):

    .venv/bin/python benchmarks/serving.py overhead   # full graph (zero-latency simulated models) vs ingress-only
    .venv/bin/python benchmarks/serving.py routed     # Prism's routing vs everything on the premium tier
    .venv/bin/python benchmarks/serving.py batching   # built-in tier at concurrency 16: backlog batches vs batch 1
    .venv/bin/python benchmarks/serving.py records    # render records on vs off (two copies of the graph)
    .venv/bin/python benchmarks/serving.py served     # make serve's fast route end to end, one request at a time
    .venv/bin/python -m benchmarks.burst --profile sim|cpu   # admission under bursts (benchmarks/burst.py)

Results are recorded in benchmarks/RESULTS.md. Medians and p95 over all requests of a run.
"""

import asyncio
import copy
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from graph.config import ROOT, load_serve_config  # noqa: E402
from graph.keys import gateway_key  # noqa: E402

PORT = 18100
BASE = f"http://127.0.0.1:{PORT}"
MIX = [("soft teal to purple gradient background for slides", "free")] * 6 + \
      [("flat minimal app icon of a rocket", "free")] * 5 + \
      [("a photo of a golden retriever on a beach at sunset, 35mm", "free")] * 4 + \
      [('a poster that says "GRAND OPENING"', "free")] * 3 + \
      [("hero image for our saas landing page, cinematic", "pro")] * 2


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def drive_statuses(path: str, bodies: list[dict], concurrency: int) -> list[tuple[int, float, bool]]:
    """(status, latency ms, has Retry-After) for every request, `concurrency` at a time."""
    out, queue = [], list(bodies)
    async with httpx.AsyncClient(base_url=BASE, timeout=300) as client:
        async def worker():
            while queue:
                body = queue.pop()
                t = time.perf_counter()
                r = await client.post(path, json=body)
                out.append((r.status_code, (time.perf_counter() - t) * 1000, "retry-after" in r.headers))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def drive(path: str, bodies: list[dict], concurrency: int) -> tuple[list[float], list[dict], int]:
    """Send bodies with `concurrency` workers; returns latencies (ms) of 200s, their JSON, non-200 count."""
    lat, out, bad = [], [], 0
    queue = list(bodies)
    async with httpx.AsyncClient(base_url=BASE, timeout=300, headers=HEADERS) as client:
        async def worker():
            nonlocal bad
            while queue:
                body = queue.pop()
                t = time.perf_counter()
                r = await client.post(path, json=body)
                if r.status_code == 200:
                    lat.append((time.perf_counter() - t) * 1000)
                    out.append(r.json())
                else:
                    bad += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, out, bad


HEADERS: dict[str, str] = {}  # a gateway key where a benchmark's bodies say the user tier (routed)


def sequential(path: str, body: dict, n: int, port: int = PORT) -> list[float]:
    """Latencies (ms) of n requests one after another on one keep-alive connection, with the standard library's
    HTTP client: a few tens of microseconds of client per request, where httpx's asyncio stack costs milliseconds
    on this CPU, so what is left is the server's."""
    import http.client
    import json

    conn, data, lat = http.client.HTTPConnection("127.0.0.1", port, timeout=60), json.dumps(body), []
    for _ in range(n):
        t = time.perf_counter()
        conn.request("POST", path, data, {"Content-Type": "application/json", **HEADERS})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"{path}: {r.status}")
        lat.append((time.perf_counter() - t) * 1000)
    conn.close()
    return lat


def start(config: dict) -> None:
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
        serve_api.serve_start(http_options={"host": "127.0.0.1", "port": PORT})
    from ray.serve.context import _get_global_client

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
    deadline = time.monotonic() + 300
    names = [a["name"] for a in config["applications"]]
    while time.monotonic() < deadline:
        apps = serve.status().applications
        if all(n in apps and apps[n].status == "RUNNING" for n in names):
            return
        time.sleep(0.5)
    raise SystemExit(f"apps not running: {serve.status()}")


def sim_config(zero_latency: bool = False) -> dict:
    cfg = load_serve_config(ROOT / "serve_config.sim.yaml")
    cfg["http_options"]["port"] = PORT
    app = cfg["applications"][0]
    if zero_latency:
        for spec in app["args"]["tiers"].values():
            spec["latency_ms_p50"], spec["latency_ms_p95"] = 0.001, 0.001
    return cfg


def overhead() -> None:
    cfg = sim_config(zero_latency=True)
    for spec in cfg["applications"][0]["args"]["tiers"].values():
        spec["max_concurrency"] = 32  # admission lets concurrency 16 in: this measures the path, not refusals
    bare = {"name": "bare", "route_prefix": "/bare", "import_path": "benchmarks.bare_ingress:app",
            "deployments": [{"name": "BareIngress", "ray_actor_options": {"num_cpus": 0.1},
                                     "max_ongoing_requests": 64}]}
    cfg["applications"].append(bare)
    start(cfg)
    # No `intent` in the body: the classifier (MiniLM + head) runs, as for a normal request.
    body = {"prompt": "flat minimal app icon of a rocket", "size": "64x64"}
    print("graph overhead: /v1/images/generations through the full graph (zero-latency simulated generators, the "
          "intent classified) vs a one-deployment ingress that parses the same body and returns a 64x64 PNG; "
          "'stages' = the classifier's, post's and encoding's own compute (prism.timings_ms)")
    for conc in (1, 16):
        n = 60 if conc == 1 else 320
        asyncio.run(drive("/v1/images/generations", [body] * 20, conc))  # warm-up
        full, outs, bad_f = asyncio.run(drive("/v1/images/generations", [body] * n, conc))
        bare_l, _, bad_b = asyncio.run(drive("/bare/v1/images/generations", [body] * n, conc))
        stages = [sum(o["prism"]["timings_ms"].get(k, 0.0) for k in ("intent", "post", "typography", "encode"))
                  for o in outs]
        adds = statistics.median(full) - statistics.median(bare_l) - statistics.median(stages)
        print(f"  concurrency {conc:2d}: full p50 {statistics.median(full):7.1f} ms p95 {pct(full, 95):7.1f} | "
              f"ingress-only p50 {statistics.median(bare_l):6.1f} p95 {pct(bare_l, 95):6.1f} | stages p50 "
              f"{statistics.median(stages):5.1f} | graph adds p50 {adds:5.1f} ms | non-200: {bad_f}/{bad_b}")
    asyncio.run(drive("/v1/route", [body] * 20, 1))
    route, routed, bad = asyncio.run(drive("/v1/route", [body] * 100, 1))
    bare_l, _, _ = asyncio.run(drive("/bare/v1/images/generations", [body] * 100, 1))
    intent = statistics.median(o["timings_ms"].get("intent", 0.0) for o in routed)
    print(f"  /v1/route (classifier + rules, no model) concurrency 1: p50 {statistics.median(route):.1f} ms, "
          f"p95 {pct(route, 95):.1f} ms, non-200 {bad} | of which the classifier (MiniLM + head) p50 {intent:.1f} ms"
          f" | the bare ingress's round trip p50 {statistics.median(bare_l):.1f} ms")
    # The same at concurrency 1 with a lean client (above: httpx), so the client's own cost is not counted.
    lean = {name: sequential(path, body, 100) for name, path in (
        ("full", "/v1/images/generations"), ("bare", "/bare/v1/images/generations"), ("route", "/v1/route"))}
    print("  lean client, concurrency 1: " + " | ".join(f"{k} p50 {statistics.median(v):.1f} ms p95 {pct(v, 95):.1f}"
                                                       for k, v in lean.items()))


def routed() -> None:
    cfg = sim_config()
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Ingress":  # measure the routing itself: no load-based brownout in either arm
            for route in d["user_config"]["routing"]["routes"].values():
                route.pop("brownout", None)
    records = tempfile.mkdtemp(prefix="prism-routed-")
    cfg["applications"][0]["args"]["records"] = {"dir": records}
    HEADERS["Authorization"] = f"Bearer {gateway_key(records)}"  # the mix's user tiers, as a gateway says them
    start(cfg)
    bodies = [{"prompt": p, "user_tier": t, "size": "256x256", "seed": i} for i, (p, t) in enumerate(MIX * 4)]
    mono = [{**b, "model": "premium"} for b in bodies]
    asyncio.run(drive("/v1/images/generations", bodies[:8], 4))
    r_lat, r_out, r_bad = asyncio.run(drive("/v1/images/generations", bodies, 4))
    m_lat, m_out, m_bad = asyncio.run(drive("/v1/images/generations", mono, 4))

    def summary(lat, out):
        cost = statistics.mean(o["prism"]["cost_usd"] for o in out)
        ocr = [o["prism"]["ocr"]["passed"] for o in out if o["prism"].get("ocr")]
        return statistics.median(lat), pct(lat, 95), cost, (sum(ocr) / len(ocr)) if ocr else float("nan")

    r, m = summary(r_lat, r_out), summary(m_lat, m_out)
    print(f"routed vs monolith (serve_config.sim.yaml: H100 latency profiles; {len(bodies)} requests of the seeds' "
          f"mix, concurrency 4)")
    print(f"  routed:   p50 {r[0]:7.0f} ms  p95 {r[1]:7.0f} ms  cost/render ${r[2]:.5f}  OCR pass {r[3]:.0%}  "
          f"non-200 {r_bad}")
    print(f"  monolith: p50 {m[0]:7.0f} ms  p95 {m[1]:7.0f} ms  cost/render ${m[2]:.5f}  OCR pass {m[3]:.0%}  "
          f"non-200 {m_bad}")
    print(f"  routed/monolith: p50 {r[0] / m[0]:.2f} ({(r[0] / m[0] - 1):+.0%}), p95 {r[1] / m[1]:.2f}, "
          f"cost {r[2] / m[2]:.2f} ({(r[2] / m[2] - 1):+.0%})")


def batching() -> None:
    """The built-in fast tier at concurrency 16 on one replica: batches taken from the backlog (up to 8) vs batch 1."""
    base = load_serve_config(ROOT / "serve_config.yaml")
    base["http_options"]["port"] = PORT
    app = base["applications"][0]
    app["args"]["tiers"] = {"fast": app["args"]["tiers"]["fast"]}
    app["args"]["tiers"]["fast"].update(max_batch_size=8, max_concurrency=16)  # admission lets all 16 in
    app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("Generator_")
                          or d["name"] == "Generator_fast"]
    for d in app["deployments"]:
        if d["name"] == "Generator_fast":
            d.pop("autoscaling_config", None)
            d["num_replicas"], d["max_ongoing_requests"] = 1, 16
        if d["name"] == "Ingress":
            routing = d["user_config"]["routing"]
            routing["routes"] = {"fast": {"tier": "fast", "max_latency_ms": 120000}}
            routing["default_route"], routing["rules"], routing["model_aliases"] = "fast", [], {}
            routing["admission"].pop("max_total", None)
    one = copy.deepcopy(base)
    one["applications"][0]["args"]["tiers"]["fast"]["max_batch_size"] = 1
    body = {"prompt": "flat minimal app icon of a rocket", "size": "64x64", "intent": "icon"}
    results = {}
    for label, cfg in (("backlog batches (max 8)", base), ("batch 1", one)):
        start(cfg)
        asyncio.run(drive("/v1/images/generations", [body] * 16, 16))
        t = time.perf_counter()
        lat, out, bad = asyncio.run(drive("/v1/images/generations", [body] * 96, 16))
        sizes = [o["prism"]["batch_size"] for o in out]
        results[label] = (len(lat) / (time.perf_counter() - t), statistics.median(lat), bad, statistics.mean(sizes))
    print("batching: built-in fast tier (32 px model, 8 steps, 64 px answer), 1 replica, concurrency 16, 96 requests")
    for label, (rps, p50, bad, size) in results.items():
        print(f"  {label}: {rps:5.2f} req/s, p50 {p50:7.0f} ms, mean batch size {size:.2f}, non-200 {bad}")
    (b8, *_), (b1, *_) = results.values()
    print(f"  throughput ratio backlog / batch 1: {b8 / b1:.2f}x")


def records() -> None:
    """The record write is on the request's path (committed before the response, so `url` works at once and a
    retried request id finds it): measure what it costs against an identical app with records off."""
    import tempfile

    cfg = sim_config(zero_latency=True)
    on = cfg["applications"][0]
    on["args"]["records"] = {"dir": tempfile.mkdtemp(prefix="prism-bench-records-")}
    off = copy.deepcopy(on)
    off.update(name="norec", route_prefix="/norec")
    off["args"]["records"] = {"enabled": False}
    for app in (on, off):  # two graphs on 2 cores: light fractions, one replica each
        for d in app["deployments"]:
            d["ray_actor_options"] = {"num_cpus": 0.05}
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
    cfg["applications"].append(off)
    start(cfg)
    print("render records: full graph (zero-latency simulated generator, 256x256 PNG) with records on vs off, "
          "the two arms interleaved in rounds")
    for conc in (1, 16):
        body = {"prompt": "flat minimal app icon of a rocket", "size": "256x256", "intent": "icon"}
        lat = {"on": [], "off": []}
        for path in ("/v1/images/generations", "/norec/v1/images/generations"):
            asyncio.run(drive(path, [body] * 10, conc))  # warm-up
        for _ in range(4):
            for arm, path in (("on", "/v1/images/generations"), ("off", "/norec/v1/images/generations")):
                got, out, _ = asyncio.run(drive(path, [body] * (20 if conc == 1 else 64), conc))
                lat[arm] += got
                if arm == "on":
                    rec_ms = [o["prism"]["timings_ms"].get("record", 0.0) for o in out]
        on_p50, off_p50 = statistics.median(lat["on"]), statistics.median(lat["off"])
        print(f"  concurrency {conc:2d}: on p50 {on_p50:6.1f} ms p95 {pct(lat['on'], 95):6.1f} | off p50 "
              f"{off_p50:6.1f} ms p95 {pct(lat['off'], 95):6.1f} | ratio p50 {on_p50 / off_p50:.2f}x | "
              f"record write p50 {statistics.median(rec_ms):.1f} ms ({len(lat['on'])}+{len(lat['off'])} requests)")


def served() -> None:
    """What a newcomer sees: serve_config.yaml (the embedded default), "a red star on a blue background" at 512x512
    on the fast route, one request at a time (issue 20: served latency before and after new built-in models)."""
    import tempfile

    cfg = load_serve_config(ROOT / "serve_config.yaml")
    cfg["http_options"]["port"] = PORT
    cfg["applications"][0]["args"].setdefault("records", {})["dir"] = tempfile.mkdtemp(prefix="prism-served-")
    start(cfg)
    body = {"prompt": "a red star on a blue background", "size": "512x512"}
    asyncio.run(drive("/v1/images/generations", [{**body, "seed": i} for i in range(5)], 1))
    lat, out, bad = asyncio.run(drive("/v1/images/generations", [{**body, "seed": 100 + i} for i in range(30)], 1))
    routes = sorted({o["prism"]["route"] for o in out})
    print(f"served fast route end to end (512x512, n={len(lat)}): p50 {statistics.median(lat):.0f} ms, "
          f"p95 {pct(lat, 95):.0f} ms, routes {routes}, non-200 {bad}")


if __name__ == "__main__":
    {"overhead": overhead, "routed": routed, "batching": batching, "records": records,
     "served": served}[sys.argv[1]]()

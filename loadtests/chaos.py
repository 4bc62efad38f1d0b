"""Chaos under load: kill replicas, the Serve controller and the HTTP proxy mid-burst; count what is lost.

    python -m loadtests.chaos                       # 20 s baseline + 60 s chaos on serve_config.yaml, loopback only
    python -m loadtests.chaos --chaos-s 20 --baseline-s 10 --kill-every 5 8      # a shorter run

Starts one Ray instance and deploys serve_config.yaml into it exactly as `serve deploy` does (so the killer can
reach the actors), drives mixed traffic from worker threads with a request id each, and during the chaos phase
`ray.kill`s, at random intervals and in rotation: a generator replica, the upscaler, the intent classifier, the
Serve controller and the HTTP proxy. Prints: requests sent, accepted (an HTTP answer other than a 503/429
rejection), completed with 200, failed by status and stage, lost (accepted, no final answer: connection reset or
client timeout), duplicate answers per request id, p95 of 200s before vs during chaos, and the time from the last
kill until every deployment is healthy again. Writes benchmarks/chaos.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [("a red star on a blue background", "128x128"), ("flat minimal app icon of a rocket", "128x128"),
           ("a teal to purple gradient background", "256x256"), ("a small white ring on a black background", "128x128"),
           ("hero image for our saas landing page", "256x256")]
TARGETS = ("generator", "upscaler", "intent", "controller", "proxy")


def start(port: int):
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from graph.config import load_serve_config

    config = load_serve_config(ROOT / "serve_config.yaml")
    config["http_options"]["port"] = port
    ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    client = serve_api.serve_start(http_options=config["http_options"], proxy_location=config["proxy_location"])
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
    wait_healthy(300)


def healthy() -> bool:
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # the controller is restarting
        return False
    return bool(apps) and all(a.status == "RUNNING" and all(d.status == "HEALTHY" for d in a.deployments.values())
                              for a in apps.values())


def wait_healthy(timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if healthy():
            return time.monotonic() - t0
        time.sleep(0.5)
    raise TimeoutError(f"not healthy after {timeout_s}s")


def actor_for(target: str, rng: random.Random):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    match = {"generator": "#Generator_", "upscaler": "#Upscaler#", "intent": "#IntentClassifier#",
             "controller": "SERVE_CONTROLLER_ACTOR", "proxy": "SERVE_PROXY_ACTOR"}[target]
    found = sorted(n for n in names if match in n)
    if not found:
        return None, None
    name = rng.choice(found)
    return name, ray.get_actor(name, namespace="serve")


class Run:
    def __init__(self, url: str):
        self.url = url
        self.rows: list[dict] = []
        self.lock = threading.Lock()
        self.phase = "baseline"
        self.stop = threading.Event()

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.is_set():
                prompt, size = rng.choice(PROMPTS)
                rid, phase, t = uuid.uuid4().hex, self.phase, time.perf_counter()
                row = {"rid": rid, "phase": phase}
                try:
                    r = c.post("/v1/images/generations", headers={"X-Request-ID": rid},
                               json={"prompt": prompt, "size": size})
                    row |= {"status": r.status_code, "ms": 1000 * (time.perf_counter() - t)}
                    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                    if r.status_code == 200:
                        row["reasons"] = [f["reason"] for f in body.get("prism", {}).get("fallbacks", [])]
                    else:
                        err = body.get("error", {})
                        row |= {"code": err.get("code"), "stage": _stage_of(err), "has_rid": bool(err.get("request_id"))
                                or r.headers.get("x-request-id") == rid}
                except httpx.ConnectError:
                    row |= {"status": "refused"}  # never accepted: the proxy was down
                    time.sleep(0.5)
                except httpx.HTTPError as e:
                    row |= {"status": "lost", "error": type(e).__name__}
                except ValueError as e:  # an answer that is not the JSON it claims to be
                    row |= {"status": "bad_body", "error": str(e)[:100]}
                with self.lock:
                    self.rows.append(row)

    def killer(self, every: tuple[float, float], rng: random.Random, kills: list) -> None:
        import ray

        i = 0
        while not self.stop.wait(rng.uniform(*every)):
            target = TARGETS[i % len(TARGETS)]
            name, handle = actor_for(target, rng)
            if handle is not None:
                ray.kill(handle, no_restart=target not in ("controller", "proxy"))
                kills.append({"t": time.monotonic(), "target": target, "actor": name})
                print(f"killed {target}: {name}", flush=True)
            i += 1


def _stage_of(err: dict) -> str | None:
    for d in err.get("details") or []:
        if isinstance(d, dict) and (d.get("stage") or d.get("tier")):
            return d.get("stage") or f"generate:{d.get('tier')}"
    return None


def p95(xs: list[float]) -> float | None:
    return round(statistics.quantiles(xs, n=20)[18], 1) if len(xs) >= 20 else None


def report(rows: list[dict], kills: list, recovery_s: float | None) -> dict:
    out = {}
    for phase in ("baseline", "chaos"):
        rs = [r for r in rows if r["phase"] == phase]
        accepted = [r for r in rs if r["status"] not in (503, 429, "refused")]
        failed = collections.Counter(f"{r['status']} {r.get('stage') or r.get('code') or ''}".strip()
                                     for r in accepted if r["status"] not in (200, "lost"))
        out[phase] = {"sent": len(rs), "accepted": len(accepted), "ok_200": sum(r["status"] == 200 for r in rs),
                      "rejected_503": sum(r["status"] in (503, 429) for r in rs),
                      "refused": sum(r["status"] == "refused" for r in rs),
                      "lost": sum(r["status"] == "lost" for r in rs), "failed": dict(failed),
                      "failed_without_request_id": sum(1 for r in accepted if r["status"] not in (200, "lost")
                                                       and not r.get("has_rid")),
                      "replica_died_retries": sum(r.get("reasons", []).count("replica_died") for r in rs),
                      "p95_ms_200": p95([r["ms"] for r in rs if r["status"] == 200])}
    ids = collections.Counter(r["rid"] for r in rows)
    out["duplicate_answers"] = sum(1 for n in ids.values() if n > 1)
    out["kills"] = [{"target": k["target"], "actor": k["actor"]} for k in kills]
    out["recovery_s_after_last_kill"] = recovery_s
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--baseline-s", type=float, default=20)
    ap.add_argument("--chaos-s", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kill-every", type=float, nargs=2, default=(6.0, 12.0), metavar=("MIN_S", "MAX_S"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "chaos.json")
    args = ap.parse_args()
    import ray
    from ray import serve

    start(args.port)
    run, kills, rng = Run(f"http://127.0.0.1:{args.port}"), [], random.Random(args.seed)
    workers = [threading.Thread(target=run.worker, args=(args.seed + i,), daemon=True)
               for i in range(args.concurrency)]
    try:
        for w in workers:
            w.start()
        time.sleep(args.baseline_s)
        run.phase = "chaos"
        killer = threading.Thread(target=run.killer, args=(tuple(args.kill_every), rng, kills), daemon=True)
        killer.start()
        time.sleep(args.chaos_s)
        run.stop.set()
        for w in workers:
            w.join(timeout=150)
        recovery = None
        if kills:
            wait_healthy(300)
            recovery = round(time.monotonic() - kills[-1]["t"], 1)
        result = report(run.rows, kills, recovery)
        print(json.dumps(result, indent=1))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        run.stop.set()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())

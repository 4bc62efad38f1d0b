"""Chaos under load: kill replicas, the Serve controller and the HTTP proxy mid-burst; count what is lost.

    python -m loadtests.chaos                       # 20 s baseline + 60 s chaos on serve_config.yaml, loopback only
    python -m loadtests.chaos --chaos-s 20 --baseline-s 10 --kill-every 5 8      # a shorter run

Starts one Ray instance and deploys serve_config.yaml into it exactly as `serve deploy` does (so the killer can
reach the actors), drives mixed traffic from worker threads with a request id each, and during the chaos phase
`ray.kill`s, at random intervals and in rotation: a generator replica (which also runs the post-processing and
typography of its renders), the Serve controller and the HTTP proxy. The intent classifier runs inside the ingress
since #16, so it has no replica of its own to kill. Prints: requests sent, accepted (an HTTP answer other than a 503/429
rejection), completed with 200, failed by status and stage, lost (accepted, no final answer after the client's
retries), duplicate renders (request ids with more than one successful render record), p95 of 200s before vs
during chaos, and the time from the last kill until every deployment is healthy again. Writes benchmarks/chaos.json.

The client behaves as a careful client should: when its connection drops mid-request (the proxy holding it died)
it retries with the same X-Request-ID. Prism answers a retried id from its render record, or waits for the render
still in flight under that id, so the retry never renders twice (graph/records.py, deployments/ingress.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [("a red star on a blue background", "128x128"), ("flat minimal app icon of a rocket", "128x128"),
           ("a teal to purple gradient background", "256x256"), ("a small white ring on a black background", "128x128"),
           ("hero image for our saas landing page", "256x256")]
TARGETS = ("generator", "controller", "proxy")
RETRY_WINDOW_S = 120  # a dropped request is retried (same request id) for this long before it counts as lost


def start(port: int, records_dir: str):
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from graph.config import load_serve_config

    config = load_serve_config(ROOT / "serve_config.yaml")
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["records"]["dir"] = records_dir
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
    match = {"generator": "#Generator_", "controller": "SERVE_CONTROLLER_ACTOR", "proxy": "SERVE_PROXY_ACTOR"}[target]
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
                row = {"rid": uuid.uuid4().hex, "phase": self.phase, "t": time.perf_counter(), "retries": 0}
                self.request(c, row, {"prompt": prompt, "size": size})
                with self.lock:
                    self.rows.append(row)

    def request(self, c: httpx.Client, row: dict, body: dict) -> None:
        """One request to its final answer: a dropped connection is retried with the same request id."""
        accepted = False
        while True:
            try:
                r = c.post("/v1/images/generations", headers={"X-Request-ID": row["rid"]}, json=body)
                break
            except httpx.ConnectError:
                if not accepted:
                    row["status"] = "refused"  # never accepted: the proxy was down
                    time.sleep(0.5)
                    return
            except httpx.HTTPError as e:  # accepted, then the connection dropped: retry with the same id
                accepted, row["error"] = True, type(e).__name__
            if time.perf_counter() - row["t"] > RETRY_WINDOW_S:
                row["status"] = "lost"
                return
            row["retries"] += 1
            time.sleep(1.0)  # the proxy restarts in about a second
        row |= {"status": r.status_code, "ms": 1000 * (time.perf_counter() - row["t"])}
        try:
            answer = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        except ValueError as e:  # an answer that is not the JSON it claims to be
            row |= {"status": "bad_body", "error": str(e)[:100]}
            return
        if r.status_code == 200:
            prism = answer.get("prism", {})
            row["reasons"] = [f["reason"] for f in prism.get("fallbacks", [])]
            row["from_record"] = any("already rendered" in n for n in prism.get("notes", []))
        else:
            err = answer.get("error", {})
            row |= {"code": err.get("code"), "stage": _stage_of(err),
                    "has_rid": bool(err.get("request_id")) or r.headers.get("x-request-id") == row["rid"]}

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


def duplicate_renders(records_dir: str) -> int:
    """Request ids with more than one successful render in the record store: each one a render done twice."""
    from graph.records import SqliteRenderStore

    with SqliteRenderStore(records_dir) as store:
        return len(store.rendered_twice())


def report(rows: list[dict], kills: list, recovery_s: float | None, duplicates: int) -> dict:
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
                      "client_retries_same_id": sum(r.get("retries", 0) for r in rs),
                      "answered_from_record": sum(bool(r.get("from_record")) for r in rs),
                      "p95_ms_200": p95([r["ms"] for r in rs if r["status"] == 200])}
    out["duplicate_renders"] = duplicates
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

    records_dir = tempfile.mkdtemp(prefix="prism-chaos-records-")
    start(args.port, records_dir)
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
        result = report(run.rows, kills, recovery, duplicate_renders(records_dir))
        print(json.dumps(result, indent=1))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        run.stop.set()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())

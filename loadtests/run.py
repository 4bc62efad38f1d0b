"""One command, end to end: start Prism if it is not up, run Locust headless for a bounded time, check the
targets, stop what it started. Exit status = the checker's.

    .venv/bin/python loadtests/run.py                      # burst shape on serve_config.sim.yaml (make loadtest)
    .venv/bin/python loadtests/run.py --users 1000 --spawn-rate 100 --run-time 90   # (make loadtest-1000)
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _up(host: str) -> bool:
    req = urllib.request.Request(f"{host}/v1/route", data=json.dumps({"prompt": "an app icon"}).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_server(config: str, host: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "serve"), "run", config], cwd=ROOT, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve run exited early; see {log}")
        if _up(host):
            return proc
        time.sleep(1)
    proc.terminate()
    sys.exit(f"server not answering after 240 s; see {log}")


def key_header() -> dict[str, str]:
    """The load generator's gateway key: its bodies say each user's tier, as a gateway in front of Prism would."""
    return {"Authorization": f"Bearer {os.environ['PRISM_LOAD_KEY']}"} if os.environ.get("PRISM_LOAD_KEY") else {}


def simulated_only(config: str) -> bool:
    """Are all the profile's tiers simulated (a render sleeps, using no CPU)?"""
    from graph.config import load_serve_config, prism_app

    tiers = (prism_app(load_serve_config(ROOT / config))["args"].get("tiers") or {}).values()
    return all(t.get("kind") == "simulated" for t in tiers)


def make_gateway_key(config: str) -> None:
    """A gateway key in the store the server uses (the config's records dir, as the server resolves it)."""
    sys.path.insert(0, str(ROOT))
    from graph.config import load_serve_config, prism_app
    from graph.keys import gateway_key
    from graph.records import RecordsSpec

    spec = RecordsSpec.model_validate(prism_app(load_serve_config(ROOT / config))["args"].get("records") or {})
    os.environ["PRISM_LOAD_KEY"] = gateway_key(spec.resolved_dir())


def baseline_groups() -> dict[str, list[tuple[str, str]]]:
    """The mix's (prompt, user tier) pairs, grouped by the route the default policy gives them, so that each group's
    requests go one at a time to their own tier: no tier ever holds two baseline requests."""
    from prompts import PROMPTS, TIERS

    return {"typography": [(p, t) for p in PROMPTS["typography"] for t in TIERS],
            "fast": [(p, t) for p in PROMPTS["icon"] + PROMPTS["background"] for t in TIERS],
            "standard": [(p, t) for p in PROMPTS["photoreal"] for t in TIERS] + [(p, "free") for p in PROMPTS["hero"]],
            "premium": [(p, t) for p in PROMPTS["hero"] for t in TIERS if t != "free"]}


def p95(ms: list[float]) -> float:
    """The 95th percentile, interpolated between samples as Locust's histogram is read (not the max of a few)."""
    return statistics.quantiles(ms, n=20, method="inclusive")[-1] if len(ms) > 1 else ms[0]


def measure_unloaded(host: str, min_samples: int, seconds: float, side_by_side: bool = True) -> dict[str, float]:
    """Each route's unloaded p95 (ms): the baseline the accepted requests' p95 under load is held to
    (loadtests/targets.yaml: max_accepted_p95_ratio). Each route group sends one request at a time, the groups side by
    side, for `seconds` and on until it has `min_samples`. Why not the mix one request at a time, as before: 2 rounds
    gave the standard route 8 samples, whose "p95" is their max, and a simulated model's own spread (p50 2.2 s, p95
    3.2 s) then decided the check: a run missed it at 1.28x while Prism's own stages took 20-40 ms of each render.
    Not side by side where renders use the CPU (a profile with real models): there the groups run one after another,
    or the renders sharing the 2 cores make the baseline slow (benchmarks/burst.py saw it 3x slow)."""
    by_route: dict[str, list[float]] = {}
    lock = threading.Lock()

    def one(prompt: str, tier: str, i: int, keep: bool) -> None:
        body = {"prompt": prompt, "size": ("256x256", "512x512")[i % 2], "user_tier": tier}
        req = urllib.request.Request(f"{host}/v1/images/generations", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", **key_header()})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            route = json.load(r)["prism"]["route"]
        if keep:
            with lock:
                by_route.setdefault(route, []).append(1000 * (time.perf_counter() - t))

    def group(pairs: list[tuple[str, str]]) -> None:
        one(*pairs[0], 0, keep=False)  # warms the group's tier (lazy loads); not counted
        deadline, n = time.monotonic() + seconds, 0
        while n < min_samples or time.monotonic() < deadline:
            prompt, tier = pairs[n % len(pairs)]
            one(prompt, tier, n, keep=True)
            n += 1

    with ThreadPoolExecutor(max_workers=4 if side_by_side else 1) as pool:
        list(pool.map(group, baseline_groups().values()))  # list(): a group's error is raised here
    return {route: p95(ms) for route, ms in by_route.items()}


def run_locust(args, out: Path) -> int:
    env = {**os.environ, "PRISM_SHAPE": "burst" if args.users is None else "none",
           "PRISM_BASE_USERS": str(args.base_users), "PRISM_PHASE_S": str(args.phase_s)}
    cmd = [str(BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless", "--host", args.host,
           "--csv", str(out), "--only-summary", "--stop-timeout", "30"]
    if args.users is not None:
        cmd += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.run_time}s"]
    bound = (args.run_time if args.users is not None else 3 * args.phase_s) + 120
    return subprocess.run(cmd, env=env, timeout=bound).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="serve_config.sim.yaml")
    ap.add_argument("--profile", default="sim", help="section of loadtests/targets.yaml")
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--users", type=int, default=None, help="constant users instead of the burst shape")
    ap.add_argument("--spawn-rate", type=float, default=50)
    ap.add_argument("--run-time", type=int, default=90)
    ap.add_argument("--base-users", type=int, default=3, help="burst shape: calm users (spike is 10x)")
    ap.add_argument("--phase-s", type=float, default=40)
    ap.add_argument("--unloaded-s", type=float, default=90, help="unloaded baseline: seconds of one-at-a-time sends")
    ap.add_argument("--unloaded-samples", type=int, default=20, help="unloaded baseline: at least this many a group")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "loadtest")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = None
    make_gateway_key(args.config)  # passed to locust through the environment
    if not _up(args.host):
        print(f"starting serve run {args.config} ...", flush=True)
        server = start_server(args.config, args.host, args.out.with_suffix(".serve.log"))
    try:
        sys.path.insert(0, str(ROOT / "loadtests"))
        unloaded = measure_unloaded(args.host, args.unloaded_samples, args.unloaded_s, simulated_only(args.config))
        print("unloaded p95 by route (ms):", {k: round(v) for k, v in sorted(unloaded.items())}, flush=True)
        args.out.with_name(args.out.name + "_unloaded.json").write_text(json.dumps(unloaded))
        run_locust(args, args.out)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)  # serve run stops its cluster on SIGTERM (not SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    check = [sys.executable, str(ROOT / "loadtests" / "check.py"), f"{args.out}_stats.csv", "--profile", args.profile,
             "--unloaded", f"{args.out}_unloaded.json"]
    return subprocess.run(check).returncode


if __name__ == "__main__":
    sys.exit(main())

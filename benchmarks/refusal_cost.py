"""What one refusal at the door costs, in CPU milliseconds per process, through Serve's proxy and straight to the
ingress replica's own HTTP port (Serve's direct ingress), side by side in one Ray instance:

    .venv/bin/python -m benchmarks.refusal_cost

The simulated profile with 60-s renders: a few enterprise requests take every slot and hold it, then 400 free
requests, one at a time and 8 at a time, are each refused at the door (503 + Retry-After). On 2 cores a refusal's
tail under a flood is set by how much CPU each one takes from everything else, so that is what this counts
(`psutil` CPU times of the proxy, the ingress and the rest, before and after). A second arm runs the same with the
switch off, to show that turning it on does not change the proxy's own path. Results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

REFUSALS = 400
PROCESSES = {"proxy": "ProxyActor", "ingress": "prism:Ingress", "controller": "ServeController",
             "gcs": "gcs_server", "generators": "prism:Generator", "load generator": "benchmarks.refusal_cost"}


def cpu_by_process() -> dict[str, float]:
    import psutil

    out = dict.fromkeys(PROCESSES, 0.0)
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for name, marker in PROCESSES.items():
            if marker in cmd:
                try:
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                out[name] += t.user + t.system
    return out


async def refusals(port: int, concurrency: int) -> tuple[list[float], dict[str, float], float]:
    """REFUSALS free requests at `concurrency`: their latencies (ms), CPU ms per refusal by process, seconds."""
    from benchmarks import burst

    lat: list[float] = []

    async def worker(k: int) -> None:
        for _ in range(k):
            o = await burst.send_raw("flat minimal app icon of a rocket", "free", port=port)
            if o.status not in (503, 429) or not o.retry_after:
                raise SystemExit(f"expected a refusal with Retry-After, got {o.status}: {o.body}")
            lat.append(o.ms)

    before, t = cpu_by_process(), time.perf_counter()
    await asyncio.gather(*(worker(REFUSALS // concurrency) for _ in range(concurrency)))
    seconds, after = time.perf_counter() - t, cpu_by_process()
    return lat, {k: 1000 * (after[k] - before[k]) / len(lat) for k in PROCESSES}, seconds


def held_config() -> dict:
    """The simulated profile with renders that hold their slots for the whole run, one replica a tier."""
    from benchmarks import burst
    from graph.config import ROOT, load_serve_config

    cfg = load_serve_config(ROOT / "serve_config.sim.yaml")
    cfg["http_options"]["port"] = burst.PORT
    app = cfg["applications"][0]
    for spec in app["args"]["tiers"].values():
        spec["latency_ms_p50"], spec["latency_ms_p95"] = 60_000, 60_001
    for d in app["deployments"]:
        if d["name"] == "Ingress":
            for r in d["user_config"]["routing"]["routes"].values():
                r["max_latency_ms"], r["attempt_timeout_ms"] = 200_000, 150_000
        elif d["name"].startswith("Generator"):  # one replica each: no replica starting during the count
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
    return cfg


def arm(direct: bool) -> None:
    from benchmarks import burst
    from benchmarks.serving import pct, start
    from graph.keys import gateway_key

    if direct:
        os.environ.update(burst.DIRECT_INGRESS_ENV)
    cfg = held_config()
    app = cfg["applications"][0]
    records = tempfile.mkdtemp(prefix="prism-refusal-")
    app["args"].setdefault("records", {})["dir"] = records
    burst.HEADERS["Authorization"] = f"Bearer {gateway_key(records)}"
    start(cfg)
    doors = {"proxy": burst.PORT}
    if direct:
        burst.wait_for_port(burst.REPLICA_PORT)
        doors["replica's own port"] = burst.REPLICA_PORT

    async def run() -> None:
        holders = [asyncio.ensure_future(burst.send_raw(p, "enterprise")) for p, _ in burst.MIX[::2] * 2]
        await asyncio.sleep(8)  # every slot taken; the rest of the holders were refused after their wait
        for door, port in doors.items():
            for concurrency in (1, 8):
                lat, cpu, seconds = await refusals(port, concurrency)
                print(f"| {'on' if direct else 'off'} | {door} | {concurrency} | {statistics.median(lat):.1f} / "
                      f"{pct(lat, 99):.1f} ms | {len(lat) / seconds:.0f}/s | {cpu['proxy']:.2f} | {cpu['ingress']:.2f} "
                      f"| {sum(cpu.values()):.2f} |", flush=True)
        for h in holders:
            h.cancel()

    asyncio.run(run())


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--arm":
        arm(sys.argv[2] == "direct")
        return 0
    print(f"{REFUSALS} door refusals on the simulated profile, every slot held; CPU ms per refusal by process")
    print("| direct ingress | door | concurrency | refusal p50 / p99 | refusals/s | proxy CPU | ingress CPU | "
          "all counted CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("proxy", "direct"):  # each its own Ray: Serve reads the switch when it starts
        subprocess.run([sys.executable, "-m", "benchmarks.refusal_cost", "--arm", name], check=True,
                       stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check Locust's CSV stats against loadtests/targets.yaml; exit 1 on any miss.

    python loadtests/check.py out/loadtest_stats.csv --profile sim --unloaded out/loadtest_unloaded.json

--unloaded: each route's unloaded p95 in ms (JSON), measured by run.py before the load, for the targets'
max_accepted_p95_ratio: the accepted requests' p95 under load over the same route's unloaded p95.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

TARGETS = Path(__file__).with_name("targets.yaml")


def read_stats(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict, key: str) -> float:
    v = row.get(key, "") or "0"
    return float(v) if v not in ("N/A", "") else 0.0


def evaluate(rows: list[dict], targets: dict, unloaded: dict[str, float] | None = None) -> tuple[list[str], list[str]]:
    """(lines to print, misses) for the stats rows against one profile's targets."""
    gen = [r for r in rows if r["Type"] == "POST"]
    total = sum(_num(r, "Request Count") for r in gen)
    errors = sum(_num(r, "Failure Count") for r in gen)
    r503 = [r for r in rows if r["Type"] == "503"]
    n503 = sum(_num(r, "Request Count") for r in r503)
    lines, misses = [], []

    def check(label: str, value: float, limit: float, fmt: str = "{:.3f}", op=float.__le__):
        ok = op(float(value), float(limit))
        lines.append(f"{'ok  ' if ok else 'MISS'} {label}: {fmt.format(value)} (target {fmt.format(limit)})")
        if not ok:
            misses.append(label)

    check("requests", total, targets["min_requests"], "{:.0f}", float.__ge__)
    check("error ratio (not 200, not designed 503)", errors / max(total, 1), targets["max_error_ratio"])
    check("503 ratio", n503 / max(total, 1), targets["max_503_ratio"])
    waits = targets.get("paid_max_wait_ms", {})  # user tier -> how long the policy lets it wait for a slot
    for user_tier in sorted({r["Name"].split(" ", 1)[0] for r in r503}):
        mine = [r for r in r503 if r["Name"].split(" ", 1)[0] == user_tier]
        limit = targets["max_503_p99_ms"] + waits.get(user_tier, 0)
        check(f"503 p99 ms ({user_tier})", max(_num(r, "99%") for r in mine), limit, "{:.0f}")
    routes = {r["Name"]: r for r in rows if r["Type"] == "route"}
    for name, t in targets.get("routes", {}).items():
        if name not in routes:
            lines.append(f"--   route {name}: no 200s in this run")
            continue
        check(f"route {name} p50 ms", _num(routes[name], "50%"), t["p50_ms"], "{:.0f}")
        check(f"route {name} p95 ms", _num(routes[name], "95%"), t["p95_ms"], "{:.0f}")
    if "max_accepted_p95_ratio" in targets:
        accepted_ratios(rows, routes, targets, unloaded, lines, check)
    return lines, misses


def accepted_ratios(rows: list[dict], routes: dict[str, dict], targets: dict, unloaded: dict[str, float] | None,
                    lines: list[str], check) -> None:
    """Accepted p95 under load over the route's unloaded p95: every 200 of the route less the wait it had at the door
    (`served <route>`, all user tiers together), and by user tier where the run says it (`accepted <user tier>
    <route>`): a paid request may have waited at the door for a slot, by policy, so its bound is the same ratio plus
    that wait; older runs: all users together. A row with fewer than `min_p95_samples` requests is reported, not
    judged: its "p95" would be its maximum, decided by the model's own spread rather than by the load."""
    if not unloaded:
        check("unloaded baseline routes (run.py measures them)", 0, 1, "{:.0f}", float.__ge__)
    waits, least = targets.get("paid_max_wait_ms", {}), targets.get("min_p95_samples", 20)
    served = {r["Name"]: r for r in rows if r["Type"] == "served"}
    accepted = {tuple(r["Name"].split(" ", 1)): r for r in rows if r["Type"] == "accepted"}
    if not accepted and not served:  # a run from before the by-tier rows: all users together
        accepted = {("all", name): r for name, r in routes.items()}

    def judge(label: str, r: dict, wait: float, base: float) -> None:
        n = int(_num(r, "Request Count"))
        if n < least:
            lines.append(f"--   {label}: {n} requests, too few for a p95 (at least {least}): not judged")
            return
        check(f"{label} / unloaded ({base:.0f} ms)", max(0.0, _num(r, "95%") - wait) / base,
              targets["max_accepted_p95_ratio"], "{:.2f}")

    for name, base in sorted((unloaded or {}).items()):
        mine = sorted((tier, r) for (tier, route), r in accepted.items() if route == name)
        if not mine and name not in served:
            lines.append(f"--   route {name}: no 200s under load")
        if name in served:
            judge(f"route {name} p95 under load less each request's wait at the door", served[name], 0, base)
        for tier, r in mine:
            wait = waits.get(tier, 0)
            label = f"route {name} p95 under load{'' if tier == 'all' else ', ' + tier}"
            judge(label + (f" less its {wait} ms policy wait" if wait else ""), r, wait, base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("stats_csv", type=Path)
    ap.add_argument("--profile", default="sim")
    ap.add_argument("--targets", type=Path, default=TARGETS)
    ap.add_argument("--unloaded", type=Path, help="JSON {route: unloaded p95 ms} (run.py writes it)")
    args = ap.parse_args(argv)
    targets = yaml.safe_load(args.targets.read_text())[args.profile]
    unloaded = json.loads(args.unloaded.read_text()) if args.unloaded else None
    lines, misses = evaluate(read_stats(args.stats_csv), targets, unloaded)
    print("\n".join(lines))
    print("PASS" if not misses else f"FAIL: {len(misses)} target(s) missed")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())

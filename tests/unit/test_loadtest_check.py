"""loadtests/check.py, the load-test gate, on synthetic Locust stats CSVs: it passes what meets the targets and fails,
naming the target, what does not."""

import csv
import json

import pytest

from loadtests import check

# The columns Locust's --csv writes to *_stats.csv (the ones the checker reads, plus a few it must ignore).
COLUMNS = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
           "50%", "95%", "99%", "100%"]
TARGETS = {"min_requests": 100, "max_error_ratio": 0.0, "max_503_ratio": 0.5, "max_503_p99_ms": 50,
           "paid_max_wait_ms": {"pro": 2000},
           "routes": {"fast": {"p50_ms": 2500, "p95_ms": 8000}, "premium": {"p50_ms": 10000, "p95_ms": 25000}}}


def row(type_: str, name: str, count: int, failures: int = 0, p50: float = 0, p95: float = 0, p99: float = 0):
    return {"Type": type_, "Name": name, "Request Count": count, "Failure Count": failures,
            "Median Response Time": p50, "Average Response Time": p50, "50%": p50, "95%": p95, "99%": p99,
            "100%": p99}


def good_run() -> list[dict]:
    return [row("POST", "gen:icon", 80), row("POST", "gen:hero", 40), row("route", "fast", 70, p50=900, p95=2000),
            row("route", "premium", 20, p50=4000, p95=9000), row("503", "free icon", 25, p50=8, p99=30),
            row("503", "pro icon", 5, p50=2010, p99=2040),  # waited its 2 s for a slot, then refused
            row("", "Aggregated", 240, p50=500, p95=4000, p99=9000)]


def write(tmp_path, rows: list[dict]):
    path = tmp_path / "loadtest_stats.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def run(tmp_path, rows, capsys, targets_=TARGETS, unloaded=None) -> tuple[int, str]:
    targets = tmp_path / "targets.yaml"
    import yaml

    targets.write_text(yaml.safe_dump({"sim": targets_}))
    argv = [str(write(tmp_path, rows)), "--profile", "sim", "--targets", str(targets)]
    if unloaded is not None:
        (tmp_path / "unloaded.json").write_text(json.dumps(unloaded))
        argv += ["--unloaded", str(tmp_path / "unloaded.json")]
    code = check.main(argv)
    return code, capsys.readouterr().out


def test_a_run_that_meets_every_target_passes(tmp_path, capsys):
    code, out = run(tmp_path, good_run(), capsys)
    assert code == 0, out
    assert out.strip().endswith("PASS") and "MISS" not in out


def _with(rows: list[dict], name: str, **changes) -> list[dict]:
    return [{**r, **changes} if r["Name"] == name else r for r in rows]


MISSES = [
    pytest.param(lambda rows: _with(rows, "gen:icon", **{"Failure Count": 1}),
                 "error ratio (not 200, not designed 503)", id="one_error"),
    pytest.param(lambda rows: _with(rows, "free icon", **{"99%": 51}), "503 p99 ms (free)", id="slow_rejection"),
    pytest.param(lambda rows: _with(rows, "pro icon", **{"99%": 2051}), "503 p99 ms (pro)",
                 id="paid_refusal_past_its_wait"),
    pytest.param(lambda rows: _with(rows, "free icon", **{"Request Count": 125}), "503 ratio", id="too_many_503"),
    pytest.param(lambda rows: _with(rows, "fast", **{"95%": 8001}), "route fast p95 ms", id="route_p95"),
    pytest.param(lambda rows: _with(rows, "premium", **{"50%": 10001}), "route premium p50 ms", id="route_p50"),
    pytest.param(lambda rows: _with(rows, "gen:hero", **{"Request Count": 10}), "requests",
                 id="too_few_requests"),
]


@pytest.mark.parametrize("spoil,label", MISSES)
def test_a_missed_target_fails_and_is_named(tmp_path, capsys, spoil, label):
    code, out = run(tmp_path, spoil(good_run()), capsys)
    assert code == 1, out
    missed = [line for line in out.splitlines() if line.startswith("MISS")]
    assert len(missed) == 1 and missed[0].startswith(f"MISS {label}:"), out
    assert out.strip().endswith("FAIL: 1 target(s) missed")


def test_a_route_without_200s_is_reported_not_failed(tmp_path, capsys):
    code, out = run(tmp_path, [r for r in good_run() if r["Name"] != "premium"], capsys)
    assert code == 0 and "route premium: no 200s in this run" in out


# The goal form of the route targets (#16): accepted p95 under load at most 1.2x the route's unloaded p95.
RATIO = {k: v for k, v in TARGETS.items() if k != "routes"} | {"max_accepted_p95_ratio": 1.2}


def test_accepted_latency_within_the_ratio_of_the_unloaded_baseline_passes(tmp_path, capsys):
    code, out = run(tmp_path, good_run(), capsys, RATIO, unloaded={"fast": 2000 / 1.2, "premium": 9000})
    assert code == 0, out
    assert "ok   route fast p95 under load / unloaded (1667 ms): 1.20 (target 1.20)" in out


def test_accepted_latency_past_the_ratio_fails_naming_the_route(tmp_path, capsys):
    code, out = run(tmp_path, good_run(), capsys, RATIO, unloaded={"fast": 1000, "premium": 9000})
    assert code == 1, out
    missed = [line for line in out.splitlines() if line.startswith("MISS")]
    assert missed == ["MISS route fast p95 under load / unloaded (1000 ms): 2.00 (target 1.20)"], out


def test_a_ratio_target_without_an_unloaded_baseline_fails(tmp_path, capsys):
    code, out = run(tmp_path, good_run(), capsys, RATIO)
    assert code == 1 and "MISS unloaded baseline" in out, out


# By user tier (`accepted <user tier> <route>`): a paid request may wait at the door for a slot by policy (here pro,
# 2 s), so its bound is the ratio plus that wait; a free one never waits and gets no allowance.
def by_tier(free_p95: float, pro_p95: float) -> list[dict]:
    return good_run() + [row("accepted", "free fast", 50, p50=900, p95=free_p95),
                         row("accepted", "pro fast", 20, p50=2500, p95=pro_p95)]


def test_a_paid_tier_may_take_its_policy_wait_on_top_of_the_ratio(tmp_path, capsys):
    code, out = run(tmp_path, by_tier(2000, 3900), capsys, RATIO, unloaded={"fast": 2000 / 1.2, "premium": 9000})
    assert code == 0, out
    assert "ok   route fast p95 under load, pro less its 2000 ms policy wait / unloaded (1667 ms): 1.14" in out
    assert "ok   route fast p95 under load, free / unloaded (1667 ms): 1.20" in out


def test_a_free_request_past_the_ratio_fails_though_paid_ones_wait(tmp_path, capsys):
    code, out = run(tmp_path, by_tier(2100, 3900), capsys, RATIO, unloaded={"fast": 2000 / 1.2, "premium": 9000})
    assert code == 1, out
    missed = [line for line in out.splitlines() if line.startswith("MISS")]
    assert missed == ["MISS route fast p95 under load, free / unloaded (1667 ms): 1.26 (target 1.20)"], out


def test_a_paid_request_past_its_wait_and_the_ratio_fails(tmp_path, capsys):
    code, out = run(tmp_path, by_tier(2000, 4100), capsys, RATIO, unloaded={"fast": 2000 / 1.2, "premium": 9000})
    assert code == 1 and "MISS route fast p95 under load, pro less its 2000 ms policy wait" in out, out


# `served <route>`: every 200 less its wait at the door (all user tiers); and rows too small for a p95 are not judged.
def test_served_latency_past_the_ratio_fails_naming_the_route(tmp_path, capsys):
    rows = good_run() + [row("served", "fast", 60, p50=900, p95=2400)]
    code, out = run(tmp_path, rows, capsys, RATIO, unloaded={"fast": 1000, "premium": 9000})
    assert code == 1, out
    assert "MISS route fast p95 under load less each request's wait at the door / unloaded (1000 ms): 2.40" in out


def test_served_latency_within_the_ratio_passes(tmp_path, capsys):
    rows = good_run() + [row("served", "fast", 60, p50=900, p95=1150)]
    code, out = run(tmp_path, rows, capsys, RATIO, unloaded={"fast": 1000, "premium": 9000})
    assert code == 0, out
    assert "ok   route fast p95 under load less each request's wait at the door / unloaded (1000 ms): 1.15" in out


def test_a_row_too_small_for_a_p95_is_reported_not_judged(tmp_path, capsys):
    rows = good_run() + [row("served", "fast", 60, p50=900, p95=1150),
                         row("accepted", "free fast", 12, p50=900, p95=4700)]  # its max: one slow draw
    code, out = run(tmp_path, rows, capsys, RATIO | {"min_p95_samples": 20},
                    unloaded={"fast": 1000, "premium": 9000})
    assert code == 0, out
    assert "--   route fast p95 under load, free: 12 requests, too few for a p95 (at least 20): not judged" in out
    rows[-1] = row("accepted", "free fast", 20, p50=900, p95=4700)  # the same p95 from enough requests is judged
    code, out = run(tmp_path, rows, capsys, RATIO | {"min_p95_samples": 20},
                    unloaded={"fast": 1000, "premium": 9000})
    assert code == 1 and "MISS route fast p95 under load, free / unloaded (1000 ms): 4.70" in out, out

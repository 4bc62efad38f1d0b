"""Metric labels stay bounded, and the shipped Grafana dashboard only queries series Prism exports."""

import json
import re
from pathlib import Path

from graph.metrics import STAGES, bounded

ROOT = Path(__file__).resolve().parents[2]


def test_label_values_are_bounded():
    assert bounded("fast", {"fast", "standard"}) == "fast"
    assert bounded("a prompt someone typed", {"fast"}) == "other"
    assert bounded(None, {"fast"}) == "none"
    assert "record" in STAGES and "total" in STAGES


def _defined_metrics() -> set[str]:
    src = (ROOT / "graph" / "metrics.py").read_text()
    return set(re.findall(r'(?:Counter|Histogram)\("(prism_\w+)"', src))


def test_dashboard_queries_only_exported_series():
    defined = _defined_metrics()
    assert {"prism_requests_total", "prism_request_latency_ms", "prism_cost_usd_total"} <= defined
    dash = json.loads((ROOT / "ops" / "grafana" / "prism-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_bucket$", "", m) for e in exprs for m in re.findall(r"ray_(prism_\w+)", e)}
    assert used and used <= defined, used - defined
    # Every Prism metric has a panel.
    assert defined <= used, defined - used

import pytest

from graph.cost import render_cost


@pytest.mark.parametrize("per_image,per_s,n,secs,expected", [
    pytest.param(0.0, 0.002, 2, 1.5, 0.003, id="compute_only"),
    pytest.param(0.04, 0.0, 3, 9.0, 0.12, id="per_image_only"),
    pytest.param(0.01, 0.001, 1, -1.0, 0.01, id="negative_time_clamped"),
])
def test_render_cost(per_image, per_s, n, secs, expected):
    assert render_cost(per_image, per_s, n, secs) == pytest.approx(expected)


def test_gpu_share_cost():
    # A quarter of a $4/h GPU for 1.8 s, no other fees.
    assert render_cost(0.0, 0.0, 1, 1.8, usd_per_gpu_hour=4.0, gpu_fraction=0.25) == pytest.approx(0.0005)


def test_spend_ledger_rolling_window():
    from graph.cost import SpendLedger

    ledger = SpendLedger()
    ledger.add("free", 0.5, now=1_000_000)
    ledger.add("free", 0.25, now=1_000_000 + 3600)
    ledger.add("pro", 2.0, now=1_000_000 + 3600)
    assert ledger.spent("free", 7200, now=1_000_000 + 3600) == pytest.approx(0.75)
    assert ledger.spent("free", 1800, now=1_000_000 + 3600) == pytest.approx(0.25)  # the first add left the window
    assert ledger.spent("enterprise", 7200, now=1_000_000) == 0.0
    assert ledger.totals() == {"free": pytest.approx(0.75), "pro": pytest.approx(2.0)}

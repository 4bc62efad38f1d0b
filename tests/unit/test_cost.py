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


# -- Hosted tiers: what the provider says a render cost, the dated list price otherwise ----------------------------

def test_usage_cost_prices_each_modality():
    from graph.cost import TokenPrices, TokenUsage, usage_cost

    prices = TokenPrices(text_input=5.0, image_input=8.0, image_output=30.0)
    # 20 prompt tokens at $5/M + 7024 image tokens at $30/M (GPT Image, high, 1024x1024).
    assert usage_cost(TokenUsage(text_input=20, image_output=7024), prices) == pytest.approx(0.0001 + 0.21072)
    assert usage_cost(TokenUsage(image_input=1000), prices) == pytest.approx(0.008)


def test_output_text_without_its_own_rate_is_charged_at_the_image_rate():
    from graph.cost import TokenPrices, TokenUsage, usage_cost

    unpriced = TokenPrices(text_input=5.0, image_output=30.0)
    priced = TokenPrices(text_input=5.0, image_output=30.0, text_output=10.0)
    assert usage_cost(TokenUsage(text_output=1000), unpriced) == pytest.approx(0.03)
    assert usage_cost(TokenUsage(text_output=1000), priced) == pytest.approx(0.01)


ATTEMPT_CASES = [
    pytest.param(2, 0.0, 0, 0.12, id="list_price_only"),
    pytest.param(2, 0.4216, 2, 0.4216, id="all_reported"),
    pytest.param(2, 0.2108, 1, 0.2708, id="one_reported_one_listed"),
    pytest.param(0, 0.0, 0, 0.0, id="failed_attempt_no_images"),
]


@pytest.mark.parametrize(("n", "reported", "images_reported", "expected"), ATTEMPT_CASES)
def test_attempt_cost_charges_what_was_reported_and_lists_the_rest(n, reported, images_reported, expected):
    from graph.cost import attempt_cost

    cost = {"usd_per_image": 0.06}
    assert attempt_cost(cost, n, 3.0, 0.0, reported, images_reported) == pytest.approx(expected)


def test_attempt_cost_keeps_charging_gpu_time():
    from graph.cost import attempt_cost

    assert attempt_cost({"usd_per_gpu_hour": 4.0}, 1, 1.8, gpu_fraction=0.25) == pytest.approx(0.0005)


def test_price_card_is_the_dated_sourced_price_and_none_for_gpu_tiers():
    import datetime as dt

    from graph.cost import price_card

    hosted = {"usd_per_image": 0.0672, "usd_per_second": 0.0, "checked": dt.date(2026, 12, 3),
              "source": "https://ai.google.dev/gemini-api/docs/pricing", "tokens": None}
    assert price_card(hosted) == {"usd_per_image": 0.0672, "checked": "2026-12-03",
                                  "source": "https://ai.google.dev/gemini-api/docs/pricing"}
    assert price_card({"usd_per_gpu_hour": 4.0, "usd_per_image": 0.0}) is None


def test_model_price_follows_routes_and_aliases_to_the_tier():
    from types import SimpleNamespace

    from graph.cost import model_price

    specs = {"standard": {"cost": {"usd_per_image": 0.0672, "checked": "2026-12-03", "source": "https://g.test/p"}},
             "sd35": {"cost": {"usd_per_gpu_hour": 4.0}}}
    policy = SimpleNamespace(routes={"default": SimpleNamespace(tier="standard")},
                             model_aliases={"gemini-3.1-flash-image": "default"})
    expected = {"price": {"tier": "standard", "usd_per_image": 0.0672, "checked": "2026-12-03",
                          "source": "https://g.test/p"}}
    assert model_price("gemini-3.1-flash-image", specs, policy) == expected
    assert model_price("default", specs, policy) == expected
    assert model_price("sd35", specs, policy) == {}

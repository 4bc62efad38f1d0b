import pytest

from graph.cost import render_cost


@pytest.mark.parametrize("per_image,per_s,n,secs,expected", [
    pytest.param(0.0, 0.002, 2, 1.5, 0.003, id="compute_only"),
    pytest.param(0.04, 0.0, 3, 9.0, 0.12, id="per_image_only"),
    pytest.param(0.01, 0.001, 1, -1.0, 0.01, id="negative_time_clamped"),
])
def test_render_cost(per_image, per_s, n, secs, expected):
    assert render_cost(per_image, per_s, n, secs) == pytest.approx(expected)

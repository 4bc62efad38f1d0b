import pytest

from graph.load import TierLoad, expected_wait_s, retry_after_s, should_shed

CASES = [
    pytest.param(TierLoad(inflight=6, ewma_s=2.0), 4, 6.0, 4, id="two_rounds_ahead"),
    pytest.param(TierLoad(inflight=0, ewma_s=2.0), 4, 2.0, 1, id="idle"),
    pytest.param(TierLoad(inflight=3, ewma_s=None), 1, 0.0, 1, id="no_measurement"),
    pytest.param(TierLoad(inflight=1000, ewma_s=5.0), 1, 5005.0, 60, id="capped"),
]


@pytest.mark.parametrize("load,parallel,wait,retry", CASES)
def test_wait_and_retry_after(load, parallel, wait, retry):
    assert expected_wait_s(load, parallel) == pytest.approx(wait)
    assert retry_after_s(load, parallel) == retry


def test_ewma_and_shedding():
    load = TierLoad()
    load.observe(1.0)
    load.observe(3.0)
    assert load.ewma_s == pytest.approx(1.4) and load.completed == 2
    load.inflight = 4
    assert should_shed(load, parallel=1, remaining_s=5.0)  # 5 rounds x 1.4 s = 7 s > 5 s
    assert not should_shed(load, parallel=4, remaining_s=5.0)  # 2 rounds = 2.8 s
    assert not should_shed(TierLoad(inflight=9), parallel=1, remaining_s=0.1)  # never shed blind


def test_track_counts_in_flight_and_feeds_the_ewma_only_on_success():
    load = TierLoad()
    with load.track():
        assert load.inflight == 1
    assert load.inflight == 0 and load.completed == 1 and load.ewma_s is not None
    with pytest.raises(RuntimeError), load.track():
        raise RuntimeError("replica died")
    assert load.inflight == 0 and load.completed == 1
    assert load.snapshot()["completed"] == 1 and load.snapshot()["inflight"] == 0

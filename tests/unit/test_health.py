"""The health gate behind Generator.check_health: consecutive failures only, any success resets."""

import pytest

from engines.health import HealthGate, ReplicaUnhealthy


def test_isolated_failures_never_replace_the_replica():
    gate = HealthGate(threshold=3)
    for _ in range(5):
        gate.failed("slow probe")
        gate.failed("slow probe")
        gate.ok()
    assert gate.failures == 0 and gate.last_error == ""


def test_consecutive_failures_raise_with_the_last_error():
    gate = HealthGate(threshold=3)
    gate.failed("a")
    gate.failed("b")
    with pytest.raises(ReplicaUnhealthy, match="3 consecutive failed health probes; last: c"):
        gate.failed("c")


def test_recent_success_makes_probing_unnecessary_but_a_failure_does_not():
    gate = HealthGate(threshold=3, max_age_s=30)
    assert gate.fresh()
    assert not gate.fresh(now=gate.last_ok + 31)
    gate.failed("x")
    assert not gate.fresh()  # once a probe failed, keep probing until one passes

"""How the ingress maps what a call to a generator raises (deployments/calls.py call_within / attempt).

The errors are Ray's own exception classes, raised by a fault-injecting awaitable standing in for a
DeploymentResponse: the cases a lost node produces (CI saw a bare 500 when the intent replica's node died).
"""

import asyncio
import time

import pytest
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    OwnerDiedError,
    RaySystemError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.calls import ReplicaDied, attempt, call_within
from graph.errors import CapacityError, DeadlineExceeded, InvalidRequest, PrismError, StageFailed


class _Response_fault_injecting:
    """Awaits to `raises` (or to `value`), or sleeps `hang_s` first; records cancel() like a DeploymentResponse."""

    def __init__(self, raises: BaseException | None = None, value=None, hang_s: float = 0.0):
        self.raises, self.value, self.hang_s, self.cancelled = raises, value, hang_s, False

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        await asyncio.sleep(self.hang_s)
        if self.raises is not None:
            raise self.raises
        return self.value

    def cancel(self):
        self.cancelled = True


LOST = [ActorDiedError(), ActorUnavailableError("node gone", None), NodeDiedError("node 1 died"),
        WorkerCrashedError(), OwnerDiedError("ab" * 14, None, "classify")]


@pytest.mark.parametrize("error", LOST, ids=lambda e: type(e).__name__)
def test_a_lost_replica_node_or_worker_is_a_replica_death_named_by_stage(error):
    with pytest.raises(ReplicaDied) as info:
        asyncio.run(call_within(_Response_fault_injecting(error), None, "generate:fast"))
    assert info.value.stage == "generate:fast" and info.value.error == type(error).__name__


def test_other_ray_errors_are_a_502_naming_the_stage():
    for error in (RaySystemError("grpc"), RayTaskError("process", "tb", ValueError("bad")).as_instanceof_cause()):
        with pytest.raises(StageFailed) as info:
            asyncio.run(call_within(_Response_fault_injecting(error), None, "post"))
        assert info.value.status_code == 502 and info.value.stage == "post", info.value.message


def test_a_replicas_own_prism_error_keeps_its_status():
    raised = RayTaskError("render", "tb", InvalidRequest("`text` too long", param="text")).as_instanceof_cause()
    with pytest.raises(PrismError) as info:
        asyncio.run(call_within(_Response_fault_injecting(raised), None, "typography"))
    assert info.value.status_code == 422 and not isinstance(info.value, StageFailed)


def test_overload_and_unavailability_are_503_with_retry_after():
    for error, after in ((BackPressureError(num_queued_requests=9, max_queued_requests=8), "1"),
                         (DeploymentUnavailableError("Upscaler"), "5")):
        with pytest.raises(CapacityError) as info:
            asyncio.run(call_within(_Response_fault_injecting(error), None, "post"))
        assert info.value.status_code == 503 and info.value.headers["Retry-After"] == after


def test_past_the_deadline_cancels_the_call_and_is_a_504():
    response = _Response_fault_injecting(value="late", hang_s=5)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(call_within(response, time.perf_counter() + 0.05, "post"))
    assert response.cancelled


def test_a_cancel_that_meets_the_answer_is_a_cancel():
    # A job cancelled as its render's answer comes in: Python 3.11's wait_for returned the answer (cpython gh-86296).
    async def run():
        answer = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(call_within(answer, time.perf_counter() + 10, "generate:fast"))
        await asyncio.sleep(0)
        answer.set_result("rendered")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(run())


class _Handle_fault_injecting:
    """A tier's handle whose generate.remote(job) answers with a fault-injecting response."""

    def __init__(self, response):
        self.generate = self
        self.response = response

    def remote(self, job):
        return self.response


ATTEMPTS = [
    pytest.param(_Response_fault_injecting(NodeDiedError("gone")), "replica_died", id="replica_died"),
    pytest.param(_Response_fault_injecting(BackPressureError(num_queued_requests=1, max_queued_requests=1)),
                 "overloaded", id="backpressure"),
    pytest.param(_Response_fault_injecting(RuntimeError("boom")), "error", id="bug_in_the_call"),
    pytest.param(_Response_fault_injecting(value="late", hang_s=5), "deadline", id="attempt_timeout"),
]


@pytest.mark.parametrize("response,reason", ATTEMPTS)
def test_an_attempt_maps_each_failure_to_a_fallback_reason(response, reason):
    from graph.schemas import GenerateJob, RouteDecision

    decision = RouteDecision(route="r", tier="fast", rule="x", max_latency_ms=60_000, attempt_timeout_ms=100)
    got = asyncio.run(attempt(_Handle_fault_injecting(response), "fast", GenerateJob(prompt="p", seed=1), decision,
                              time.perf_counter() + 60))
    assert got.failure == reason and got.result is None and got.detail

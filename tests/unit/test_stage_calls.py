"""How the ingress maps what a call to a generator raises (deployments/calls.py call_within / attempt), and how the
chain walk over such calls moves on after a replica death (deployments/tiers.py).

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
    RayActorError,
    RaySystemError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.calls import ReplicaDied, attempt, call_within
from graph.errors import CapacityError, DeadlineExceeded, InvalidRequest, PrismError, StageFailed
from graph.schemas import GenerateResult


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


class _Tier_fault_injecting:
    """A tier's handle whose calls answer in turn from `responses` (a death first, then a render), counting them."""

    def __init__(self, *responses):
        self.generate, self.responses, self.calls = self, list(responses), 0

    def remote(self, job):
        self.calls += 1
        return self.responses.pop(0)


def _rendered() -> GenerateResult:
    return GenerateResult(pngs=[b"png"], model="m", model_version="1", steps=1, guidance=1.0, compute_s=0.1)


def _two_tiers(a, b, replicas_of_a: int = 1):
    """Admission over tiers a and b (1 slot a replica), the Tiers over their fault-injecting handles, and a route
    whose chain is [a, b]."""
    from deployments.tiers import Tiers
    from graph.admission import Admission
    from graph.schemas import RouteDecision

    adm = Admission({"a": 1, "b": 1})
    adm.set_running({"a": replicas_of_a, "b": 1})
    tiers = Tiers({"a": a, "b": b}, {"a": {"name": "A", "guidance": 3.0}, "b": {"name": "B", "guidance": 3.0}}, adm)
    return adm, tiers, RouteDecision(route="r", tier="a", rule="x", fallbacks=["b"], max_latency_ms=60_000)


async def _render_on(tiers, decision, ticket) -> tuple[str, list[str]]:
    """(the tier that answered, the fallback reasons on the way) of one render through Tiers.render."""
    from graph.schemas import GenerateJob, GenerationRequest
    from graph.trace import Trace

    trace = Trace(rid="r1", req=GenerationRequest(prompt="a red star"))
    _, tier = await tiers.render(GenerateJob(prompt="p", seed=1), decision, ticket, time.perf_counter() + 60, trace)
    return tier, [f.reason for f in trace.fallbacks]


@pytest.mark.parametrize("replicas,served_by,calls_on_a", [(1, "b", 1), (2, "a", 2)])
def test_a_death_on_a_tiers_last_replica_moves_the_render_on_and_one_with_a_replica_left_retries_there(
        replicas, served_by, calls_on_a):
    async def run():
        a = _Tier_fault_injecting(_Response_fault_injecting(RayActorError(actor_id="actor-1")),
                                  _Response_fault_injecting(value=_rendered()))
        b = _Tier_fault_injecting(_Response_fault_injecting(value=_rendered()))
        adm, tiers, decision = _two_tiers(a, b, replicas_of_a=replicas)
        tier, reasons = await _render_on(tiers, decision, await adm.admit(["a", "b"], "free"))
        return tier, a.calls, reasons, adm.snapshot()
    tier, calls, reasons, load = asyncio.run(run())
    assert (tier, calls, reasons) == (served_by, calls_on_a, ["replica_died"])
    assert load["a"]["used"] == 0 and load["b"]["used"] == 0  # every slot the render held is free again


def test_a_render_admitted_on_a_fallback_whose_last_replica_dies_is_served_by_the_routes_own_full_tier():
    async def run():
        a = _Tier_fault_injecting(_Response_fault_injecting(value=_rendered()))
        b = _Tier_fault_injecting(_Response_fault_injecting(RayActorError(actor_id="actor-b")))
        adm, tiers, decision = _two_tiers(a, b)
        holder = await adm.admit(["a"], "free")  # a is full: this request is admitted on its fallback b
        ticket = await adm.admit(["a", "b"], "free")
        assert ticket.tier == "b"
        tier, reasons = await _render_on(tiers, decision, ticket)
        adm.release(holder)
        return tier, (a.calls, b.calls), reasons, adm.snapshot()
    tier, calls, reasons, load = asyncio.run(run())
    assert (tier, calls, reasons) == ("a", (1, 1), ["replica_died"])
    assert load["a"]["used"] == 0 and load["b"]["used"] == 0

"""What a call to another deployment can end in, mapped to Prism's terms: Serve's overload and availability errors,
a replica (or its node, or the worker holding the result) dying mid-call, a stage deadline, any other Ray error."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray.exceptions import (
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from graph.errors import CapacityError, DeadlineExceeded, PrismError, StageFailed
from graph.schemas import GenerateJob, GenerateResult, RouteDecision

log = logging.getLogger("prism.calls")

# What a call sees when the replica holding it is gone: the actor died (RayActorError, ActorUnavailableError), its
# node died, the worker process crashed, or the result's owner went with it (ObjectLostError, OwnerDiedError).
REPLICA_LOST = (RayActorError, NodeDiedError, WorkerCrashedError, ObjectLostError, LocalRayletDiedError)


class ReplicaDied(Exception):
    """The replica holding the call died; Serve retries only calls not yet started (ray#47237), so the caller
    decides whether to run it again. Named by stage, not by whoever noticed (ray#61758)."""

    def __init__(self, stage: str, error: str, replica: str | None = None):
        super().__init__(f"{stage}: {error}")
        self.stage, self.error, self.replica = stage, error, replica  # replica: the dead actor's id, when Ray names it


@dataclass
class Attempt:
    """One model attempt on a tier, what the chain walk decides on: the failure reason (None: rendered), its detail,
    the replica's answer, and which replica died (a `replica_died` whose actor Ray named)."""

    failure: str | None
    detail: str = ""
    result: GenerateResult | None = None
    dead_replica: str | None = None


class AttemptTimeout(Exception):
    """A model attempt passed the route's attempt_timeout_ms while the request's deadline still holds."""


async def call_within(response, deadline: float | None, stage: str, attempt_deadline: float | None = None):
    """Await a downstream call within the deadline; map Serve's overload and availability errors."""
    limit = deadline if attempt_deadline is None else min(deadline, attempt_deadline)
    timeout = None if limit is None else limit - time.perf_counter()
    try:
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it drops a cancel that meets the answer
            return await response
    except TimeoutError:
        response.cancel()
        if attempt_deadline is not None and attempt_deadline < deadline:
            raise AttemptTimeout from None
        raise DeadlineExceeded(f"stage {stage} did not finish within the request's deadline") from None
    except BackPressureError:
        raise CapacityError(f"stage {stage} is at capacity (its queue is full)", retry_after_s=1) from None
    except DeploymentUnavailableError:
        raise CapacityError(f"stage {stage} has no replica available", retry_after_s=5) from None
    except REPLICA_LOST as e:
        raise ReplicaDied(stage, type(e).__name__, getattr(e, "actor_id", None)) from None
    except PrismError:  # a replica's own PrismError (Ray re-raises it as one) keeps its status
        raise
    except (RayServeException, RayError) as e:  # anything else Ray raises: a clean 502 naming the stage
        raise StageFailed(stage, f"stage {stage} failed: {type(e).__name__}") from None


class Streamed:
    """A streamed generator call (`generate_stream`) awaited like a plain one: its events go to `on_event` as they
    come, its last item is the result; cancelling it cancels the stream (the replica stops at its next step)."""

    def __init__(self, stream, on_event: Callable[[dict], None]):
        self.stream, self.on_event = stream, on_event

    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> GenerateResult:
        try:
            async for item in self.stream:
                if isinstance(item, GenerateResult):
                    return item
                self.on_event(item)
        except asyncio.CancelledError:  # a cancelled job: the replica must hear it (and stop at its next step)
            self.stream.cancel()
            raise
        raise StageFailed("generate", "the generator's stream ended without a result")

    def cancel(self) -> None:
        self.stream.cancel()


async def attempt(handle, tier: str, job: GenerateJob, decision: RouteDecision, deadline: float,
                  on_event: Callable[[dict], None] | None = None) -> Attempt:
    """One model attempt on a tier. With `on_event` (an async job) the call is streamed: each step and stage reaches
    it as it happens."""
    attempt_deadline = None
    if decision.attempt_timeout_ms:
        attempt_deadline = time.perf_counter() + decision.attempt_timeout_ms / 1000
    call = (handle.generate.remote(job) if on_event is None
            else Streamed(handle.options(stream=True).generate_stream.remote(job), on_event))
    try:
        result = await call_within(call, deadline, f"generate:{tier}", attempt_deadline=attempt_deadline)
    except AttemptTimeout:
        return Attempt("deadline", f"no answer within attempt_timeout_ms={decision.attempt_timeout_ms}")
    except ReplicaDied as e:
        return Attempt("replica_died", f"the {e.stage} replica died mid-render ({e.error})", dead_replica=e.replica)
    except CapacityError as e:
        return Attempt("overloaded", e.message)
    except DeadlineExceeded:
        raise
    except PrismError as e:
        return Attempt(e.code, e.message)
    except Exception as e:  # a replica crashed or the call failed: try the next model
        log.warning("tier %s failed: %r", tier, e)
        return Attempt("error", type(e).__name__)
    return Attempt(result.failure, result.detail, result)

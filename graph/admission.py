"""Admission at the door: can a tier of the route's chain take this request now, for this user tier?

The ingress decides this before any model work and answers a refusal at once (503 or 429 + Retry-After). Capacity
is what the generator replicas report (deployments/reports.py): live replicas x slots, a slot being one render a
replica runs at once without slowing the renders it holds past the policy's `max_slowdown`. Slots in use are this
ingress's own tickets, known exactly, plus what the replicas report holding for the other ingress replicas. A slot
taken is kept until the render is answered: admitted work is never shed for capacity later. Under saturation a slot
that frees goes first to the paid user tiers that may wait for one (`max_wait_ms`); free ones are refused at once.

Pure bookkeeping and decisions over plain data; the ingress feeds it reports and times (no Ray here).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from graph.errors import CapacityError

USER_TIERS = ("enterprise", "pro", "free")  # highest priority first
MAX_RETRY_AFTER_S = 60


class ClassPolicy(BaseModel):
    """How one user tier is admitted under saturation."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(default=1.0, gt=0, le=1, description="Share of a tier's slots this user tier may fill "
                                                              "(the rest is kept for higher tiers).")
    max_wait_ms: int = Field(default=0, ge=0, le=60_000, description="How long a request may wait at the door "
                                                                     "for a slot when its tiers are full.")


def _default_classes() -> dict[str, ClassPolicy]:
    # Paid tiers wait a little for the next free slot (and get it before anyone else); free never waits.
    return {"free": ClassPolicy(), "pro": ClassPolicy(max_wait_ms=2000), "enterprise": ClassPolicy(max_wait_ms=5000)}


class AdmissionPolicy(BaseModel):
    """The routing policy's `admission:` block (live-tunable with the rest of user_config)."""

    model_config = ConfigDict(extra="forbid")

    max_slowdown: float = Field(
        default=1.2, ge=1.0, le=20.0,
        description="An admitted render may take at most this many times its tier's unloaded time: it sets how "
                    "many renders a replica takes at once (its slots), from the tier's batch_efficiency.")
    max_total: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Renders admitted at once across all tiers: for tiers that share one machine's CPU (the embedded "
                    "default on 2 cores), where each tier's own slots would overcommit the cores.")
    # A request's route names its tier; when that tier is full, a faster-or-similar tier of its chain may take it,
    # but a much slower one would answer it several times slower than the route promises when idle: "within_slowdown"
    # admits on a fallback only when its service time is at most max_slowdown x the route tier's (unknown times, or a
    # route tier with no live replica: allowed), so accepted work stays near its unloaded latency and the rest is
    # refused at once; "any" admits on any tier of the chain that can meet the deadline (more accepted, slower).
    capacity_fallback: Literal["within_slowdown", "any"] = Field(
        default="within_slowdown",
        description="Which fallback tiers may take a request at the door when its route's tier is full.")
    classes: dict[str, ClassPolicy] = Field(default_factory=_default_classes)
    # A busy or just-started replica may miss a beat (a long call holding its GIL): 10 s of silence, 20 report
    # periods, before its slots stop counting. A replica that dies holding work is noticed at once (replica_died).
    report_stale_s: float = Field(default=10.0, gt=0, le=120, description="A replica silent this long is gone.")

    def of(self, user_tier: str) -> ClassPolicy:
        return self.classes.get(user_tier, ClassPolicy())


def slots_per_replica(batch_efficiency: float, max_batch_size: int, max_slowdown: float,
                      fixed: int | None = None) -> int:
    """Renders one replica takes at once: as many as fit in a batch whose time stays within `max_slowdown` x one
    render's (a batch of b costs 1 + batch_efficiency x (b - 1) renders' time), at least 1, at most the batch size.

    Example: batch_efficiency 0.35 (each extra image costs 35% of one), max_slowdown 1.2 -> 1 slot (a pair would
    take 1.35x); max_slowdown 2.0 -> 1 + floor(1.0 / 0.35) = 3 slots, if max_batch_size allows 3.
    """
    if fixed is not None:
        return fixed
    if batch_efficiency <= 0:  # a batch costs what one render does: fill it
        return max(1, max_batch_size)
    return max(1, min(max_batch_size, 1 + math.floor((max_slowdown - 1.0) / batch_efficiency + 1e-9)))


HOSTED_CONCURRENCY = 8  # a hosted tier's calls only wait on the network: this many at once per replica by default


def tier_slots(spec: dict, max_slowdown: float) -> int:
    """Slots per replica of a tier (a ModelSpec as a dict): its `max_concurrency` when set; a hosted API's calls run
    side by side (HOSTED_CONCURRENCY); a model's from its batch efficiency and the latency target."""
    from engines.generators import REMOTE_KINDS

    if spec.get("max_concurrency"):
        return int(spec["max_concurrency"])
    if spec.get("kind") in REMOTE_KINDS:
        return HOSTED_CONCURRENCY
    return slots_per_replica(spec.get("batch_efficiency", 0.6), spec.get("max_batch_size", 1), max_slowdown)


def class_limit(capacity: int, share: float) -> int:
    """Slots a user tier may fill: its share of the capacity, never less than one while there is any capacity
    (a 1-slot tier serves every class when idle). Example: 4 slots, share 0.5 -> 2; 1 slot, share 0.5 -> 1."""
    return 0 if capacity <= 0 else max(1, math.floor(capacity * share + 1e-9))


def others_inflight(reports: list[ReplicaReport], me: str) -> int:
    """Renders the replicas hold for other ingress replicas: their reports count work by caller, so this ingress's
    own (which it knows exactly, with no report's lag) is left out.

    Example: two replicas report {me: 2, other: 1} and {other: 2}: 3 held for others."""
    return sum(r.inflight - r.by_caller.get(me, 0) for r in reports)


def retry_after_s(seconds_until_free: float) -> int:
    """Whole seconds a refused client should wait (1..60)."""
    return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds_until_free))))


@dataclass
class ReplicaReport:
    """What a generator replica says about itself (deployments/reports.py writes one every half second)."""

    replica: str
    inflight: int
    service_s: float | None
    ts: float
    by_caller: dict[str, int] = field(default_factory=dict)  # ingress replica id -> renders held for it


class DoorPass:
    """A request past the door and not yet admitted or refused: it holds a claim on the free slots the door counts."""

    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission

    def close(self) -> None:
        """Idempotent: admission decided, or the request ended before it got there."""
        if self._admission is not None:
            self._admission.pending -= 1
            self._admission = None


@dataclass
class Ticket:
    """A slot held on a tier by one request, from admission until its render is answered."""

    tier: str
    user_tier: str
    started: float = field(default_factory=time.monotonic)
    waited_ms: float = 0.0
    forced: bool = False  # taken beyond capacity: a fallback of admitted work (never refused)


@dataclass
class TierState:
    """The ingress's view of one tier."""

    slots: int  # per replica
    replicas: int = 1  # until Serve's controller or the first report says
    running: int | None = None  # replicas Serve's controller has RUNNING (None: not asked yet)
    others: int = 0  # renders the replicas hold for other ingress replicas (their reports)
    reported_service_s: float | None = None
    local: list[Ticket] = field(default_factory=list)
    deaths: list[float] = field(default_factory=list)  # monotonic times this ingress saw a replica die
    dead: dict[str, float] = field(default_factory=dict)  # replicas seen dead here -> when (set_running keeps them)
    service_s: float | None = None  # EWMA of answered renders, measured here

    def capacity(self, now: float, stale_s: float) -> int:
        recent_deaths = sum(1 for t in self.deaths if now - t < stale_s)
        return max(0, self.replicas - recent_deaths) * self.slots

    def used(self) -> int:
        """Slots in use: this ingress's own tickets (exact) and what the replicas report holding for the others."""
        return len(self.local) + self.others

    def service_time(self) -> float | None:
        """Seconds a render takes here: measured by this ingress, else as the replicas report, else unknown."""
        return self.service_s or self.reported_service_s

    def seconds_until_free(self, now: float) -> float:
        """When the oldest render this ingress holds here should be done (service time from its start)."""
        service = self.service_s or self.reported_service_s or 1.0
        if not self.local:
            return service
        return max(0.0, min(t.started for t in self.local) + service - now)


class Admission:
    """Slots per tier, the waiting room for paid user tiers, and the decision to admit, wait or refuse."""

    def __init__(self, slots: dict[str, int], policy: AdmissionPolicy | None = None, status: int = 503,
                 me: str = ""):
        self.policy = policy or AdmissionPolicy()
        self.status, self.me = status, me  # me: this ingress replica's id, as the generators' reports name it
        self.tiers = {t: TierState(slots=n) for t, n in slots.items()}
        self.pending = 0  # requests past the door, not yet admitted or refused (DoorPass)
        self._waiting: dict[str, list] = {t: [] for t in slots}
        self._order = itertools.count()

    # ---- what the ingress learns -------------------------------------------------------------------

    def set_slots(self, slots: dict[str, int]) -> None:
        for tier, n in slots.items():
            self.tiers[tier].slots = n
        self._wake_all()

    def update(self, tier: str, reports: list[ReplicaReport], now_wall: float | None = None) -> None:
        """The replicas' latest reports for a tier (stale ones are dropped: the replica is gone)."""
        now_wall = time.time() if now_wall is None else now_wall
        live = [r for r in reports if now_wall - r.ts < self.policy.report_stale_s]
        st = self.tiers[tier]
        # Liveness from Serve's controller when known (a busy replica may miss a report), else from the reports.
        st.replicas = st.running if st.running is not None else len(live)
        st.others = max(0, others_inflight(live, self.me))
        times = [r.service_s for r in live if r.service_s]
        st.reported_service_s = sum(times) / len(times) if times else st.reported_service_s
        self._wake(tier)

    def set_running(self, running: dict[str, int]) -> None:
        """Replicas per tier that Serve's controller has RUNNING (health-checked, alive): the tiers' capacity."""
        for tier, n in running.items():
            st = self.tiers.get(tier)
            if st is None:
                continue
            if st.running is not None and n < st.running:  # the controller now counts the deaths seen here
                del st.deaths[:st.running - n]
            st.running = st.replicas = n
        self._wake_all()

    def running(self) -> dict[str, int | None]:
        """Replicas Serve's controller has RUNNING per tier (None: not heard yet)."""
        return {t: st.running for t, st in self.tiers.items()}

    def alive(self, tier: str) -> bool:
        """Has the tier a replica left that this ingress has not just seen die?"""
        return self.tiers[tier].capacity(time.monotonic(), self.policy.report_stale_s) > 0

    def replica_died(self, tier: str, replica: str | None = None) -> None:
        """A call saw its replica die: its slots are gone now, before any report says so. A replica that held several
        calls dies once (when Ray names it): counted per call, one death took a 2-replica tier's whole capacity."""
        now, st = time.monotonic(), self.tiers[tier]
        if replica is not None:
            # Apart from `deaths`, which set_running trims as the controller catches up: a late call on the same
            # dead replica must not count it again after that. Ids are never reused; 10x report_stale_s outlasts any
            # call that was in flight on it.
            st.dead = {r: t for r, t in st.dead.items() if now - t < 10 * self.policy.report_stale_s}
            if replica in st.dead:
                return
            st.dead[replica] = now
        st.deaths.append(now)

    # ---- decisions ---------------------------------------------------------------------------------

    def has_room(self, tier: str, user_tier: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        st = self.tiers[tier]
        cap = st.capacity(now, self.policy.report_stale_s)
        share = self.policy.of(user_tier).share
        if self.policy.max_total is not None:
            total = sum(s.used() for s in self.tiers.values())
            if total >= class_limit(self.policy.max_total, share):
                return False
        return st.used() < class_limit(cap, share)

    def free_slots(self, tiers: set[str], user_tier: str, now: float | None = None) -> int:
        """Slots this user tier may still take on any of these tiers (and under max_total)."""
        now = time.monotonic() if now is None else now
        share = self.policy.of(user_tier).share
        free = 0
        for t in tiers:
            st = self.tiers.get(t)
            if st is not None:
                free += max(0, class_limit(st.capacity(now, self.policy.report_stale_s), share) - st.used())
        if self.policy.max_total is not None:
            total = sum(s.used() for s in self.tiers.values())
            free = min(free, max(0, class_limit(self.policy.max_total, share) - total))
        return free

    def door_check(self, tiers: set[str], user_tier: str) -> DoorPass:
        """Before the request costs anything (no classifier, no store): refuse when the free slots of every tier it
        could be routed to are already spoken for by requests past the door and not yet admitted, and its user tier
        may not wait. Counting those keeps a flood that arrives at once out of the classifier: without it, all of it
        passes the door before the first is admitted. The pass is closed when admission decides (or the request
        ends)."""
        if self.policy.of(user_tier).max_wait_ms <= 0 and self.free_slots(tiers, user_tier) <= self.pending:
            raise self._refusal(sorted(tiers), user_tier, "every tier this request could use is full")
        self.pending += 1
        return DoorPass(self)

    async def admit(self, chain: list[str], user_tier: str, deadline_s: float | None = None) -> Ticket:
        """A slot on the first tier of the chain with room (a service time within the deadline and, past the route's
        own tier, near its time: capacity_fallback), or on the first usable tier after a bounded wait (paid tiers),
        or CapacityError (503/429 + Retry-After) at once."""
        now = time.monotonic()
        usable = [t for t in chain if t in self.tiers and self._in_time(t, deadline_s) and self._near(t, chain[0], now)]
        for tier in usable:
            if self.has_room(tier, user_tier, now):
                return self._take(tier, user_tier)
        wait_ms = self.policy.of(user_tier).max_wait_ms
        if wait_ms and usable:
            limit = wait_ms / 1000 if deadline_s is None else min(wait_ms / 1000, deadline_s)
            ticket = await self._wait(usable[0], user_tier, limit)
            if ticket is not None:
                return ticket
        raise self._refusal(usable or chain, user_tier, "every model on the route is at capacity")

    def force(self, tier: str, user_tier: str) -> Ticket:
        """A slot for a fallback attempt of admitted work: taken even past capacity (never refused)."""
        return self._take(tier, user_tier, forced=True)

    def release(self, ticket: Ticket, service_s: float | None = None, alpha: float = 0.2) -> None:
        """The render holding this ticket was answered (or failed); `service_s` feeds the tier's EWMA."""
        st = self.tiers[ticket.tier]
        if ticket in st.local:
            st.local.remove(ticket)
        if service_s is not None:
            st.service_s = service_s if st.service_s is None else (1 - alpha) * st.service_s + alpha * service_s
        self._wake(ticket.tier)

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {t: {"replicas": st.replicas, "slots_per_replica": st.slots,
                    "capacity": st.capacity(now, self.policy.report_stale_s), "used": st.used(),
                    "held_here": len(st.local), "held_for_others": st.others,
                    "waiting": sum(1 for w in self._waiting[t] if not w[3].done()),
                    "service_ms": None if st.service_s is None else round(st.service_s * 1000, 1)}
                for t, st in self.tiers.items()}

    # ---- internals ---------------------------------------------------------------------------------

    def _near(self, tier: str, own: str, now: float) -> bool:
        """May `tier` take a request whose route names `own` (capacity_fallback)? Only a full tier is held to it: when
        the route's tier has no live replica at all, a slower answer beats none."""
        if tier == own or self.policy.capacity_fallback == "any" or own not in self.tiers:
            return True
        if self.tiers[own].capacity(now, self.policy.report_stale_s) == 0:
            return True
        mine, theirs = self.tiers[own].service_time(), self.tiers[tier].service_time()
        return mine is None or theirs is None or theirs <= self.policy.max_slowdown * mine

    def _in_time(self, tier: str, deadline_s: float | None) -> bool:
        service = self.tiers[tier].service_s
        return deadline_s is None or service is None or service <= deadline_s

    def _take(self, tier: str, user_tier: str, forced: bool = False) -> Ticket:
        ticket = Ticket(tier=tier, user_tier=user_tier, forced=forced)
        self.tiers[tier].local.append(ticket)
        return ticket

    async def _wait(self, tier: str, user_tier: str, limit_s: float) -> Ticket | None:
        fut = asyncio.get_running_loop().create_future()
        rank = USER_TIERS.index(user_tier) if user_tier in USER_TIERS else len(USER_TIERS)
        t0 = time.monotonic()
        heapq.heappush(self._waiting[tier], (rank, next(self._order), user_tier, fut))
        try:
            async with asyncio.timeout(limit_s):  # not wait_for: on 3.11 a cancel that meets the grant is dropped
                ticket = await asyncio.shield(fut)
        except (TimeoutError, asyncio.CancelledError) as e:
            # Out of time, or the waiter itself went away (a cancelled job, a client gone): the shielded future would
            # stay in the heap and be granted a slot nobody releases. Take it out; a slot granted just now goes back.
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            fut.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            return None
        ticket.waited_ms = round((time.monotonic() - t0) * 1000, 1)
        return ticket

    def _wake(self, tier: str) -> None:
        """Hand free slots to the waiting paid requests, highest user tier first, then oldest."""
        heap = self._waiting[tier]
        while heap:
            _, _, user_tier, fut = heap[0]
            if fut.done():
                heapq.heappop(heap)
                continue
            if not self.has_room(tier, user_tier):
                return
            heapq.heappop(heap)
            fut.set_result(self._take(tier, user_tier))

    def _wake_all(self) -> None:
        for tier in self.tiers:
            self._wake(tier)

    def _refusal(self, tiers: list[str], user_tier: str, why: str) -> CapacityError:
        now = time.monotonic()
        parts = []
        for t in tiers:
            st = self.tiers.get(t)
            if st is not None:
                cap = st.capacity(now, self.policy.report_stale_s)
                parts.append(f"{t}: {st.used()} of {cap} slots in use, {user_tier!r} may use "
                             f"{class_limit(cap, self.policy.of(user_tier).share)}")
        known = [t for t in tiers if t in self.tiers]
        if known and all(self.tiers[t].replicas == 0 for t in known):  # not full: nothing is up to fill yet
            why = "no replica of the tiers this request could use is running yet (starting, scaled to zero or lost)"
        wait = min((self.tiers[t].seconds_until_free(now) for t in known), default=1.0)
        err = CapacityError(f"{why} for user tier {user_tier!r} ({'; '.join(parts)}); retry later",
                            retry_after_s=retry_after_s(wait),
                            details=[{"reason": "capacity", "user_tier": user_tier, "tiers": tiers}])
        err.status_code = self.status
        return err

"""Generator replicas report their load; ingress replicas read every report. Admission (graph/admission.py) decides
on the whole application's view this gives: live replicas per tier, the renders each holds, its service time.

The reports live in Ray's GCS key-value store (the store Serve keeps its own checkpoints in), one key per replica,
rewritten every REPORT_PERIOD_S by a thread in the replica and read by a thread in each ingress. A replica that
dies stops writing: its report goes stale and its slots stop counting. No extra deployment, no hop on a request's
path. `ray.experimental.internal_kv` is Ray's internal API, pinned with Ray 2.60 in requirements.txt.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from graph.admission import ReplicaReport

log = logging.getLogger("prism.reports")

NAMESPACE = "prism-load"
REPORT_PERIOD_S = 0.5
FORGET_AFTER_S = 300  # reports this old (replicas long gone) are deleted by the readers


def _key(app: str, tier: str, replica: str) -> str:
    return f"{app}/{tier}/{replica}"


class LoadReporter:
    """A daemon thread in a generator replica: writes {inflight, by_caller, service_s, ts} every REPORT_PERIOD_S."""

    def __init__(self, app: str, tier: str, replica: str, state: Callable[[], tuple[int, float | None, dict]],
                 period_s: float = REPORT_PERIOD_S):
        self.key = _key(app, tier, replica).encode()
        self.replica, self.state, self.period_s = replica, state, period_s
        self._stop = threading.Event()
        try:
            self.write()  # at once: a replica is visible to admission as soon as it is up
        except Exception as e:
            log.debug("first load report not written: %r", e)
        self._thread = threading.Thread(target=self._run, name=f"load-report-{tier}", daemon=True)
        self._thread.start()

    def write(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        inflight, service_s, by_caller = self.state()
        body = {"replica": self.replica, "inflight": inflight, "by_caller": by_caller, "service_s": service_s,
                "ts": time.time()}
        _internal_kv_put(self.key, json.dumps(body).encode(), overwrite=True, namespace=NAMESPACE)

    def stop(self) -> None:
        """Graceful shutdown: stop writing and take the report down, so the slots stop counting at once."""
        from ray.experimental.internal_kv import _internal_kv_del

        self._stop.set()
        try:
            _internal_kv_del(self.key, namespace=NAMESPACE)
        except Exception as e:  # the GCS may be going down with the cluster
            log.debug("load report not deleted: %r", e)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.write()
            except Exception as e:  # a GCS hiccup: the next period tries again; stale reports only under-admit
                log.debug("load report not written: %r", e)
            self._stop.wait(self.period_s)


def read_reports(app: str) -> dict[str, list[ReplicaReport]]:
    """Every replica's latest report for this app, by tier (readers drop the long-dead ones from the store)."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list

    out: dict[str, list[ReplicaReport]] = {}
    now = time.time()
    for key in _internal_kv_list(f"{app}/".encode(), namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:
            continue
        body = json.loads(raw)
        if now - body["ts"] > FORGET_AFTER_S:
            _internal_kv_del(key, namespace=NAMESPACE)
            continue
        tier = key.decode().split("/")[1]
        out.setdefault(tier, []).append(ReplicaReport(replica=body["replica"], inflight=int(body["inflight"]),
                                                      service_s=body.get("service_s"), ts=float(body["ts"]),
                                                      by_caller=body.get("by_caller") or {}))
    return out


def running_replicas(app: str) -> dict[str, int]:
    """Generator replicas per tier that Serve's controller has RUNNING (what it health-checks and routes to).

    The controller's details as the plain dict it sends, not `serve.status()`: that builds pydantic models of every
    deployment's config, cloudpickling each request router class on the way, 44 ms of this process's CPU (and GIL)
    a call against 0.9 ms for the dict (benchmarks/RESULTS.md), and the ingress asks every second. The client is
    Serve's internal API (`serve.status()` calls the same method), pinned with Ray 2.60 in requirements.txt."""
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][app]["deployments"]
    return {name.removeprefix("Generator_"): sum(1 for r in d.get("replicas", []) if r.get("state") == "RUNNING")
            for name, d in deployments.items() if name.startswith("Generator_")}


class ReportPoller:
    """An ingress's reader: every half report period, every replica's report goes to admission, and every
    second the controller's count of running replicas (started lazily, from the first request, on the replica's
    event loop)."""

    def __init__(self, admission, tiers: list[str]):
        self.admission, self.tiers = admission, tiers
        self._task = None

    def start(self) -> None:
        import asyncio

        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        import asyncio

        from ray import serve

        app = serve.get_replica_context().app_name
        rounds = 0
        while True:
            try:
                if rounds % 4 == 0:  # every second
                    self.admission.set_running(await asyncio.to_thread(running_replicas, app))
                reports = await asyncio.to_thread(read_reports, app)
                for tier in self.tiers:
                    self.admission.update(tier, reports.get(tier, []))
            except Exception as e:  # the controller or the GCS may be restarting: keep the last view, try again
                log.debug("load reports not read: %r", e)
            rounds += 1
            await asyncio.sleep(REPORT_PERIOD_S / 2)

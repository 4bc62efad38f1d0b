"""Fractional GPUs on logical GPUs (ray.init(num_gpus=2) on this CPU machine): replicas with num_gpus 0.25
really pack onto one GPU as the planner predicts, and the app serves (models run on CPU without CUDA)."""

import ray

from graph.placement import NodeShape, demands_from_app, plan
from tests.integration.conftest import GPU_TIERS


def test_quarter_gpu_replicas_pack_on_one_gpu_and_serve(deployer, http):
    tiers = http.get("/faults/v1/tiers").json()
    placed = {t: tiers[t]["gpu_ids"] for t in GPU_TIERS}
    assert all(len(ids) == 1 for ids in placed.values()), placed
    assert len({ids[0] for ids in placed.values()}) == 1, f"not packed on one GPU: {placed}"
    assert tiers["ok"]["device"] == "cpu"  # CUDA is absent: the model runs on CPU
    assert ray.cluster_resources()["GPU"] == 2
    assert ray.available_resources().get("GPU", 0) == 2 - 0.25 * len(GPU_TIERS)

    faults_app = next(a for a in deployer.base_config["applications"] if a["name"] == "faults")
    p = plan(demands_from_app(faults_app), NodeShape(gpus_per_node=2, gpu_memory_gb=80))
    assert p.ok and [len(g.replicas) for g in p.gpus if g.replicas] == [len(GPU_TIERS)]

    r = http.post("/faults/v1/images/generations", json={"prompt": "a red star", "model": "ok", "size": "64x64"})
    assert r.status_code == 200 and r.json()["prism"]["tier"] == "ok"

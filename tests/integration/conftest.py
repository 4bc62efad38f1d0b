"""One Ray + Serve instance for the whole integration session, deployed from the real serve_config.yaml.

The app is deployed exactly as `serve run serve_config.yaml` / `serve deploy` do it (a ServeDeploySchema
handed to the Serve controller), so the YAML's args, deployment options and routing user_config are tested.
"""

import copy
import os
import time

import httpx
import pytest

from graph.config import ROOT, load_serve_config

PORT = int(os.environ.get("PRISM_TEST_PORT", "18000"))
APP = "prism"


class Deployer:
    """Deploys (and redeploys) a serve config into the running test cluster."""

    def __init__(self, client, base_config: dict):
        self.client = client
        self.base_config = base_config

    def deploy(self, config: dict, timeout_s: float = 300) -> None:
        from ray import serve
        from ray.serve.schema import ServeDeploySchema

        self.client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status == "DEPLOY_FAILED":
                pytest.fail(f"deploy failed: {status.message}")
            time.sleep(0.5)
        pytest.fail(f"app not RUNNING after {timeout_s}s: {serve.status()}")

    def config_copy(self) -> dict:
        return copy.deepcopy(self.base_config)


@pytest.fixture(scope="session")
def deployer():
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api

    config = load_serve_config(ROOT / "serve_config.yaml")
    config["http_options"]["port"] = PORT
    ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        client = serve_api.serve_start(http_options=config["http_options"], proxy_location=config["proxy_location"])
        d = Deployer(client, config)
        d.deploy(config)
        yield d
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def base_url(deployer) -> str:
    return f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c

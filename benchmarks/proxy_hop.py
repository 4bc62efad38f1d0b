"""What the Serve proxy's hop costs on this machine: a plain deployment, requests one after another, through the
proxy and straight to the replica's own (direct-ingress) HTTP port. Each arm is its own Ray instance, since Serve
reads these switches from the environment when it starts:

    .venv/bin/python -m benchmarks.proxy_hop

Results in benchmarks/RESULTS.md ("MiniLM on ONNX Runtime").
"""

import os
import statistics
import subprocess
import sys

PORT = 18123
ARMS = {
    "default": {},
    "user code and router on the event loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                               "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
    "direct ingress on": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "18200",
                          "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "18210"},
}


def arm(name: str) -> None:
    import ray
    from ray import serve
    from starlette.responses import Response

    from benchmarks.serving import pct, sequential

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Plain:
        async def __call__(self, request):
            await request.body()
            return Response(b'{"ok":true}', media_type="application/json")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(Plain.bind(), name="plain", route_prefix="/plain")
        body = {"prompt": "flat minimal app icon of a rocket", "size": "64x64"}
        ports = {"proxy": PORT}
        if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":
            ports["replica's own port"] = int(os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"])
        for where, port in ports.items():
            lat = sequential("/plain", body, 300, port=port)[50:]  # the first 50 warm up
            print(f"  {name}, {where}: p50 {statistics.median(lat):.2f} ms p95 {pct(lat, 95):.2f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--arm":
        arm(sys.argv[2])
        return 0
    print("the Serve proxy's hop: a plain deployment, 250 sequential requests (after 50 to warm up), lean client")
    for name, env in ARMS.items():
        subprocess.run([sys.executable, "-m", "benchmarks.proxy_hop", "--arm", name], env={**os.environ, **env},
                       check=True, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""As a user runs it: `serve run serve_config.yaml`, then the README's curl and OpenAI-SDK examples."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CURL_BODY = '{"prompt":"a poster that says \\"GRAND OPENING\\"","size":"256x256"}'


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`serve run` of serve_config.yaml as a user runs it, on a free port instead of 8000 (a user's own `make serve`
    may hold 8000) and always on a new Ray instance of its own (`--address local`), never the user's."""
    import yaml

    from tests.isolation import free_port, kill_pids, pids_using

    port = free_port(18100)
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port  # the only change to the shipped profile
    profile = tmp_path_factory.mktemp("profile") / "serve_config.yaml"
    profile.write_text(yaml.safe_dump(config, sort_keys=False))
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    serve_bin = Path(sys.executable).parent / "serve"
    env = {**os.environ, "PRISM_RECORDS_DIR": str(tmp_path_factory.mktemp("records"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(serve_bin), "run", "--address", "local", str(profile)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve run exited early:\n{log.read_text()[-3000:]}"
            try:
                # /healthz is ready once every tier runs a replica (before, a poster may render on a fallback tier:
                # CI saw the README's curl answered by `standard`); then a render answers.
                health = httpx.get(f"{base}/healthz", timeout=5)
                if health.status_code == 200 and health.json()["ready"] and \
                        httpx.post(f"{base}/v1/images/generations", json={"prompt": "an app icon", "size": "64x64"},
                                   timeout=60).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"serve run not answering after 240 s:\n{log.read_text()[-3000:]}")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)  # serve run ignores SIGINT in the background; SIGTERM stops it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # only then: its Ray processes, found by this session's own Ray dir
            proc.kill()
            kill_pids(pids_using(os.environ["RAY_TMPDIR"]))


def test_readme_curl_returns_typography_png(served):
    out = subprocess.run(["curl", "-s", f"{served}/v1/images/generations", "-H", "content-type: application/json",
                          "-d", CURL_BODY], capture_output=True, timeout=180, check=True)
    body = json.loads(out.stdout)
    assert "prism" in body and body["prism"]["tier"] == "typography", body
    assert body["prism"]["intent"]["text_to_render"] == "GRAND OPENING"
    img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert img.format == "PNG" and img.size == (256, 256)


def test_readme_openai_sdk_example(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served}/v1", api_key="unused")
    result = client.images.generate(prompt="a teal to purple gradient background", size="512x512",
                                    response_format="b64_json")
    img = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert img.size == (512, 512)
    assert result.model_extra["prism"]["route"] == "fast"


def test_a_red_star_on_a_blue_background_comes_back_as_a_red_star_on_blue(served):
    """The built-in models draw what was asked: the project's checker (engines/shapes.py, no learned part) reads
    the served PNG as a red star, not a red blob, on a blue background, for every seed."""
    import numpy as np

    from engines import shapes

    scene = shapes.Scene("solid", ("blue",), shape="star", color="red")
    reads = []
    for seed in (1, 2, 3, 4):
        r = httpx.post(f"{served}/v1/images/generations", timeout=120,
                       json={"prompt": "a red star on a blue background", "size": "512x512", "seed": seed})
        assert r.status_code == 200, r.text
        body = r.json()
        assert any("demo model" in n for n in body["prism"]["notes"]), body["prism"]["notes"]
        img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB")
        reads.append(shapes.check(np.asarray(img.resize((64, 64), Image.BOX)), scene) | {"tier": body["prism"]["tier"]})
    assert all(r["bg_ok"] and r["color_ok"] and r["shape_ok"] for r in reads), reads

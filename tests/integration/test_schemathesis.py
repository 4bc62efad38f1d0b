"""Schemathesis against the served app's OpenAPI spec: generated requests, valid and invalid, find no 5xx.

Runs on the /faults app (same API, same ingress code; its default route is a real built-in model and its
typography stage accepts any OCR read). A fixed budget, seeded and deterministic: the examples in the spec, the
coverage phase's boundary cases, and 8 generated requests per operation.
"""

import subprocess
import sys
from pathlib import Path


def test_no_server_errors_on_generated_requests(base_url, http):
    st = Path(sys.executable).parent / "schemathesis"
    out = subprocess.run(
        [str(st), "run", f"{base_url}/faults/openapi.json", "--url", f"{base_url}/faults",
         "--checks", "not_a_server_error", "--max-examples", "8", "--seed", "1", "--generation-deterministic",
         "--request-timeout", "60", "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, timeout=600)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert "No issues found" in tail or "passed" in tail.lower(), tail

"""The HTTP edge without Ray: error shapes and messages (FastAPI in-process)."""

import pytest
from fastapi.testclient import TestClient

from graph.errors import CapacityError, GenerationFailed
from graph.http import make_app
from graph.schemas import GenerationRequest


@pytest.fixture(scope="module")
def client():
    app = make_app(max_body_bytes=8192)

    @app.post("/echo")
    async def echo(req: GenerationRequest):
        if req.prompt == "full":
            raise CapacityError("queue full", retry_after_s=3)
        if req.prompt == "garbage":
            raise GenerationFailed("every model failed")
        if req.prompt == "bug":
            raise RuntimeError("secret internal detail")
        return {"ok": True}

    return TestClient(app, raise_server_exceptions=False)


CASES = [
    pytest.param({"prompt": "x" * 5000}, 422, "prompt", "at most 4000", id="long_prompt"),
    pytest.param({"prompt": "x", "size": "300x300"}, 422, "size", "multiple of 64", id="size"),
    pytest.param({"prompt": "x", "n": 9}, 422, "n", "less than or equal to 4", id="n"),
    pytest.param({"prompt": "x", "n": "two"}, 422, "n", "valid integer", id="wrong_type"),
    pytest.param({}, 422, "prompt", "required", id="missing"),
]


@pytest.mark.parametrize("body,status,param,fragment", CASES)
def test_validation_errors_name_field_and_range(client, body, status, param, fragment):
    r = client.post("/echo", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"]
    assert err["request_id"] == r.headers["x-request-id"]


def test_malformed_json_is_422(client):
    r = client.post("/echo", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]


def test_body_over_limit_is_413_before_parsing(client):
    r = client.post("/echo", json={"prompt": "x" * 9000})
    assert r.status_code == 413 and "limit is 8192" in r.json()["error"]["message"]


def test_capacity_is_503_with_retry_after(client):
    r = client.post("/echo", json={"prompt": "full"})
    assert r.status_code == 503 and r.headers["retry-after"] == "3"


def test_generation_failure_is_502(client):
    assert client.post("/echo", json={"prompt": "garbage"}).status_code == 502


def test_unexpected_error_is_500_without_details(client):
    r = client.post("/echo", json={"prompt": "bug"}, headers={"x-request-id": "abc-123"})
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text
    assert r.json()["error"]["request_id"] == "abc-123" == r.headers["x-request-id"]
